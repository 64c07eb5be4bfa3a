"""Linear baselines (PCA+CCA, PCA+PLS, reduced-rank ridge, regularised CCA): train-only fitting, a real
linear signal found, a null cohort at chance, hyperparameters chosen on val."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from alignment.baselines import BASELINES, BaselineConfig, fit_baselines, read_batches, row_batches, val_score
from alignment.metrics import rank_pass, summarize_ranks, top1_permutation_test
from pipeline import GenealignError, write_store

GENES = ["G0", "G1", "G2"]


def make_store(path: Path, n: int = 600, signal: float = 2.0, null: bool = False, seed: int = 0) -> Path:
    """Latent (2, 3, 4) = a linear map of gene G1's first 4 dims + noise (or of an independent copy)."""
    rng = np.random.default_rng(seed)
    genes = rng.normal(size=(n, len(GENES), 8)).astype(np.float32)  # (N, G, D)
    source = rng.normal(size=(n, 4)) if null else genes[:, 1, :4]  # (N, 4)
    neuro = signal * source @ rng.normal(size=(4, 24)) + rng.normal(size=(n, 24))  # (N, V)
    iids = [str(2_000_000 + i) for i in range(n)]
    write_store(path, iids, neuro.reshape(n, 2, 3, 4).astype(np.float32), genes, GENES,
                split_fractions=(0.6, 0.1, 0.3), chunk_rows=50)
    return path


@pytest.fixture(scope="module")
def signal_store(tmp_path_factory):
    from pipeline import open_store

    return open_store(make_store(tmp_path_factory.mktemp("signal") / "s.zarr"))


@pytest.fixture(scope="module")
def null_store(tmp_path_factory):
    from pipeline import open_store

    return open_store(make_store(tmp_path_factory.mktemp("null") / "n.zarr", n=1200, null=True))


SMALL_GRID = BaselineConfig(brain_dims=(4, 8), gene_dims=(4, 8), alphas=(0.1, 1.0), ranks=(2, 4), genes_kept=(1, 2))


def test_features(store, gene_indices, config=BaselineConfig(), methods=("cca", "pls")):
    """(method -> (neuro features, gene features)) of the test split, baselines fitted on train."""
    baselines = fit_baselines(store, store.indices("train"), gene_indices, methods, config)
    test = store.indices("test")
    neuro, genes = store.read_rows(test)
    genes = genes[:, gene_indices]
    neuro_pc = baselines.frontend.transform_neuro(neuro)
    gene_pc = baselines.frontend.transform_genes(genes)
    return baselines, {name: m.embed(neuro_pc, gene_pc) for name, m in baselines.methods.items()}


test_features.__test__ = False  # a helper, not a test


@pytest.mark.parametrize("gene_indices", [[1], [0, 1, 2]], ids=["single", "sequence"])
def test_baselines_find_a_linear_signal(signal_store, gene_indices):
    baselines, features = test_features(signal_store, gene_indices)
    n_test = len(signal_store.indices("test"))
    assert baselines.n_fit == len(signal_store.indices("train"))
    for name, (neuro_f, gene_f) in features.items():
        assert neuro_f.shape == gene_f.shape and neuro_f.shape[0] == n_test
        assert np.allclose(np.linalg.norm(neuro_f, axis=1), 1, atol=1e-5)  # cosine = dot product
        result = rank_pass(neuro_f, gene_f)
        summary = summarize_ranks(result.ranks, n_test)
        assert summary["top1"] > 10 * summary["chance_top1"], (name, summary)
        assert top1_permutation_test(result.best, result.best_unique, 200)["p_value"] < 0.01
        assert baselines.methods[name].train_correlations[0] > 0.8


def test_single_gene_baseline_sees_only_its_gene(signal_store):
    # G1 carries the signal, G0 does not: a baseline restricted to G0 must be at chance level.
    _, with_g1 = test_features(signal_store, [1])
    _, with_g0 = test_features(signal_store, [0])
    n_test = len(signal_store.indices("test"))
    top1 = lambda f: summarize_ranks(rank_pass(*f).ranks, n_test)["top1"]  # noqa: E731
    assert top1(with_g1["cca"]) > 5 * top1(with_g0["cca"]) + 1e-9
    assert top1(with_g0["cca"]) < 5 / n_test


def test_null_cohort_is_at_chance(null_store):
    _, features = test_features(null_store, [0, 1, 2], SMALL_GRID, BASELINES)
    assert set(features) == set(BASELINES)
    n_test = len(null_store.indices("test"))
    for name, (neuro_f, gene_f) in features.items():
        result = rank_pass(neuro_f, gene_f)
        summary = summarize_ranks(result.ranks, n_test)
        assert top1_permutation_test(result.best, result.best_unique, 500, seed=0)["p_value"] > 0.05, name
        assert summary["mean_rank"] == pytest.approx(summary["chance_mean_rank"], rel=0.1), name


