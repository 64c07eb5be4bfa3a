"""Does `genealign explain` find the genes the generator planted? The issue-14 measurement.

    python benchmarks/explain_planted.py --work /tmp/explain_bench [--subjects 3000] [--repeats 5]

synth a cohort (111 genes) -> ingest (the demo's split fractions) -> train the sequence model with
the demo's preset (`DemoConfig.sequence_model` / `sequence_train`) -> explain on the test split, then
prints how many of the truth's planted genes (causal genes + interaction pair) are in explain's top
14 and the wall time of each step. Finished steps are reused when WORK already holds them.

An analysis, not a speed benchmark: `make bench` does not run it. About 10-20 minutes on 2 CPU cores
for 3,000 subjects (training and explain each take several minutes).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from alignment.demo import DemoConfig  # noqa: E402
from alignment.explain import ExplainConfig, explain  # noqa: E402
from alignment.settings import fit_batch  # noqa: E402
from alignment.train import TrainConfig, train  # noqa: E402
from pipeline import open_store  # noqa: E402
from pipeline.ingest import IngestConfig, ingest  # noqa: E402
from pipeline.synth import SynthConfig, synthesize  # noqa: E402

TOP = 14


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--subjects", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    demo = DemoConfig()
    cohort, store, run, out = args.work / "cohort", args.work / "cohort.zarr", args.work / "sequence", args.work / "explain"
    seconds = {}
    started = time.perf_counter()
    if not (cohort / "truth.json").exists():
        synthesize(SynthConfig(out_dir=cohort, subjects=args.subjects, genes=demo.genes, seed=demo.seed))
    ingest(IngestConfig(gene_embedding_dir=cohort / "gene_embeddings", brain_latent_dir=cohort / "brain_latent",
                        store=store, workers=2, split_fractions=tuple(demo.split_fractions)))
    seconds["synth + ingest"] = time.perf_counter() - started
    started = time.perf_counter()
    if not (run / "best_model.pt").exists():
        tcfg = TrainConfig(store=str(store), output_dir=str(run), mode="sequence", device=args.device, save_every=0,
                           overwrite=True, **demo.sequence_train)
        tcfg, _ = fit_batch(tcfg, len(open_store(store).indices("train")), explicit=False)
        train(tcfg, replace(demo.sequence_model, mode="sequence"))
    seconds["train"] = time.perf_counter() - started
    started = time.perf_counter()
    result = explain(ExplainConfig(checkpoint=run / "best_model.pt", store=store, split="test", output_dir=out,
                                   repeats=args.repeats, device=args.device, overwrite=True))
    seconds["explain"] = time.perf_counter() - started
    found = result.planted_in_top(TOP)
    print(f"test split: {result.n_subjects:,} subjects; MRR {result.mrr:.4f} (chance {result.chance_mrr:.4f})")
    print(f"planted genes: {len(result.planted or [])}; in explain's top {TOP}: {len(found)} ({', '.join(found)})")
    print("precision: " + ", ".join(f"top {k} {p:.2f}" for k, p in (result.precision or {}).items()))
    print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))
    print(f"report: {result.report}")


if __name__ == "__main__":
    main()
