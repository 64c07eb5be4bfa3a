"""A trained model's features for store rows, and the device/autocast choices every stage shares.

`embed_model(model, store, rows, gene_indices, device)` is the one place that turns raw store rows
into normalised features: training's validation, `genealign evaluate`, `explain` and `embed` all call
it, so every figure is computed from the same encodings a user exports. A model that residualises
covariates gets each subject's covariate row from the store (`model_covariates`).
"""

from __future__ import annotations

import contextlib
from typing import Callable

import numpy as np
import torch

from pipeline.errors import GenealignError
from pipeline.residualize import covariate_columns
from pipeline.store import StoreView, row_blocks


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' -> a device; under torchrun 'cuda' means this rank's GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise GenealignError(f"--device {name} was asked for but no CUDA GPU is visible; use --device cpu.")
        return torch.device("cuda", local_rank if name == "cuda" else int(name.split(":")[1]))
    if name != "cpu":
        raise GenealignError(f"--device {name!r} is not a device: use auto, cpu, cuda or cuda:N.")
    return torch.device(name)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 on CUDA (no loss scaling needed), full precision elsewhere."""
    return torch.bfloat16 if device.type == "cuda" else None


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast to `dtype` on `device`; no autocast when dtype is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def model_genes(genes: np.ndarray, gene_indices, single: bool) -> np.ndarray:
    """Store gene rows (b, G, D) -> the model's input: (b, D) for one gene, else (b, G', D) in the
    model's gene order."""
    if single:
        return genes[:, gene_indices[0]]
    if list(gene_indices) == list(range(genes.shape[1])):
        return genes
    return np.ascontiguousarray(genes[:, list(gene_indices)])


def model_covariates(model, store: StoreView) -> np.ndarray | None:
    """The store's covariates (N, C) float32 in the columns the model was trained with (matched by
    name), or None for a model that residualises nothing; a GenealignError when columns are missing."""
    if not model.residualizes:
        return None
    names = model.config.covariate_names
    where = f"The model (residualised on {', '.join(names)}) on store {store.path}"
    index = covariate_columns(store.covariate_names, names, where)
    return np.ascontiguousarray(store.covariates[:, index], dtype=np.float32)


@torch.no_grad()
def embed_model(
    model, store: StoreView, rows, gene_indices, device: torch.device, batch_size: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised features (n, P) float32 of both sides for `rows` (in that order), on `device`.

    `gene_indices` are store gene indices in the model's order (one index for a single-gene model)."""
    rows = np.asarray(rows, dtype=np.int64)
    single = not model.config.use_transformer
    width = model.config.projection_dim
    neuro_out = torch.empty(len(rows), width, device=device)
    gene_out = torch.empty(len(rows), width, device=device)
    was_training = model.training
    model.eval()
    one_gene = int(gene_indices[0]) if single else None
    covariates = model_covariates(model, store)  # (N, C) | None
    with autocast(device, autocast_dtype(device)):
        for positions, neuro, genes in row_blocks(store, rows, gene_index=one_gene):
            genes = genes if single else model_genes(genes, gene_indices, single=False)
            for lo in range(0, len(positions), batch_size):
                batch = positions[lo : lo + batch_size]
                at = torch.from_numpy(batch).to(device)
                neuro_t = torch.from_numpy(neuro[lo : lo + batch_size].astype(np.float32, copy=False)).to(device)
                genes_t = torch.from_numpy(genes[lo : lo + batch_size].astype(np.float32, copy=False)).to(device)
                cov_t = None if covariates is None else torch.from_numpy(covariates[rows[batch]]).to(device)  # (b, C)
                neuro_out[at] = model.encode_neuro(neuro_t, covariates=cov_t).float()  # (b, P)
                gene_out[at] = model.encode_gene(genes_t, covariates=cov_t).float()  # (b, P)
    model.train(was_training)
    return neuro_out, gene_out


def residual_inputs(model, store) -> Callable | None:
    """`inputs(rows, neuro, genes) -> (neuro, genes)` for the baselines: raw store rows through the
    model's own residualiser (genes may be None), or None when the model residualises nothing."""
    covariates = model_covariates(model, store)  # (N, C) | None
    if covariates is None:
        return None
    device, gene_shape = model.logit_scale.device, tuple(model.covariate_residualizer.gene_beta.shape[1:])

    @torch.no_grad()
    def inputs(rows, neuro, genes):
        cov = torch.from_numpy(covariates[rows]).to(device)  # (b, C)
        neuro = model.residualize_neuro(torch.from_numpy(neuro).to(device), cov).cpu().numpy()  # (b, V)
        if genes is not None:  # (b, G', D): (b, 1, D) for a single-gene model, whose beta is (K, D)
            g = torch.from_numpy(genes).to(device)
            genes = model.residualize_genes(g.reshape(len(g), *gene_shape), cov).reshape(g.shape).cpu().numpy()
        return neuro, genes

    return inputs
