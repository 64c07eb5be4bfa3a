"""Retrieval metrics against brute force (ties included), chunking, draws, bootstrap and permutations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from alignment.metrics import (
    holm_adjust,
    bootstrap_ci,
    chance_levels,
    harmonic,
    method_metrics,
    pool_draws,
    rank_pass,
    retrieval_ranks,
    summarize_ranks,
    top1_permutation_test,
    topk_curve,
    val_retrieval,
)
from pipeline import GenealignError


def brute_force_ranks(query: np.ndarray, gallery: np.ndarray) -> np.ndarray:
    """1 + number of other gallery items scoring >= the true pair, one query at a time."""
    scores = query @ gallery.T
    n = len(query)
    return np.array([1 + sum(scores[i, j] >= scores[i, i] for j in range(n) if j != i) for i in range(n)])


def argsort_ranks(query: np.ndarray, gallery: np.ndarray) -> np.ndarray:
    """Position of the true pair in a descending argsort (valid when a row has no ties)."""
    order = np.argsort(-(query @ gallery.T), axis=1, kind="stable")
    return np.array([int(np.flatnonzero(order[i] == i)[0]) + 1 for i in range(len(query))])


def correlated(n: int, d: int, signal: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    shared = rng.normal(size=(n, d))
    a = signal * shared + rng.normal(size=(n, d))
    b = signal * shared + rng.normal(size=(n, d))
    return a, b


def test_ranks_match_argsort_without_ties():
    q, g = correlated(40, 6, 0.7)
    expected = argsort_ranks(q, g)
    assert np.array_equal(retrieval_ranks(q, g, chunk=7), expected)
    assert np.array_equal(brute_force_ranks(q, g), expected)
    assert not np.array_equal(retrieval_ranks(g, q), expected)  # the two directions differ


def test_ties_rank_pessimistically():
    # Integer features give exactly representable, deliberately tied scores.
    query = np.array([[1, 0], [1, 0], [0, 1], [1, 1], [0, 0]], dtype=np.float32)
    gallery = np.array([[1, 0], [1, 0], [0, 2], [1, 1], [3, 3]], dtype=np.float32)
    # row 0: scores 1,1,0,1,3 -> items 1, 3 tie the true pair and item 4 beats it -> rank 4
    # row 4: query is zero, every score is 0 -> all others tie -> rank 5 (last, never first)
    ranks = retrieval_ranks(query, gallery, chunk=2)
    assert np.array_equal(ranks, brute_force_ranks(query, gallery))
    assert ranks[0] == 4 and ranks[4] == 5
    constant = np.ones((6, 3), dtype=np.float32)
    assert np.all(retrieval_ranks(constant, constant) == 6)


def test_ties_random_integer_features_match_brute_force():
    rng = np.random.default_rng(3)
    q = rng.integers(-1, 2, size=(30, 3)).astype(np.float64)
    g = rng.integers(-1, 2, size=(30, 3)).astype(np.float64)
    expected = brute_force_ranks(q, g)
    assert len(np.unique(q @ g.T)) < 10  # many ties really occur
    for chunk in (1, 4, 1000):
        assert np.array_equal(retrieval_ranks(q, g, chunk=chunk), expected)


def test_chunking_invariance_and_torch_input():
    q, g = correlated(101, 8, 0.5, seed=1)
    small = rank_pass(q.astype(np.float32), g.astype(np.float32), chunk=3)
    big = rank_pass(torch.from_numpy(q).float(), torch.from_numpy(g).float(), chunk=4096)
    assert np.array_equal(small.ranks, big.ranks)
    assert np.array_equal(small.best, big.best) and np.array_equal(small.best_unique, big.best_unique)
    assert small.unmatched_mean == pytest.approx(big.unmatched_mean, rel=1e-5)
    assert small.unmatched_sd == pytest.approx(big.unmatched_sd, rel=1e-5)


def test_rank_pass_moments_and_best_match_brute_force():
    q, g = correlated(50, 5, 0.8, seed=2)
    scores = q @ g.T
    result = rank_pass(q, g, chunk=8)
    off = scores[~np.eye(50, dtype=bool)]
    assert result.unmatched_mean == pytest.approx(off.mean(), rel=1e-9)
    assert result.unmatched_sd == pytest.approx(off.std(ddof=1), rel=1e-9)
    assert np.allclose(result.matched, np.diag(scores))
    assert np.array_equal(result.best, scores.argmax(axis=1))
    # the sampled unmatched scores are real off-diagonal entries
    assert all(np.any(np.isclose(scores[i], s) & ~np.eye(50, dtype=bool)[i]) for i, s in enumerate(result.unmatched_sample))


def test_summarize_ranks_and_chance():
    ranks = np.array([1, 2, 6, 11, 1])
    s = summarize_ranks(ranks, pool_size=20)
    assert s["top1"] == pytest.approx(0.4) and s["top5"] == pytest.approx(0.6) and s["top10"] == pytest.approx(0.8)
    assert s["mean_rank"] == pytest.approx(4.2) and s["median_rank"] == 2
    assert s["mrr"] == pytest.approx(np.mean(1 / ranks))
    assert s["chance_top1"] == pytest.approx(1 / 20) and s["chance_top10"] == pytest.approx(0.5)
    assert s["chance_mean_rank"] == pytest.approx(10.5)
    assert s["chance_mrr"] == pytest.approx(sum(1 / k for k in range(1, 21)) / 20)
    assert chance_levels(3)["chance_top5"] == 1.0
    assert harmonic(4) == pytest.approx(1 + 1 / 2 + 1 / 3 + 1 / 4)


def test_chance_levels_are_what_random_scores_get():
    rng = np.random.default_rng(5)
    ranks = np.concatenate([retrieval_ranks(rng.normal(size=(200, 4)), rng.normal(size=(200, 4))) for _ in range(10)])
    s = summarize_ranks(ranks, 200)
    assert s["top10"] == pytest.approx(s["chance_top10"], abs=0.02)
    assert s["mean_rank"] == pytest.approx(s["chance_mean_rank"], rel=0.05)
    assert s["mrr"] == pytest.approx(s["chance_mrr"], rel=0.2)


def test_topk_curve():
    curve = topk_curve(np.array([1, 3, 3, 60]), k_max=5)
    assert np.allclose(curve, [0.25, 0.25, 0.75, 0.75, 0.75])


def test_pool_draws_reproducible_by_seed():
    a, b, c = pool_draws(500, 300, 5, seed=1), pool_draws(500, 300, 5, seed=1), pool_draws(500, 300, 5, seed=2)
    assert a.shape == (5, 300) and np.array_equal(a, b) and not np.array_equal(a, c)
    assert all(len(np.unique(row)) == 300 for row in a)  # without replacement
    q, g = correlated(400, 6, 0.6)
    f1, _ = method_metrics(q, g, pool_sizes=(100,), draws=4, bootstrap=20, permutations=20, seed=3)
    f2, _ = method_metrics(q, g, pool_sizes=(100,), draws=4, bootstrap=20, permutations=20, seed=3)
    assert f1 == f2


def test_pooled_top1_is_higher_in_smaller_pools_and_matches_brute_force():
    q, g = correlated(300, 6, 0.6)
    figures, _ = method_metrics(q, g, pool_sizes=(30,), draws=10, bootstrap=0, permutations=0, seed=0)
    pooled = figures["retrieval"]["neuro_to_gene"]["30"]
    whole = figures["retrieval"]["neuro_to_gene"]["all"]
    assert pooled["top1"] > whole["top1"] and pooled["chance_top1"] == pytest.approx(1 / 30)
    lo, hi = pooled["ci"]["top1"]
    assert lo <= pooled["top1"] <= hi
    # the mean over draws is the mean of brute-force top-1 in the same pools
    expected = np.mean([np.mean(brute_force_ranks(q[s], g[s]) == 1) for s in pool_draws(300, 30, 10, seed=0)])
    assert pooled["top1"] == pytest.approx(expected)


def test_permutation_p_value_small_on_signal_large_on_noise():
    q, g = correlated(200, 8, 1.5)
    strong = rank_pass(q, g)
    test = top1_permutation_test(strong.best, strong.best_unique, n_perm=200, seed=0)
    assert test["top1"] > 0.1 and test["p_value"] == pytest.approx(1 / 201)
    assert test["null_top1_mean"] < 0.02
    rng = np.random.default_rng(9)
    p_values = []
    for seed in range(20):
        noise = rank_pass(rng.normal(size=(200, 8)), rng.normal(size=(200, 8)))
        p_values.append(top1_permutation_test(noise.best, noise.best_unique, n_perm=200, seed=seed)["p_value"])
    p_values = np.array(p_values)
    # Under the null p is (super-)uniform: rarely small, typically large.
    assert np.mean(p_values < 0.05) <= 0.2 and np.median(p_values) > 0.2


def test_bootstrap_ci_contains_point_estimate_and_narrows_with_n():
    q, g = correlated(400, 8, 1.5)
    ranks = retrieval_ranks(q, g)
    point = summarize_ranks(ranks, 400)
    ci = bootstrap_ci(ranks, n_boot=300, seed=0)
    for metric, (lo, hi) in ci.items():
        assert lo <= point[metric] <= hi, metric
    assert ci["top1"][1] - ci["top1"][0] > 0
    assert bootstrap_ci(ranks, n_boot=300, seed=0) == ci  # reproducible
    wide = bootstrap_ci(ranks[:50], n_boot=300, seed=0)
    for metric in ("top1", "mrr"):
        assert wide[metric][1] - wide[metric][0] > ci[metric][1] - ci[metric][0]


def test_method_metrics_layout_and_similarity():
    q, g = correlated(120, 6, 1.0)
    figures, plots = method_metrics(q, g, pool_sizes=(50,), draws=3, bootstrap=50, permutations=50, seed=0)
    for direction in ("neuro_to_gene", "gene_to_neuro"):
        whole = figures["retrieval"][direction]["all"]
        for key in ("top1", "top5", "top10", "mean_rank", "median_rank", "mrr", "pool_size", "chance_top1",
                    "chance_mean_rank", "chance_mrr", "ci", "p_value_top1"):
            assert key in whole, key
        assert whole["pool_size"] == 120 and len(plots["ranks"][direction]) == 120
        assert len(figures["topk_curve"][direction]) == 50
    sim = figures["similarity"]
    assert sim["matched_mean"] > sim["unmatched_mean"] and sim["cohens_d"] > 1
    assert sim["n_unmatched"] == 120 * 119


def test_val_retrieval():
    q, g = correlated(64, 6, 2.0)
    out = val_retrieval(torch.from_numpy(q).float(), torch.from_numpy(g).float())
    assert out["pool_size"] == 64 and out["chance_top1"] == pytest.approx(1 / 64)
    assert out["top1_neuro_to_gene"] == pytest.approx(np.mean(brute_force_ranks(q, g) == 1))
    assert out["top1_gene_to_neuro"] == pytest.approx(np.mean(brute_force_ranks(g, q) == 1))
    assert out["top1_mean"] == pytest.approx((out["top1_neuro_to_gene"] + out["top1_gene_to_neuro"]) / 2)


def test_non_finite_and_mismatched_features_are_clear_errors():
    q = np.ones((4, 2))
    with pytest.raises(GenealignError, match="NaN or inf"):
        retrieval_ranks(np.full((4, 2), np.nan), q)
    with pytest.raises(GenealignError, match="same shape"):
        retrieval_ranks(q, np.ones((5, 2)))


def test_pooled_ranks_batched_and_fallback_agree(monkeypatch):
    import alignment.metrics as metrics

    q, g = correlated(200, 5, 0.7, seed=4)
    subsets = pool_draws(200, 60, 7, seed=0)
    expected = np.stack([brute_force_ranks(q[s], g[s]) for s in subsets])
    assert np.array_equal(metrics.pooled_ranks(q, g, subsets), expected)
    monkeypatch.setattr(metrics, "BLOCK_ELEMENTS", 100)  # forces the one-pool-at-a-time path
    assert np.array_equal(metrics.pooled_ranks(q, g, subsets, chunk=7), expected)


def test_holm_adjust_matches_the_step_down_procedure():
    rng = np.random.default_rng(5)
    for m in (1, 2, 7, 16):
        p = rng.uniform(0, 0.2, size=m)
        p[rng.integers(0, m)] = p[0]  # a tie
        adjusted = holm_adjust(p)
        # brute force: Holm rejects H_(k) at alpha iff p_(j) <= alpha / (m - j + 1) for every j <= k;
        # the adjusted p is the smallest alpha that rejects it.
        for alpha in np.linspace(0.0, 1.0, 201):
            order = np.argsort(p, kind="stable")
            rejected = np.zeros(m, dtype=bool)
            for j, i in enumerate(order):
                if p[i] > alpha / (m - j):
                    break
                rejected[i] = True
            assert np.array_equal(rejected, adjusted <= alpha + 1e-12), (alpha, p, adjusted)
    assert holm_adjust([0.01, 0.04, 0.03]).tolist() == pytest.approx([0.03, 0.06, 0.06])
