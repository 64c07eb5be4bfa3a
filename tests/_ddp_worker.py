"""One rank of the distributed contrastive_step test (tests/test_step.py starts two of these).

Usage: python tests/_ddp_worker.py OUT_DIR   with RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set.
Every rank builds the same model and the same global batch, takes its own contiguous share of the
rows, runs contrastive_step(distributed=True) and saves the loss and all parameter gradients to
OUT_DIR/rank{R}.pt, for the test to compare with a one-process run over the global batch.
"""

from __future__ import annotations

import os
import sys

import torch

from alignment import MultiGeneAlignmentModel, contrastive_step

V, D, G, P, B = 12, 6, 3, 8, 4  # B rows per micro-batch per rank
CASES = (
    # (name, use_transformer, loss, micro-batches per rank)
    ("single_clip_k1", False, "clip", 1),
    ("single_clip_k2", False, "clip", 2),
    ("sequence_clip_k2", True, "clip", 2),
    ("sequence_siglip_k2", True, "siglip", 2),
)


def build(use_transformer: bool, loss: str) -> MultiGeneAlignmentModel:
    """Same weights in every process (seeded), float64, dropout 0 (ranks draw different masks)."""
    torch.manual_seed(0)
    model = MultiGeneAlignmentModel(
        neuro_input_dim=V, gene_input_dim=D, num_genes=G if use_transformer else 1, projection_dim=P,
        use_transformer=use_transformer, transformer_hidden_dim=8, transformer_num_layers=1,
        transformer_num_heads=2, dropout=0.0, loss=loss, neuro_pca_dim=5, gene_pca_dim=4,
    ).double()
    neuro, genes = global_batch(use_transformer, 64, seed=99)
    model.fit_frontend(neuro, genes)
    return model


def global_batch(use_transformer: bool, n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    neuro = torch.randn(n, V, generator=g, dtype=torch.float64)
    genes = torch.randn(n, *((G, D) if use_transformer else (D,)), generator=g, dtype=torch.float64)
    genes = genes + 0.5 * neuro[:, :D].reshape(n, *([1] * (genes.dim() - 2)), D)  # some shared signal
    return neuro, genes


def main(out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {}
    for name, use_transformer, loss_name, k in CASES:
        model = build(use_transformer, loss_name)
        neuro, genes = global_batch(use_transformer, world * k * B)
        mine = slice(rank * k * B, (rank + 1) * k * B)
        neuro, genes = neuro[mine], genes[mine]
        micro = [(neuro[i * B : (i + 1) * B], genes[i * B : (i + 1) * B]) for i in range(k)]
        loss = contrastive_step(model, micro, distributed=True)
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        # A second call without zeroing accumulates: earlier .grad must not be all-reduced again.
        contrastive_step(model, micro, distributed=True)
        again = {n: p.grad.clone() for n, p in model.named_parameters()}
        results[name] = {"loss": loss, "grads": grads, "accumulated": again}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
