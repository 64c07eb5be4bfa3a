"""Train-split normalisation: z-scoring and PCA (optionally whitening), the one implementation used by
the model's front-end (`alignment.model`) and the linear baselines (`alignment.baselines`).

Pure functions of torch rows on the rows' device; statistics come back in float64.

- `moments(x)`: per-column mean and std (ddof 0) of rows (n, d), std floored for constant columns.
- `zscore(x, mean, std)`: (x - mean) / std (torch or numpy, in the promoted dtype of the operands).
- `principal_components(z, k, generator)`: top-k eigenvalues and unit directions of the covariance of
  centred rows z (n, d): exact up to EXACT_PCA_MAX_DIM columns, randomized above.
- `whitening_matrix(evals, components)`: W with z @ W of identity covariance on the fitting rows.
- `fit_pca(x, k, generator, whiten)` / `fit_gene_pca(genes, k, whiten)`: the above chained for rows
  (n, d), and for gene rows (n, G, D) with one PCA per gene.

Sign convention: the largest-magnitude entry of every direction is positive, so the same rows always
give the same matrices (eigenvector signs are otherwise arbitrary across runs and platforms).
"""

from __future__ import annotations

import torch

# Above this many columns a PCA uses a randomized range finder instead of an exact (d, d) eigh.
EXACT_PCA_MAX_DIM = 2048
# A std below this x the mean std (a constant column) is floored there, so dividing by it is safe.
STD_FLOOR_RTOL = 1e-6
# An eigenvalue below this x the largest is numerically zero: its whitening column is set to zero.
NULL_EIGENVALUE_RTOL = 1e-6
_CHUNK_VALUES = 1 << 22  # values per row chunk when accumulating in float64
_GENE_CHUNK_ROWS = 8192


def moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-column mean and std (ddof 0) of x (n, d), float64: two passes over row chunks, each chunk
    reduced in the input's precision and the chunk sums accumulated in float64."""
    n, d = x.shape
    step = max(1, _CHUNK_VALUES // max(d, 1))
    total = torch.zeros(d, dtype=torch.float64, device=x.device)
    for start in range(0, n, step):
        total += x[start : start + step].sum(0)
    mean = total / n
    center = mean.to(x.dtype)
    sq = torch.zeros(d, dtype=torch.float64, device=x.device)
    for start in range(0, n, step):
        sq += (x[start : start + step] - center).square().sum(0)
    # Correct for the rounding of the mean to the input's precision: E[(x-c)^2] - (mean-c)^2.
    std = (sq / n - (mean - center.double()).square()).clamp(min=0).sqrt()
    scale = float(std.mean())
    return mean, std.clamp(min=STD_FLOOR_RTOL * scale if scale > 0 else 1.0)


def zscore(x, mean, std):
    """(x - mean) / std with one temporary; pass mean and std in the dtype the result should have."""
    out = x - mean
    out /= std
    return out


def fix_signs(components: torch.Tensor) -> torch.Tensor:
    """Components (..., d, k) with the largest-magnitude entry of each column made positive."""
    idx = components.abs().argmax(dim=-2, keepdim=True)  # (..., 1, k)
    signs = torch.sign(torch.gather(components, -2, idx))
    return components * torch.where(signs == 0, torch.ones_like(signs), signs)


def top_eigh(cov: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k eigenpairs of symmetric (..., d, d), descending: ((..., k), (..., d, k))."""
    if cov.dim() > 2 and cov.device.type == "cpu":
        # A batch of small eighs (one per gene): one thread is several times faster than torch's
        # threaded batch on CPU, and gives the same result.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            evals, evecs = torch.linalg.eigh(cov)
        finally:
            torch.set_num_threads(threads)
    else:
        evals, evecs = torch.linalg.eigh(cov)
    return evals[..., -k:].flip(-1), evecs[..., -k:].flip(-1)


def second_moment(z: torch.Tensor) -> torch.Tensor:
    """z.T @ z / n (d, d) of rows z (n, d), accumulated over row chunks in float64."""
    n, d = z.shape
    cov = torch.zeros(d, d, dtype=torch.float64, device=z.device)
    step = max(1, _CHUNK_VALUES // d)
    for start in range(0, n, step):
        block = z[start : start + step]  # (c, d)
        cov += (block.T @ block).double()
    return cov / n


def principal_components(z: torch.Tensor, k: int, generator: torch.Generator | None = None,
                         power_iterations: int = 2):
    """Top-k (eigenvalues (k,), unit directions (d, k)) float64 of the covariance of centred rows z (n, d).

    d <= EXACT_PCA_MAX_DIM: exact eigendecomposition of the float64 covariance. Larger d: randomized
    subspace iteration (Halko, Martinsson & Tropp 2011; ~(3 + 4 q) n*d*(k+p) flops for q power
    iterations instead of n*d^2), then an exact Rayleigh-Ritz step on the found subspace, so the
    eigenvalues are exact within it. A flat spectrum (e.g. whitened inputs) needs more power
    iterations to find its top. `generator` seeds the random test matrix (same state, same result)."""
    n, d = z.shape
    if d <= EXACT_PCA_MAX_DIM:
        evals, components = top_eigh(second_moment(z), k)
        return evals, fix_signs(components)
    width = min(k + max(16, k // 4), n, d)
    omega = torch.randn(d, width, generator=generator, device=z.device, dtype=z.dtype)  # (d, l)
    basis = torch.linalg.qr(z @ omega).Q  # (n, l) spans the top of z's column space
    for _ in range(power_iterations):  # each sharpens the spectrum's top
        basis = torch.linalg.qr(z.T @ basis).Q  # (d, l)
        basis = torch.linalg.qr(z @ basis).Q  # (n, l)
    subspace = torch.linalg.qr(z.T @ basis).Q  # (d, l) orthonormal, approx. top right singular vectors
    scores = (z @ subspace).double()  # (n, l)
    evals, rotation = top_eigh(scores.T @ scores / n, k)  # exact PCA within the subspace
    return evals, fix_signs(subspace.double() @ rotation)


def whitening_matrix(evals: torch.Tensor, components: torch.Tensor) -> torch.Tensor:
    """components / sqrt(eigenvalue), (..., d, k): z @ W has identity covariance on the fitting rows.

    A component whose eigenvalue is numerically zero (the rows have fewer than k independent
    directions, e.g. a gene with few distinct embeddings) gets a zero column: whitening it would
    multiply rounding noise, and any unseen direction, by ~1e6."""
    null = evals <= NULL_EIGENVALUE_RTOL * evals.amax(dim=-1, keepdim=True).clamp(min=0)
    scale = torch.where(null, torch.zeros_like(evals), evals.clamp(min=1e-300).rsqrt())
    return fix_signs(components) * scale[..., None, :]


def fit_pca(x: torch.Tensor, k: int, generator: torch.Generator | None = None, whiten: bool = True,
            power_iterations: int = 2):
    """(mean (d,), std (d,), matrix (d, k) or None when k = 0) float64 for rows x (n, d).

    The matrix maps z-scored rows to PCA scores: whitening (identity covariance) or, with
    whiten=False, the orthonormal principal directions. z is computed in x's dtype;
    `power_iterations` as in `principal_components`."""
    mean, std = moments(x)
    if not k:
        return mean, std, None
    z = zscore(x, mean.to(x.dtype), std.to(x.dtype))  # (n, d)
    evals, components = principal_components(z, k, generator, power_iterations)
    return mean, std, whitening_matrix(evals, components) if whiten else components


def fit_gene_pca(genes: torch.Tensor, k: int, whiten: bool = True):
    """(mean (G, D), std (G, D), matrix (G, D, k) or None when k = 0) float64 for rows (n, G, D).

    Each gene gets its own z-scoring and an exact PCA of its (D, D) covariance (accumulated over
    row chunks in float64); matrix as in `fit_pca`."""
    n, g, d = genes.shape
    mean, std = moments(genes.reshape(n, g * d))
    mean, std = mean.reshape(g, d), std.reshape(g, d)
    if not k:
        return mean, std, None
    m, s = mean.to(genes.dtype), std.to(genes.dtype)
    cov = torch.zeros(g, d, d, dtype=torch.float64, device=genes.device)
    for j in range(g):
        for start in range(0, n, _GENE_CHUNK_ROWS):
            z = zscore(genes[start : start + _GENE_CHUNK_ROWS, j], m[j], s[j])  # (c, D)
            cov[j] += (z.T @ z).double()
    evals, components = top_eigh(cov / n, k)
    components = fix_signs(components)
    return mean, std, whitening_matrix(evals, components) if whiten else components
