"""Covariate residualisation: which confounds are regressed out of the inputs, and how.

Brain latents and gene embeddings both carry age, sex, site and ancestry; a contrastive model (or a
baseline) can then "retrieve" a subject from confounds alone. Residualising both modalities on the
covariates, with the coefficients fitted on train rows only, removes that route (Alfaro-Almagro et al.
2021, "Confound modelling in UK Biobank brain imaging", NeuroImage 224).

    select_covariates(selection, covariate_groups) -> source columns ("all" | "none" | "NAME,NAME")
    design_terms(groups, covariate_groups)          -> terms: intercept, each column, age^2, age x sex,
                                                       age x each site level
    Residualizer.fit_stats(names, terms, covariates) -> the term spec with train standardisation
    Residualizer.design(covariates (n, C))          -> design (n, K)
    fit_coefficients(design (n, K), features (n, F)) -> beta (K, F), least squares, column chunks
    residualize(features, design, beta)              -> features - design @ beta

A term is a tuple of store covariate columns whose product is one design column: () is the
intercept, ("age",) a main effect, ("age", "age") age squared, ("age", "site=site_2") an interaction.
The group names age / sex / site are matched case-insensitively. Columns that are not one-hot levels
(no "=" in the name) are standardised with the fitting rows' mean and std, so age^2 is well
conditioned; the span of the design, and so the residuals, does not depend on it.

`design_matrix` and `residualize` take numpy arrays or torch tensors alike; `fit_coefficients` works
in float64 torch and returns the input's kind. `CovariateResidualizer` holds a fitted residualiser as
torch buffers, for the model's front-end (part of its state_dict, applied on its device).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipeline.errors import GenealignError

ALL, NONE = "all", "none"
INTERACTING = ("age", "sex", "site")  # group names with the Alfaro-Almagro interactions
FIT_CHUNK_VALUES = 1 << 24  # feature values (n x columns) per float64 product in `fit_coefficients`


# ----------------------------------------------------------------------------------------- terms
def select_covariates(selection: str | None, covariate_groups: dict, where: str = "--residualize") -> tuple[str, ...]:
    """The source columns to residualise on, in the store's order.

    `selection`: "all" (every stored covariate; nothing when the store has none), "none", or
    "NAME,NAME" of source column names (`covariate_groups` keys, e.g. age, sex, site). A name not in
    the store, or names for a store without covariates, is a GenealignError saying what to do."""
    text = (selection or ALL).strip()
    if text.lower() == NONE:
        return ()
    if text.lower() == ALL:
        return tuple(covariate_groups)
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise GenealignError(f"{where} {selection!r}: write all, none, or covariate names like age,sex,site.")
    if not covariate_groups:
        raise GenealignError(
            f"{where} {text}: the store has no covariates; ingest with --covariates FILE, or use {where} none."
        )
    missing = [n for n in names if n not in covariate_groups]
    if missing:
        raise GenealignError(
            f"{where}: {', '.join(missing)} not among the store's covariates ({', '.join(covariate_groups)}); "
            "write all, none, or some of those names separated by commas."
        )
    return tuple(g for g in covariate_groups if g in names)


def design_terms(groups, covariate_groups: dict) -> tuple[tuple[str, ...], ...]:
    """Intercept, every store column of `groups`, then age^2, age x sex and age x each site level
    where groups named age / sex / site (any case) are among `groups`. () when `groups` is empty."""
    if not groups:
        return ()
    by_role = {g.lower(): covariate_groups[g] for g in groups if g.lower() in INTERACTING}
    terms = [()] + [(c,) for g in groups for c in covariate_groups[g]]
    ages = by_role.get("age", [])
    terms += [(a, a) for a in ages]
    for role in ("sex", "site"):
        terms += [(a, c) for a in ages for c in by_role.get(role, [])]
    return tuple(terms)


def term_name(term: tuple[str, ...]) -> str:
    """'intercept', 'age', 'age^2', 'age*site=site_2'."""
    if not term:
        return "intercept"
    if len(term) == 2 and term[0] == term[1]:
        return f"{term[0]}^2"
    return "*".join(term)


def exponents(terms, names) -> np.ndarray:
    """(K, C) float: how often each covariate column enters each term (0 for the intercept row)."""
    index = {name: i for i, name in enumerate(names)}
    out = np.zeros((len(terms), len(names)))
    for k, term in enumerate(terms):
        for column in term:
            out[k, index[column]] += 1
    return out


def standardised(names) -> np.ndarray:
    """(C,) bool: the columns standardised before the products (every one that is not a one-hot level)."""
    return np.array(["=" not in name for name in names], dtype=bool)


# ---------------------------------------------------------------------------------------- design
def design_matrix(covariates, mean, std, powers):
    """Design (n, K) of raw covariates (n, C): x = (covariates - mean) / std, then column k is
    prod_c x_c ** powers[k, c]. covariates, mean, std: numpy or torch, one kind and dtype; powers
    (K, C) small integers, numpy or torch."""
    x = (covariates - mean) / std  # (n, C)
    stack = np.stack if isinstance(x, np.ndarray) else torch.stack
    ones = x[:, 0] * 0 + 1  # (n,)
    columns = []
    for row in powers.tolist():  # column by column: an (n, K, C) broadcast would not fit for n = 100k
        column = ones
        for c, power in enumerate(row):
            if power:
                column = column * x[:, c] ** int(power)
        columns.append(column)
    return stack(columns, 1)  # (n, K)


def residualize(features, design, beta):
    """features (n, F) - design (n, K) @ beta (K, F), numpy or torch, in the features' dtype."""
    if isinstance(features, np.ndarray):
        return features - design.astype(features.dtype) @ beta.astype(features.dtype)
    return features - design.to(features.dtype) @ beta.to(features.dtype)


