"""Loader throughput: genealign's BatchLoader against the seed's per-subject loader, same cohort, same run.

The seed built each batch from `batch_size` calls of a Dataset `__getitem__` that did one pandas
`.loc[iid]` per gene (111 DataFrames indexed by IID, held in memory) and one `np.load` of the
subject's npz, then default-collated them (DataLoader, shuffle=True, batch_size 64). That loader is
re-implemented here as faithfully as we know it and timed on a fixed number of batches (it is slow),
with num_workers 0 and 2. Ours is timed over whole epochs in each placement this machine supports
('device' only where CUDA is available). Prints samples/s and the ratio to the seed loader.

    .venv/bin/python benchmarks/loader.py [--subjects 2000] [--genes 111] [--work-dir DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.loader import BatchLoader, LoaderConfig  # noqa: E402
from pipeline.sources import GENE_FILE_SUFFIX, LATENT_FILE_SUFFIX, gene_file_name, latent_file_name  # noqa: E402
from pipeline.store import open_store, write_store  # noqa: E402

LATENT_SHAPE = (3, 15, 18, 15)
EMBEDDING_DIM = 256
BATCH_SIZE = 64


class SeedMultiGeneNeuroDataset(Dataset):
    """The seed's per-subject loader (sequence mode), re-implemented for comparison only."""

    def __init__(self, brain_latent_dir, gene_embedding_dir, iid_column="IID"):
        self.brain_latent_dir = str(brain_latent_dir)
        gene_files = sorted(f for f in os.listdir(gene_embedding_dir) if f.endswith(GENE_FILE_SUFFIX))
        self.gene_names = [f[: -len(GENE_FILE_SUFFIX)] for f in gene_files]
        self.gene_data = {}
        for name, file in zip(self.gene_names, gene_files):
            df = pd.read_csv(os.path.join(gene_embedding_dir, file))
            df[iid_column] = df[iid_column].astype(str)
            self.gene_data[name] = df.set_index(iid_column)
        latent_iids = {
            f[: -len(LATENT_FILE_SUFFIX)] for f in os.listdir(brain_latent_dir) if f.endswith(LATENT_FILE_SUFFIX)
        }
        common = latent_iids
        for df in self.gene_data.values():
            common &= set(df.index)
        self.iids = sorted(common)

    def __len__(self):
        return len(self.iids)

    def __getitem__(self, idx):
        iid = self.iids[idx]
        data = np.load(os.path.join(self.brain_latent_dir, f"{iid}_latent.npz"))
        if "latent" in data:
            latent = data["latent"]
        elif "arr_0" in data:
            latent = data["arr_0"]
        else:
            latent = data[data.files[0]]
        neuro = torch.from_numpy(latent.flatten().astype(np.float32))
        gene_sequence = np.stack([self.gene_data[g].loc[iid].values.astype(np.float32) for g in self.gene_names])
        return {
            "neuro_embedding": neuro,
            "gene_sequence": torch.from_numpy(gene_sequence),
            "iid": iid,
            "gene_names": self.gene_names,
        }


def make_cohort(out_dir: Path, subjects: int, genes: int, seed: int = 0) -> tuple[Path, Path]:
    """(gene_embedding_dir, brain_latent_dir): pipeline.synth if present, else random data in the
    same file formats."""
    try:
        from pipeline.synth import SynthConfig, synthesize
    except ImportError:
        synthesize = None
    if synthesize is not None:
        result = synthesize(
            SynthConfig(out_dir=out_dir, subjects=subjects, genes=genes, embedding_dim=EMBEDDING_DIM,
                        latent_shape=LATENT_SHAPE, seed=seed)
        )
        return Path(result.gene_embedding_dir), Path(result.brain_latent_dir)
    rng = np.random.default_rng(seed)
    gene_dir, latent_dir = out_dir / "gene_embeddings", out_dir / "brain_latent"
    gene_dir.mkdir(parents=True, exist_ok=True)
    latent_dir.mkdir(parents=True, exist_ok=True)
    iids = [str(1_000_000 + i) for i in range(subjects)]
    for iid in iids:
        np.savez(latent_dir / latent_file_name(iid), latent=rng.normal(size=LATENT_SHAPE).astype(np.float32))
    columns = [f"dim_{d}" for d in range(EMBEDDING_DIM)]
    for g in range(genes):
        df = pd.DataFrame(rng.normal(size=(subjects, EMBEDDING_DIM)).astype(np.float32), columns=columns)
        df.insert(0, "IID", iids)
        df.to_csv(gene_dir / gene_file_name(f"GENE{g:03d}"), index=False, float_format="%.6g")
    return gene_dir, latent_dir


