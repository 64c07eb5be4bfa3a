"""How much relatives split across train and test inflate the test figure (issue #13's leak check).

    python benchmarks/relatedness_leak.py --subjects 8000 --families 0.6

One `genealign synth --families F` cohort, ingested twice: split by a hash of the IID (relatives
may sit across splits) and with `--kinship` (whole families in one split). On each, the demo's
sequence model (the cpu-small preset) is trained and evaluated on its test split with the
baselines; the script prints, per split, the related pairs across splits and the test top-1 (pool
1,000, both directions, chance 0.001) of the model and of the strongest baseline (best on val), with
95% intervals. The two test splits hold different subjects, so a difference inside the intervals is
no leak. An analysis, not a speed benchmark: about 10 minutes on 2 CPU cores at 8,000 subjects.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from alignment.evaluate import EvalConfig, evaluate  # noqa: E402
from alignment.model import ModelConfig  # noqa: E402
from alignment.report import method_row  # noqa: E402
from alignment.settings import fit_batch, preset_values  # noqa: E402
from alignment.train import TrainConfig, train  # noqa: E402
from pipeline import open_store  # noqa: E402
from pipeline.ingest import IngestConfig, ingest  # noqa: E402
from pipeline.synth import SynthConfig, synthesize  # noqa: E402

SPLIT = (0.7, 0.1, 0.2)  # the demo's: >= 1,000 test subjects


def run(cohort, store: Path, out: Path, kinship: bool, seed: int) -> dict:
    ingest(IngestConfig(cohort.gene_embedding_dir, cohort.brain_latent_dir, store, workers=2, split_fractions=SPLIT,
                        kinship=cohort.out_dir / "kinship.dat" if kinship else None, overwrite=True))
    view = open_store(store)
    model_values, train_values = preset_values("cpu-small", "sequence")
    tcfg = TrainConfig(store=str(store), output_dir=str(out / "sequence"), mode="sequence", save_every=0,
                       overwrite=True, seed=seed, **train_values)
    tcfg, _ = fit_batch(tcfg, len(view.indices("train")), explicit=False)
    train(tcfg, ModelConfig(mode="sequence", **model_values))
    result = evaluate(EvalConfig(checkpoint=out / "sequence" / "best_model.pt", store=store, split="test",
                                 pool_sizes=("1000",), permutations=200, output_dir=out / "eval", overwrite=True))
    metrics = result.metrics
    rows = {name: method_row(metrics, name, metrics["headline_pool"])
            for name in ("model", metrics.get("strongest_baseline")) if name}
    return {"relatedness": view.relatedness, "rows": rows, "strongest": metrics.get("strongest_baseline")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subjects", type=int, default=8000)
    parser.add_argument("--families", type=float, default=0.6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work_dir", type=Path, default=Path("/tmp/genealign_relatedness_leak"))
    args = parser.parse_args()
    started = time.perf_counter()
    cohort = synthesize(SynthConfig(out_dir=args.work_dir / "cohort", subjects=args.subjects, families=args.families,
                                    seed=args.seed), overwrite=True)
    results = {}
    for label, kinship in (("IID-hash split", False), ("family split (--kinship)", True)):
        tag = "family" if kinship else "hash"
        results[label] = run(cohort, args.work_dir / f"{tag}.zarr", args.work_dir / tag, kinship, args.seed)
    print(f"\n{args.subjects:,} subjects, {args.families:.0%} in families; test top-1, pool 1,000, chance 0.001 "
          f"({time.perf_counter() - started:.0f}s)")
    family = results["family split (--kinship)"]["relatedness"]
    across = {"IID-hash split": family["cross_split_pairs_with_iid_hash_split"],
              "family split (--kinship)": family["cross_split_pairs"]}
    for label, result in results.items():
        print(f"{label}: {across[label]:,} of {family['related_pairs']:,} related pairs across splits")
        for name, row in result["rows"].items():
            figures = ", ".join(f"{d} {row[f'top1_{d}']:.3f} {_ci(row.get(f'ci_{d}'))}" for d in ("neuro_to_gene", "gene_to_neuro"))
            print(f"  {row['name']}: {figures}")
    (args.work_dir / "leak.json").write_text(json.dumps(results, indent=1, default=str))


def _ci(ci) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""


if __name__ == "__main__":
    main()
