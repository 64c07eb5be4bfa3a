"""Quadratic ridge on screened genes (`qrr_screened`): the reduced-rank ridge of `alignment.baselines`
with second-order gene features added, so that a brain which depends on a product of genetic factors
(an interaction no linear map of the gene scores can express) has a classical baseline that can find it.

Regressors of a row, from the screened genes' whitened per-gene scores s (n, m k), the columns
rrr_screened reads: [s, standardise(z_i z_j for i <= j)], where z = (s - mean) @ W (n, q) are the top-q
joint principal components of s. The mean, W (`pipeline.normalize`) and the products' mean and std are
estimated on the train rows only; val and test rows go through the same train-fitted maps
(`QuadraticBaseline.features`). Products of q joint components rather than of all m k scores keep the
count at q (q + 1) / 2 (300 for q = 24) whatever the number of genes, and keep the directions several
genes share.

Then the rrr recipe: scikit-learn `Ridge` to the brain's whitened scores, truncated to rank r along the
top singular directions of the train predictions; retrieval by cosine between predicted and observed
brain scores in that rank-r space. Genes are ranked by `_gene_order` (train fit, val R^2); genes kept,
per-gene width, q, alpha, brain width and rank are chosen on val by (top-1, MRR) (`val_score`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from alignment.baselines import (POWER_ITERATIONS, BaselineConfig, FittedBaseline, _columns, _gene_order, _l2,
                                 _linear_maps, val_score)
from pipeline.normalize import principal_components, zscore

# A joint component whose eigenvalue is below this fraction of the largest is rounding noise (e.g. a gene
# direction without variance on train, whitened to a zero column): its products would be standardised
# noise, so q is capped below it.
RELATIVE_EIGENVALUE_FLOOR = 1e-9


def products(z: np.ndarray) -> np.ndarray:
    """Pairwise products z_i z_j, i <= j (squares included), of rows z (n, q) -> (n, q (q + 1) / 2),
    in `np.triu_indices(q)` order."""
    i, j = np.triu_indices(z.shape[1])
    return z[:, i] * z[:, j]


@dataclass(frozen=True)
class Expansion:
    """The train-fitted maps from linear scores s (n, m k) to the regressors (n, m k + q (q + 1) / 2)."""

    joint_mean: np.ndarray  # (m k,)
    joint_components: np.ndarray  # (m k, q)
    product_mean: np.ndarray  # (q (q + 1) / 2,)
    product_std: np.ndarray  # (q (q + 1) / 2,), constant products get 1

    def __call__(self, linear: np.ndarray) -> np.ndarray:
        quadratic = products((linear - self.joint_mean) @ self.joint_components)  # (n, q (q + 1) / 2)
        return np.hstack([linear, zscore(quadratic, self.product_mean, self.product_std)])


def fit_expansions(linear: np.ndarray, qs, seed: int) -> list[Expansion]:
    """One `Expansion` per q in `qs` (capped by the rank of the train rows `linear` (n, m k)); the joint
    PCA is fitted once, at the largest q, and each smaller q reads its leading columns."""
    joint_mean = linear.mean(axis=0)  # (m k,)
    centred = torch.from_numpy(linear - joint_mean)  # (n, m k) float64
    top = min(max(qs), linear.shape[1], len(linear) - 1)
    generator = torch.Generator().manual_seed(seed)
    evals, components = (t.numpy() for t in principal_components(centred, top, generator, POWER_ITERATIONS))
    supported = max(1, int((evals > RELATIVE_EIGENVALUE_FLOOR * max(evals[0], 0.0)).sum()))
    expansions = []
    for q in sorted({min(q, supported) for q in qs}):
        quadratic = products((linear - joint_mean) @ components[:, :q])  # (n, q (q + 1) / 2)
        mean, std = quadratic.mean(axis=0), quadratic.std(axis=0)
        expansions.append(Expansion(joint_mean, components[:, :q], mean, np.where(std > 0, std, 1.0)))
    return expansions


@dataclass
class QuadraticBaseline(FittedBaseline):
    """A fitted qrr_screened: `gene_columns` are the linear scores s; `gene_map` (m k + q (q + 1) / 2, r)
    reads `features`, the train-fitted expansion of them."""

    expansion: Expansion | None = None

    def features(self, gene_scores: np.ndarray) -> np.ndarray:
        """Front-end gene scores (n, Q) -> regressors (n, m k + q (q + 1) / 2)."""
        return self.expansion(gene_scores[:, self.gene_columns])

    def embed(self, neuro_scores: np.ndarray, gene_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Front-end scores -> unit-norm features (n, r), (n, r) float32: observed and predicted brain."""
        return (_l2(neuro_scores[:, self.neuro_columns] @ self.neuro_map),
                _l2(self.features(gene_scores) @ self.gene_map))