def make_store(gene_dir: Path, latent_dir: Path, store_path: Path):
    """pipeline.ingest if present, else the seed dataset's arrays written with write_store."""
    try:
        from pipeline.ingest import IngestConfig, ingest
    except ImportError:
        ingest = None
    if ingest is not None:
        ingest(IngestConfig(gene_embedding_dir=gene_dir, brain_latent_dir=latent_dir, store=store_path))
        return open_store(store_path)
    seed = SeedMultiGeneNeuroDataset(latent_dir, gene_dir)
    neuro = np.stack([np.load(latent_dir / latent_file_name(iid))["latent"] for iid in seed.iids])
    genes = np.stack([seed.gene_data[g].loc[seed.iids].to_numpy(np.float32) for g in seed.gene_names], axis=1)
    return write_store(store_path, seed.iids, neuro, genes, seed.gene_names)


def time_seed(dataset, num_workers: int, batches: int) -> float:
    """samples/s of the seed loader over `batches` batches (worker start-up excluded: one warm-up batch)."""
    loader = DataLoader(dataset, batch_size=BATCH_SIZE, shuffle=True, num_workers=num_workers)
    iterator = iter(loader)
    next(iterator)
    start = time.perf_counter()
    samples = 0
    for _ in range(batches):
        batch = next(iterator)
        samples += len(batch["iid"])
    return samples / (time.perf_counter() - start)


def time_ours(store, rows, placement: str, min_seconds: float) -> tuple[float, float, int]:
    """(setup seconds, samples/s over whole epochs, epochs) of BatchLoader in one placement."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    start = time.perf_counter()
    loader = BatchLoader(store, rows, LoaderConfig(batch_size=BATCH_SIZE, placement=placement), device)
    setup = time.perf_counter() - start
    samples, epochs = 0, 0
    start = time.perf_counter()
    while epochs < 2 or time.perf_counter() - start < min_seconds:
        for neuro, genes in loader.epoch(epochs):
            samples += len(neuro)
        epochs += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return setup, samples / (time.perf_counter() - start), epochs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=2000)
    parser.add_argument("--genes", type=int, default=111)
    parser.add_argument("--seed-batches", type=int, default=10, help="batches timed for the seed loader")
    parser.add_argument("--min-seconds", type=float, default=3.0, help="at least this long per placement of ours")
    parser.add_argument("--work-dir", type=Path, default=None, help="keep the cohort here (reused if present)")
    args = parser.parse_args()

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="genealign-bench-loader-"))
    cohort = work / f"cohort_{args.subjects}x{args.genes}"
    start = time.perf_counter()
    if not (cohort / "done").exists():
        gene_dir, latent_dir = make_cohort(cohort, args.subjects, args.genes)
        (cohort / "done").write_text(f"{gene_dir}\n{latent_dir}\n")
    gene_dir, latent_dir = (Path(p) for p in (cohort / "done").read_text().split())
    store = make_store(gene_dir, latent_dir, cohort / "store.zarr")
    print(f"cohort: {store.n_subjects} subjects x {store.n_genes} genes x {store.embedding_dim} dims, "
          f"latent {store.latent_shape}, store {store.dtype}, chunk {store.chunk_rows} rows "
          f"(prepared in {time.perf_counter() - start:.1f} s)")
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA'}; batch {BATCH_SIZE}")

    start = time.perf_counter()
    seed_dataset = SeedMultiGeneNeuroDataset(latent_dir, gene_dir)
    print(f"seed loader setup (read {store.n_genes} CSVs into pandas): {time.perf_counter() - start:.1f} s")
    seed_rates = {}
    for workers in (0, 2):
        seed_rates[workers] = time_seed(seed_dataset, workers, args.seed_batches)
        print(f"seed loader, num_workers={workers}: {seed_rates[workers]:10.1f} samples/s "
              f"({args.seed_batches} batches of {BATCH_SIZE})")
    best_seed = max(seed_rates.values())

    rows = store.indices("all")  # the same subjects the seed loader serves
    placements = (["device"] if torch.cuda.is_available() else []) + ["memory", "stream"]
    for placement in placements:
        setup, rate, epochs = time_ours(store, rows, placement, args.min_seconds)
        print(f"genealign BatchLoader, {placement:>6}: {rate:10.1f} samples/s over {epochs} epochs "
              f"(setup {setup:.2f} s) = {rate / seed_rates[0]:8.1f}x seed(workers=0), "
              f"{rate / best_seed:8.1f}x best seed")


if __name__ == "__main__":
    main()
