"""Synthetic cohorts with known ground truth, in exactly the seed's file formats, plus their oracle.

`synthesize(SynthConfig(...))` writes

    out_dir/gene_embeddings/{GENE}_brain_gene_embeddingUKB.csv   IID, emb_0 .. emb_{D-1}; one row a subject
    out_dir/brain_latent/{IID}_latent.npz                        np.savez, key `latent`, float32, latent_shape
    out_dir/truth.json                                           the ground truth (see `synthesize`)

The generative model (per subject; every parameter is rebuilt from the seed, never stored):

- Genetics. A low-dimensional genetic factor z ~ N(0, I_K) (K = 8), two private factors u, w ~ N(0, 1),
  and shared nuisance factors: ancestry a ~ N(0, I_4) and genotyping batch t ~ N(0, I_4). A minority
  of "causal" genes (~11%, strengths decaying geometrically from 1.0) each carry 3 dimensions of z:
  embedding = mean + scale * (strength * loadings @ z_subset + loadings @ (a, t) + the gene's own
  low-rank structured noise + isotropic noise). Gene "a" of the interaction pair carries only u,
  gene "b" only w. All other genes are pure noise with the same structure; a and t are shared by
  every gene (they dominate the embeddings' top principal components) and never reach the brain.
- Brain. Component values f(z, u, w), each standardised to mean 0 / variance 1: linear projections
  and liability-threshold (softplus) functions of the first 4 ("odd") dimensions of z; products and
  centred squares of the other 4 ("even") dimensions, which therefore carry no linear signal at all
  (epistasis / stabilising selection); and the interaction u * w, which neither gene of the pair
  predicts alone. Coefficients c = signal * f + non-genetic variation, mapped through spatially
  smooth maps (Gaussian blobs, one set per channel), plus large gene-independent nuisance maps
  (think head size, age), a mean image, Gaussian-blurred noise and white noise.
- `null=True`: the brain uses an independent copy of (z, u, w): same marginal distributions of both
  modalities, no gene->brain signal.

`oracle_embeddings` scores every (gene row, neuro row) pair with the generator's true parameters and
the observed data only; `oracle_retrieval` turns that into top-1 retrieval on a random pool.

CSV values are written with a fixed number of decimals (`GeneratorSpec.decimals`, 5 by default:
6 significant digits for values >= 1) by a vectorised formatter; the value a reader gets back,
`float32(float(text))`, is exactly `float32(round(x * 10**decimals) / 10**decimals)`.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from pipeline.atomic import atomic_write_json, replace_dir, temp_dir_for
from pipeline.errors import GenealignError
from pipeline.sources import DEFAULT_IID_COLUMN, DEFAULT_LATENT_KEY, gene_file_name, latent_file_name

# Real HGNC symbols of brain-relevant genes; a cohort with `genes=G` uses the first G.
GENE_SYMBOLS = (
    # Alzheimer's disease (familial and GWAS loci)
    "APOE", "BDNF", "COMT", "APP", "PSEN1", "PSEN2", "MAPT", "TREM2", "CLU", "BIN1", "SORL1", "ABCA7",
    "CR1", "PICALM", "CD33", "MS4A6A", "GRN", "CD2AP", "EPHA1", "INPP5D", "PLCG2", "ABI3", "PTK2B",
    "CELF1", "FERMT2", "CASS4", "SLC24A4", "RIN3", "ADAM10", "ACE", "SPI1", "TYROBP",
    # Parkinson's disease, ALS/FTD, prion, repeat disorders
    "SNCA", "LRRK2", "GBA1", "PINK1", "PRKN", "PARK7", "VPS35", "UCHL1", "ATP13A2", "SOD1", "TARDBP",
    "FUS", "C9orf72", "VCP", "PRNP", "HTT", "ATXN1", "ATXN2", "ATXN3", "FXN",
    # psychiatric GWAS and candidate genes
    "DISC1", "NRG1", "DRD2", "SLC6A4", "FOXP2", "CACNA1C", "ANK3", "ZNF804A", "TCF4", "GRIN2A",
    "GRIN2B", "GRM3", "SETD1A", "CSMD1", "DRD1", "DRD3", "DRD4", "HTR1A", "HTR2A", "HTR2C", "MAOA",
    "MAOB", "TPH2", "SLC6A3", "SLC6A2", "TH", "DDC", "DBH", "OXTR", "AVPR1A", "CHRNA7", "CHRNA4",
    # neurodevelopment, autism, epilepsy, synapse
    "NRXN1", "SHANK3", "SHANK2", "MECP2", "FMR1", "CNTNAP2", "NLGN3", "NLGN4X", "SYNGAP1", "DLG4",
    "CHD8", "ADNP", "DYRK1A", "ARID1B", "PTEN", "TSC1", "TSC2", "MTOR", "NF1", "UBE3A", "CDKL5",
    "STXBP1", "SCN1A", "SCN2A", "SCN8A", "KCNQ2", "GRIN1", "GRIA1", "GRIA2", "GABRA1", "GABRB3",
    "GABRG2", "GAD1", "GAD2", "SLC17A7", "CAMK2A", "ARC", "NTRK2", "RELN", "DCX", "PAFAH1B1",
    # glia and myelin, neural development
    "GFAP", "AQP4", "SLC1A2", "OLIG2", "MBP", "PLP1", "MOG", "CX3CR1", "NOTCH3", "DCC", "ROBO1",
)

TRUTH_NAME = "truth.json"
GENERATOR = "genealign-synth"
GENERATOR_VERSION = 1
IID_LOW, IID_HIGH = 1_000_000, 6_000_000  # UKB-like 7-digit IIDs in [IID_LOW, IID_HIGH)
BRAIN_CHUNK = 1024  # subjects per brain noise stream; fixed so the output never depends on workers

# Independent random streams: np.random.default_rng([seed, STREAM, ...]).
_SUBJECTS, _GENE_NOISE, _BRAIN_NOISE, _GENE_PARAMS, _ASSIGN, _BRAIN_PARAMS, _ORACLE_MC, _ROWS = range(8)


@dataclass(frozen=True)
class SynthConfig:
    """What to generate. Same config, same bytes."""

    out_dir: Path
    subjects: int = 8000
    genes: int = 111
    embedding_dim: int = 256
    latent_shape: tuple = (3, 15, 18, 15)
    seed: int = 0
    signal: float = 1.0
    null: bool = False
    missing_latent_frac: float = 0.01
    missing_gene_row_frac: float = 0.005
    shuffle_rows: bool = True


@dataclass(frozen=True)
class SynthResult:
    out_dir: Path
    gene_embedding_dir: Path
    brain_latent_dir: Path
    truth_path: Path
    n_subjects: int
    n_genes: int
    seconds: float


@dataclass(frozen=True)
class GeneratorSpec:
    """The generative model's fixed hyper-parameters (recorded in truth.json, read back by the oracle).

    Calibrated at signal=1.0 with 111 x 256 genes and (3, 15, 18, 15) latents: the oracle's top-1 on
    a pool of 1,000 is ~0.6-0.7 (both directions); a linear PCA+CCA or ridge model trained on 6,000
    subjects gets ~0.03-0.04, and even the best linear map (from the oracle's own posterior means)
    ~0.16: the nonlinear components and the interaction carry most of the retrievable signal."""

    n_factors: int = 8  # K, dimensions of the genetic factor z
    n_odd_factors: int = 4  # z[:4] reach the brain linearly/monotonically, z[4:] only through even functions
    factors_per_gene: int = 3
    causal_fraction: float = 0.11
    min_causal: int = 3
    strength_decay: float = 0.82  # strengths 1, 0.82, 0.67, ...
    # Precision (1 / posterior variance) a strength-1 gene alone gives about each factor it carries;
    # loadings are scaled by it, so difficulty does not depend on embedding_dim.
    gene_precision: float = 14.0
    interaction_precision: float = 14.0
    # Embedding noise, variance per dimension before the gene's scale: shared by every gene
    # (ancestry; genotyping batch / technical), the gene's own low-rank structure, isotropic.
    n_ancestry: int = 4
    ancestry_var: float = 0.15
    n_batch: int = 4
    batch_var: float = 0.15
    lowrank_rank: int = 8
    lowrank_var: float = 0.05
    iso_var: float = 0.4
    mean_sd: float = 0.3
    log_scale_range: float = 0.5  # gene scale = exp(uniform(-r, r))
    n_linear: int = 4
    n_threshold: int = 2
    n_product: int = 3
    n_square: int = 2
    threshold_gain: float = 2.5
    threshold_offset: float = 0.5
    interaction_amplitude: float = 1.0
    env_var: float = 0.08  # non-genetic variance of each signal coefficient
    n_nuisance: int = 6
    nuisance_sd: float = 2.0
    smooth_sd: float = 0.6
    white_sd: float = 0.4
    smooth_width: float = 1.5  # voxels, Gaussian blur of the structured noise
    blob_width: float = 2.0  # voxels, spatial maps
    blobs_per_channel: int = 2
    projection_noise: float = 0.04  # variance of a map's coefficient estimated alone from one latent
    decimals: int = 5

    @classmethod
    def from_dict(cls, values: dict) -> "GeneratorSpec":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


# ------------------------------------------------------------------------------------- parameters
@dataclass
class _GeneParams:
    mean: np.ndarray  # (D,)
    scale: float
    loadings: np.ndarray  # (D, L) on the shared latent y = [z, u, w, a]
    lowrank: np.ndarray  # (D, r): structured noise is lowrank @ h, h ~ N(0, I_r)


@dataclass
class _Model:
    """Everything rebuilt from (config, spec): the oracle and the writers use the same object."""

    config: SynthConfig
    spec: GeneratorSpec
    gene_names: tuple[str, ...]
    causal: dict  # gene index -> strength
    gene_factors: dict  # gene index -> list of factor indices into z
    interaction: tuple  # (gene index carrying u, gene index carrying w) or ()
    kinds: list  # per brain component: linear | threshold | product | square | interaction
    vectors: np.ndarray  # (M, 2, K + 2) projection(s) of (z, u, w) each component uses
    threshold_norm: tuple  # (mean, sd) of the raw threshold function under N(0, 1)
    maps: np.ndarray  # (M, V) signal maps
    nuisance_maps: np.ndarray  # (n_nuisance, V)
    mean_map: np.ndarray  # (V,)
    blur: list  # per spatial axis (n, n) blur matrix; structured noise = blur-along-axes(white)

    @property
    def n_latent(self) -> int:  # L: z, u, w, ancestry, batch
        return self.spec.n_factors + 2 + self.spec.n_ancestry + self.spec.n_batch

    @property
    def n_components(self) -> int:
        return len(self.kinds)

    @property
    def u_index(self) -> int:
        return self.spec.n_factors

    @property
    def w_index(self) -> int:
        return self.spec.n_factors + 1

    def gene(self, j: int) -> _GeneParams:
        return _gene_params(self, j)


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in key])


def _orthonormal(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """(rows, cols) with orthonormal columns when rows >= cols, else unit-norm random columns."""
    g = rng.standard_normal((rows, cols))
    if rows >= cols:
        q, r = np.linalg.qr(g)
        return q * np.sign(np.diag(r))
    return g / np.linalg.norm(g, axis=0, keepdims=True)


def _n_causal(spec: GeneratorSpec, n_genes: int) -> tuple[int, bool]:
    """(number of main-effect genes, whether there is an interaction pair) for a cohort of n_genes."""
    if n_genes >= 4:
        n = max(spec.min_causal, round(spec.causal_fraction * n_genes))
        return max(1, min(n, n_genes - 3)), True  # keep >= 1 pure-noise gene
    return max(1, n_genes - 1), False


def _build_model(config: SynthConfig, spec: GeneratorSpec) -> _Model:
    G, K = config.genes, spec.n_factors
    rng = _rng(config.seed, _ASSIGN)
    order = rng.permutation(G)
    n_causal, has_pair = _n_causal(spec, G)
    pair = (int(order[0]), int(order[1])) if has_pair else ()
    causal_idx = order[2 : 2 + n_causal] if has_pair else order[:n_causal]
    causal = {int(j): round(float(spec.strength_decay**i), 6) for i, j in enumerate(causal_idx)}
    # Greedy balanced assignment: each gene takes the factors least covered so far (and at least one
    # odd factor, so every causal gene has some linear signal), random tie-breaks.
    covered = np.zeros(K)
    gene_factors = {}
    n_odd = min(spec.n_odd_factors, K)
    for j, strength in causal.items():
        jitter = rng.uniform(0, 1e-6, K)
        first = int(np.argmin((covered + jitter)[:n_odd])) if n_odd else int(np.argmin(covered + jitter))
        rest = [k for k in np.argsort(covered + jitter, kind="stable") if k != first]
        chosen = sorted([first] + [int(k) for k in rest[: max(0, min(spec.factors_per_gene, K) - 1)]])
        covered[chosen] += strength**2
        gene_factors[j] = chosen

    brng = _rng(config.seed, _BRAIN_PARAMS)
    kinds, vectors = [], []
    odd, even = np.arange(n_odd), np.arange(n_odd, K)

    def embed(idx, vec):
        out = np.zeros(K + 2)
        out[idx] = vec
        return out

    if n_odd:
        basis = _orthonormal(brng, n_odd, max(n_odd, spec.n_linear))
        for m in range(spec.n_linear):
            col = basis[:, m] if m < basis.shape[1] else _orthonormal(brng, n_odd, 1)[:, 0]
            kinds.append("linear")
            vectors.append([embed(odd, col), np.zeros(K + 2)])
        for _ in range(spec.n_threshold):
            kinds.append("threshold")
            vectors.append([embed(odd, _orthonormal(brng, n_odd, 1)[:, 0]), np.zeros(K + 2)])
    if len(even) >= 2:
        for _ in range(spec.n_product):
            q = _orthonormal(brng, len(even), 2)
            kinds.append("product")
            vectors.append([embed(even, q[:, 0]), embed(even, q[:, 1])])
    if len(even) >= 1:
        for _ in range(spec.n_square):
            kinds.append("square")
            vectors.append([embed(even, _orthonormal(brng, len(even), 1)[:, 0]), np.zeros(K + 2)])
    if pair:
        kinds.append("interaction")
        vectors.append([embed([K], [1.0]), embed([K + 1], [1.0])])
    vectors = np.asarray(vectors, dtype=np.float64).reshape(len(kinds), 2, K + 2)

    raw = _softplus_moments(spec)
    latent_shape = tuple(int(s) for s in config.latent_shape)
    blur = [_blur_matrix(n, spec.smooth_width) for n in latent_shape[1:]]
    whiten = _Whitener(latent_shape, blur, spec)
    M = len(kinds)
    maps = np.stack([_blob_map(brng, latent_shape, spec) for _ in range(M)]) if M else np.zeros((0, whiten.V))
    nuisance = np.stack([_blob_map(brng, latent_shape, spec) for _ in range(spec.n_nuisance)])
    # Scale each map so its coefficient, estimated alone by GLS from one latent, has variance
    # `projection_noise`: the brain-side SNR then does not depend on latent_shape.
    for arr in (maps, nuisance):
        for m in range(len(arr)):
            info = float(np.sum(whiten(arr[m][None]) ** 2))
            arr[m] *= 1.0 / math.sqrt(info * spec.projection_noise)
    mean_map = _blob_map(brng, latent_shape, spec)
    mean_map = mean_map / max(float(np.std(mean_map)), 1e-12) + brng.normal(0, 0.5, latent_shape[0]).repeat(
        whiten.V // latent_shape[0]
    )
    return _Model(
        config=config, spec=spec, gene_names=tuple(GENE_SYMBOLS[:G]), causal=causal, gene_factors=gene_factors,
        interaction=pair, kinds=kinds, vectors=vectors, threshold_norm=raw, maps=maps, nuisance_maps=nuisance,
        mean_map=mean_map, blur=blur,
    )


def _gene_params(model: _Model, j: int) -> _GeneParams:
    spec, D, K = model.spec, model.config.embedding_dim, model.spec.n_factors
    rng = _rng(model.config.seed, _GENE_PARAMS, j)
    L = model.n_latent
    mean = rng.normal(0.0, spec.mean_sd, D)
    scale = float(np.exp(rng.uniform(-spec.log_scale_range, spec.log_scale_range)))
    r = max(1, min(spec.lowrank_rank, D // 4))
    basis = _orthonormal(rng, D, r)
    spectrum = 1.0 / np.arange(1, r + 1)
    spectrum *= spec.lowrank_var * D / spectrum.sum()
    lowrank = basis * np.sqrt(spectrum)
    directions = _orthonormal(rng, D, K + 2) * math.sqrt(D)  # (D, K+2), columns of norm sqrt(D)
    P = spec.n_ancestry
    loadings = np.zeros((D, L))
    loadings[:, K + 2 : K + 2 + P] = rng.normal(0.0, math.sqrt(spec.ancestry_var / max(P, 1)), (D, P))
    loadings[:, K + 2 + P :] = rng.normal(0.0, math.sqrt(spec.batch_var / max(spec.n_batch, 1)), (D, spec.n_batch))
    # Column norm^2 = strength^2 * precision * iso_var: the gene alone then gives about
    # `strength^2 * precision` of precision on each factor it carries.
    unit = math.sqrt(spec.iso_var / D)
    if j in model.causal:
        for k in model.gene_factors[j]:
            loadings[:, k] = directions[:, k] * unit * model.causal[j] * math.sqrt(spec.gene_precision)
    if model.interaction and j in model.interaction:
        k = model.u_index if j == model.interaction[0] else model.w_index
        loadings[:, k] = directions[:, k] * unit * math.sqrt(spec.interaction_precision)
    return _GeneParams(mean=mean, scale=scale, loadings=loadings, lowrank=lowrank)


def _softplus_moments(spec: GeneratorSpec) -> tuple[float, float]:
    nodes, weights = np.polynomial.hermite_e.hermegauss(80)
    weights = weights / weights.sum()
    g = np.logaddexp(0.0, spec.threshold_gain * (nodes - spec.threshold_offset))
    mean = float(weights @ g)
    return mean, float(math.sqrt(weights @ (g - mean) ** 2))


def _blur_matrix(n: int, width: float) -> np.ndarray:
    """(n, n) Gaussian blur, rows of unit norm, so blurred unit white noise has unit variance."""
    pos = np.arange(n)
    k = np.exp(-((pos[:, None] - pos[None, :]) ** 2) / (2.0 * width**2))
    return k / np.linalg.norm(k, axis=1, keepdims=True)


def _blob_map(rng: np.random.Generator, latent_shape: tuple, spec: GeneratorSpec) -> np.ndarray:
    """(V,) sum of Gaussian blobs, an independent set per channel (axis 0)."""
    grid = latent_shape[1:]
    coords = np.stack(np.meshgrid(*[np.arange(n) for n in grid], indexing="ij"), axis=-1).reshape(-1, len(grid))
    channels = []
    for _ in range(latent_shape[0]):
        centres = rng.uniform(0, 1, (spec.blobs_per_channel, len(grid))) * (np.asarray(grid) - 1)
        amps = rng.standard_normal(spec.blobs_per_channel)
        d2 = ((coords[None, :, :] - centres[:, None, :]) ** 2).sum(-1)  # (blobs, voxels)
        channels.append(amps @ np.exp(-d2 / (2.0 * spec.blob_width**2)))
    return np.concatenate(channels)


def _apply_axes(x: np.ndarray, mats: list, latent_shape: tuple) -> np.ndarray:
    """x (n, V) -> each spatial axis a (latent axes 1..) multiplied by mats[a]:
    y[.., i, ..] = sum_j mats[a][i, j] x[.., j, ..]. Keeps x's float dtype."""
    dims = (x.shape[0], *latent_shape)
    y = x
    for axis, mat in enumerate(mats, start=2):
        before, after = int(np.prod(dims[:axis])), int(np.prod(dims[axis + 1 :]))
        y = np.matmul(mat.astype(x.dtype), y.reshape(before, dims[axis], after))  # (before, n_axis, after)
    return y.reshape(x.shape[0], -1)


class _Whitener:
    """Whitens brain noise: cov = smooth_sd^2 * (blur blur^T along every spatial axis) + white_sd^2 * I,
    diagonal in the Kronecker eigenbasis of the per-axis blur covariances."""

    def __init__(self, latent_shape: tuple, blur: list, spec: GeneratorSpec):
        self.latent_shape = latent_shape
        self.V = int(np.prod(latent_shape))
        self.bases, eig = [], np.ones(latent_shape[1:])
        for axis, k in enumerate(blur):
            values, vectors = np.linalg.eigh(k @ k.T)
            self.bases.append(vectors.T)  # rotate into the eigenbasis
            shape = [1] * len(blur)
            shape[axis] = len(values)
            eig = eig * np.clip(values, 0.0, None).reshape(shape)
        var = spec.smooth_sd**2 * eig + spec.white_sd**2  # (grid,)
        self.inv_sd = np.broadcast_to(1.0 / np.sqrt(var), latent_shape).reshape(-1)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return _apply_axes(np.asarray(x, dtype=np.float64), self.bases, self.latent_shape) * self.inv_sd


# ------------------------------------------------------------------------------- subject draws
@dataclass
class _Subjects:
    iid: np.ndarray  # (N,) int64, 7 digits
    latent: np.ndarray  # (N, L) genetic side: z, u, w, ancestry, batch
    brain_factors: np.ndarray  # (N, K + 2) the (z, u, w) the brain sees: latent's, or independent (null)
    env: np.ndarray  # (N, M) non-genetic variation of the signal coefficients
    nuisance: np.ndarray  # (N, n_nuisance)
    missing_latent: np.ndarray  # subject indices without a latent file
    missing_row: dict  # subject index -> gene index whose CSV lacks the subject's row


def _draw_subjects(model: _Model) -> _Subjects:
    cfg, spec = model.config, model.spec
    N, K = cfg.subjects, spec.n_factors
    rng = _rng(cfg.seed, _SUBJECTS)
    iid = rng.choice(IID_HIGH - IID_LOW, size=N, replace=False).astype(np.int64) + IID_LOW
    latent = rng.standard_normal((N, model.n_latent))
    independent = rng.standard_normal((N, K + 2))
    env = rng.standard_normal((N, model.n_components)) * math.sqrt(spec.env_var)
    nuisance = rng.standard_normal((N, spec.n_nuisance)) * spec.nuisance_sd
    n_latent_missing = int(round(cfg.missing_latent_frac * N))
    n_row_missing = int(round(cfg.missing_gene_row_frac * N))
    perm = rng.permutation(N)
    which_gene = rng.integers(0, cfg.genes, size=n_row_missing)
    rows = perm[n_latent_missing : n_latent_missing + n_row_missing]
    return _Subjects(
        iid=iid, latent=latent, brain_factors=independent if cfg.null else latent[:, : K + 2], env=env,
        nuisance=nuisance, missing_latent=np.sort(perm[:n_latent_missing]),
        missing_row={int(s): int(g) for s, g in zip(rows, which_gene)},
    )


def _components(model: _Model, mean: np.ndarray, cov: np.ndarray | None = None) -> np.ndarray:
    """E[f | (z, u, w) ~ N(mean, cov)] per subject: (n, M). cov=None gives f itself at `mean`."""
    n = mean.shape[0]
    out = np.empty((n, model.n_components))
    nodes, weights = np.polynomial.hermite_e.hermegauss(24)
    weights = weights / weights.sum()
    for m, (kind, (v1, v2)) in enumerate(zip(model.kinds, model.vectors)):
        a = mean @ v1
        var_a = 0.0 if cov is None else float(v1 @ cov @ v1)
        if kind == "linear":
            out[:, m] = a
        elif kind == "threshold":
            t = a[:, None] + math.sqrt(var_a) * nodes[None, :]
            g = np.logaddexp(0.0, model.spec.threshold_gain * (t - model.spec.threshold_offset)) @ weights
            out[:, m] = (g - model.threshold_norm[0]) / model.threshold_norm[1]
        elif kind == "square":
            out[:, m] = (a**2 + var_a - 1.0) / math.sqrt(2.0)
        else:  # product of two orthogonal projections, or the interaction u * w
            b = mean @ v2
            out[:, m] = a * b + (0.0 if cov is None else float(v1 @ cov @ v2))
    if model.kinds and model.kinds[-1] == "interaction":
        out[:, -1] *= model.spec.interaction_amplitude
    return out


def _signal_coefficients(model: _Model, subjects: _Subjects, rows: np.ndarray) -> np.ndarray:
    """(n, M) brain coefficients of `rows`: signal * f(z, u, w) + non-genetic variation."""
    f = _components(model, subjects.brain_factors[rows])
    return model.config.signal * f + subjects.env[rows]


def _gene_values(model: _Model, subjects: _Subjects, j: int) -> np.ndarray:
    """(N, D) float64 embedding of gene j for every subject (before rounding to text)."""
    p = model.gene(j)
    D = model.config.embedding_dim
    rng = _rng(model.config.seed, _GENE_NOISE, j)
    h = rng.standard_normal((model.config.subjects, p.lowrank.shape[1]))
    noise = rng.standard_normal((model.config.subjects, D), dtype=np.float32)
    x = subjects.latent @ p.loadings.T + h @ p.lowrank.T  # (N, D)
    x += math.sqrt(model.spec.iso_var) * noise
    x *= p.scale
    x += p.mean
    return x


def _brain_values(model: _Model, subjects: _Subjects, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, neuro (n, V) float32) of one BRAIN_CHUNK block of subjects."""
    spec = model.spec
    lo, hi = chunk * BRAIN_CHUNK, min((chunk + 1) * BRAIN_CHUNK, model.config.subjects)
    rows = np.arange(lo, hi)
    rng = _rng(model.config.seed, _BRAIN_NOISE, chunk)
    V = model.mean_map.shape[0]
    smooth = rng.standard_normal((len(rows), V), dtype=np.float32)
    white = rng.standard_normal((len(rows), V), dtype=np.float32)
    coefficients = np.concatenate([_signal_coefficients(model, subjects, rows), subjects.nuisance[rows]], axis=1)
    maps = np.concatenate([model.maps, model.nuisance_maps]).astype(np.float32)  # (M + n_nuisance, V)
    neuro = _apply_axes(smooth, model.blur, tuple(model.config.latent_shape))  # (n, V) float32 throughout
    neuro *= np.float32(spec.smooth_sd)
    neuro += np.float32(spec.white_sd) * white
    neuro += coefficients.astype(np.float32) @ maps
    neuro += model.mean_map.astype(np.float32)
    return rows, neuro


# ------------------------------------------------------------------------------------ CSV writer
def _text_tables(decimals: int) -> tuple[np.ndarray, np.ndarray]:
    """uint64 lookup tables whose 8 bytes spell text, zero bytes as padding (dropped at the end).

    prefix[neg * 100 + integer_part] = "-12." ; fraction[f] = "01234," (decimals digits + ',')."""
    prefix = np.zeros((200, 8), np.uint8)
    for neg in (0, 1):
        for ip in range(100):
            text = ("-" if neg else "") + f"{ip}."
            prefix[neg * 100 + ip, : len(text)] = np.frombuffer(text.encode(), np.uint8)
    scale = 10**decimals
    frac = np.zeros((scale, 8), np.uint8)
    digits = np.arange(scale)
    for p in range(decimals):
        frac[:, decimals - 1 - p] = 48 + (digits // 10**p) % 10
    frac[:, decimals] = ord(",")
    return prefix.view(np.uint64).ravel(), frac.view(np.uint64).ravel()


def _iid_tokens(iid: np.ndarray) -> np.ndarray:
    """(n,) uint64 whose bytes spell the 7-digit IID followed by ','."""
    tok = np.zeros((len(iid), 8), np.uint8)
    for p in range(7):
        tok[:, 6 - p] = 48 + (iid // 10**p) % 10
    tok[:, 7] = ord(",")
    return tok.view(np.uint64).ravel()


def quantize(values: np.ndarray, decimals: int) -> np.ndarray:
    """The float32 a CSV reader gets back from what `write_gene_csv` writes for `values`."""
    n = np.rint(np.asarray(values, dtype=np.float64) * 10**decimals)
    return (n / 10**decimals).astype(np.float32)


def write_gene_csv(path: Path, iid: np.ndarray, values: np.ndarray, decimals: int) -> None:
    """Write `IID,emb_0..emb_{D-1}` rows with `decimals` fixed decimals, vectorised: each value is two
    table look-ups (sign + integer part, fraction) into a uint64 buffer whose zero padding bytes are
    then deleted (bytes.translate). |values| must be < 99 (the generator's values are O(1))."""
    values = np.asarray(values, dtype=np.float64)
    n_rows, D = values.shape
    assert 1 <= decimals <= 6 and (n_rows == 0 or np.abs(values).max() < 99.0), "value out of the writer's range"
    prefix_table, frac_table = _text_tables(decimals)
    tokens = _iid_tokens(np.asarray(iid, dtype=np.int64))
    scale = 10**decimals
    header = (DEFAULT_IID_COLUMN + "," + ",".join(f"emb_{d}" for d in range(D)) + "\n").encode()
    chunk = 256  # rows per block: keeps the byte buffer in cache
    buffer = np.empty((chunk, 1 + 2 * D), np.uint64)  # IID token, then (prefix, fraction) per value
    with open(path, "wb") as fh:
        fh.write(header)
        for lo in range(0, n_rows, chunk):
            block = values[lo : lo + chunk]
            m = len(block)
            q = np.rint(block * scale).astype(np.int64)  # (m, D)
            mag = np.abs(q)
            whole = mag // scale
            rows = buffer[:m]
            rows[:, 0] = tokens[lo : lo + m]
            np.take(prefix_table, whole + (q < 0) * 100, out=rows[:, 1::2])
            np.take(frac_table, mag - whole * scale, out=rows[:, 2::2])
            text = rows.view(np.uint8).reshape(m, -1)
            text[:, -8 + decimals] = 10  # the last value ends its line with '\n' instead of ','
            fh.write(rows.tobytes().translate(None, b"\x00"))


# --------------------------------------------------------------------------------------- writing
def _validate(config: SynthConfig) -> None:
    def bad(what: str) -> GenealignError:
        return GenealignError(f"SynthConfig: {what}")

    if int(config.subjects) < 2:
        raise bad(f"subjects={config.subjects}; expected at least 2 subjects.")
    if not 1 <= int(config.genes) <= len(GENE_SYMBOLS):
        raise bad(f"genes={config.genes}; expected 1 to {len(GENE_SYMBOLS)} (the built-in gene symbols).")
    if int(config.embedding_dim) < 2:
        raise bad(f"embedding_dim={config.embedding_dim}; expected at least 2.")
    shape = tuple(config.latent_shape)
    if len(shape) < 2 or min(int(s) for s in shape) < 1:
        raise bad(f"latent_shape={shape}; expected (channels, *grid) with positive sizes, e.g. (3, 15, 18, 15).")
    if int(np.prod(shape)) < 64:
        raise bad(f"latent_shape={shape} has {int(np.prod(shape))} values; use at least 64 (e.g. (2, 4, 4, 4)).")
    if not (config.signal >= 0 and math.isfinite(config.signal)):
        raise bad(f"signal={config.signal}; expected a finite number >= 0.")
    for name in ("missing_latent_frac", "missing_gene_row_frac"):
        value = getattr(config, name)
        if not 0.0 <= value < 1.0:
            raise bad(f"{name}={value}; expected a fraction in [0, 1).")
    if config.missing_latent_frac + config.missing_gene_row_frac >= 1.0:
        raise bad("missing_latent_frac + missing_gene_row_frac must be < 1 (some subjects must be complete).")


def _normalised(config: SynthConfig) -> SynthConfig:
    return SynthConfig(
        out_dir=Path(config.out_dir), subjects=int(config.subjects), genes=int(config.genes),
        embedding_dim=int(config.embedding_dim), latent_shape=tuple(int(s) for s in config.latent_shape),
        seed=int(config.seed), signal=float(config.signal), null=bool(config.null),
        missing_latent_frac=float(config.missing_latent_frac),
        missing_gene_row_frac=float(config.missing_gene_row_frac), shuffle_rows=bool(config.shuffle_rows),
    )


def _write_genes(config: SynthConfig, spec: GeneratorSpec, genes: list, out: Path) -> None:
    model = _build_model(config, spec)
    subjects = _draw_subjects(model)
    for j in genes:
        values = _gene_values(model, subjects, j)
        lacking = [s for s, g in subjects.missing_row.items() if g == j]
        if config.shuffle_rows:
            order = _rng(config.seed, _ROWS, j).permutation(config.subjects)
        else:
            order = np.argsort(subjects.iid, kind="stable")
        if lacking:
            order = order[~np.isin(order, lacking)]
        write_gene_csv(out / gene_file_name(model.gene_names[j]), subjects.iid[order], values[order], spec.decimals)


def _write_latents(config: SynthConfig, spec: GeneratorSpec, chunks: list, out: Path) -> None:
    model = _build_model(config, spec)
    subjects = _draw_subjects(model)
    missing = set(subjects.missing_latent.tolist())
    shape = tuple(config.latent_shape)
    for chunk in chunks:
        rows, neuro = _brain_values(model, subjects, chunk)
        for row, values in zip(rows, neuro):
            if int(row) not in missing:
                np.savez(out / latent_file_name(str(subjects.iid[row])), **{DEFAULT_LATENT_KEY: values.reshape(shape)})


def _run_task(task: tuple) -> None:
    kind, config, spec, items, out = task
    (_write_genes if kind == "genes" else _write_latents)(config, spec, items, out)


def _n_workers(config: SynthConfig) -> int:
    work = config.subjects * (config.genes * config.embedding_dim + int(np.prod(config.latent_shape)))
    if work < 20_000_000 or "fork" not in multiprocessing.get_all_start_methods():
        return 1
    return max(1, min(os.cpu_count() or 1, 8))


def synthesize(config: SynthConfig) -> SynthResult:
    """Generate a cohort (see the module docstring) and write it under `config.out_dir`.

    gene_embeddings/ and brain_latent/ are each written to a temporary sibling and renamed into
    place, replacing a previous cohort's folder whole (no stale files); truth.json is written last.
    truth.json holds the config, the generator spec, the gene list, the causal genes and their
    strengths, the factors each carries, the interaction pair, the brain components, and which IIDs
    lack a latent file or a row in one gene's CSV. Big parameters (loadings, maps) are not stored:
    they are rebuilt from the seed."""
    _validate(config)
    config = _normalised(config)
    spec = GeneratorSpec()
    start = time.perf_counter()
    out = config.out_dir
    out.mkdir(parents=True, exist_ok=True)
    model = _build_model(config, spec)
    subjects = _draw_subjects(model)
    gene_dir, latent_dir = out / "gene_embeddings", out / "brain_latent"
    # A folder without truth.json is an unfinished cohort: drop the old truth before touching the data.
    (out / TRUTH_NAME).unlink(missing_ok=True)
    tmp_genes, tmp_latents = temp_dir_for(gene_dir), temp_dir_for(latent_dir)
    try:
        n_chunks = -(-config.subjects // BRAIN_CHUNK)
        gene_batch = max(1, min(8, -(-config.genes // 8)))
        tasks = [("latents", config, spec, [c], tmp_latents) for c in range(n_chunks)]
        tasks += [
            ("genes", config, spec, list(range(lo, min(lo + gene_batch, config.genes))), tmp_genes)
            for lo in range(0, config.genes, gene_batch)
        ]
        workers = _n_workers(config)
        if workers == 1:
            for task in tasks:
                _run_task(task)
        else:
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
                list(pool.map(_run_task, tasks))
        replace_dir(tmp_genes, gene_dir)
        replace_dir(tmp_latents, latent_dir)
    except BaseException:
        shutil.rmtree(tmp_genes, ignore_errors=True)
        shutil.rmtree(tmp_latents, ignore_errors=True)
        raise
    truth_path = atomic_write_json(out / TRUTH_NAME, _truth(model, subjects))
    return SynthResult(
        out_dir=out, gene_embedding_dir=gene_dir, brain_latent_dir=latent_dir, truth_path=truth_path,
        n_subjects=config.subjects, n_genes=config.genes, seconds=time.perf_counter() - start,
    )


def _truth(model: _Model, subjects: _Subjects) -> dict:
    cfg, spec = model.config, model.spec
    names = model.gene_names
    planted = {names[j]: s for j, s in sorted(model.causal.items(), key=lambda kv: -kv[1])}
    no_signal = cfg.null or cfg.signal == 0
    components = []
    for m, (kind, (v1, v2)) in enumerate(zip(model.kinds, model.vectors)):
        entry = {"index": m, "kind": kind}
        if kind == "interaction":
            entry["genes"] = [names[j] for j in model.interaction]
        else:
            entry["factors"] = sorted({int(k) for k in np.flatnonzero(np.abs(v1) + np.abs(v2) > 1e-12)})
        components.append(entry)
    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items() if k != "out_dir"}
    return {
        "generator": GENERATOR,
        "generator_version": GENERATOR_VERSION,
        "config": config,
        "spec": asdict(spec),
        "gene_names": list(names),
        "null": cfg.null,
        "signal": cfg.signal,
        # Genes with a main effect on the brain, strongest first ({} when nothing reaches the brain).
        "causal_genes": {} if no_signal else planted,
        # The same genes' planted structure, also in a null cohort (their embeddings are identical).
        "planted_genes": planted,
        "gene_factors": {names[j]: model.gene_factors[j] for j in model.causal},
        "interaction": (
            {"genes": [names[j] for j in model.interaction], "factors": ["u", "w"], "component": len(model.kinds) - 1,
             "strength": spec.interaction_amplitude, "active": not no_signal}
            if model.interaction else None
        ),
        "noise_genes": [n for j, n in enumerate(names) if j not in model.causal and j not in model.interaction],
        "brain_components": components,
        "n_subjects": cfg.subjects,
        "n_complete": cfg.subjects - len(subjects.missing_latent) - len(subjects.missing_row),
        "missing_latent": sorted(str(subjects.iid[s]) for s in subjects.missing_latent),
        "missing_gene_row": dict(sorted((str(subjects.iid[s]), names[g]) for s, g in subjects.missing_row.items())),
        "csv_decimals": spec.decimals,
        "notes": {
            "strength": "a causal gene's loading scale; alone it gives ~strength^2 * spec.gene_precision "
                        "of precision on each factor of z it carries (gene_factors)",
            "interaction": "gene a carries only u, gene b only w; the brain component is u * w",
            "oracle": "pipeline.synth.oracle_embeddings rebuilds every parameter from config + spec",
        },
    }


# ----------------------------------------------------------------------------------------- truth
def load_truth(path: str | Path) -> dict:
    """truth.json of a cohort (the file, or the cohort folder holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / TRUTH_NAME
    if not path.exists():
        raise GenealignError(f"{path} does not exist: point at the truth.json written by `genealign synth`.")
    try:
        truth = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise GenealignError(
            f"{path} is not valid JSON ({exc}); regenerate the cohort with `genealign synth`."
        ) from exc
    if truth.get("generator") != GENERATOR:
        raise GenealignError(f"{path} was not written by `genealign synth`; regenerate the cohort.")
    if truth.get("generator_version") != GENERATOR_VERSION:
        raise GenealignError(
            f"{path} comes from synth generator version {truth.get('generator_version')}, this genealign "
            f"rebuilds version {GENERATOR_VERSION}; regenerate the cohort with `genealign synth`."
        )
    return truth


def causal_genes(truth: dict) -> dict[str, float]:
    """Genes with a main effect on the brain -> strength (1.0 = strongest), strongest first.
    Empty for a null cohort. The interaction pair is in truth['interaction'] (no main effect)."""
    return dict(truth["causal_genes"])


def strongest_gene(truth: dict) -> str:
    """The planted gene that alone tells the most about the brain: the largest `gene_information`
    (ties: the larger strength). Not simply the largest strength: a gene whose factors reach the
    brain only through products and squares carries little that one gene can retrieve (in the default
    cohort DLG4, strength 1.0, carries factors 0, 4, 5 and 1.9 nats; DBH, strength 0.67, carries the
    monotonically acting 1, 2, 3 and 2.6 nats, and its oracle top-1 out of 1,000 alone is 0.057
    against DLG4's 0.037). In a null cohort, the gene that would be strongest under the signal model (its
    embedding carries the same structure; nothing reaches the brain), so null and signal runs can be
    compared gene for gene."""
    planted = truth["planted_genes"]
    information = gene_information(truth)
    return max(planted, key=lambda g: (information[g], planted[g]))


def gene_information(truth: dict) -> dict[str, float]:
    """Planted gene -> what its embedding alone tells about the brain: the mutual information, in nats
    per subject, between the oracle's gene-side prediction of the brain components and their observed
    GLS estimates, under the oracle's Gaussian approximation: 0.5 * (log det marginal - log det
    predictive). From the truth alone, no data: the generator is linear-Gaussian on the gene side, so
    the posterior covariance does not depend on the observed values. Scored under the signal model
    (as the oracle scores a null cohort)."""
    model = _model_from_truth(truth)
    _, noise_cov = _observed_coefficients(model, np.zeros((1, int(np.prod(model.config.latent_shape)))))
    out = {}
    for name in truth["planted_genes"]:
        j = model.gene_names.index(name)
        _, cov = _gene_posterior(model, [j], np.zeros((1, 1, model.config.embedding_dim)))
        predictive, marginal = _oracle_covariances(model, cov, noise_cov)
        out[name] = 0.5 * float(np.linalg.slogdet(marginal)[1] - np.linalg.slogdet(predictive)[1])
    return out


def _model_from_truth(truth: dict) -> _Model:
    cfg = dict(truth["config"])
    cfg["latent_shape"] = tuple(cfg["latent_shape"])
    return _build_model(_normalised(SynthConfig(out_dir=Path("."), **cfg)), GeneratorSpec.from_dict(truth["spec"]))


# ---------------------------------------------------------------------------------------- oracle
def _gene_posterior(model: _Model, gene_idx: list, genes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Posterior of the shared latent y = (z, u, w, ancestry, batch) given the observed embeddings of the
    genes `gene_idx`: (mean (N, L), covariance (L, L)). Exact for the generator's linear-Gaussian
    gene model (each gene's low-rank + isotropic noise integrated out by Woodbury)."""
    L, iso = model.n_latent, model.spec.iso_var
    precision = np.eye(L)
    projected = np.zeros((genes.shape[0], L))
    for col, j in enumerate(gene_idx):
        p = model.gene(j)
        F, W = p.lowrank, p.loadings  # (D, r), (D, L)
        # C^-1 W with C = F F^T + iso I (noise of the gene after removing mean and scale)
        inner = np.linalg.solve(iso * np.eye(F.shape[1]) + F.T @ F, F.T @ W)
        cinv_w = (W - F @ inner) / iso  # (D, L)
        precision += W.T @ cinv_w
        x = (np.asarray(genes[:, col], dtype=np.float64) - p.mean) / p.scale  # (N, D)
        projected += x @ cinv_w
    cov = np.linalg.inv(precision)
    cov = (cov + cov.T) / 2
    return projected @ cov, cov


def _observed_coefficients(model: _Model, neuro: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """GLS estimate of the signal coefficients of each latent: (coefficients (N, M), their noise
    covariance (M, M)). Nuisance maps are random effects with their known variance; the structured
    and white noise are whitened exactly."""
    spec = model.spec
    whiten = _Whitener(tuple(model.config.latent_shape), model.blur, spec)
    X = whiten(model.maps).T  # (V, M)
    Z = whiten(model.nuisance_maps).T  # (V, n_nuisance)
    # V_tot^-1 = I - Z (Z^T Z + I / tau^2)^-1 Z^T
    core = np.linalg.inv(Z.T @ Z + np.eye(Z.shape[1]) / spec.nuisance_sd**2)
    vx = X - Z @ (core @ (Z.T @ X))
    info = X.T @ vx  # (M, M) = X^T V^-1 X
    noise_cov = np.linalg.inv(info)
    gls = vx @ noise_cov  # (V, M)
    out = np.empty((neuro.shape[0], X.shape[1]))
    for lo in range(0, neuro.shape[0], 2048):
        block = np.asarray(neuro[lo : lo + 2048], dtype=np.float64) - model.mean_map
        out[lo : lo + 2048] = whiten(block) @ gls
    return out, (noise_cov + noise_cov.T) / 2


def oracle_embeddings(truth: dict, gene_names, genes: np.ndarray, neuro: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(gene_side (N, M+2), neuro_side (N, M+2)) float64 with gene_side[i] @ neuro_side[j] = the
    oracle's log-likelihood ratio log p(c_j | genes_i) - log p(c_j) that gene row i and neuro row j
    are the same subject (pointwise mutual information; higher = better; Bayes-optimal ranking in
    both directions under the assumptions below).

    `genes` (N, G', D) holds the embeddings of `gene_names` (any subset of the cohort's genes, any
    order, float32 or float16-rounded); `neuro` (N, V) the latents flattened in C order.

    What it knows and assumes: the generator's true parameters, rebuilt from the seed in truth.json
    (gene loadings, noise structure, spatial maps, noise covariance, component functions), and the
    observed rows only, never the per-subject hidden factors. Gene side: the exact Gaussian
    posterior of (z, u, w, ancestry, batch) given the present genes, then the exact posterior mean mu_i of
    each brain component (closed forms; Gauss-Hermite for the threshold). Neuro side: the exact GLS
    estimate c_j of the component coefficients (noise whitened, nuisance maps as random effects).
    The one approximation: c | genes ~ N(mu, S) with S the population-average predictive
    covariance, and c ~ N(0, Sigma) marginally (both from 20,000 seeded Monte-Carlo draws); the true
    predictive law of the products/squares is not Gaussian and its spread varies by subject, so the
    oracle is close to, not exactly, the best achievable. Rounding of stored values is ignored (far
    below the noise). A null cohort is scored under the signal model, which gives ~chance."""
    model = _model_from_truth(truth)
    genes = np.asarray(genes)
    neuro = np.asarray(neuro)
    names = list(gene_names)
    if genes.ndim != 3 or genes.shape[1] != len(names) or genes.shape[2] != model.config.embedding_dim:
        raise GenealignError(
            f"oracle_embeddings: genes has shape {genes.shape}; expected (N, {len(names)}, "
            f"{model.config.embedding_dim}) for the {len(names)} gene names given."
        )
    V = int(np.prod(model.config.latent_shape))
    if neuro.ndim != 2 or neuro.shape[1] != V or neuro.shape[0] != genes.shape[0]:
        raise GenealignError(
            f"oracle_embeddings: neuro has shape {neuro.shape}; expected ({genes.shape[0]}, {V}) "
            f"(latents of shape {tuple(model.config.latent_shape)} flattened)."
        )
    unknown = [g for g in names if g not in model.gene_names]
    if unknown:
        raise GenealignError(
            f"oracle_embeddings: genes {', '.join(unknown[:5])} are not in this cohort's truth.json; "
            "use the truth.json of the cohort the store was ingested from."
        )
    gene_idx = [model.gene_names.index(g) for g in names]
    K2 = model.spec.n_factors + 2
    mean, cov = _gene_posterior(model, gene_idx, genes)
    mu = model.config.signal * _components(model, mean[:, :K2], cov[:K2, :K2])  # (N, M)
    observed, noise_cov = _observed_coefficients(model, neuro)  # (N, M), (M, M)

    predictive, marginal = _oracle_covariances(model, cov, noise_cov)
    pred_inv = np.linalg.inv(predictive)
    quad = pred_inv - np.linalg.inv(marginal)
    gene_side = np.concatenate(
        [mu @ pred_inv, -0.5 * np.einsum("nm,mk,nk->n", mu, pred_inv, mu)[:, None], np.ones((len(mu), 1))], axis=1
    )
    neuro_side = np.concatenate(
        [observed, np.ones((len(observed), 1)), -0.5 * np.einsum("nm,mk,nk->n", observed, quad, observed)[:, None]],
        axis=1,
    )
    return gene_side, neuro_side


def _oracle_covariances(model: _Model, cov: np.ndarray, noise_cov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(predictive, marginal) (M, M) covariances of the observed coefficients, given the gene
    posterior covariance `cov` (L, L) and the GLS noise covariance (M, M), by seeded Monte Carlo:
    y_hat ~ N(0, I - P) is what the posterior mean looks like, y = y_hat + N(0, P) the truth."""
    K2 = model.spec.n_factors + 2
    post_cov = cov[:K2, :K2]
    rng = _rng(model.config.seed, _ORACLE_MC)
    n_mc = 20_000
    spread = _sqrt_psd(np.eye(K2) - post_cov)
    residual = _sqrt_psd(post_cov)
    y_hat = rng.standard_normal((n_mc, K2)) @ spread.T
    y = y_hat + rng.standard_normal((n_mc, K2)) @ residual.T
    f_true = _components(model, y)
    f_pred = _components(model, y_hat, post_cov)
    s2 = model.config.signal**2
    M = model.n_components
    base = model.spec.env_var * np.eye(M) + noise_cov
    predictive = s2 * np.cov(f_true - f_pred, rowvar=False).reshape(M, M) + base
    marginal = s2 * np.cov(f_true, rowvar=False).reshape(M, M) + base
    return predictive, marginal


def _sqrt_psd(a: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh((a + a.T) / 2)
    return vectors * np.sqrt(np.clip(values, 0.0, None))


def oracle_retrieval(truth: dict, gene_names, genes: np.ndarray, neuro: np.ndarray, pool: int = 1000,
                     seed: int = 0) -> dict:
    """The oracle's top-1 retrieval on one random pool of min(pool, N) subjects, both directions.
    Ties count as misses (the true match must score strictly highest)."""
    n = genes.shape[0]
    size = min(int(pool), n)
    rows = np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))
    gene_side, neuro_side = oracle_embeddings(truth, gene_names, np.asarray(genes)[rows], np.asarray(neuro)[rows])
    score = gene_side @ neuro_side.T  # (pool, pool): row = gene query, column = neuro candidate
    diag = np.diag(score)
    off = score.copy()
    np.fill_diagonal(off, -np.inf)
    g2b = float(np.mean(diag > off.max(axis=1)))
    b2g = float(np.mean(diag > off.max(axis=0)))
    return {
        "pool_size": size,
        "gene_to_brain_top1": g2b,
        "brain_to_gene_top1": b2g,
        "mean_top1": (g2b + b2g) / 2,
        "chance_top1": 1.0 / size,
    }
