"""pipeline.normalize against brute-force numpy on small data: moments, signs, whitening, both PCA paths."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline import normalize
from pipeline.normalize import (
    fit_gene_pca,
    fit_pca,
    fix_signs,
    moments,
    principal_components,
    whitening_matrix,
    zscore,
)


def low_rank_rows(n: int, d: int, rank: int = 5, seed: int = 0) -> torch.Tensor:
    """Rows with `rank` strong directions (well separated eigenvalues) plus small isotropic noise."""
    rng = np.random.default_rng(seed)
    scales = np.linspace(6.0, 2.0, rank)
    x = (rng.normal(size=(n, rank)) * scales) @ np.linalg.qr(rng.normal(size=(d, rank)))[0].T
    return torch.from_numpy(x + 0.1 * rng.normal(size=(n, d))).float()


def covariance(x: torch.Tensor) -> np.ndarray:
    x = x.double().numpy()
    x = x - x.mean(0)
    return x.T @ x / len(x)


def test_moments_match_numpy_and_floor_a_constant_column():
    rng = np.random.default_rng(1)
    x = (1e3 + rng.normal(size=(157, 6)) * rng.uniform(0.1, 3, size=6)).astype(np.float32)
    x[:, 2] = 5.0
    mean, std = moments(torch.from_numpy(x))
    assert mean.dtype == torch.float64 and std.shape == (6,)
    want = x.astype(np.float64)
    np.testing.assert_allclose(mean.numpy(), want.mean(0), rtol=1e-7)
    keep = [0, 1, 3, 4, 5]
    np.testing.assert_allclose(std.numpy()[keep], want.std(0)[keep], rtol=1e-4)
    assert 0 < std[2] <= 1e-6 * float(std.mean()) * 1.01  # floored, never 0
    _, ones = moments(torch.full((4, 3), 7.0))
    assert torch.equal(ones, torch.ones(3, dtype=torch.float64))  # every column constant: floor 1


def test_zscore_works_on_numpy_and_torch():
    x = np.arange(12, dtype=np.float64).reshape(4, 3)
    mean, std = x.mean(0), x.std(0)
    np.testing.assert_allclose(zscore(x, mean, std), (x - mean) / std)
    t = torch.from_numpy(x)
    assert torch.allclose(zscore(t, torch.from_numpy(mean), torch.from_numpy(std)), torch.from_numpy((x - mean) / std))
    assert x[0, 0] == 0.0  # the input is not modified


def test_exact_pca_matches_numpy_eigh_with_the_sign_convention():
    x = low_rank_rows(400, 30)
    z = x - x.mean(0)
    evals, components = principal_components(z, 4)
    want_vals, want_vecs = np.linalg.eigh(covariance(x))
    np.testing.assert_allclose(evals.numpy(), want_vals[::-1][:4], rtol=1e-5)
    overlap = np.abs(components.numpy().T @ want_vecs[:, ::-1][:, :4])
    np.testing.assert_allclose(overlap, np.eye(4), atol=1e-4)
    # Sign convention: the largest-magnitude entry of every direction is positive.
    top = components.gather(0, components.abs().argmax(0, keepdim=True))
    assert (top > 0).all()
    assert torch.equal(fix_signs(-components), components)


def test_whitened_rows_have_identity_covariance_and_null_directions_zero_columns():
    x = low_rank_rows(300, 12)
    _, _, w = fit_pca(x, 5)
    z = (x.double() - x.double().mean(0)) / x.double().std(0, correction=0)
    np.testing.assert_allclose(covariance(z @ w), np.eye(5), atol=1e-6)
    # Three distinct rows span two directions: asking for four gives two zero columns, not 1e6 ones.
    rank2 = torch.randn(3, 8, dtype=torch.float64)[torch.arange(60) % 3]
    evals, components = principal_components(rank2 - rank2.mean(0), 4)
    norms = whitening_matrix(evals, components).norm(dim=0)
    assert (norms[:2] > 0).all() and torch.equal(norms[2:], torch.zeros(2, dtype=torch.float64))


def test_randomized_and_exact_paths_agree_on_the_top_subspace(monkeypatch):
    x = low_rank_rows(300, 60)
    z = x - x.mean(0)
    exact_vals, exact = principal_components(z, 5)
    monkeypatch.setattr(normalize, "EXACT_PCA_MAX_DIM", 10)  # 60 columns now take the randomized path
    vals, approx = principal_components(z, 5, torch.Generator().manual_seed(0))
    again_vals, again = principal_components(z, 5, torch.Generator().manual_seed(0))
    assert torch.equal(again, approx) and torch.equal(again_vals, vals)  # deterministic per seed
    torch.testing.assert_close(vals, exact_vals, rtol=1e-4, atol=0)
    projector = lambda u: u @ u.T  # noqa: E731
    assert float((projector(approx) - projector(exact)).abs().max()) < 1e-4
    top = approx.gather(0, approx.abs().argmax(0, keepdim=True))
    assert (top > 0).all()


def test_unwhitened_pca_is_orthonormal_and_zero_k_is_z_scoring_only():
    x = low_rank_rows(200, 15)
    mean, std, components = fit_pca(x, 4, whiten=False)
    np.testing.assert_allclose((components.T @ components).numpy(), np.eye(4), atol=1e-10)
    mean0, std0, none = fit_pca(x, 0)
    assert none is None and torch.equal(mean0, mean) and torch.equal(std0, std)


def test_gene_pca_is_one_pca_per_gene():
    genes = torch.stack([low_rank_rows(250, 9, rank=3, seed=s) + s for s in range(3)], dim=1)  # (n, 3, 9)
    mean, std, w = fit_gene_pca(genes, 3)
    assert mean.shape == std.shape == (3, 9) and w.shape == (3, 9, 3)
    for j in range(3):
        m, s, wj = fit_pca(genes[:, j], 3)
        torch.testing.assert_close(mean[j], m)
        torch.testing.assert_close(std[j], s)
        torch.testing.assert_close(w[j], wj, rtol=1e-5, atol=1e-8)
    _, _, components = fit_gene_pca(genes, 2, whiten=False)
    eye = torch.eye(2, dtype=torch.float64).expand(3, 2, 2)
    torch.testing.assert_close(components.transpose(1, 2) @ components, eye, rtol=0, atol=1e-10)


@pytest.mark.parametrize("k", [1, 7])
def test_pca_width_and_dtype(k):
    _, _, w = fit_pca(low_rank_rows(50, 7), k)
    assert w.shape == (7, k) and w.dtype == torch.float64
