"""pipeline.residualize: which terms, the design, the least-squares fit, the residuals (brute force)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline import GenealignError
from pipeline.residualize import (
    Residualizer,
    design_terms,
    fit_coefficients,
    relatedness_note,
    residualize,
    select_covariates,
    term_name,
)

GROUPS = {"Age": ["Age"], "sex": ["sex"], "SITE": ["SITE=b", "SITE=c"], "PC1": ["PC1"]}
NAMES = ("Age", "sex", "SITE=b", "SITE=c", "PC1")


def covariates(n: int = 60, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    site = rng.integers(0, 3, n)
    return np.column_stack([rng.uniform(45, 80, n), rng.integers(0, 2, n), site == 1, site == 2,
                            rng.normal(size=n)]).astype(np.float32)  # (n, 5)


def test_terms_follow_alfaro_almagro_case_insensitively():
    terms = design_terms(select_covariates("all", GROUPS), GROUPS)
    assert [term_name(t) for t in terms] == [
        "intercept", "Age", "sex", "SITE=b", "SITE=c", "PC1", "Age^2", "Age*sex", "Age*SITE=b", "Age*SITE=c"]
    # Without age there are no interactions; without site no age x site.
    assert [term_name(t) for t in design_terms(("sex", "SITE"), GROUPS)] == ["intercept", "sex", "SITE=b", "SITE=c"]
    assert [term_name(t) for t in design_terms(("Age", "sex"), GROUPS)] == ["intercept", "Age", "sex", "Age^2", "Age*sex"]
    assert design_terms((), GROUPS) == ()


def test_selection_all_none_names_and_errors():
    assert select_covariates("all", GROUPS) == ("Age", "sex", "SITE", "PC1")
    assert select_covariates("none", GROUPS) == ()
    assert select_covariates("PC1,Age", GROUPS) == ("Age", "PC1")  # the store's order
    assert select_covariates("all", {}) == ()  # no covariates: nothing, no error
    with pytest.raises(GenealignError, match=r"bogus not among the store's covariates \(Age, sex, SITE, PC1\)"):
        select_covariates("Age,bogus", GROUPS)
    with pytest.raises(GenealignError, match="ingest with --covariates"):
        select_covariates("age", {})


def test_residuals_are_orthogonal_to_every_design_column_on_the_fit_rows():
    cov = covariates()
    rng = np.random.default_rng(1)
    spec = Residualizer.fit_stats(NAMES, design_terms(tuple(GROUPS), GROUPS), cov)
    design = spec.design(cov)  # (n, K)
    features = design @ rng.normal(size=(design.shape[1], 7)) + rng.normal(size=(len(cov), 7))  # (n, F)
    residuals = spec.apply(features, cov, spec.fit(cov, features))
    assert np.abs(design.T @ residuals).max() < 1e-8 * np.abs(design.T @ features).max()
    # Brute force: the same residuals as numpy's lstsq, column by column.
    for j in range(features.shape[1]):
        coef = np.linalg.lstsq(design, features[:, j], rcond=None)[0]
        np.testing.assert_allclose(residuals[:, j], features[:, j] - design @ coef, atol=1e-9)


def test_design_standardises_continuous_columns_only():
    cov = covariates()
    spec = Residualizer.fit_stats(NAMES, design_terms(tuple(GROUPS), GROUPS), cov)
    design = spec.design(cov)
    cov = cov.astype(np.float64)
    age = (cov[:, 0] - cov[:, 0].mean()) / cov[:, 0].std()
    names = spec.term_names
    np.testing.assert_allclose(design[:, names.index("intercept")], 1.0)
    np.testing.assert_allclose(design[:, names.index("Age")], age, rtol=1e-6)
    np.testing.assert_allclose(design[:, names.index("Age^2")], age**2, rtol=1e-6)
    np.testing.assert_array_equal(design[:, names.index("SITE=b")], cov[:, 2])  # one-hot kept 0/1
    np.testing.assert_allclose(design[:, names.index("Age*SITE=c")], age * cov[:, 3], rtol=1e-6)


def test_fit_in_column_chunks_torch_and_collinear_design():
    rng = np.random.default_rng(2)
    design = np.column_stack([np.ones(40), rng.normal(size=(40, 3)), np.ones(40)])  # a duplicated intercept
    features = rng.normal(size=(40, 11))
    whole = fit_coefficients(design, features)
    np.testing.assert_allclose(fit_coefficients(design, features, chunk_columns=3), whole, atol=1e-12)
    resid = residualize(features, design, whole)
    assert np.abs(design.T @ resid).max() < 1e-9
    as_torch = fit_coefficients(torch.from_numpy(design), torch.from_numpy(features).float())
    assert isinstance(as_torch, torch.Tensor)
    np.testing.assert_allclose(as_torch.numpy(), whole, atol=1e-5)


def test_missing_values_and_relatedness_line():
    cov = covariates()
    cov[3, 0] = np.nan
    with pytest.raises(GenealignError, match="1 subject.*Age"):
        Residualizer.fit_stats(NAMES, design_terms(tuple(GROUPS), GROUPS), cov)
    assert relatedness_note({"controlled": True}) is None
    assert relatedness_note({"controlled": False}).startswith("Relatedness not controlled: the split is by IID hash")
