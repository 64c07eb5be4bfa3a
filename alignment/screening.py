"""Two steps of sequence-mode training that run before the first epoch (issue #12's recipe):

- Gene screening (`--screen_genes K`): the genes ranked as the screened baselines rank them (the val
  R^2 of a per-gene ridge fitted on train, `alignment.baselines.rank_genes`), the best K kept. With
  111 genes of which a handful carry signal, the contrastive model otherwise spends its capacity and
  its group lasso on noise genes. Covariates the run residualises are regressed out first, so a
  gene that only carries a confound (sex in an X-linked gene) is not picked for it.
- PCA start of the per-gene input maps (`--gene_projection_init_pca Q`): the first Q of the H output
  columns of every gene's (d_in, H) input map start as the train rows' top-Q joint principal
  components across the kept genes (scaled to unit variance), the rest as initialised. The model
  then starts from the directions shared by several genes instead of from noise, which is what lets
  a quadratic gene head find products of them (on the demo cohort neither helps alone).
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import torch

from pipeline.errors import GenealignError
from pipeline.normalize import principal_components


def screened_store(store, k: int, train_rows: np.ndarray, model_config, build_model) -> tuple[object, dict]:
    """(a view of `store` holding the best `k` genes in store order, the ranking for config.json).
    `model_config` carries the run's residualisation; `build_model(cfg, store, names)` makes a model."""
    from alignment.baselines import BaselineConfig, fit_rows, rank_genes
    from alignment.embed import model_covariates, residual_inputs

    inputs = None
    train_rows = fit_rows(train_rows, BaselineConfig().fit_max_rows, 0)  # the rows rank_genes fits on
    if model_config.residual_terms is not None:  # the residualiser alone, on every gene: no PCA
        probe = build_model(replace(model_config, neuro_pca_dim=0, gene_pca_dim=0), store, store.gene_names)
        neuro, genes = store.read_rows(train_rows)
        covariates = model_covariates(probe, store)
        probe.fit_frontend(torch.from_numpy(neuro), torch.from_numpy(genes), torch.from_numpy(covariates[train_rows]))
        del neuro, genes
        inputs = residual_inputs(probe, store)
    order = rank_genes(store, train_rows, range(store.n_genes), inputs=inputs)
    kept = sorted(order[:k])
    ranking = {"screen_genes": k, "kept": [store.gene_names[i] for i in kept],
               "ranked": [store.gene_names[i] for i in order], "by": "val R^2 of a per-gene ridge fitted on train"}
    return store.with_genes(kept), ranking


@torch.no_grad()
def init_gene_projection(model, genes: torch.Tensor, q: int, covariates=None) -> None:
    """Set the first `q` output columns of the per-gene input maps (G, kG, H) to the top-q joint PCs
    of the front-ended train rows `genes` (n, G, D) raw, each column scaled to unit variance x G;
    q is capped by the transformer width H, G x kG and the rows."""
    weight = model.gene_input_weight()  # (G, kG, H) | None
    if weight is None:
        raise GenealignError("--gene_projection_init_pca needs per-gene input projections (--gene_projection per_gene).")
    n_genes, k, hidden = weight.shape
    q = min(int(q), hidden, n_genes * k, len(genes) - 1)  # a width default: capped by what the model and data allow
    if q < 1:
        return
    x = model._gene_frontend(genes.to(model.gene_mean.dtype), covariates).double()  # (n, G, kG)
    flat = x.reshape(len(x), -1)
    flat = flat - flat.mean(dim=0)
    evals, components = principal_components(flat, q)  # (q,), (G*kG, q)
    scale = torch.sqrt(evals.clamp_min(1e-12))  # each PC's train standard deviation
    maps = (components / scale).reshape(n_genes, k, q)  # (G, kG, q): per gene, the PC loadings
    weight[:, :, :q] = (maps * n_genes).to(weight.dtype)  # the mean pooling divides by G again
    assert math.isfinite(float(weight.sum()))
