"""The CLI: both option spellings, one red line and exit 1 for every user mistake, end to end runs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from alignment.cli import app

runner = CliRunner()


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


def test_ingest_both_spellings_and_info(tmp_path, write_cohort):
    gdir, ldir = write_cohort(tmp_path)
    result = run(*ingest_args(gdir, ldir, tmp_path / "s.zarr"))
    assert result.exit_code == 0, result.output
    assert "kept" in result.output and "4" in result.output
    again = run("ingest", "--gene-embedding-dir", gdir, "--brain_latent_dir", ldir, "--store", tmp_path / "s.zarr")
    assert again.exit_code == 0 and "up to date" in " ".join(again.output.split())
    info = run("info", "--store", tmp_path / "s.zarr")
    assert info.exit_code == 0 and "APOE" in info.output


def test_full_disk_is_one_line(tmp_path, monkeypatch, write_cohort):
    import errno

    import zarr

    def full(array, selection, value):
        raise OSError(errno.ENOSPC, "No space left on device")

    gdir, ldir = write_cohort(tmp_path)
    monkeypatch.setattr(zarr.Array, "__setitem__", full)
    result = run(*ingest_args(gdir, ldir, tmp_path / "s.zarr"))
    assert_one_line_error(result, "no space left on the device", "free some space")
    assert not (tmp_path / "s.zarr").exists()
    assert not any(p.name.startswith(".s.zarr.") for p in tmp_path.iterdir())  # no temp dir left behind


def test_missing_directory(tmp_path, write_cohort):
    _, ldir = write_cohort(tmp_path)
    assert_one_line_error(run(*ingest_args(tmp_path / "nope", ldir, tmp_path / "s.zarr")), "nope")


def test_no_gene_files(tmp_path, write_cohort):
    _, ldir = write_cohort(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(run(*ingest_args(empty, ldir, tmp_path / "s.zarr")), "No gene embedding files found")


def test_unknown_gene(tmp_path, write_cohort):
    gdir, ldir = write_cohort(tmp_path)
    assert_one_line_error(run(*ingest_args(gdir, ldir, tmp_path / "s.zarr", "--genes", "APOE,APOF")), "Gene 'APOF' not found")


def test_missing_iid_column(tmp_path, write_cohort):
    gdir, ldir = write_cohort(tmp_path)
    assert_one_line_error(run(*ingest_args(gdir, ldir, tmp_path / "s.zarr", "--iid_column", "eid")), "eid", "IID")


def test_non_numeric_value(tmp_path, write_cohort):
    gdir, ldir = write_cohort(tmp_path)
    path = gdir / "BDNF_brain_gene_embeddingUKB.csv"
    lines = path.read_text().splitlines()
    cells = lines[2].split(",")
    cells[3] = "abc"
    lines[2] = ",".join(cells)
    path.write_text("\n".join(lines) + "\n")
    assert_one_line_error(run(*ingest_args(gdir, ldir, tmp_path / "s.zarr")), "BDNF_brain_gene_embeddingUKB.csv", "3")


def test_duplicate_iid(tmp_path, write_cohort):
    gdir, ldir = write_cohort(tmp_path, iids=("1000001", "1000002", "1000001"))
    assert_one_line_error(run(*ingest_args(gdir, ldir, tmp_path / "s.zarr")), "1000001")


def test_no_paired_subjects_shows_both_sides(tmp_path, write_cohort):
    gdir, _ = write_cohort(tmp_path / "a", iids=("0012345", "0012346"))
    _, ldir = write_cohort(tmp_path / "b", iids=("12345", "12346"))
    assert_one_line_error(run(*ingest_args(gdir, ldir, tmp_path / "s.zarr")), "0012345", "12345")


def test_train_unknown_gene_lists_available(tmp_path, write_cohort):
    gdir, ldir = write_cohort(tmp_path)
    assert run(*ingest_args(gdir, ldir, tmp_path / "s.zarr")).exit_code == 0
    result = run("train", "--store", tmp_path / "s.zarr", "--mode", "single", "--single_gene_name", "XYZ",
                 "--output_dir", tmp_path / "o")
    assert_one_line_error(result, "Gene 'XYZ' not found", "Available genes: APOE, BDNF")


def test_missing_store(tmp_path):
    assert_one_line_error(run("info", "--store", tmp_path / "none.zarr"), "does not exist")


TINY_SEQUENCE = ("--batch_size", "32", "--projection_dim", "8", "--transformer_hidden_dim", "8",
                 "--transformer_num_layers", "1", "--transformer_num_heads", "2", "--neuro_pca_dim", "4",
                 "--gene_pca_dim", "4", "--device", "cpu")


@pytest.fixture(scope="module")
def synth_store(tmp_path_factory) -> Path:
    """A 300-subject synth cohort ingested through the CLI (shared, read-only)."""
    root = tmp_path_factory.mktemp("cli")
    cohort, store = root / "cohort", root / "s.zarr"
    result = run("synth", cohort, "--subjects", "300", "--genes", "6", "--embedding-dim", "8", "--latent_shape", "2,4,4,4", "--seed", "1")
    assert result.exit_code == 0, result.output
    assert (cohort / "truth.json").exists()
    result = run("ingest", "--gene_embedding_dir", cohort / "gene_embeddings", "--brain_latent_dir", cohort / "brain_latent",
                 "--store", store, "--split_fractions", "0.5,0.2,0.3", "--workers", "1")
    assert result.exit_code == 0, result.output
    return store


def assert_fits(output: str, width: int = 80) -> None:
    assert "…" not in output, output
    assert max(len(line) for line in output.splitlines()) <= width, output


def test_train_resume_evaluate_through_the_cli(synth_store, tmp_path):
    store, run_dir = synth_store, tmp_path / "run"
    result = run("train", "--store", store, "--mode", "sequence", "--output_dir", run_dir, "--num_epochs", "2", *TINY_SEQUENCE)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "Best epoch" in text and "pool" in text and "chance" in text and "Preset cpu-small" in text
    result = run("evaluate", "--checkpoint", run_dir / "best_model.pt", "--store", store, "--output_dir", tmp_path / "eval",
                 "--pool_sizes", "50,all", "--draws", "3", "--bootstrap", "20", "--permutations", "20")
    assert result.exit_code == 0, result.output
    assert_fits(result.output)
    text = " ".join(result.output.split())
    for needle in ("oracle", "PCA+CCA", "PCA+PLS", "chance", "neuro→gene", "gene→neuro", "pool of 88", "Holm"):
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


def test_resume_from_the_folder_alone_and_extend(synth_store, tmp_path):
    run_dir = tmp_path / "run"
    assert run("train", "--store", synth_store, "--output_dir", run_dir, "--num_epochs", "2", *TINY_SEQUENCE).exit_code == 0
    assert_one_line_error(run("train", "--resume", run_dir), "finished its 2 epochs", "--extend")
    assert_one_line_error(run("train", "--resume", run_dir, "--num_epochs", "3"), "--num_epochs 3", "--extend")
    assert_one_line_error(run("train", "--resume", run_dir, "--projection_dim", "16"), "--projection_dim 16", "contradicts")
    assert_one_line_error(run("train", "--resume", run_dir, "--learning-rate", "0.5"), "--learning_rate 0.5", "contradicts")
    result = run("train", "--resume", run_dir, "--num_epochs", "4", "--extend", "--device", "cpu")
    assert result.exit_code == 0, result.output
    history = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in history] == [1, 2, 3, 4]
    config = json.loads((run_dir / "config.json").read_text())
    assert config["train"]["num_epochs"] == 4 and config["extensions"][0]["from_epochs"] == 2
    # The LR continues from where the finished run left it: no jump back to the peak.
    assert history[2]["lr"] < 0.5 * max(r["lr"] for r in history[:2])


def test_train_refuses_another_run_and_keeps_foreign_files(synth_store, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "README.txt").write_text("my notes")
    assert run("train", "--store", synth_store, "--output_dir", run_dir, "--num_epochs", "1", *TINY_SEQUENCE).exit_code == 0
    result = run("train", "--store", synth_store, "--output_dir", run_dir, "--num_epochs", "1", "--seed", "5", *TINY_SEQUENCE)
    assert_one_line_error(result, "holds another run", "--resume", "--overwrite")
    assert (run_dir / "README.txt").read_text() == "my notes"


def test_evaluate_a_run_folder_without_store(synth_store, tmp_path):
    run_dir = tmp_path / "run"
    assert run("train", "--store", synth_store, "--output_dir", run_dir, "--num_epochs", "1", *TINY_SEQUENCE).exit_code == 0
    result = run("evaluate", "--checkpoint", run_dir, "--pool_sizes", "2000,all", "--draws", "2", "--bootstrap", "0",
                 "--permutations", "0", "--baselines", "none", "--no-oracle")
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "Pool size 2,000 skipped" in text  # said in the terminal, not only in report.md
    metrics = json.loads((run_dir / "eval_test" / "metrics.json").read_text())
    assert Path(metrics["store"]).resolve() == Path(synth_store).resolve()
    # Another checkpoint's evaluation is not replaced without --overwrite.
    other = tmp_path / "other"
    assert run("train", "--store", synth_store, "--output_dir", other, "--num_epochs", "1", "--seed", "3", *TINY_SEQUENCE).exit_code == 0
    args = ("evaluate", "--checkpoint", other, "--output_dir", run_dir / "eval_test", "--pool_sizes", "all", "--draws", "1",
            "--bootstrap", "0", "--permutations", "0", "--baselines", "none", "--no-oracle")
    assert_one_line_error(run(*args), "holds the evaluation of", "--overwrite")
    assert run(*args, "--overwrite").exit_code == 0


@pytest.mark.parametrize("command", ["train", "evaluate", "ingest", "synth", "info", "demo"])
def test_help_fits_80_columns_with_panels(command):
    result = run(command, "--help")
    assert result.exit_code == 0, result.output
    assert_fits(result.output)
    if command == "train":
        for panel in ("Data", "Model", "Training", "Output"):
            assert panel in result.output
        assert "--gene-embedding-dir" in result.output and "--resume" in result.output


def test_version_and_flags():
    result = run("--version")
    assert result.exit_code == 0 and result.output.startswith("genealign ")
    assert "--no-oracle" in run("evaluate", "--help").output


def test_zero_epochs_is_refused(synth_store, tmp_path):
    result = run("train", "--store", synth_store, "--output_dir", tmp_path / "r", "--num_epochs", "0", "--device", "cpu")
    assert_one_line_error(result, "--num_epochs must be >= 1")
    assert not (tmp_path / "r" / "config.json").exists()


def test_evaluate_on_a_store_with_other_genes_is_a_clear_error(tmp_path, write_cohort):
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


def test_small_latents_and_narrow_embeddings_train_with_default_dimensions(tmp_path):
    """A (4, 4, 4) latent and 8-wide embeddings of 12 genes: no dimension flags needed in either mode."""
    cohort, store = tmp_path / "cohort", tmp_path / "s.zarr"
    result = run("synth", cohort, "--subjects", "300", "--genes", "12", "--embedding_dim", "8", "--latent_shape", "4,4,4")
    assert result.exit_code == 0, result.output
    assert run("ingest", "--gene_embedding_dir", cohort / "gene_embeddings", "--brain_latent_dir", cohort / "brain_latent",
               "--store", store, "--workers", "1").exit_code == 0
    for mode in ("sequence", "single"):
        run_dir = tmp_path / mode
        extra = ("--single_gene_name", "APOE") if mode == "single" else ()
        result = run("train", "--store", store, "--mode", mode, *extra, "--output_dir", run_dir, "--num_epochs", "2", "--device", "cpu")
        assert result.exit_code == 0, result.output
        model = json.loads((run_dir / "config.json").read_text())["model"]
        assert model["neuro_pca_dim"] <= 64 and model["gene_pca_dim"] <= 8
        result = run("evaluate", "--checkpoint", run_dir, "--pool_sizes", "all", "--draws", "1", "--bootstrap", "0",
                     "--permutations", "0")
        assert result.exit_code == 0, result.output
    result = run("train", "--store", store, "--output_dir", tmp_path / "x", "--neuro_pca_dim", "256", "--device", "cpu")
    assert_one_line_error(result, "--neuro_pca_dim 256", "64 values")


def test_train_residualize_bogus_is_one_line(make_confounded_store, tmp_path):
    store = make_confounded_store(tmp_path / "c.zarr", n=80)
    result = run("train", "--store", store, "--residualize", "age,bogus", "--output_dir", tmp_path / "o", "--device", "cpu")
    assert_one_line_error(result, "--residualize: bogus not among the store's covariates (age, sex, site)")
    help_text = run("train", "--help").output + run("evaluate", "--help").output
    assert help_text.count("--residualize") == 2
