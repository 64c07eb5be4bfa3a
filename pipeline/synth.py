"""Synthetic cohorts with known ground truth, in exactly the seed's file formats.

`synthesize(SynthConfig(...))` writes

    out_dir/gene_embeddings/{GENE}_brain_gene_embeddingUKB.csv   IID, emb_0 .. emb_{D-1}; one row a subject
    out_dir/brain_latent/{IID}_latent.npz                        np.savez, key `latent`, float32, latent_shape
    out_dir/truth.json                                           the ground truth (see `synthesize`)
    out_dir/covariates.csv, out_dir/kinship.dat                  with `confounds` / `families` only
    out_dir/.genealign-synth.json                                what synth wrote (pipeline.synth_output)

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
- `confounds=True` / `families=F`: covariates and relatives as in UK Biobank (`pipeline.synth_confounds`),
  drawn from their own random streams: without them the output is what it was before they existed.

The oracle (`pipeline.oracle`) rebuilds every parameter from truth.json and scores retrieval with them.

CSV values are written with a fixed number of decimals (`GeneratorSpec.decimals`, 5 by default:
6 significant digits for values >= 1) by a vectorised formatter; the value a reader gets back,
`float32(float(text))`, is exactly `float32(round(x * 10**decimals) / 10**decimals)`.
"""

from __future__ import annotations

import functools
import json
import math
import multiprocessing
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from pipeline.atomic import atomic_write_json, replace_dir, temp_dir_for
from pipeline.errors import GenealignError
from pipeline import synth_confounds as confounds
from pipeline.sources import DEFAULT_LATENT_KEY, gene_file_name, latent_file_name
from pipeline.synth_output import (
    GENERATOR,
    GENERATOR_VERSION,
    TRUTH_NAME,
    claim_folder,
    remove_own,
    settings_record,
    truth_record,
    write_gene_csv,
    write_marker,
)
from pipeline.synth_space import Whitener, apply_axes, blob_map, blur_matrix

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

IID_LOW, IID_HIGH = 1_000_000, 6_000_000  # UKB-like 7-digit IIDs in [IID_LOW, IID_HIGH)
CONFOUND_SPEC = confounds.ConfoundSpec()
BRAIN_CHUNK = 1024  # subjects per brain noise stream; fixed so the output never depends on workers

