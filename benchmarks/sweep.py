"""Benchmark: `genealign sweep` over every gene vs one `genealign train --mode single`, same store, same epochs.

Both commands run as subprocesses and are timed whole (start-up, store reads, front-end fits, training,
validation, and what each writes: train its checkpoints and curves, sweep its test scoring, table,
report and plot). Both use their defaults (the cpu-small single-mode preset) with the same
`--num_epochs` and `--patience`; the default patience 0 makes both run every epoch. Target: the sweep
of all genes within 3x one single-gene training. On a synthetic store it also prints how many of the
truth's causal genes the sweep's top k holds.

    python benchmarks/sweep.py [--subjects 3000 | --store S.zarr] [--epochs 20] [--patience 0] [--gene DBH]
                               [--repeats 3]
"""

from __future__ import annotations

import argparse
import csv
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def cohort(root: Path, subjects: int) -> Path:
    from pipeline.ingest import IngestConfig, ingest
    from pipeline.synth import SynthConfig, synthesize

    synthesize(SynthConfig(out_dir=root / "cohort", subjects=subjects))
    store = root / "cohort.zarr"
    ingest(IngestConfig(gene_embedding_dir=root / "cohort" / "gene_embeddings",
                        brain_latent_dir=root / "cohort" / "brain_latent", store=store, workers=2))
    return store


def timed(args: list[str]) -> float:
    """Wall seconds of `genealign ARGS` in a fresh process."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "alignment.cli", *args], capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"genealign {' '.join(args)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, help="an ingested store (default: synthesize --subjects into a temp dir)")
    parser.add_argument("--subjects", type=int, default=3000)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--patience", type=int, default=0)
    parser.add_argument("--gene", help="gene of the single-gene training (default: the truth's strongest, else the first)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=1, help="alternate the two commands this many times")
    args = parser.parse_args()

    from pipeline import open_store
    from pipeline.oracle import strongest_gene
    from pipeline.synth import causal_genes, load_truth

    with tempfile.TemporaryDirectory(prefix="genealign-sweep-bench-") as tmp:
        root = Path(tmp)
        store_path = args.store or cohort(root, args.subjects)
        store = open_store(store_path)
        truth_path = store.cohort_truth_path()
        truth = load_truth(truth_path) if truth_path else None
        gene = args.gene or (strongest_gene(truth) if truth else store.gene_names[0])
        common = ["--store", str(store_path), "--num_epochs", str(args.epochs), "--patience", str(args.patience),
                  "--device", args.device]
        singles, sweeps = [], []
        for _ in range(args.repeats):  # alternated, so both see the same machine load on average
            singles.append(timed(["train", *common, "--mode", "single", "--single_gene_name", gene,
                                  "--output_dir", str(root / "train"), "--overwrite"]))
            sweeps.append(timed(["sweep", *common, "--output_dir", str(root / "sweep"), "--overwrite"]))
        single, swept = statistics.median(singles), statistics.median(sweeps)
        ratios = [b / a for a, b in zip(singles, sweeps)]  # per pair: the two ran back to back
        with open(root / "sweep" / "sweep.csv", newline="") as fh:
            ranked = [row["gene"] for row in sorted(csv.DictReader(fh), key=lambda r: int(r["rank"]))]

    n = {split: len(store.indices(split)) for split in ("train", "val", "test")}
    print(f"store {store_path}: {n['train']:,} train / {n['val']:,} val / {n['test']:,} test subjects, "
          f"{store.n_genes} genes; {args.epochs} epochs, patience {args.patience}, device {args.device}")
    print(f"genealign train --mode single ({gene}): {single:7.1f} s  (runs: {', '.join(f'{t:.1f}' for t in singles)})")
    print(f"genealign sweep ({store.n_genes} genes):      {swept:7.1f} s  (runs: {', '.join(f'{t:.1f}' for t in sweeps)})")
    print(f"ratio sweep / one single-gene training: {statistics.median(ratios):.2f}x, median of the pairs' "
          f"({', '.join(f'{r:.2f}' for r in ratios)}) (target <= 3x)")
    if truth:
        causal = causal_genes(truth)
        for k in sorted({5, 10, 12, len(causal)}):
            hits = sum(g in causal for g in ranked[:k])
            print(f"top {k:>2}: {hits} of the truth's {len(causal)} causal genes (precision {hits / k:.2f})")


if __name__ == "__main__":
    main()