def test_fit_uses_only_train_rows(signal_store, tmp_path):
    """Changing test-split values must not change the fitted front-end or the estimators."""
    from pipeline import open_store, write_store as write

    neuro, genes = signal_store.read_rows(np.arange(signal_store.n_subjects))
    test = signal_store.indices("test")
    neuro[test] += 100.0
    genes[test] *= -3.0
    other = write(tmp_path / "o.zarr", signal_store.iid, neuro.reshape(-1, 2, 3, 4), genes, GENES,
                  split_fractions=(0.6, 0.1, 0.3), chunk_rows=50)
    assert np.array_equal(open_store(other.path).split, signal_store.split)
    a = fit_baselines(signal_store, signal_store.indices("train"), [0, 1, 2])
    b = fit_baselines(other, other.indices("train"), [0, 1, 2])
    assert np.allclose(a.frontend.neuro_mean, b.frontend.neuro_mean)
    assert np.allclose(a.frontend.joint_components, b.frontend.joint_components)
    assert np.allclose(a.methods["cca"].train_correlations, b.methods["cca"].train_correlations)
    for name in ("rrr", "rcca_screened"):  # val rows (hyperparameters) and train rows are unchanged
        assert a.methods[name].chosen == b.methods[name].chosen
        assert np.allclose(a.methods[name].gene_map, b.methods[name].gene_map)


def test_fit_subsample_and_dims(signal_store):
    config = BaselineConfig(pca_dim=6, per_gene_dim=3, n_components=4, fit_max_rows=100)
    baselines = fit_baselines(signal_store, signal_store.indices("train"), [0, 1, 2], ("pls",), config)
    assert baselines.n_fit == 100 and set(baselines.methods) == {"pls"}
    assert baselines.frontend.dims == (6, 6) and baselines.frontend.gene_components.shape == (3, 8, 3)
    assert baselines.methods["pls"].n_components == 4
    described = baselines.describe()
    assert described["n_fit_rows"] == 100 and described["per_gene_dim"] == 3


def test_read_batches_cover_rows_once_in_order(signal_store):
    rows = signal_store.indices("test")
    batches = row_batches(signal_store, rows, 40)
    assert np.array_equal(np.concatenate(batches), rows)
    neuro, genes = signal_store.read_rows(rows)
    got = list(read_batches(signal_store, rows, 40, [2, 0]))
    assert np.array_equal(np.concatenate([g for _, _, g in got]), genes[:, [2, 0]])
    assert np.array_equal(np.concatenate([n for _, n, _ in got]), neuro)


def test_unknown_baseline_is_a_clear_error(signal_store):
    with pytest.raises(GenealignError, match="Unknown baseline"):
        fit_baselines(signal_store, signal_store.indices("train"), [0], ("ridge",))


def test_val_score_matches_a_brute_force_ranking():
    rng = np.random.default_rng(3)
    neuro_f, gene_f = rng.normal(size=(30, 5)), rng.normal(size=(30, 5))
    gene_f[:10] = neuro_f[:10] + 0.1 * gene_f[:10]  # some easy matches
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    sims = unit(neuro_f) @ unit(gene_f).T
    top1, mrr = [], []
    for s in (sims, sims.T):
        ranks = np.array([1 + int(np.sum(s[i] > s[i, i])) for i in range(30)])
        top1.append(np.mean(ranks == 1))
        mrr.append(np.mean(1.0 / ranks))
    assert val_score(neuro_f, gene_f) == pytest.approx((np.mean(top1), np.mean(mrr)))


def test_regression_baselines_find_the_signal_and_record_their_choices(signal_store):
    methods = ("rrr", "rrr_screened", "rcca", "rcca_screened")
    baselines, features = test_features(signal_store, [0, 1, 2], SMALL_GRID, methods)
    n_test = len(signal_store.indices("test"))
    for name in methods:
        result = rank_pass(*features[name])
        assert summarize_ranks(result.ranks, n_test)["top1"] > 10 / n_test, name
        chosen = baselines.methods[name].chosen
        assert {"alpha", "rank", "brain_dim", "per_gene_dim", "genes_kept", "val_top1", "val_mrr"} <= set(chosen)
        assert chosen["alpha"] in SMALL_GRID.alphas and chosen["rank"] <= 4 and chosen["brain_dim"] <= 8
    # G1 carries the signal: the per-gene screening ranks it first.
    for name in ("rrr_screened", "rcca_screened"):
        assert baselines.methods[name].chosen["screened_genes"][0] == "G1"
    assert baselines.strongest() in methods
    assert baselines.methods["rrr"].describe()["n_components"] == baselines.methods["rrr"].chosen["rank"]


def test_one_gene_skips_the_screened_variants_with_a_note(signal_store):
    baselines = fit_baselines(signal_store, signal_store.indices("train"), [1], ("cca", "rrr", "rrr_screened"), SMALL_GRID)
    assert set(baselines.methods) == {"cca", "rrr"} and "Screened" in baselines.notes[0]
    assert "val_top1" in baselines.methods["cca"].chosen  # every method is scored on val for the report


