"""Ingest speed against the floor of reading every input file once.

    python benchmarks/ingest.py --cohort /tmp/gi_bench/cohort_10000x111
    python benchmarks/ingest.py --subjects 2000 --repeat 3    # makes the cohort with `genealign synth`

Floor: `pandas.read_csv` (pandas' defaults) of every gene CSV plus `np.load` of every latent, one
process. pandas 3.1 parses a large CSV on several threads by default (`mode.max_threads`), so the
floor is also measured with `mode.max_threads = 1` (one parse thread, as `read_csv` was before) and
the ratios printed against both; the targets are against the default floor. Then the whole
`genealign ingest` command, as a user runs it (a subprocess: interpreter start and imports
included), with --workers 1 and --workers 2, each into a fresh store. Prints the
seconds, the ratio of each to the floor (targets: <= 1.6x with 1 worker, <= 1.3x with 2) and the
peak RSS of the largest process of each run. Every figure is the best of --repeat rounds; the inputs
are read once beforehand, so every run finds them in the page cache, and dirty pages are flushed
before each run, so no run pays for the previous one's writes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

FLOOR = """
import sys, time
from pathlib import Path
import numpy as np, pandas as pd
gene_dir, latent_dir = Path(sys.argv[1]), Path(sys.argv[2])
if sys.argv[3] != "default":
    pd.set_option("mode.max_threads", int(sys.argv[3]))
started = time.perf_counter()
for path in sorted(gene_dir.glob("*_brain_gene_embeddingUKB.csv")):
    pd.read_csv(path)
for path in sorted(latent_dir.glob("*_latent.npz")):
    with np.load(path) as npz:
        npz[npz.files[0]]
print(time.perf_counter() - started)
"""


SERIAL_FLOOR = "floor, one read_csv thread"


def timed(command: list[str]) -> tuple[float, float, str]:
    """(wall seconds, peak RSS MiB of the largest process, stdout) of one child run."""
    os.sync()
    started = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{out}")
    return seconds, usage.ru_maxrss / 1024, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cohort", type=Path, help="a `genealign synth` folder (default: made in --work_dir)")
    parser.add_argument("--subjects", type=int, default=10_000, help="cohort size when --cohort is not given")
    parser.add_argument("--repeat", type=int, default=1, help="rounds; each figure is the best of them")
    parser.add_argument("--work_dir", type=Path, default=Path("/tmp/genealign_bench_ingest"))
    args = parser.parse_args()
    genealign = str(Path(sys.executable).with_name("genealign"))
    args.work_dir.mkdir(parents=True, exist_ok=True)
    cohort = args.cohort or args.work_dir / f"cohort_{args.subjects}x111"
    if not (cohort / "truth.json").exists():
        subprocess.run([genealign, "synth", str(cohort), "--subjects", str(args.subjects)], check=True)
    gene_dir, latent_dir = cohort / "gene_embeddings", cohort / "brain_latent"
    for path in [*gene_dir.iterdir(), *latent_dir.iterdir()]:  # into the page cache
        path.read_bytes()

    best: dict[str, tuple[float, float]] = {}
    for _ in range(args.repeat):
        for key, threads in (("floor", "default"), (SERIAL_FLOOR, "1")):
            _, rss, out = timed([sys.executable, "-c", FLOOR, str(gene_dir), str(latent_dir), threads])
            best[key] = min(best.get(key, (float("inf"), 0.0)), (float(out.split()[-1]), rss))
        for workers in (1, 2):
            store = args.work_dir / f"store_w{workers}.zarr"
            shutil.rmtree(store, ignore_errors=True)
            seconds, rss, _ = timed([genealign, "ingest", "--gene-embedding-dir", str(gene_dir), "--brain-latent-dir",
                                     str(latent_dir), "--store", str(store), "--workers", str(workers)])
            key = f"genealign ingest --workers {workers}"
            best[key] = min(best.get(key, (float("inf"), 0.0)), (seconds, rss))
            shutil.rmtree(store, ignore_errors=True)

    n_genes = len(list(gene_dir.glob("*.csv")))
    n_latents = len(list(latent_dir.glob("*.npz")))
    floor = best["floor"][0]
    print(f"\n{n_latents:,} latents x {n_genes} gene CSVs, {os.cpu_count()} CPUs, best of {args.repeat}")
    print(f"{'':34s}{'seconds':>9s}{'x floor':>9s}{'peak RSS MiB':>14s}")
    for name, (seconds, rss) in best.items():
        print(f"{name:34s}{seconds:9.2f}{seconds / floor:9.2f}{rss:14.0f}")
    for workers, target in ((1, 1.6), (2, 1.3)):
        seconds = best[f"genealign ingest --workers {workers}"][0]
        print(f"ratio --workers {workers}: {seconds / floor:.2f}x the floor (target <= {target}x); "
              f"{seconds / best[SERIAL_FLOOR][0]:.2f}x the one-thread floor")


if __name__ == "__main__":
    main()