def fit_coefficients(design, features, chunk_columns: int | None = None):
    """Least-squares beta (K, F) of features (n, F) on design (n, K): beta = pinv(design) @ features,
    the minimum-norm solution (a design with collinear columns, e.g. a constant one, is fine). float64,
    feature columns in chunks (default: FIT_CHUNK_VALUES values each), so F of tens of thousands and n
    of 100k fit in memory. Returns numpy for numpy features, else a float64 tensor on their device."""
    as_numpy = isinstance(features, np.ndarray)
    feats = torch.from_numpy(features) if as_numpy else features
    x = torch.as_tensor(design, dtype=torch.float64, device=feats.device)  # (n, K)
    if x.shape[0] != feats.shape[0]:
        raise ValueError(f"design has {x.shape[0]} rows, features {feats.shape[0]}")
    pinv = torch.linalg.pinv(x)  # (K, n)
    chunk_columns = chunk_columns or max(1, FIT_CHUNK_VALUES // max(len(x), 1))
    beta = torch.empty(x.shape[1], feats.shape[1], dtype=torch.float64, device=feats.device)  # (K, F)
    for lo in range(0, feats.shape[1], chunk_columns):
        beta[:, lo : lo + chunk_columns] = pinv @ feats[:, lo : lo + chunk_columns].to(torch.float64)
    return beta.cpu().numpy() if as_numpy else beta


def covariate_columns(store_names, wanted, where: str) -> np.ndarray:
    """Indices of the columns `wanted` among `store_names`; a GenealignError naming the missing ones."""
    store_names = list(store_names)
    missing = [name for name in wanted if name not in store_names]
    if missing:
        raise GenealignError(
            f"{where} needs covariate column(s) {', '.join(missing)}, which the store does not have "
            f"({', '.join(store_names) or 'no covariates'}); use a store ingested with the same --covariates file."
        )
    return np.array([store_names.index(name) for name in wanted], dtype=np.int64)


def check_complete(covariates: np.ndarray, names, where: str) -> None:
    """Missing (non-finite) covariate values cannot be residualised on: a GenealignError naming them."""
    bad = ~np.isfinite(covariates)
    if bad.any():
        columns = [names[c] for c in np.flatnonzero(bad.any(axis=0))]
        raise GenealignError(
            f"{where}: {int(bad.any(axis=1).sum())} subject(s) lack a value of covariate(s) {', '.join(columns)}; "
            "impute them or drop those subjects at ingest, or leave them out with --residualize NAME,NAME."
        )


# ------------------------------------------------------------------------------------ the bundle
@dataclass
class Residualizer:
    """A term spec over covariate columns `names` (the columns of the covariates it is given, in
    order) with the standardisation of the rows it was fitted on. float64 numpy."""

    names: tuple[str, ...]  # (C,)
    terms: tuple[tuple[str, ...], ...]  # (K,)
    mean: np.ndarray  # (C,)
    std: np.ndarray  # (C,)

    @classmethod
    def fit_stats(cls, names, terms, covariates: np.ndarray) -> "Residualizer":
        """Standardisation of the non-one-hot columns from fitting rows (n, C); a constant column keeps std 1."""
        covariates = np.asarray(covariates, dtype=np.float64)
        check_complete(covariates, list(names), "Residualisation")
        scaled = standardised(names)
        mean = np.where(scaled, covariates.mean(axis=0), 0.0)  # (C,)
        std = covariates.std(axis=0)
        std = np.where(scaled & (std > 0), std, 1.0)  # (C,)
        return cls(tuple(names), tuple(tuple(t) for t in terms), mean, std)

    @property
    def powers(self) -> np.ndarray:
        return exponents(self.terms, self.names)  # (K, C)

    @property
    def term_names(self) -> list[str]:
        return [term_name(t) for t in self.terms]

    def design(self, covariates: np.ndarray) -> np.ndarray:
        """Raw covariates (n, C) -> design (n, K) float64."""
        return design_matrix(np.asarray(covariates, dtype=np.float64), self.mean, self.std, self.powers)

    def fit(self, covariates: np.ndarray, features: np.ndarray) -> np.ndarray:
        """beta (K, F) of fitting rows' features (n, F) on their design."""
        return fit_coefficients(self.design(covariates), np.asarray(features, dtype=np.float64))

    def apply(self, features: np.ndarray, covariates: np.ndarray, beta: np.ndarray) -> np.ndarray:
        """Residuals (n, F) of features (n, F), float64."""
        return residualize(np.asarray(features, dtype=np.float64), self.design(covariates), beta)


class CovariateResidualizer(torch.nn.Module):
    """A residualiser as buffers: standardisation mean / std (C,) and, per named input, coefficients
    beta (K, *shape) (e.g. "neuro" (K, V), "gene" (K, G, D)). `forward(x, covariates, name)` returns
    x (B, *shape) minus its covariates' fitted part; `fit(covariates, {name: rows})` fits them."""

    def __init__(self, names, terms, shapes: dict):
        super().__init__()
        self.names, self.terms = tuple(names), tuple(tuple(t) for t in terms)
        self.powers = exponents(self.terms, self.names)  # (K, C) numpy: read on the host, no device sync
        self.register_buffer("mean", torch.zeros(len(self.names)))  # (C,)
        self.register_buffer("std", torch.ones(len(self.names)))  # (C,)
        for name, shape in shapes.items():
            self.register_buffer(f"{name}_beta", torch.zeros(len(self.terms), *shape))  # (K, *shape)

    def rows(self, covariates, n: int) -> torch.Tensor:
        """`covariates` as a (n, C) tensor on the buffers' device; a GenealignError when missing or misshapen."""
        if covariates is None:
            raise GenealignError(
                f"This model was trained with covariates residualised ({', '.join(self.names)}): pass covariates=(B, "
                f"{len(self.names)}) raw rows in the order model.config.covariate_names, e.g. store.covariates[rows]."
            )
        covariates = torch.as_tensor(covariates, device=self.mean.device)
        if tuple(covariates.shape) != (n, len(self.names)):
            raise GenealignError(
                f"covariates have shape {tuple(covariates.shape)}; the model expects ({n}, {len(self.names)}) raw rows "
                f"with columns {', '.join(self.names)}."
            )
        return covariates

    def design(self, covariates, n: int, dtype: torch.dtype) -> torch.Tensor:
        """Raw covariate rows (n, C) -> design (n, K) in `dtype`."""
        return design_matrix(self.rows(covariates, n).to(dtype), self.mean.to(dtype), self.std.to(dtype), self.powers)

    def forward(self, x: torch.Tensor, covariates, name: str) -> torch.Tensor:
        beta = getattr(self, f"{name}_beta")  # (K, *shape)
        flat = residualize(x.reshape(len(x), -1), self.design(covariates, len(x), x.dtype), beta.reshape(len(beta), -1))
        return flat.reshape(x.shape)

    @torch.no_grad()
    def fit(self, covariates, inputs: dict) -> None:
        """Standardisation, then the least-squares coefficients of each input's fitting rows (n, *shape)."""
        n = len(next(iter(inputs.values())))
        spec = Residualizer.fit_stats(self.names, self.terms, self.rows(covariates, n).double().cpu().numpy())
        self.mean.copy_(torch.from_numpy(spec.mean))
        self.std.copy_(torch.from_numpy(spec.std))
        for name, x in inputs.items():
            beta = getattr(self, f"{name}_beta")
            design = self.design(covariates, n, torch.float64).to(x.device)  # (n, K)
            beta.copy_(fit_coefficients(design, x.reshape(n, -1)).reshape(beta.shape))

    def spec(self) -> Residualizer:
        """The term spec and standardisation as numpy, to residualise other features alike."""
        return Residualizer(self.names, self.terms, self.mean.double().cpu().numpy(), self.std.double().cpu().numpy())


def residualizer_for(selection: str | None, store, rows) -> Residualizer | None:
    """The residualiser of `selection` for a store (see `select_covariates`), standardised on `rows`;
    None when nothing is residualised."""
    groups = select_covariates(selection, store.covariate_groups)
    if not groups:
        return None
    terms = design_terms(groups, store.covariate_groups)
    return Residualizer.fit_stats(store.covariate_names, terms, store.covariates[np.asarray(rows)])


def describe_setting(groups, has_covariates: bool) -> str:
    """One line for reports: which covariates were residualised."""
    if groups:
        return f"Residualised on covariates {', '.join(groups)} (with age^2, age x sex, age x site where present), fitted on train."
    if not has_covariates:
        return "No covariates residualised: the store has no covariates (ingest with --covariates FILE)."
    return "No covariates residualised (--residualize none)."


def relatedness_note(relatedness: dict) -> str | None:
    """The report line on relatives, or None when a kinship file controlled the split."""
    if relatedness.get("controlled"):
        return None
    return "Relatedness not controlled: the split is by IID hash; relatives may sit across splits (ingest with --kinship)."