def _search_expansions(train: tuple, val: tuple, config: BaselineConfig, brain_dims) -> dict:
    """The best (q, alpha, p, rank) on val for linear scores train (s, y), val (s, y)."""
    (s_tr, y_tr), (s_va, y_va) = train, val
    best = None
    for expansion in fit_expansions(s_tr, config.quadratic_pcs, config.seed + 3):
        x_tr, x_va = expansion(s_tr), expansion(s_va)  # (n, m k + q (q + 1) / 2)
        ranks = lambda p: sorted({min(r, p, x_tr.shape[1]) for r in config.ranks})  # noqa: E731
        for alpha, p, r, gene_map, neuro_map in _linear_maps("rrr", x_tr, y_tr, config, brain_dims, ranks):
            score = val_score(y_va[:, :p] @ neuro_map, x_va @ gene_map)
            if best is None or score > best["score"]:
                best = dict(score=score, expansion=expansion, alpha=alpha, p=p, rank=r, gene_map=gene_map,
                            neuro_map=neuro_map)
    return best


def fit_quadratic(train: tuple, val: tuple, n_genes: int, config: BaselineConfig, offsets: tuple,
                  dims: tuple) -> QuadraticBaseline:
    """qrr_screened from train (x, y) and val (x, y): the whitened per-gene (n, G' K) and brain (n, P)
    scores, as `fit_regression` receives them; `offsets` / `dims` likewise."""
    (x_tr, y_tr), (x_va, y_va) = train, val
    width, big = dims
    brain_dims = sorted({min(p, big) for p in config.brain_dims})
    best = None
    with threadpool_limits(limits=1, user_api="blas"):
        order = _gene_order(train, val, n_genes, width)
        for m in sorted({min(m, n_genes) for m in config.genes_kept}):
            for k in sorted({min(k, width) for k in config.gene_dims}):
                cols = _columns(order[:m], k, width)
                found = _search_expansions((x_tr[:, cols], y_tr), (x_va[:, cols], y_va), config, brain_dims)
                if best is None or found["score"] > best["score"]:
                    best = dict(found, genes=m, k=k, cols=cols)
    x = best["expansion"](x_tr[:, best["cols"]]) @ best["gene_map"]  # (n, r) predicted brain
    y = y_tr[:, : best["p"]] @ best["neuro_map"]  # (n, r) observed brain
    correlations = [float(np.corrcoef(x[:, i], y[:, i])[0, 1]) if x[:, i].std() > 0 else 0.0 for i in range(x.shape[1])]
    q = best["expansion"].joint_components.shape[1]
    chosen = {"per_gene_dim": best["k"], "quadratic_pcs": q, "n_products": q * (q + 1) // 2, "alpha": best["alpha"],
              "brain_dim": best["p"], "rank": best["rank"], "genes_kept": best["genes"],
              "val_top1": best["score"][0], "val_mrr": best["score"][1],
              "screened_genes": [int(j) for j in order[: best["genes"]]]}
    return QuadraticBaseline("qrr_screened", None, best["rank"], correlations, [], offsets[0] + np.arange(best["p"]),
                             offsets[1] + best["cols"], best["neuro_map"], best["gene_map"], chosen,
                             expansion=best["expansion"])
