"""Linear baselines for the retrieval figures: PCA + CCA and PCA + PLS, fitted on the train split only.

The point of a baseline is that a contrastive model's "top-1 out of 1,000" means little until a
classical linear method has been scored on the same split, the same pools and the same genes. Both
baselines share one PCA front-end; every statistic is estimated on (at most `fit_max_rows` of) the
train split, whatever split is evaluated.

Front-end (`PCAFrontend`):
- neuro (n, V): z-score each voxel with train mean/std, then PCA to `pca_dim` components.
- genes (n, G, D): z-score each (gene, dim); then
  * one gene (single mode): PCA to `pca_dim`;
  * several genes (sequence mode): per-gene PCA *whitening* to `per_gene_dim` components, concatenate
    the G genes (G x per_gene_dim columns), then a joint PCA to `pca_dim`. A PCA of the raw G x D
    concatenation (28,416 columns for UK Biobank) would keep whatever has the largest variance inside
    each gene; whitening each gene first puts every gene's leading directions on an equal footing, so
    the joint PCA keeps the directions shared by several genes (e.g. a genetic factor carried by a few
    genes). It also needs O(G x D^2) memory (per-gene covariances accumulated chunk by chunk) instead
    of the O(n x G x D) of a PCA of the concatenation.
- Single-mode checkpoints are compared with baselines on the same single gene, sequence-mode ones with
  baselines on all genes (the caller passes the gene indices).

Methods: scikit-learn's `CCA` and `PLSCanonical` (symmetric PLS, mode A) with `n_components`
components, fitted on the train PCA scores. Retrieval is by cosine similarity in the canonical space:
the neuro side is the x-scores, the gene side the y-scores, each row L2-normalised.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from pipeline.errors import GenealignError
from pipeline.store import StoreView

BASELINES = ("cca", "pls")
LABELS = {"cca": "PCA+CCA", "pls": "PCA+PLS"}
# Above this many columns a PCA uses a randomized range finder instead of an exact eigh.
EXACT_PCA_MAX_DIM = 2048


@dataclass(frozen=True)
class BaselineConfig:
    pca_dim: int = 64  # components per modality after the PCA front-end
    per_gene_dim: int = 32  # sequence mode: whitened components kept per gene before the joint PCA
    n_components: int = 8  # canonical components of CCA / PLS (beyond the few that carry signal, cosine only adds noise)
    fit_max_rows: int = 10_000  # train rows used for fitting (deterministic subsample)
    max_iter: int = 1000  # scikit-learn's NIPALS iterations per component
    seed: int = 0


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


def read_batches(store: StoreView, rows, batch_rows: int, gene_indices=None):
    """Yield (rows, neuro (b, V) float32, genes (b, G', D) float32) over `rows` (sorted), with only
    the genes `gene_indices` (store order) when given."""
    rows = np.sort(np.asarray(rows, dtype=np.int64))
    select = None if gene_indices is None or list(gene_indices) == list(range(store.n_genes)) else list(gene_indices)
    for batch in row_batches(store, rows, batch_rows):
        neuro, genes = store.read_rows(batch)  # (b, V), (b, G, D)
        if select is not None:
            genes = np.ascontiguousarray(genes[:, select])  # (b, G', D)
        yield batch, neuro, genes


def fit_rows(train_rows: np.ndarray, max_rows: int, seed: int) -> np.ndarray:
    """The train rows the baselines are fitted on: all of them, or a seeded sorted subsample."""
    train_rows = np.asarray(train_rows, dtype=np.int64)
    if len(train_rows) <= max_rows:
        return train_rows
    return np.sort(np.random.default_rng([seed, 23]).choice(train_rows, size=max_rows, replace=False))


# ------------------------------------------------------------------------------------------- PCA
def _top_components(z: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """(d, k) orthonormal leading principal directions of the centred rows `z` (n, d), sign-fixed."""
    n, d = z.shape
    if d <= EXACT_PCA_MAX_DIM:
        cov = (z.T.double() @ z.double()) / n  # (d, d)
        evals, evecs = torch.linalg.eigh(cov)
        components = evecs[:, torch.argsort(evals, descending=True)[:k]]
    else:  # randomized range finder with power iterations (Halko et al.)
        width = min(d, k + 10)
        basis = torch.randn(d, width, generator=generator, device=z.device, dtype=z.dtype)
        basis = torch.linalg.qr(z @ basis).Q  # (n, l)
        for _ in range(4):
            basis = torch.linalg.qr(z.T @ basis).Q  # (d, l)
            basis = torch.linalg.qr(z @ basis).Q  # (n, l)
        small = (basis.T @ z).double()  # (l, d): z projected on its leading range
        evals, evecs = torch.linalg.eigh(small @ small.T)  # (l, l): cheaper than an SVD of (l, d)
        order = torch.argsort(evals, descending=True)[:k]
        components = (small.T @ evecs[:, order]) / evals[order].clamp(min=1e-30).sqrt()  # (d, k)
    # Deterministic signs: the largest-magnitude entry of each direction is positive.
    signs = torch.sign(components.gather(0, components.abs().argmax(dim=0, keepdim=True)))
    signs[signs == 0] = 1
    return (components * signs).to(torch.float64)


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

    @property
    def dims(self) -> tuple[int, int]:
        q = self.joint_components.shape[1] if self.joint_components is not None else self.gene_components.shape[2]
        return self.neuro_components.shape[1], q

    def transform_neuro(self, neuro: np.ndarray) -> np.ndarray:
        """Raw rows (n, V) -> PCA scores (n, p) float64."""
        z = (np.asarray(neuro, dtype=np.float64) - self.neuro_mean) / self.neuro_std  # (n, V)
        return z @ self.neuro_components

    def _per_gene(self, genes: np.ndarray) -> np.ndarray:
        z = (np.asarray(genes, dtype=np.float64) - self.gene_mean) / self.gene_std  # (n, G', D)
        per_gene = np.matmul(z.transpose(1, 0, 2), self.gene_components)  # (G', n, k1), batched BLAS
        return per_gene.transpose(1, 0, 2).reshape(len(z), -1)  # (n, G' k1), gene-major columns

    def transform_genes(self, genes: np.ndarray) -> np.ndarray:
        """Raw rows (n, G', D) -> PCA scores (n, q) float64."""
        flat = self._per_gene(genes)
        if self.joint_components is None:
            return flat
        return (flat - self.joint_mean) @ self.joint_components


def fit_frontend(
    store: StoreView,
    rows: np.ndarray,
    gene_indices,
    config: BaselineConfig,
    device: torch.device | str = "cpu",
    batch_rows: int = 512,
) -> tuple[PCAFrontend, np.ndarray, np.ndarray]:
    """Fit the PCA front-end on `rows` (train rows) of the genes `gene_indices` (store indices).

    Returns (front-end, neuro scores (n, p), gene scores (n, q)) of those rows. Pass 1 keeps the
    neuro rows and accumulates per-gene moments and covariances (about a shift, float64); with
    several genes, pass 2 computes the whitened per-gene scores for the joint PCA."""
    device = torch.device(device)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    rows = np.asarray(rows, dtype=np.int64)
    n, n_genes, d = len(rows), len(gene_indices), store.embedding_dim
    single = n_genes == 1
    p = min(config.pca_dim, store.neuro_dim, n - 1)
    k1 = min(config.pca_dim if single else config.per_gene_dim, d, n - 1)

    neuro_rows = np.empty((n, store.neuro_dim), dtype=np.float32)  # (n, V)
    s1 = torch.zeros(n_genes, d, dtype=torch.float64, device=device)
    s2 = torch.zeros(n_genes, d, d, dtype=torch.float64, device=device)
    shift = None
    at = 0
    for _, neuro, genes in read_batches(store, rows, batch_rows, gene_indices):
        neuro_rows[at : at + len(neuro)] = neuro
        at += len(neuro)
        g = torch.from_numpy(genes).to(device)  # (b, G', D)
        if shift is None:
            shift = g.double().mean(dim=0)  # (G', D)
        c = (g.double() - shift).float().transpose(0, 1)  # (G', b, D)
        s1 += c.double().sum(dim=1)
        s2 += torch.bmm(c.transpose(1, 2), c).double()  # (G', D, D)
    mean_c = s1 / n  # (G', D), about the shift
    cov = s2 / n - mean_c[:, :, None] * mean_c[:, None, :]  # (G', D, D)
    gene_std = torch.diagonal(cov, dim1=1, dim2=2).clamp(min=0).sqrt()
    scale = float(gene_std.mean())
    gene_std = gene_std.clamp(min=1e-6 * scale if scale > 0 else 1.0)  # (G', D)
    corr = cov / (gene_std[:, :, None] * gene_std[:, None, :])  # covariance of the z-scored genes

    # Neuro: z-score and PCA on the device, float32 rows, float64 moments.
    x = torch.from_numpy(neuro_rows).to(device)
    neuro_mean = x.double().mean(dim=0)
    neuro_std = x.double().std(dim=0, correction=0)
    scale = float(neuro_std.mean())
    neuro_std = neuro_std.clamp(min=1e-6 * scale if scale > 0 else 1.0)
    z = ((x.double() - neuro_mean) / neuro_std).float()  # (n, V)
    del x, neuro_rows
    neuro_components = _top_components(z, p, generator)  # (V, p)
    neuro_scores = (z.double() @ neuro_components).cpu().numpy()  # (n, p)
    del z

    # Per-gene PCA; whitened when several genes are concatenated.
    # G' small eighs: one LAPACK thread each is several times faster than a threaded batch on CPU.
    with threadpool_limits(limits=1, user_api="blas"):
        evals, evecs = np.linalg.eigh(corr.cpu().numpy())  # ascending
    evals = torch.from_numpy(evals[:, ::-1][:, :k1].copy())  # (G', k1)
    evecs = torch.from_numpy(evecs[:, :, ::-1][:, :, :k1].copy())  # (G', D, k1)
    signs = torch.sign(evecs.gather(1, evecs.abs().argmax(dim=1, keepdim=True)))
    signs[signs == 0] = 1
    evecs = evecs * signs
    if not single:
        top = evals.max(dim=1, keepdim=True).values.clamp(min=1e-12)
        evecs = evecs / torch.maximum(evals, 1e-6 * top).sqrt()[:, None, :]
    frontend = PCAFrontend(
        neuro_mean=neuro_mean.cpu().numpy(),
        neuro_std=neuro_std.cpu().numpy(),
        neuro_components=neuro_components.cpu().numpy(),
        gene_mean=(mean_c + shift).cpu().numpy(),
        gene_std=gene_std.cpu().numpy(),
        gene_components=evecs.cpu().numpy(),
    )
    if single:
        gene_scores = np.concatenate(
            [frontend.transform_genes(genes) for _, _, genes in read_batches(store, rows, batch_rows, gene_indices)]
        )
        return frontend, neuro_scores, gene_scores

    per_gene = np.concatenate(
        [frontend._per_gene(genes) for _, _, genes in read_batches(store, rows, batch_rows, gene_indices)]
    )  # (n, G' k1)
    q = min(config.pca_dim, per_gene.shape[1], n - 1)
    joint_mean = per_gene.mean(axis=0)
    centred = torch.from_numpy(per_gene - joint_mean).float().to(device)
    frontend.joint_mean = joint_mean
    frontend.joint_components = _top_components(centred, q, generator).cpu().numpy()  # (G' k1, q)
    return frontend, neuro_scores, (per_gene - joint_mean) @ frontend.joint_components


# -------------------------------------------------------------------------------------- CCA / PLS
def _l2(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.where(norms > 0, norms, 1.0)).astype(np.float32)


@dataclass
class FittedBaseline:
    name: str  # 'cca' | 'pls'
    estimator: object  # sklearn CCA | PLSCanonical, fitted on the train PCA scores
    n_components: int
    train_correlations: list  # per component: correlation of the train x- and y-scores
    notes: list = field(default_factory=list)

    @property
    def label(self) -> str:
        return LABELS[self.name]

    def embed(self, neuro_scores: np.ndarray, gene_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """PCA scores -> unit-norm canonical features (n, c), (n, c) float32; score = cosine."""
        with threadpool_limits(limits=1, user_api="blas"):
            x, y = self.estimator.transform(neuro_scores, gene_scores)
        return _l2(np.asarray(x)), _l2(np.asarray(y))


@dataclass
class Baselines:
    """The shared front-end and the fitted methods, plus what to record about the fit."""

    frontend: PCAFrontend
    methods: dict  # name -> FittedBaseline
    n_fit: int
    gene_names: tuple
    config: BaselineConfig

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
    return FittedBaseline(name, estimator, c, correlations, notes)


def fit_baselines(
    store: StoreView,
    train_rows: np.ndarray,
    gene_indices,
    methods=BASELINES,
    config: BaselineConfig = BaselineConfig(),
    device: torch.device | str = "cpu",
) -> Baselines:
    """Fit the front-end and each method in `methods` on the train rows, genes `gene_indices`."""
    methods = tuple(methods)
    unknown = [m for m in methods if m not in BASELINES]
    if unknown:
        raise GenealignError(f"Unknown baseline(s) {', '.join(unknown)}: use any of {', '.join(BASELINES)} (or none).")
    rows = fit_rows(train_rows, config.fit_max_rows, config.seed)
    if len(rows) < 4:
        raise GenealignError(
            f"The train split of {store.path} has {len(rows)} subjects; the baselines need at least 4 to fit."
        )
    frontend, neuro_scores, gene_scores = fit_frontend(store, rows, list(gene_indices), config, device)
    fitted = {name: fit_baseline(name, neuro_scores, gene_scores, config) for name in methods}
    names = tuple(store.gene_names[i] for i in gene_indices)
    return Baselines(frontend=frontend, methods=fitted, n_fit=len(rows), gene_names=names, config=config)
