"""Linear baselines for the retrieval figures: PCA + CCA, PCA + PLS, reduced-rank ridge and regularised
CCA, fitted on the train split only (the last two choose their hyperparameters on the val split).

The point of a baseline is that a contrastive model's "top-1 out of 1,000" means little until a
classical linear method has been scored on the same split, the same pools and the same genes. Both
baselines share one PCA front-end; every statistic is estimated on (at most `fit_max_rows` of) the
train split, whatever split is evaluated.

Front-end (`PCAFrontend`, fitted with `pipeline.normalize`, the z-scoring/PCA the model uses too):
- neuro (n, V): z-score each voxel with train mean/std, then PCA to `pca_dim` components.
- genes (n, G, D): z-score each (gene, dim); then
  * one gene (single mode): PCA to `pca_dim`;
  * several genes (sequence mode): per-gene PCA *whitening* to `per_gene_dim` components, concatenate
    the G genes (G x per_gene_dim columns), then a joint PCA to `pca_dim`. A PCA of the raw G x D
    concatenation (28,416 columns for UK Biobank) would keep whatever has the largest variance inside
    each gene; whitening each gene first puts every gene's leading directions on an equal footing, so
    the joint PCA keeps the directions shared by several genes (e.g. a genetic factor carried by a few
    genes). A gene direction without variance on the train rows gets a zero column, as in the model.
- Single-mode checkpoints are compared with baselines on the same single gene, sequence-mode ones with
  baselines on all genes (the caller passes the gene indices).

Methods: scikit-learn's `CCA` and `PLSCanonical` (symmetric PLS, mode A) with `n_components`
components, fitted on the train PCA scores. Retrieval is by cosine similarity in the canonical space:
the neuro side is the x-scores, the gene side the y-scores, each row L2-normalised.

Regression methods (`rrr`, `rcca`) read their own columns of the front-end: the brain's whitened PCA
scores (up to max(brain_dims)) and every gene's whitened PCA scores (up to max(gene_dims) per gene).
- rrr: scikit-learn `Ridge` from the gene scores to the brain scores, truncated to `rank` along the top
  singular directions of the train predictions; features: predicted and observed brain scores in
  that rank-r space.
- rcca: CCA with a ridge term on the gene side's covariance (the brain side is already whitened).
- *_screened (several genes): genes ranked by the val R^2 of a per-gene ridge fitted on train; the
  number kept is one more hyperparameter.
- qrr_screened (`alignment.baselines_quadratic`): rrr_screened with the pairwise products of the top-q
  joint principal components of the screened genes' scores added as regressors (q on val): a brain
  that depends on a product of genetic factors is beyond every linear method here.
Per-gene width, brain width, alpha, rank (and genes kept) are chosen on the val split by top-1, then
MRR (mean of both directions). Every method records its val scores, so `Baselines.strongest()` names
the one to compare the model with.

Covariates only (`fit_covariate_baseline`, stores with covariates): the rrr machinery with the gene
side replaced by the subject's covariate design (every stored covariate, with age^2, age x sex, age x
site; `pipeline.residualize`): what confounds alone retrieve. Its brain side goes through the same
`inputs` as the other methods, so with the brain residualised on those covariates it sits at chance.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from pipeline.errors import GenealignError
from pipeline.normalize import fit_gene_pca, fit_pca, principal_components, zscore
from pipeline.residualize import ALL, Residualizer, residualizer_for
from pipeline.store import StoreView

BASELINES = ("cca", "pls", "rrr", "rrr_screened", "rcca", "rcca_screened", "qrr_screened")
LABELS = {"cca": "PCA+CCA", "pls": "PCA+PLS", "rrr": "reduced-rank ridge", "rrr_screened": "reduced-rank ridge, screened genes",
          "rcca": "regularised CCA", "rcca_screened": "regularised CCA, screened genes",
          "qrr_screened": "quadratic ridge, screened genes",
          "covariates": "covariates only (reduced-rank ridge, covariates → brain)"}
REGRESSION = ("rrr", "rrr_screened", "rcca", "rcca_screened", "qrr_screened")
SCREENED = ("rrr_screened", "rcca_screened", "qrr_screened")
# The joint PCA runs on whitened per-gene scores, whose spectrum is flat: the randomized PCA needs
# more power iterations there than the model's front-end does on raw latents.
POWER_ITERATIONS = 4


@dataclass(frozen=True)
class BaselineConfig:
    pca_dim: int = 64  # components per modality after the PCA front-end
    per_gene_dim: int = 32  # sequence mode: whitened components kept per gene before the joint PCA
    n_components: int = 8  # canonical components of CCA / PLS (beyond the few that carry signal, cosine only adds noise)
    fit_max_rows: int = 10_000  # train rows used for fitting (deterministic subsample)
    max_iter: int = 1000  # scikit-learn's NIPALS iterations per component
    seed: int = 0
    # rrr / rcca: grids searched on the val split (top-1, then MRR); widths are capped by the data.
    brain_dims: tuple = (32, 128)  # whitened brain PCA scores (the regression targets)
    gene_dims: tuple = (8, 16)  # whitened PCA scores per gene (the regressors)
    alphas: tuple = (0.01, 0.1, 1.0, 10.0)  # ridge strength / rcca regularisation, in units of n_train
    ranks: tuple = (2, 4, 8, 16, 32)
    genes_kept: tuple = (4, 8, 16, 32)  # screened variants: number of best-ranked genes kept
    quadratic_pcs: tuple = (8, 16, 24)  # qrr_screened: joint components whose pairwise products are added


# ------------------------------------------------------------------------------------ reading rows
def row_batches(store: StoreView, rows: np.ndarray, batch_rows: int) -> list[np.ndarray]:
    """Split sorted `rows` into consecutive batches of about `batch_rows`, cut at store-chunk
    boundaries where possible so that each chunk is read once."""
    rows = np.asarray(rows, dtype=np.int64)
    if len(rows) == 0:
        return []
    chunk_of = rows // store.chunk_rows
    starts = np.flatnonzero(np.r_[True, chunk_of[1:] != chunk_of[:-1]])  # first row of each chunk group
    batches, begin = [], 0
    for start in [*starts[1:], len(rows)]:
        if start - begin >= batch_rows or start == len(rows):
            # a chunk group larger than a batch is cut inside (rare: batch_rows < chunk_rows)
            for lo in range(begin, start, max(batch_rows, 1)):
                batches.append(rows[lo : min(start, lo + max(batch_rows, 1))])
            begin = start
    return batches


def read_batches(store: StoreView, rows, batch_rows: int, gene_indices=None, inputs=None):
    """Yield (rows, neuro (b, V) float32, genes (b, G', D) float32) over `rows` (sorted), with only
    the genes `gene_indices` (store order) when given. `inputs(rows, neuro, genes) -> (neuro, genes)`,
    when given, transforms each batch first (the covariate residualisation of the model)."""
    rows = np.sort(np.asarray(rows, dtype=np.int64))
    select = None if gene_indices is None or list(gene_indices) == list(range(store.n_genes)) else list(gene_indices)
    for batch in row_batches(store, rows, batch_rows):
        neuro, genes = store.read_rows(batch)  # (b, V), (b, G, D)
        if select is not None:
            genes = np.ascontiguousarray(genes[:, select])  # (b, G', D)
        if inputs is not None:
            neuro, genes = inputs(batch, neuro, genes)
        yield batch, neuro, genes


def fit_rows(train_rows: np.ndarray, max_rows: int, seed: int) -> np.ndarray:
    """The train rows the baselines are fitted on: all of them, or a seeded sorted subsample."""
    train_rows = np.asarray(train_rows, dtype=np.int64)
    if len(train_rows) <= max_rows:
        return train_rows
    return np.sort(np.random.default_rng([seed, 23]).choice(train_rows, size=max_rows, replace=False))


# ------------------------------------------------------------------------------------------- PCA
@dataclass
class PCAFrontend:
    """Train-split z-scoring and PCA of both modalities (see the module docstring). float64 numpy."""

    neuro_mean: np.ndarray  # (V,)
    neuro_std: np.ndarray  # (V,)
    neuro_components: np.ndarray  # (V, p)
    gene_mean: np.ndarray  # (G', D)
    gene_std: np.ndarray  # (G', D)
    gene_components: np.ndarray  # (G', D, k1): per-gene whitening (several genes) or PCA (one gene)
    joint_mean: np.ndarray | None = None  # (G' k1,) several genes only
    joint_components: np.ndarray | None = None  # (G' k1, q) several genes only
    # rrr / rcca only: whitened brain scores and whitened per-gene scores, appended after the
    # CCA/PLS columns by the transforms (columns p: and q:).
    brain_whitening: np.ndarray | None = None  # (V, P)
    gene_whitening: np.ndarray | None = None  # (G', D, K)

    @property
    def dims(self) -> tuple[int, int]:
        q = self.joint_components.shape[1] if self.joint_components is not None else self.gene_components.shape[2]
        return self.neuro_components.shape[1], q

    def transform_neuro(self, neuro: np.ndarray) -> np.ndarray:
        """Raw rows (n, V) -> PCA scores (n, p) float64 [+ whitened brain scores (n, P)]."""
        z = zscore(np.asarray(neuro, dtype=np.float64), self.neuro_mean, self.neuro_std)  # (n, V)
        if self.brain_whitening is None:
            return z @ self.neuro_components
        return np.hstack([z @ self.neuro_components, z @ self.brain_whitening])

    def _per_gene(self, genes: np.ndarray, matrices=None) -> np.ndarray:
        """Raw rows (n, G', D) -> per-gene scores (n, G' k) of each matrix (G', D, k), hstacked."""
        z = zscore(np.asarray(genes, dtype=np.float64), self.gene_mean, self.gene_std).transpose(1, 0, 2)  # (G', n, D)
        parts = [np.matmul(z, m).transpose(1, 0, 2).reshape(len(genes), -1)  # (n, G' k), gene-major columns
                 for m in (matrices or [self.gene_components])]
        return parts[0] if len(parts) == 1 else np.hstack(parts)

    def transform_genes(self, genes: np.ndarray) -> np.ndarray:
        """Raw rows (n, G', D) -> PCA scores (n, q) float64 [+ whitened per-gene scores (n, G' K)]."""
        if self.gene_whitening is None:
            flat, whitened = self._per_gene(genes), None
        else:
            both = self._per_gene(genes, [self.gene_components, self.gene_whitening])
            split = self.gene_components.shape[0] * self.gene_components.shape[2]  # G' k1
            flat, whitened = both[:, :split], both[:, split:]
        scores = flat if self.joint_components is None else (flat - self.joint_mean) @ self.joint_components
        return scores if whitened is None else np.hstack([scores, whitened])


def _read_all(store: StoreView, rows: np.ndarray, gene_indices, batch_rows: int, inputs=None) -> tuple[np.ndarray, np.ndarray]:
    """neuro (n, V) and genes (n, G', D) float32 of sorted `rows`, read chunk by chunk (through
    `inputs` as in `read_batches`)."""
    neuro = np.empty((len(rows), store.neuro_dim), dtype=np.float32)
    genes = np.empty((len(rows), len(gene_indices), store.embedding_dim), dtype=np.float32)
    at = 0
    for _, neuro_b, genes_b in read_batches(store, rows, batch_rows, gene_indices, inputs):
        neuro[at : at + len(neuro_b)], genes[at : at + len(neuro_b)] = neuro_b, genes_b
        at += len(neuro_b)
    return neuro, genes


def fit_frontend(
    store: StoreView,
    rows: np.ndarray,
    gene_indices,
    config: BaselineConfig,
    device: torch.device | str = "cpu",
    batch_rows: int = 512,
    regression: bool = False,
    inputs=None,
) -> tuple[PCAFrontend, np.ndarray, np.ndarray]:
    """Fit the PCA front-end on `rows` (train rows) of the genes `gene_indices` (store indices);
    with `regression`, also the whitened columns rrr / rcca read (widths: the grids' largest).

    Returns (front-end, neuro scores (n, p), gene scores (n, q)) of those rows. The rows are held in
    memory as float32 (at most `fit_max_rows` of them); statistics are float64 (`pipeline.normalize`)."""
    device = torch.device(device)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    rows = np.sort(np.asarray(rows, dtype=np.int64))
    n, single = len(rows), len(gene_indices) == 1
    p = min(config.pca_dim, store.neuro_dim, n - 1)
    k1 = min(config.pca_dim if single else config.per_gene_dim, store.embedding_dim, n - 1)
    neuro, genes = _read_all(store, rows, list(gene_indices), batch_rows, inputs)
    x = torch.from_numpy(neuro).to(device)  # (n, V)
    neuro_mean, neuro_std, neuro_components = fit_pca(x, p, generator, False, POWER_ITERATIONS)  # (V,), (V,), (V, p)
    del x
    # Several genes: each gene whitened, so the joint PCA weighs every gene's leading directions alike.
    gene_mean, gene_std, gene_components = fit_gene_pca(torch.from_numpy(genes).to(device), k1, whiten=not single)
    frontend = PCAFrontend(*(t.cpu().numpy() for t in (neuro_mean, neuro_std, neuro_components,
                                                       gene_mean, gene_std, gene_components)))
    neuro_scores = _transform_rows(frontend.transform_neuro, neuro, batch_rows)  # (n, p)
    per_gene = _transform_rows(frontend._per_gene, genes, batch_rows)  # (n, G' k1)
    if regression:  # its own generator: CCA / PLS stay the same whichever methods are asked for
        reg_generator = torch.Generator(device=device).manual_seed(config.seed + 1)
        big = min(max(config.brain_dims), store.neuro_dim, n - 1)
        whitening = fit_pca(torch.from_numpy(neuro).to(device), big, reg_generator, True, POWER_ITERATIONS)[2]
        frontend.brain_whitening = whitening.cpu().numpy()  # (V, P)
        k = min(max(config.gene_dims), store.embedding_dim, n - 1)
        frontend.gene_whitening = fit_gene_pca(torch.from_numpy(genes).to(device), k)[2].cpu().numpy()  # (G', D, K)
    if not single:
        q = min(config.pca_dim, per_gene.shape[1], n - 1)
        joint_mean = per_gene.mean(axis=0)  # (G' k1,)
        centred = torch.from_numpy(per_gene - joint_mean).float().to(device)  # (n, G' k1)
        _, joint_components = principal_components(centred, q, generator, POWER_ITERATIONS)  # (G' k1, q)
        frontend.joint_mean, frontend.joint_components = joint_mean, joint_components.cpu().numpy()
    if regression:  # every column the methods read: CCA/PLS scores, then the whitened ones
        neuro_scores = _transform_rows(frontend.transform_neuro, neuro, batch_rows)
        return frontend, neuro_scores, _transform_rows(frontend.transform_genes, genes, batch_rows)
    gene_scores = per_gene if single else (per_gene - joint_mean) @ frontend.joint_components
    return frontend, neuro_scores, gene_scores


def _transform_rows(transform, rows: np.ndarray, batch_rows: int) -> np.ndarray:
    return np.concatenate([transform(rows[i : i + batch_rows]) for i in range(0, len(rows), batch_rows)])


# -------------------------------------------------------------------------------------- CCA / PLS
def _l2(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.where(norms > 0, norms, 1.0)).astype(np.float32)


@dataclass
class FittedBaseline:
    name: str  # one of BASELINES
    estimator: object  # sklearn CCA | PLSCanonical fitted on the train PCA scores; None for rrr / rcca
    n_components: int
    train_correlations: list  # per component: correlation of the train neuro- and gene-side features
    notes: list = field(default_factory=list)
    neuro_columns: object = field(default_factory=lambda: slice(None))  # the front-end's output columns this method reads
    gene_columns: object = field(default_factory=lambda: slice(None))
    neuro_map: np.ndarray | None = None  # rrr / rcca: (P', c) and (Q', c) linear maps to the features
    gene_map: np.ndarray | None = None
    chosen: dict = field(default_factory=dict)  # hyperparameters chosen on val, val_top1, val_mrr

    @property
    def label(self) -> str:
        return LABELS[self.name]

    def embed(self, neuro_scores: np.ndarray, gene_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Front-end scores -> unit-norm features (n, c), (n, c) float32; score = cosine."""
        x, y = neuro_scores[:, self.neuro_columns], gene_scores[:, self.gene_columns]
        if self.estimator is None:
            return _l2(x @ self.neuro_map), _l2(y @ self.gene_map)
        with threadpool_limits(limits=1, user_api="blas"):
            x, y = self.estimator.transform(x, y)
        return _l2(np.asarray(x)), _l2(np.asarray(y))

    def describe(self) -> dict:
        return {"n_components": int(self.n_components), "train_correlations": list(self.train_correlations),
                **self.chosen}


@dataclass
class Baselines:
    """The shared front-end and the fitted methods, plus what to record about the fit."""

    frontend: PCAFrontend
    methods: dict  # name -> FittedBaseline
    n_fit: int
    gene_names: tuple
    config: BaselineConfig
    notes: list = field(default_factory=list)

    def strongest(self) -> str | None:
        """The method with the best val (top-1, MRR), the one a report should compare the model with."""
        scored = {name: (m.chosen["val_top1"], m.chosen["val_mrr"]) for name, m in self.methods.items() if "val_top1" in m.chosen}
        return max(scored, key=scored.get) if scored else None

    def describe(self) -> dict:
        p, q = self.frontend.dims
        return {
            "fitted_on": "train split",
            "n_fit_rows": int(self.n_fit),
            "genes": list(self.gene_names),
            "neuro_pca_dim": int(p),
            "gene_pca_dim": int(q),
            "per_gene_dim": None if len(self.gene_names) == 1 else int(self.frontend.gene_components.shape[2]),
            "scoring": "cosine similarity in the canonical space",
        }


def _estimator(name: str, n_components: int, max_iter: int):
    from sklearn.cross_decomposition import CCA, PLSCanonical

    if name == "cca":
        return CCA(n_components=n_components, scale=True, max_iter=max_iter)
    # scale=False: the PCA scores are uncorrelated, so standardising them would whiten both views and
    # turn PLS into CCA. Unscaled, PLS on PCA scores is PLS on the z-scored features (PCA is a
    # rotation), i.e. covariance-, not correlation-maximising, as PLS is meant to be.
    return PLSCanonical(n_components=n_components, scale=False, max_iter=max_iter)


def fit_baseline(name: str, neuro_scores: np.ndarray, gene_scores: np.ndarray, config: BaselineConfig) -> FittedBaseline:
    """Fit one method on train PCA scores (n, p), (n, q)."""
    from sklearn.exceptions import ConvergenceWarning

    if name not in BASELINES:
        raise GenealignError(f"Unknown baseline {name!r}: use any of {', '.join(BASELINES)} (or none).")
    c = max(1, min(config.n_components, neuro_scores.shape[1], gene_scores.shape[1], len(neuro_scores) - 1))
    estimator = _estimator(name, c, config.max_iter)
    notes = []
    # The matrices are small (n x 64): one BLAS thread is faster than several, and far faster when
    # the threads compete with torch's for the same cores.
    with warnings.catch_warnings(record=True) as caught, threadpool_limits(limits=1, user_api="blas"):
        warnings.simplefilter("always", ConvergenceWarning)
        estimator.fit(neuro_scores, gene_scores)
        x, y = estimator.transform(neuro_scores, gene_scores)
    if any(issubclass(w.category, ConvergenceWarning) for w in caught):
        notes.append(f"{LABELS[name]}: scikit-learn reported that some components did not converge in {config.max_iter} iterations.")
    correlations = [float(np.corrcoef(x[:, k], y[:, k])[0, 1]) for k in range(c)]
    return FittedBaseline(name, estimator, c, correlations, notes, slice(0, neuro_scores.shape[1]),
                          slice(0, gene_scores.shape[1]))


# ------------------------------------------------------------------------------------- rrr / rcca
def val_score(neuro_f: np.ndarray, gene_f: np.ndarray) -> tuple[float, float]:
    """(top-1, MRR), each the mean of both retrieval directions, of matched rows on one pool."""
    sims = _l2(neuro_f) @ _l2(gene_f).T  # (n, n), row i matches column i
    top1, mrr = [], []
    for s in (sims, sims.T):
        rank = (s > np.diag(s)[:, None]).sum(axis=1)  # 0 = the match scores highest
        top1.append(float((rank == 0).mean()))
        mrr.append(float((1.0 / (rank + 1)).mean()))
    return float(np.mean(top1)), float(np.mean(mrr))


def _columns(genes, k: int, width: int) -> np.ndarray:
    """Columns of the first k whitened scores of `genes` (positions) in the gene-major (n, G' width) block."""
    return (np.asarray(genes)[:, None] * width + np.arange(k)).ravel()


def _linear_maps(kind: str, x: np.ndarray, y: np.ndarray, config: BaselineConfig, brain_dims, ranks):
    """Yield (alpha, p, rank, gene map (q, r), neuro map (p, r)) of train x (n, q) -> y[:, :p] over the grids.

    rrr: ridge (scikit-learn) from x to y, then the rank-r truncation along the top right singular
    vectors of the train predictions (ridge fits each target alone, so y[:, :p] uses the first p
    columns of one fit). rcca: CCA with (x'x/n + alpha I) for x's covariance; y is whitened, so its
    covariance is the identity."""
    n = len(x)
    if kind == "rrr":
        from sklearn.linear_model import Ridge

        for alpha in config.alphas:
            coef = Ridge(alpha=alpha * n, fit_intercept=False).fit(x, y).coef_.T  # (q, P)
            for p in brain_dims:
                _, _, vt = np.linalg.svd(x @ coef[:, :p], full_matrices=False)
                for r in ranks(p):
                    yield alpha, p, r, coef[:, :p] @ vt[:r].T, vt[:r].T
        return
    evals, basis = np.linalg.eigh(x.T @ x / n)
    cross = x.T @ y / n  # (q, P)
    for alpha in config.alphas:
        inv_sqrt = (basis / np.sqrt(np.clip(evals, 0, None) + alpha)) @ basis.T  # (q, q)
        for p in brain_dims:
            u, _, vt = np.linalg.svd(inv_sqrt @ cross[:, :p], full_matrices=False)
            for r in ranks(p):
                yield alpha, p, r, inv_sqrt @ u[:, :r], vt[:r].T


def _search(kind: str, train: tuple, val: tuple, genes, config: BaselineConfig, dims: tuple) -> dict:
    """The (k, alpha, p, rank) on the grids with the best val (top-1, MRR) for the genes `genes`."""
    (x_tr, y_tr), (x_va, y_va) = train, val
    width, big = dims
    brain_dims = sorted({min(p, big) for p in config.brain_dims})
    best = None
    for k in sorted({min(k, width) for k in config.gene_dims}):
        cols = _columns(genes, k, width)
        ranks = lambda p: sorted({min(r, p, len(cols)) for r in config.ranks})  # noqa: E731
        for alpha, p, r, gene_map, neuro_map in _linear_maps(kind, x_tr[:, cols], y_tr, config, brain_dims, ranks):
            score = val_score(y_va[:, :p] @ neuro_map, x_va[:, cols] @ gene_map)
            if best is None or score > best["score"]:
                best = dict(score=score, k=k, alpha=alpha, p=p, rank=r, cols=cols, gene_map=gene_map, neuro_map=neuro_map)
    return best


def _gene_order(train: tuple, val: tuple, n_genes: int, width: int) -> np.ndarray:
    """Gene positions, best first, by the val R^2 of a per-gene ridge (alpha = n) fitted on train."""
    from sklearn.linear_model import Ridge

    (x_tr, y_tr), (x_va, y_va) = train, val
    r2 = [Ridge(alpha=len(x_tr), fit_intercept=False).fit(x_tr[:, _columns([j], width, width)], y_tr)
          .score(x_va[:, _columns([j], width, width)], y_va) for j in range(n_genes)]
    return np.argsort(-np.asarray(r2), kind="stable")


def fit_regression(name: str, train: tuple, val: tuple, n_genes: int, config: BaselineConfig,
                   offsets: tuple, dims: tuple) -> FittedBaseline:
    """rrr / rcca [screened]: train (x, y) and val (x, y) are the whitened per-gene and brain scores."""
    if name == "qrr_screened":  # imported here: that module builds on this one's classes
        from alignment.baselines_quadratic import fit_quadratic

        return fit_quadratic(train, val, n_genes, config, offsets, dims)
    kind = name.split("_")[0]
    with threadpool_limits(limits=1, user_api="blas"):
        if name in SCREENED:
            order = _gene_order(train, val, n_genes, dims[0])
            kept = sorted({min(m, n_genes) for m in config.genes_kept})
            best = max((dict(_search(kind, train, val, order[:m], config, dims), genes=m) for m in kept),
                       key=lambda b: b["score"])
        else:
            best = dict(_search(kind, train, val, np.arange(n_genes), config, dims), genes=n_genes)
    x, y = train[0][:, best["cols"]] @ best["gene_map"], train[1][:, : best["p"]] @ best["neuro_map"]
    correlations = [float(np.corrcoef(x[:, i], y[:, i])[0, 1]) for i in range(x.shape[1])]
    chosen = {"per_gene_dim": best["k"], "alpha": best["alpha"], "brain_dim": best["p"], "rank": best["rank"],
              "genes_kept": best["genes"], "val_top1": best["score"][0], "val_mrr": best["score"][1]}
    if name in SCREENED:
        chosen["screened_genes"] = [int(j) for j in order[: best["genes"]]]
    return FittedBaseline(name, None, best["rank"], correlations, [], offsets[0] + np.arange(best["p"]),
                          offsets[1] + best["cols"], best["neuro_map"], best["gene_map"], chosen)


def fit_baselines(
    store: StoreView,
    train_rows: np.ndarray,
    gene_indices,
    methods=BASELINES,
    config: BaselineConfig = BaselineConfig(),
    device: torch.device | str = "cpu",
    inputs=None,
) -> Baselines:
    """Fit the front-end and each method in `methods` on the train rows, genes `gene_indices`, of
    the raw rows or, with `inputs` (see `read_batches`), of the rows it returns."""
    methods = tuple(methods)
    unknown = [m for m in methods if m not in BASELINES]
    if unknown:
        raise GenealignError(f"Unknown baseline(s) {', '.join(unknown)}: use any of {', '.join(BASELINES)} (or none).")
    rows = fit_rows(train_rows, config.fit_max_rows, config.seed)
    if len(rows) < 4:
        raise GenealignError(
            f"The train split of {store.path} has {len(rows)} subjects; the baselines need at least 4 to fit."
        )
    gene_indices = list(gene_indices)
    notes = []
    if len(gene_indices) == 1 and any(m in SCREENED for m in methods):
        notes.append("Screened baselines skipped: they choose among several genes and this is one gene.")
        methods = tuple(m for m in methods if m not in SCREENED)
    val_rows = store.indices("val")
    regression = any(m in REGRESSION for m in methods)
    if regression and len(val_rows) < 2:
        raise GenealignError(f"The val split of {store.path} has {len(val_rows)} subjects; rrr / rcca choose their "
                             "hyperparameters on it and need at least 2: use --baselines cca,pls.")
    frontend, neuro_scores, gene_scores = fit_frontend(store, rows, gene_indices, config, device, regression=regression,
                                                       inputs=inputs)
    p, q = frontend.dims
    fitted = {name: fit_baseline(name, neuro_scores[:, :p], gene_scores[:, :q], config)
              for name in methods if name not in REGRESSION}
    if len(val_rows) >= 2:
        neuro_val, genes_val = _read_all(store, val_rows, gene_indices, 512, inputs)
        neuro_val = _transform_rows(frontend.transform_neuro, neuro_val, 512)
        genes_val = _transform_rows(frontend.transform_genes, genes_val, 512)
        for name in [m for m in methods if m in REGRESSION]:
            fitted[name] = fit_regression(name, (gene_scores[:, q:], neuro_scores[:, p:]),
                                          (genes_val[:, q:], neuro_val[:, p:]), len(gene_indices), config,
                                          (p, q), (frontend.gene_whitening.shape[2], frontend.brain_whitening.shape[1]))
        for baseline in fitted.values():
            if "val_top1" not in baseline.chosen:
                top1, mrr = val_score(*baseline.embed(neuro_val, genes_val))
                baseline.chosen.update(val_top1=top1, val_mrr=mrr)
    fitted = {name: fitted[name] for name in methods}
    names = tuple(store.gene_names[i] for i in gene_indices)
    for baseline in fitted.values():
        if "screened_genes" in baseline.chosen:  # positions -> names, best first
            baseline.chosen["screened_genes"] = [names[j] for j in baseline.chosen["screened_genes"]]
    return Baselines(frontend=frontend, methods=fitted, n_fit=len(rows), gene_names=names, config=config, notes=notes)


# ------------------------------------------------------------------------------- covariates only
@dataclass
class CovariateBaseline:
    """Reduced-rank ridge from the covariate design (n, K) to the whitened brain scores (n, p)."""

    design: Residualizer  # the covariate design's terms and train standardisation
    brain_mean: np.ndarray  # (V,)
    brain_std: np.ndarray  # (V,)
    brain_whitening: np.ndarray  # (V, p)
    fitted: FittedBaseline  # neuro_map (p, r), gene_map (K, r)
    n_fit: int

    def embed(self, store: StoreView, rows, inputs=None, batch_rows: int = 512) -> tuple[np.ndarray, np.ndarray]:
        """Unit-norm features (n, r) of sorted `rows`: observed brain (through `inputs`) and predicted brain."""
        neuro = _read_neuro(store, rows, inputs, batch_rows)  # (n, V)
        brain = zscore(neuro, self.brain_mean, self.brain_std) @ self.brain_whitening  # (n, p)
        design = self.design.design(store.covariates[np.sort(rows)])  # (n, K)
        return _l2(brain @ self.fitted.neuro_map), _l2(design @ self.fitted.gene_map)

    def describe(self) -> dict:
        return {"fitted_on": "train split", "n_fit_rows": int(self.n_fit), "covariates_design": self.design.term_names,
                "scoring": "cosine similarity of observed and predicted brain scores", **self.fitted.describe()}


def _read_neuro(store: StoreView, rows, inputs, batch_rows: int) -> np.ndarray:
    """Brain rows (n, V) float64 of sorted `rows`, through `inputs` (called with genes=None)."""
    parts = [neuro if inputs is None else inputs(batch, neuro, None)[0]
             for batch, neuro, _ in read_batches(store, rows, batch_rows, [0])]  # (b, V) each
    return np.concatenate(parts).astype(np.float64)


def fit_covariate_baseline(store: StoreView, train_rows, config: BaselineConfig = BaselineConfig(),
                           device: torch.device | str = "cpu", inputs=None) -> CovariateBaseline | None:
    """Fit on train, tune (alpha, brain width, rank) on val like rrr; None when the store has no
    covariates or the splits are too small. `inputs` as in `read_batches` (brain side only is used)."""
    rows, val_rows = fit_rows(train_rows, config.fit_max_rows, config.seed), store.indices("val")
    if store.covariates is None or len(rows) < 4 or len(val_rows) < 2:
        return None
    design = residualizer_for(ALL, store, rows)
    neuro = _read_neuro(store, rows, inputs, 512)  # (n, V)
    big = min(max(config.brain_dims), store.neuro_dim, len(rows) - 1)
    generator = torch.Generator(device=torch.device(device)).manual_seed(config.seed + 2)
    stats = fit_pca(torch.from_numpy(neuro).to(device), big, generator, True, POWER_ITERATIONS)
    mean, std, whitening = (t.cpu().numpy() for t in stats)  # (V,), (V,), (V, P)
    y_tr = zscore(neuro, mean, std) @ whitening  # (n, P)
    y_va = zscore(_read_neuro(store, val_rows, inputs, 512), mean, std) @ whitening
    x_tr, x_va = design.design(store.covariates[rows]), design.design(store.covariates[val_rows])  # (n, K)
    brain_dims = sorted({min(p, big) for p in config.brain_dims})
    ranks = lambda p: sorted({min(r, p, x_tr.shape[1]) for r in config.ranks})  # noqa: E731
    best = None
    with threadpool_limits(limits=1, user_api="blas"):
        for alpha, p, r, gene_map, neuro_map in _linear_maps("rrr", x_tr, y_tr, config, brain_dims, ranks):
            score = val_score(y_va[:, :p] @ neuro_map, x_va @ gene_map)
            if best is None or score > best[0]:
                best = (score, alpha, p, r, gene_map, neuro_map)
    (top1, mrr), alpha, p, r, gene_map, neuro_map = best
    x, y = x_tr @ gene_map, y_tr[:, :p] @ neuro_map
    correlations = [float(np.corrcoef(x[:, i], y[:, i])[0, 1]) if x[:, i].std() > 0 else 0.0 for i in range(r)]
    chosen = {"alpha": alpha, "brain_dim": p, "rank": r, "val_top1": top1, "val_mrr": mrr}
    fitted = FittedBaseline("covariates", None, r, correlations, [], slice(None), slice(None), neuro_map, gene_map, chosen)
    return CovariateBaseline(design, mean, std, whitening[:, :p], fitted, len(rows))


def rank_genes(store: StoreView, train_rows: np.ndarray, gene_indices, config: BaselineConfig = BaselineConfig(),
               device: torch.device | str = "cpu", inputs=None) -> list[int]:
    """Store gene indices, best first, as the screened baselines rank them: the val R^2 of a per-gene
    ridge from the gene's whitened PCA scores to the brain's, fitted on (at most fit_max_rows of) the
    train rows. `genealign train --screen_genes K` keeps the first K."""
    rows, val_rows = fit_rows(train_rows, config.fit_max_rows, config.seed), store.indices("val")
    gene_indices = list(gene_indices)
    if len(rows) < 4 or len(val_rows) < 2:
        raise GenealignError(f"Screening genes needs at least 4 train and 2 val subjects in {store.path} "
                             f"({len(rows)} and {len(val_rows)}); drop --screen_genes.")
    neuro, genes = _read_all(store, np.sort(rows), gene_indices, 512, inputs)  # (n, V), (n, G, D)
    generator = torch.Generator(device=torch.device(device)).manual_seed(config.seed + 1)
    big, k = (min(max(dims), width, len(rows) - 1) for dims, width in
              ((config.brain_dims, store.neuro_dim), (config.gene_dims, store.embedding_dim)))
    brain = [t.cpu().numpy() for t in fit_pca(torch.from_numpy(neuro).to(device), big, generator, True, POWER_ITERATIONS)]
    per_gene = [t.cpu().numpy() for t in fit_gene_pca(torch.from_numpy(genes).to(device), k)]  # (G, D) x2, (G, D, K)

    def scores(neuro, genes):  # brain (n, P), genes (n, G K): the whitened scores rrr regresses
        x = np.einsum("ngd,gdk->ngk", zscore(genes, per_gene[0], per_gene[1]), per_gene[2]).reshape(len(genes), -1)
        return x, zscore(neuro, brain[0], brain[1]) @ brain[2]

    train = scores(neuro, genes)
    del neuro, genes
    val = scores(*_read_all(store, val_rows, gene_indices, 512, inputs))
    with threadpool_limits(limits=1, user_api="blas"):
        order = _gene_order(train, val, len(gene_indices), per_gene[2].shape[2])
    return [gene_indices[j] for j in order.tolist()]