# ------------------------------------------------------------------------------ quadratic ridge
def make_product_store(path: Path, n: int = 1000, seed: int = 0) -> Path:
    """Latent = a map of (a b, c d) + noise, products of factors a, c (gene G0) and b, d (gene G1), which
    G2 carries too (so the joint PCA of the genes finds them): no linear function of the genes predicts
    it (a product of independent factors is uncorrelated with each)."""
    rng = np.random.default_rng(seed)
    factors = rng.normal(size=(n, 4))  # (N, 4): a, b, c, d
    genes = rng.normal(size=(n, len(GENES), 4))  # (N, G, D)
    genes[:, 0, :2], genes[:, 1, :2] = factors[:, [0, 2]], factors[:, [1, 3]]
    genes[:, 2] = factors + 0.5 * genes[:, 2]
    source = np.stack([factors[:, 0] * factors[:, 1], factors[:, 2] * factors[:, 3]], axis=1)  # (N, 2)
    neuro = 3.0 * source @ rng.normal(size=(2, 24)) + rng.normal(size=(n, 24))  # (N, V)
    genes = genes.astype(np.float32)
    iids = [str(3_000_000 + i) for i in range(n)]
    write_store(path, iids, neuro.reshape(n, 2, 3, 4).astype(np.float32), genes, GENES,
                split_fractions=(0.6, 0.2, 0.2), chunk_rows=100)
    return path


QUADRATIC_GRID = BaselineConfig(brain_dims=(4, 8), gene_dims=(2, 4), alphas=(0.01, 0.1), ranks=(2, 4),
                                genes_kept=(2, 3), quadratic_pcs=(2, 4))


@pytest.fixture(scope="module")
def product_baselines(tmp_path_factory):
    from pipeline import open_store

    store = open_store(make_product_store(tmp_path_factory.mktemp("product") / "p.zarr"))
    return store, fit_baselines(store, store.indices("train"), [0, 1, 2], ("rrr_screened", "qrr_screened"),
                                QUADRATIC_GRID)


def test_quadratic_features_of_val_rows_match_a_brute_force_expansion(product_baselines):
    store, baselines = product_baselines
    fitted = baselines.methods["qrr_screened"]
    gene_scores = lambda split: baselines.frontend.transform_genes(store.read_rows(store.indices(split))[1])  # noqa: E731
    train, val = gene_scores("train")[:, fitted.gene_columns], gene_scores("val")[:, fitted.gene_columns]
    q = fitted.chosen["quadratic_pcs"]
    # The stored maps are the train rows' PCA (up to sign) and the train products' mean / std.
    components = np.linalg.eigh(np.cov(train.T, bias=True))[1]
    components = components[:, ::-1][:, :q]  # (m k, q), largest first
    stored = fitted.expansion.joint_components
    assert np.allclose(np.abs(np.sum(stored * components, axis=0)), 1.0, atol=1e-6)
    assert np.allclose(fitted.expansion.joint_mean, train.mean(axis=0))
    pcs = lambda rows: (rows - train.mean(axis=0)) @ stored  # noqa: E731
    slow = lambda z: np.stack([z[:, i] * z[:, j] for i in range(q) for j in range(i, q)], axis=1)  # noqa: E731
    mean, std = slow(pcs(train)).mean(axis=0), slow(pcs(train)).std(axis=0)
    expected = np.hstack([val, (slow(pcs(val)) - mean) / std])  # (n_val, m k + q (q + 1) / 2)
    got = fitted.features(gene_scores("val"))
    assert got.shape == (len(val), train.shape[1] + q * (q + 1) // 2)
    assert np.allclose(got, expected, atol=1e-8)
    neuro_f, gene_f = fitted.embed(baselines.frontend.transform_neuro(store.read_rows(store.indices("val"))[0]),
                                   gene_scores("val"))
    assert val_score(neuro_f, gene_f) == pytest.approx((fitted.chosen["val_top1"], fitted.chosen["val_mrr"]), abs=1e-6)


def test_quadratic_ridge_finds_a_product_of_two_genes(product_baselines):
    _, baselines = product_baselines
    quadratic, linear = baselines.methods["qrr_screened"].chosen, baselines.methods["rrr_screened"].chosen
    assert quadratic["val_top1"] > 2 * linear["val_top1"], (quadratic, linear)
    assert set(quadratic["screened_genes"]) >= {"G0", "G1"} and quadratic["quadratic_pcs"] in (2, 4)
    assert {"alpha", "rank", "brain_dim", "per_gene_dim", "genes_kept", "n_products", "val_mrr"} <= set(quadratic)
    assert baselines.strongest() == "qrr_screened"


def test_one_gene_skips_the_quadratic_ridge(signal_store):
    baselines = fit_baselines(signal_store, signal_store.indices("train"), [1], ("rrr", "qrr_screened"), SMALL_GRID)
    assert set(baselines.methods) == {"rrr"} and "Screened" in baselines.notes[0]