# Independent random streams: np.random.default_rng([seed, STREAM, ...]).
_SUBJECTS, _GENE_NOISE, _BRAIN_NOISE, _GENE_PARAMS, _ASSIGN, _BRAIN_PARAMS, _ORACLE_MC, _ROWS = range(8)
_CONFOUNDS, _FAMILIES, _CONFOUND_PARAMS, _CONFOUND_MAPS, _KINSHIP = range(8, 13)  # --confounds / --families


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
    confounds: bool = False  # covariates.csv; age, sex, site, head size, ancestry drive the modalities
    families: float = 0.0  # fraction of subjects in sibling pairs/trios; kinship.dat


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
    Their calibration (oracle against linear models at signal=1.0) is in README.md."""

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
    confound_maps: np.ndarray | None = None  # (4 + n_sites, V) covariate maps, built on first use

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
    blur = [blur_matrix(n, spec.smooth_width) for n in latent_shape[1:]]
    whiten = Whitener(latent_shape, blur, spec)
    M = len(kinds)
    maps = np.stack([blob_map(brng, latent_shape, spec) for _ in range(M)]) if M else np.zeros((0, whiten.V))
    nuisance = np.stack([blob_map(brng, latent_shape, spec) for _ in range(spec.n_nuisance)])
    # Scale each map so its coefficient, estimated alone by GLS from one latent, has variance
    # `projection_noise`: the brain-side SNR then does not depend on latent_shape.
    for arr in (maps, nuisance):
        _scale_maps(arr, whiten, spec)
    mean_map = blob_map(brng, latent_shape, spec)
    mean_map = mean_map / max(float(np.std(mean_map)), 1e-12) + brng.normal(0, 0.5, latent_shape[0]).repeat(
        whiten.V // latent_shape[0]
    )
    return _Model(
        config=config, spec=spec, gene_names=tuple(GENE_SYMBOLS[:G]), causal=causal, gene_factors=gene_factors,
        interaction=pair, kinds=kinds, vectors=vectors, threshold_norm=raw, maps=maps, nuisance_maps=nuisance,
        mean_map=mean_map, blur=blur,
    )


def _scale_maps(arr: np.ndarray, whiten: "Whitener", spec: GeneratorSpec) -> None:
    """In place: each map (row) scaled so its coefficient, estimated alone by GLS from one latent,
    has variance `projection_noise`."""
    for m in range(len(arr)):
        info = float(np.sum(whiten(arr[m][None]) ** 2))
        arr[m] *= 1.0 / math.sqrt(info * spec.projection_noise)


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
    families: list = field(default_factory=list)  # arrays of sibling subject indices
    covariates: confounds.Covariates | None = None


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
    subjects = _Subjects(
        iid=iid, latent=latent, brain_factors=independent if cfg.null else latent[:, : K + 2], env=env,
        nuisance=nuisance, missing_latent=np.sort(perm[:n_latent_missing]),
        missing_row={int(s): int(g) for s, g in zip(rows, which_gene)},
    )
    if cfg.families > 0:
        _make_families(model, subjects)
    if cfg.confounds:
        ancestry = latent[:, K + 2 : K + 2 + spec.n_ancestry]
        subjects.covariates = confounds.draw_covariates(_rng(cfg.seed, _CONFOUNDS), CONFOUND_SPEC, ancestry,
                                                        subjects.families)
    return subjects


def _make_families(model: _Model, subjects: _Subjects) -> None:
    """Put `families` of the subjects in sibling groups and correlate their draws in place: genetic
    factors (and the null brain's own copy) by half, ancestry almost fully, part of the non-genetic
    brain variation. Marginals are unchanged, so the oracle's per-pair scores stay exact."""
    cfg, spec, K, c = model.config, model.spec, model.spec.n_factors, CONFOUND_SPEC
    rng = _rng(cfg.seed, _FAMILIES)
    subjects.families = confounds.draw_families(rng, cfg.subjects, cfg.families, c)
    share = functools.partial(confounds.share_within_families, rng, families=subjects.families)
    share(subjects.latent[:, : K + 2], share=c.genetic_sharing)
    share(subjects.latent[:, K + 2 : K + 2 + spec.n_ancestry], share=c.ancestry_sharing)
    if cfg.null:
        share(subjects.brain_factors, share=c.genetic_sharing)
    share(subjects.env, share=c.shared_environment, sd=math.sqrt(spec.env_var))
    share(subjects.nuisance, share=c.shared_environment, sd=spec.nuisance_sd)


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
    if subjects.covariates is not None:
        factors = confounds.gene_confound_factors(subjects.covariates)  # (N, extra ancestry + sex)
        x += factors @ confounds.gene_confound_loadings(
            _rng(model.config.seed, _CONFOUND_PARAMS, j), CONFOUND_SPEC, D, factors.shape[1] - 1,
            x_linked=model.gene_names[j] in confounds.X_LINKED).T
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
    neuro = apply_axes(smooth, model.blur, tuple(model.config.latent_shape))  # (n, V) float32 throughout
    neuro *= np.float32(spec.smooth_sd)
    neuro += np.float32(spec.white_sd) * white
    neuro += coefficients.astype(np.float32) @ maps
    if subjects.covariates is not None:
        design = confounds.brain_design(subjects.covariates, CONFOUND_SPEC)[rows]  # (n, 4 + n_sites)
        neuro += (design @ _confound_maps(model)).astype(np.float32)
    neuro += model.mean_map.astype(np.float32)
    return rows, neuro


def _confound_maps(model: _Model) -> np.ndarray:
    """(4 + n_sites, V) maps of the covariates in the brain, scaled like the nuisance maps."""
    if model.confound_maps is None:
        shape = tuple(model.config.latent_shape)
        rng = _rng(model.config.seed, _CONFOUND_MAPS)
        maps = np.stack([blob_map(rng, shape, model.spec) for _ in range(4 + CONFOUND_SPEC.n_sites)])
        _scale_maps(maps, Whitener(shape, model.blur, model.spec), model.spec)
        model.confound_maps = maps
    return model.confound_maps


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
    if not 0.0 <= float(config.families) < 1.0:
        raise bad(f"families={config.families}; expected the fraction of subjects in families, in [0, 1).")
    if config.missing_latent_frac + config.missing_gene_row_frac >= 1.0:
        raise bad("missing_latent_frac + missing_gene_row_frac must be < 1 (some subjects must be complete).")


def _normalised(config: SynthConfig) -> SynthConfig:
    return SynthConfig(
        out_dir=Path(config.out_dir), subjects=int(config.subjects), genes=int(config.genes),
        embedding_dim=int(config.embedding_dim), latent_shape=tuple(int(s) for s in config.latent_shape),
        seed=int(config.seed), signal=float(config.signal), null=bool(config.null),
        missing_latent_frac=float(config.missing_latent_frac),
        missing_gene_row_frac=float(config.missing_gene_row_frac), shuffle_rows=bool(config.shuffle_rows),
        confounds=bool(config.confounds), families=float(config.families),
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


def synthesize(config: SynthConfig, overwrite: bool = False) -> SynthResult:
    """Generate a cohort (see the module docstring) and write it under `config.out_dir`.

    The folder must be missing, empty, or hold only synth's own earlier output (listed in its
    marker, `pipeline.synth_output.MARKER_NAME`); any other file is a GenealignError naming it and is
    never touched. Earlier output made with other settings is replaced only with `overwrite`.
    gene_embeddings/ and brain_latent/ are each written to a temporary sibling and renamed into
    place (no stale files); truth.json is written last, then the marker.
    truth.json holds the config, the generator spec, the gene list, the causal genes and their
    strengths, the factors each carries, the interaction pair, the brain components, and which IIDs
    lack a latent file or a row in one gene's CSV. Big parameters (loadings, maps) are not stored:
    they are rebuilt from the seed."""
    _validate(config)
    config = _normalised(config)
    spec = GeneratorSpec()
    start = time.perf_counter()
    out = config.out_dir
    settings = settings_record(config)
    earlier = claim_folder(out, settings, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    model = _build_model(config, spec)
    subjects = _draw_subjects(model)
    gene_dir, latent_dir = out / "gene_embeddings", out / "brain_latent"
    missing = set(subjects.missing_latent.tolist())
    files = [f"gene_embeddings/{gene_file_name(g)}" for g in model.gene_names]
    files += [f"brain_latent/{latent_file_name(str(iid))}" for s, iid in enumerate(subjects.iid) if s not in missing]
    files.append(TRUTH_NAME)
    files += [name for name, wanted in ((confounds.COVARIATES_NAME, config.confounds),
                                        (confounds.KINSHIP_NAME, config.families > 0)) if wanted]
    # Everything this run may leave behind is listed before it is written, so an interrupted run's
    # files are still recognised as synth's own.
    write_marker(out, settings, [*earlier, *files], complete=False)
    # A folder without truth.json is an unfinished cohort: drop the old truth before touching the data.
    (out / TRUTH_NAME).unlink(missing_ok=True)
    _write_data(config, spec, gene_dir, latent_dir)
    if config.confounds:
        confounds.write_covariates(out / confounds.COVARIATES_NAME, subjects.iid, subjects.covariates)
    if config.families > 0:
        confounds.write_kinship(out / confounds.KINSHIP_NAME, _rng(config.seed, _KINSHIP), subjects.iid,
                                subjects.families)
    truth_path = atomic_write_json(out / TRUTH_NAME, truth_record(model, subjects, CONFOUND_SPEC))
    remove_own(out, earlier, keep=files)
    write_marker(out, settings, files, complete=True)
    return SynthResult(
        out_dir=out, gene_embedding_dir=gene_dir, brain_latent_dir=latent_dir, truth_path=truth_path,
        n_subjects=config.subjects, n_genes=config.genes, seconds=time.perf_counter() - start,
    )


def _write_data(config: SynthConfig, spec: GeneratorSpec, gene_dir: Path, latent_dir: Path) -> None:
    """Write gene_embeddings/ and brain_latent/ into temporary siblings, then rename them into place."""
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
