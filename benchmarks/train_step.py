"""Benchmark: our training loop vs a bare PyTorch loop of the same model and batch.

Ours is `alignment.train.train` itself (loader, exact gradient-accumulation step, clipping, AdamW,
schedule, progress events); its samples/s is the per-epoch training throughput it records (validation
and checkpointing excluded, as they are not part of a step). The bare loop holds the same rows as
tensors and runs `model(neuro, genes)["loss"].backward(); optimizer.step()` over random batches.
Both start from the same fitted front-end and the same batch size, in the same process. Target:
overhead <= 10%.

    python benchmarks/train_step.py [--subjects 3000] [--epochs 3] [--batch_size 256]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from alignment.model import ModelConfig
from alignment.train import TrainConfig, build_model, train
from pipeline import open_store, write_store


def make_store(path: Path, subjects: int, genes: int, dim: int, latent_shape: tuple) -> Path:
    rng = np.random.default_rng(0)
    neuro = rng.normal(size=(subjects, *latent_shape)).astype(np.float32)
    embeddings = rng.normal(size=(subjects, genes, dim)).astype(np.float32)
    iids = [str(1_000_000 + i) for i in range(subjects)]
    write_store(path, iids, neuro, embeddings, [f"GENE{i}" for i in range(genes)], split_fractions=(0.9, 0.1, 0.0))
    return path


def bare_loop(store_path: Path, model_config: ModelConfig, mode: str, batch_size: int, steps: int, seed: int) -> float:
    """samples/s of the plainest correct loop: indexed batches from in-memory tensors, forward, backward, step."""
    torch.manual_seed(seed)
    view = open_store(store_path)
    rows = view.indices("train")
    neuro, genes = view.read_rows(rows)
    if mode == "single":
        genes = np.ascontiguousarray(genes[:, 0])
    gene_names = (view.gene_names[0],) if mode == "single" else view.gene_names
    model = build_model(replace(model_config, mode=mode), view, gene_names)
    neuro_t, genes_t = torch.from_numpy(neuro), torch.from_numpy(genes)
    model.fit_frontend(neuro_t, genes_t)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    start = time.perf_counter()
    done = 0
    while done < steps:
        for batch in torch.randperm(len(rows)).split(batch_size):
            if len(batch) < batch_size or done == steps:
                break
            loss = model(neuro_t[batch], genes_t[batch])["loss"]
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            done += 1
    return done * batch_size / (time.perf_counter() - start)


def ours(store_path: Path, model_config: ModelConfig, mode: str, batch_size: int, epochs: int, out: Path) -> tuple[float, int]:
    result = train(
        TrainConfig(store=str(store_path), output_dir=str(out), mode=mode,
                    single_gene_name="GENE0" if mode == "single" else None, batch_size=batch_size,
                    num_epochs=epochs, save_every=0, data_placement="memory", device="cpu", seed=0),
        model_config,
    )
    rates = [row["samples_per_s"] for row in result.history[1:]] or [result.history[0]["samples_per_s"]]
    steps = sum(1 for _ in range(len(result.history))) * (result.n_train // batch_size)
    return float(np.median(rates)), steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subjects", type=int, default=3000)
    parser.add_argument("--genes", type=int, default=111)
    parser.add_argument("--embedding_dim", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=256)
    args = parser.parse_args()
    latent_shape = (3, 15, 18, 15)
    presets = {
        "single": ModelConfig(mode="single", projection_dim=256, neuro_pca_dim=256, gene_pca_dim=32),
        "sequence (small)": ModelConfig(mode="sequence", projection_dim=256, transformer_hidden_dim=128,
                                        transformer_num_layers=2, transformer_num_heads=4, neuro_pca_dim=256,
                                        gene_pca_dim=16),
    }
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device cpu; {args.subjects} subjects x "
          f"{args.genes} genes x {args.embedding_dim}, latent {latent_shape}, batch {args.batch_size}")
    with tempfile.TemporaryDirectory() as tmp:
        store = make_store(Path(tmp) / "bench.zarr", args.subjects, args.genes, args.embedding_dim, latent_shape)
        for name, cfg in presets.items():
            mode = cfg.mode
            ours_sps, steps = ours(store, cfg, mode, args.batch_size, args.epochs, Path(tmp) / name.replace(" ", "_"))
            bare_sps = bare_loop(store, cfg, mode, args.batch_size, max(steps // args.epochs, 5), seed=0)
            print(f"{name:18s} ours {ours_sps:9,.0f} samples/s   bare loop {bare_sps:9,.0f} samples/s   "
                  f"overhead {bare_sps / ours_sps - 1:+.1%} (target <= +10%)")


if __name__ == "__main__":
    main()
