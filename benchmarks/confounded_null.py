"""The confound trap and its fix, end to end (issue #13): a `--null --confounds` cohort has no
gene->brain signal, but age, sex, site, head size and ancestry reach both modalities.

    python benchmarks/confounded_null.py --subjects 4000

synth -> ingest --covariates -> train (the cpu-small sequence preset) and evaluate with
`--residualize none` and `--residualize all`; prints every method's whole-split top-1 and permutation
p (1,000 pairing shuffles) in both directions. Without residualisation some p should be < 0.01 (the
trap); with it every p should be >= 0.01. An analysis, not a speed benchmark (minutes on 2 CPUs).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from alignment.evaluate import EvalConfig, evaluate  # noqa: E402
from alignment.model import ModelConfig  # noqa: E402
from alignment.settings import fit_batch, preset_values  # noqa: E402
from alignment.train import TrainConfig, train  # noqa: E402
from pipeline import open_store  # noqa: E402
from pipeline.ingest import IngestConfig, ingest  # noqa: E402
from pipeline.synth import SynthConfig, synthesize  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subjects", type=int, default=4000)
    parser.add_argument("--work_dir", type=Path, default=Path("/tmp/genealign_confounded_null"))
    args = parser.parse_args()
    cohort = synthesize(SynthConfig(out_dir=args.work_dir / "cohort", subjects=args.subjects, null=True, confounds=True),
                        overwrite=True)
    store = args.work_dir / "s.zarr"
    ingest(IngestConfig(cohort.gene_embedding_dir, cohort.brain_latent_dir, store, workers=2, overwrite=True,
                        covariates=cohort.out_dir / "covariates.csv", split_fractions=(0.6, 0.15, 0.25)))
    model_values, train_values = preset_values("cpu-small", "sequence")
    for setting in ("none", "all"):
        out = args.work_dir / setting
        tcfg = TrainConfig(store=str(store), output_dir=str(out), mode="sequence", save_every=0, overwrite=True,
                           residualize=setting, **train_values)
        tcfg, _ = fit_batch(tcfg, len(open_store(store).indices("train")), explicit=False)
        run = train(tcfg, ModelConfig(mode="sequence", **model_values))
        metrics = evaluate(EvalConfig(checkpoint=run.best_checkpoint, split="test", pool_sizes=("all",), bootstrap=200,
                                      permutations=1000, output_dir=out / "eval", overwrite=True)).metrics
        print(f"\n--residualize {setting}: test split N = {metrics['n_subjects']:,}, chance {1 / metrics['n_subjects']:.4f}")
        for method in metrics["methods_order"]:
            if method == "chance":
                continue
            figures = metrics["methods"][method]["retrieval"]
            cells = [f"{d} {figures[d]['all']['top1']:.4f} (p {figures[d]['all']['p_value_top1']:.3g})"
                     for d in ("neuro_to_gene", "gene_to_neuro")]
            print(f"  {metrics['methods'][method]['label']}: " + ", ".join(cells))


if __name__ == "__main__":
    main()
