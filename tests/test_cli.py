"""The CLI: both option spellings, one red line and exit 1 for every user mistake, end to end runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from alignment.cli import app

runner = CliRunner()


def write_cohort(root: Path, iids=("1000001", "1000002", "1000003", "1000004"), genes=("APOE", "BDNF"), dim=4,
                 shape=(2, 3, 2)) -> tuple[Path, Path]:
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


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def assert_one_line_error(result, *needles: str) -> None:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    text = " ".join(result.output.split())
    for needle in needles:
        assert needle in text, (needle, text)


def ingest_args(gdir, ldir, store, *extra):
    return ("ingest", "--gene_embedding_dir", gdir, "--brain-latent-dir", ldir, "--store", store, "--workers", "1", *extra)


def test_help_lists_commands():
    result = run("--help")
    assert result.exit_code == 0
    for command in ("synth", "ingest", "info", "train", "evaluate", "demo"):
        assert command in result.output


def test_ingest_both_spellings_and_info(tmp_path):
    gdir, ldir = write_cohort(tmp_path)
    result = run(*ingest_args(gdir, ldir, tmp_path / "s.zarr"))
    assert result.exit_code == 0, result.output
    assert "kept" in result.output and "4" in result.output
    again = run("ingest", "--gene-embedding-dir", gdir, "--brain_latent_dir", ldir, "--store", tmp_path / "s.zarr")
    assert again.exit_code == 0 and "up to date" in " ".join(again.output.split())
    info = run("info", "--store", tmp_path / "s.zarr")
    assert info.exit_code == 0 and "APOE" in info.output


def test_missing_directory(tmp_path):
    _, ldir = write_cohort(tmp_path)
    assert_one_line_error(run(*ingest_args(tmp_path / "nope", ldir, tmp_path / "s.zarr")), "nope")


def test_no_gene_files(tmp_path):
    _, ldir = write_cohort(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(run(*ingest_args(empty, ldir, tmp_path / "s.zarr")), "No gene embedding files found")


def test_unknown_gene(tmp_path):
    gdir, ldir = write_cohort(tmp_path)
    assert_one_line_error(run(*ingest_args(gdir, ldir, tmp_path / "s.zarr", "--genes", "APOE,APOF")), "Gene 'APOF' not found")


def test_missing_iid_column(tmp_path):
    gdir, ldir = write_cohort(tmp_path)
    assert_one_line_error(run(*ingest_args(gdir, ldir, tmp_path / "s.zarr", "--iid_column", "eid")), "eid", "IID")


def test_non_numeric_value(tmp_path):
    gdir, ldir = write_cohort(tmp_path)
    path = gdir / "BDNF_brain_gene_embeddingUKB.csv"
    lines = path.read_text().splitlines()
    cells = lines[2].split(",")
    cells[3] = "abc"
    lines[2] = ",".join(cells)
    path.write_text("\n".join(lines) + "\n")
    assert_one_line_error(run(*ingest_args(gdir, ldir, tmp_path / "s.zarr")), "BDNF_brain_gene_embeddingUKB.csv", "3")


def test_duplicate_iid(tmp_path):
    gdir, ldir = write_cohort(tmp_path, iids=("1000001", "1000002", "1000001"))
    assert_one_line_error(run(*ingest_args(gdir, ldir, tmp_path / "s.zarr")), "1000001")


def test_no_paired_subjects_shows_both_sides(tmp_path):
    gdir, _ = write_cohort(tmp_path / "a", iids=("0012345", "0012346"))
    _, ldir = write_cohort(tmp_path / "b", iids=("12345", "12346"))
    assert_one_line_error(run(*ingest_args(gdir, ldir, tmp_path / "s.zarr")), "0012345", "12345")


def test_train_unknown_gene_lists_available(tmp_path):
    gdir, ldir = write_cohort(tmp_path)
    assert run(*ingest_args(gdir, ldir, tmp_path / "s.zarr")).exit_code == 0
    result = run("train", "--store", tmp_path / "s.zarr", "--mode", "single", "--single_gene_name", "XYZ",
                 "--output_dir", tmp_path / "o")
    assert_one_line_error(result, "Gene 'XYZ' not found", "Available genes: APOE, BDNF")


def test_missing_store(tmp_path):
    assert_one_line_error(run("info", "--store", tmp_path / "none.zarr"), "does not exist")
