"""Per-CSV parse time of the readers ingest could use, on the same gene CSVs.

    python benchmarks/csv_parsers.py --cohort /tmp/genealign_bench_ingest/cohort_10000x111 --files 24

Each reader parses the first --files gene CSVs in turn (serial) and then two at a time on two
threads (throughput with both cores busy, as in ingest); every figure is ms per CSV, the best of
--repeat rounds. Readers: pandas' defaults (the ingest benchmark's floor; pandas >= 3.1 splits a
large file over several threads), the same with one thread, the typed parse ingest uses
(`pipeline.sources.read_gene_csv`: IID as text, float32 values, errors naming line and column),
pandas with `engine="pyarrow"`, and `pyarrow.csv.read_csv` with float32 column types.
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pa_csv

from pipeline.sources import read_gene_csv, read_header


def pyarrow_typed(path: Path) -> np.ndarray:
    columns = read_header(path)
    types = {name: pa.float32() for name in columns[1:]} | {columns[0]: pa.string()}
    table = pa_csv.read_csv(path, convert_options=pa_csv.ConvertOptions(column_types=types))
    return np.column_stack([column.to_numpy() for column in table.columns[1:]])  # (n, D)


def ingest_typed(path: Path):
    columns = read_header(path)
    return read_gene_csv(path, columns, columns[0], "float32")


def one_thread(path: Path):
    with pd.option_context("mode.max_threads", 1):
        return pd.read_csv(path)


READERS = {
    "pandas defaults (the floor)": pd.read_csv,
    "pandas, mode.max_threads = 1": one_thread,
    "ingest's typed parse": ingest_typed,
    'pandas engine="pyarrow"': lambda path: pd.read_csv(path, engine="pyarrow"),
    "pyarrow.csv, float32 columns": pyarrow_typed,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cohort", type=Path, required=True, help="a `genealign synth` folder")
    parser.add_argument("--files", type=int, default=24)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    files = sorted((args.cohort / "gene_embeddings").glob("*.csv"))[: args.files]
    for path in files:  # into the page cache
        path.read_bytes()
    best: dict[str, list[float]] = {name: [float("inf")] * 2 for name in READERS}
    for _ in range(args.repeat):
        for name, read in READERS.items():
            started = time.perf_counter()
            for path in files:
                read(path)
            serial = time.perf_counter() - started
            started = time.perf_counter()
            with ThreadPoolExecutor(max_workers=2) as pool:
                list(pool.map(read, files))
            two = time.perf_counter() - started
            best[name] = [min(best[name][0], serial), min(best[name][1], two)]
    print(f"{len(files)} gene CSVs ({files[0].stat().st_size / 1e6:.1f} MB each), pandas {pd.__version__}, "
          f"pyarrow {pa.__version__}, best of {args.repeat}; ms per CSV")
    print(f"{'':32s}{'serial':>8s}{'2 threads':>11s}")
    for name, (serial, two) in best.items():
        print(f"{name:32s}{serial / len(files) * 1e3:8.0f}{two / len(files) * 1e3:11.0f}")


if __name__ == "__main__":
    main()
