"""Fixtures shared by the test modules: tiny cohorts as seed-format files and as ingested stores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

SIGNAL_GENES = [f"G{i}" for i in range(6)]


def _write_cohort(root: Path, iids=("1000001", "1000002", "1000003", "1000004"), genes=("APOE", "BDNF"), dim=4,
                  shape=(2, 3, 2)) -> tuple[Path, Path]:
    """Seed-format files: one {GENE}_brain_gene_embeddingUKB.csv per gene and one {IID}_latent.npz per
    subject, random values. Returns (gene folder, latent folder)."""
    gdir, ldir = root / "genes", root / "latents"
    gdir.mkdir(parents=True, exist_ok=True)
    ldir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for gene in genes:
        frame = pd.DataFrame(rng.normal(size=(len(iids), dim)), columns=[f"e{i}" for i in range(dim)])
        frame.insert(0, "IID", list(iids))
        frame.to_csv(gdir / f"{gene}_brain_gene_embeddingUKB.csv", index=False)
    for iid in iids:
        np.savez(ldir / f"{iid}_latent.npz", latent=rng.normal(size=shape).astype(np.float32))
    return gdir, ldir


def _make_signal_store(path: Path, n: int = 240, signal: float = 3.0, seed: int = 0, null: bool = False,
                       split_fractions=(0.6, 0.2, 0.2)) -> Path:
    """An ingested store with a known signal: a 4-dim factor per subject is written (low-rank, as in
    real embeddings) into genes G0 and G1 and drives the (2, 3, 4) latent linearly; the other genes
    and the rest of the latent are noise. `null` draws the latent's factor independently (no signal)."""
    from pipeline import write_store

    rng = np.random.default_rng(seed)
    factor = rng.normal(size=(n, 4))  # (N, 4)
    genes = rng.normal(size=(n, len(SIGNAL_GENES), 8))  # (N, G, D)
    for g in (0, 1):
        genes[:, g] += 2.0 * factor @ rng.normal(size=(4, 8))
    brain_factor = rng.normal(size=(n, 4)) if null else factor
    neuro = signal * brain_factor @ rng.normal(size=(4, 24)) + rng.normal(size=(n, 24))  # (N, V)
    iids = [str(1_000_000 + i) for i in range(n)]
    write_store(path, iids, neuro.reshape(n, 2, 3, 4).astype(np.float32), genes.astype(np.float32), SIGNAL_GENES,
                split_fractions=split_fractions, chunk_rows=32)
    return path


@pytest.fixture
def write_cohort():
    """The seed-format file writer (see _write_cohort)."""
    return _write_cohort


@pytest.fixture
def make_signal_store():
    """The known-signal store builder (see _make_signal_store)."""
    return _make_signal_store


@pytest.fixture(scope="session")
def signal_store(tmp_path_factory) -> Path:
    """One known-signal store of 240 subjects shared by the whole session (read-only)."""
    return _make_signal_store(tmp_path_factory.mktemp("signal") / "s.zarr")


CONFOUND_COLUMNS = ["age", "sex", "site=site_2", "site=site_3"]


def _make_confounded_store(path: Path, n: int = 240, seed: int = 0, confound: float = 3.0) -> Path:
    """A store whose only link between genes and brain is through covariates: age, sex and site
    (3 levels, one-hot) drive both modalities (with age^2 and age x sex terms); the gene-brain
    signal itself is null. Retrieval above chance here is confounding."""
    from pipeline import write_store

    rng = np.random.default_rng(seed)
    age = rng.uniform(45, 80, n)
    sex = rng.integers(0, 2, n).astype(float)
    site = rng.integers(0, 3, n)
    covariates = np.column_stack([age, sex, site == 1, site == 2]).astype(np.float32)  # (N, 4)
    z = (age - 62) / 10
    basis = np.column_stack([z, sex, site == 1, site == 2, z**2, z * sex])  # (N, 6)
    genes = rng.normal(size=(n, len(SIGNAL_GENES), 8)) + confound * (basis @ rng.normal(size=(6, len(SIGNAL_GENES) * 8))).reshape(n, -1, 8)
    neuro = confound * basis @ rng.normal(size=(6, 24)) + rng.normal(size=(n, 24))  # (N, V)
    iids = [str(2_000_000 + i) for i in range(n)]
    write_store(path, iids, neuro.reshape(n, 2, 3, 4).astype(np.float32), genes.astype(np.float32), SIGNAL_GENES,
                split_fractions=(0.6, 0.2, 0.2), chunk_rows=32, covariates=covariates, covariate_names=CONFOUND_COLUMNS)
    return path


@pytest.fixture
def make_confounded_store():
    """The confounded store builder (see _make_confounded_store)."""
    return _make_confounded_store
