"""The oracle of a `genealign synth` cohort: retrieval scored with the generator's true parameters.

`oracle_embeddings` scores every (gene row, neuro row) pair from the observed rows only, with every
parameter rebuilt from the seed recorded in truth.json (`genealign evaluate` turns it into the
oracle's retrieval row); `gene_information` and `strongest_gene` say what one gene alone carries.
A cohort made with confounds (`SynthConfig.confounds`) is refused (`oracle_refusal` says why): the
oracle does not model them. Families keep every subject's marginal law, so the oracle's per-pair
scores stay exact in a related cohort (siblings in one pool are simply harder to tell apart).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.errors import GenealignError
from pipeline.synth import (
    _ORACLE_MC,
    GeneratorSpec,
    SynthConfig,
    _build_model,
    _components,
    _Model,
    _normalised,
    _rng,
)
from pipeline.synth_space import Whitener


# ----------------------------------------------------------------------------------------- truth
def strongest_gene(truth: dict) -> str:
    """The planted gene that alone tells the most about the brain: the largest `gene_information`
    (ties: the larger strength). Not simply the largest strength: a gene whose factors reach the
    brain only through products and squares carries little that one gene can retrieve. In a null
    cohort, the gene that would be strongest under the signal model (its embedding carries the same
    structure; nothing reaches the brain), so null and signal runs can be compared gene for gene."""
    planted = truth["planted_genes"]
    information = gene_information(truth)
    return max(planted, key=lambda g: (information[g], planted[g]))


def gene_information(truth: dict) -> dict[str, float]:
    """Planted gene -> what its embedding alone tells about the brain: the mutual information, in nats
    per subject, between the oracle's gene-side prediction of the brain components and their observed
    GLS estimates, under the oracle's Gaussian approximation: 0.5 * (log det marginal - log det
    predictive). From the truth alone, no data: the generator is linear-Gaussian on the gene side, so
    the posterior covariance does not depend on the observed values. Scored under the signal model
    (as the oracle scores a null cohort), and without confounds (their planted structure is the same)."""
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
def oracle_refusal(truth: dict) -> str | None:
    """Why the oracle cannot score this cohort, or None when it can. It models no confounds: sex and
    ancestry/site reach both modalities there, outside the generator's signal model."""
    if truth.get("config", {}).get("confounds"):
        return ("the cohort was made with `genealign synth --confounds` and the oracle does not model "
                "covariates (sex, ancestry, site, age, head size reach both modalities)")
    return None


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
    whiten = Whitener(tuple(model.config.latent_shape), model.blur, spec)
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
    refusal = oracle_refusal(truth)
    if refusal:
        raise GenealignError(f"oracle_embeddings: no oracle for this cohort: {refusal}.")
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
