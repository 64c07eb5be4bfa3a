"""The CLI: both option spellings, one red line and exit 1 for every user mistake, end to end runs."""

from __future__ import annotations

import json
import os
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


def test_ingest_direct_io_switch_both_spellings(tmp_path):
    """--direct-io / --direct_io write past the page cache where the filesystem allows, --no-... (the
    default) through it; the store is the same."""
    import numpy as np

    from pipeline import open_store

    gdir, ldir = write_cohort(tmp_path)
    assert run(*ingest_args(gdir, ldir, tmp_path / "default.zarr")).exit_code == 0
    reference = open_store(tmp_path / "default.zarr")
    for spelling in ("--direct-io", "--direct_io", "--no-direct-io", "--no_direct_io"):
        store = tmp_path / f"{spelling}.zarr"
        result = run(*ingest_args(gdir, ldir, store, spelling))
        assert result.exit_code == 0, result.output
        view = open_store(store)
        assert view.iid.tolist() == reference.iid.tolist()
        np.testing.assert_array_equal(np.asarray(view.genes[:]), np.asarray(reference.genes[:]))
        np.testing.assert_array_equal(np.asarray(view.neuro[:]), np.asarray(reference.neuro[:]))


def test_full_disk_is_one_line(tmp_path, monkeypatch):
    import errno

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    gdir, ldir = write_cohort(tmp_path)
    monkeypatch.setattr(os, "pwrite", full)
    result = run(*ingest_args(gdir, ldir, tmp_path / "s.zarr"))
    assert_one_line_error(result, "no space left on the device", "free some space")
    assert not (tmp_path / "s.zarr").exists()


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


def test_synth_ingest_train_evaluate_through_the_cli(tmp_path):
    cohort, store, run_dir = tmp_path / "cohort", tmp_path / "s.zarr", tmp_path / "run"
    result = run("synth", cohort, "--subjects", "300", "--genes", "6", "--embedding-dim", "8", "--latent_shape", "2,4,4,4", "--seed", "1")
    assert result.exit_code == 0, result.output
    assert (cohort / "truth.json").exists()
    result = run("ingest", "--gene_embedding_dir", cohort / "gene_embeddings", "--brain_latent_dir", cohort / "brain_latent",
                 "--store", store, "--split_fractions", "0.5,0.2,0.3", "--workers", "1")
    assert result.exit_code == 0, result.output
    result = run("train", "--store", store, "--mode", "sequence", "--output_dir", run_dir, "--num_epochs", "2",
                 "--batch_size", "32", "--projection_dim", "8", "--transformer_hidden_dim", "8",
                 "--transformer_num_layers", "1", "--transformer_num_heads", "2", "--neuro_pca_dim", "4",
                 "--gene_pca_dim", "4", "--device", "cpu")
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "Best epoch" in text and "pool of" in text and "chance" in text
    result = run("train", "--store", store, "--mode", "sequence", "--output_dir", run_dir, "--resume", run_dir,
                 "--num_epochs", "3", "--batch_size", "32", "--projection_dim", "8", "--transformer_hidden_dim", "8",
                 "--transformer_num_layers", "1", "--transformer_num_heads", "2", "--neuro_pca_dim", "4",
                 "--gene_pca_dim", "4", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 3
    result = run("evaluate", "--checkpoint", run_dir / "best_model.pt", "--store", store, "--output_dir", tmp_path / "eval",
                 "--pool_sizes", "50,all", "--draws", "3", "--bootstrap", "20", "--permutations", "20")
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    for needle in ("oracle", "PCA+CCA", "PCA+PLS", "chance", "neuro→gene", "gene→neuro", "pool 88", "Holm-adjusted"):
        assert needle in text, needle
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["pool_sizes"][0] == 50 and metrics["split"] == "test"
    assert "oracle" in metrics["methods_order"]
    # The oracle is on by default and can be switched off in both spellings.
    for spelling in ("--no-oracle", "--no_oracle"):
        out = tmp_path / f"eval{spelling}"
        result = run("evaluate", "--checkpoint", run_dir / "best_model.pt", "--store", store, "--output_dir", out,
                     "--pool_sizes", "all", "--draws", "1", "--bootstrap", "0", "--permutations", "0",
                     "--baselines", "none", spelling)
        assert result.exit_code == 0, result.output
        assert json.loads((out / "metrics.json").read_text())["methods_order"] == ["model", "chance"]


def test_evaluate_on_a_store_with_other_genes_is_a_clear_error(tmp_path):
    gdir, ldir = write_cohort(tmp_path, iids=tuple(str(1000000 + i) for i in range(60)))
    assert run(*ingest_args(gdir, ldir, tmp_path / "s.zarr", "--split_fractions", "0.6,0.2,0.2")).exit_code == 0
    result = run("train", "--store", tmp_path / "s.zarr", "--mode", "single", "--single_gene_name", "APOE",
                 "--output_dir", tmp_path / "run", "--num_epochs", "1", "--batch_size", "8", "--projection_dim", "4",
                 "--neuro_pca_dim", "0", "--gene_pca_dim", "0", "--device", "cpu")
    assert result.exit_code == 0, result.output
    gdir2, ldir2 = write_cohort(tmp_path / "other", iids=tuple(str(1000000 + i) for i in range(60)), genes=("BDNF",))
    assert run(*ingest_args(gdir2, ldir2, tmp_path / "o.zarr")).exit_code == 0
    result = run("evaluate", "--checkpoint", tmp_path / "run" / "best_model.pt", "--store", tmp_path / "o.zarr",
                 "--output_dir", tmp_path / "e")
    assert_one_line_error(result, "APOE")


def test_importing_the_cli_loads_neither_torch_nor_zarr():
    """Spawned ingest workers re-import the `genealign` console script (`alignment.cli`) and import
    `pipeline.ingest`: neither may load torch (it cost each worker ~1.3 s of CPU before it parsed a
    CSV) nor zarr (never used in a worker)."""
    import subprocess
    import sys

    code = (
        "import sys, alignment.cli, pipeline.ingest; "
        "print(sorted(m for m in ('torch', 'zarr', 'pandas') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "[]"
