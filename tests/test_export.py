"""embed: one row per subject with exactly the model's own encodings, Parquet and CSV round trips with
IIDs kept as text, refusals in one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from alignment.cli import app
from alignment.export import EmbedConfig, export_embeddings
from alignment.model import ModelConfig, MultiGeneAlignmentModel
from alignment.train import TrainConfig, train
from pipeline import GenealignError, open_store, write_store

runner = CliRunner()
GENES = ("APOE", "BDNF", "COMT")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A store whose IIDs have leading zeros, and a sequence and a single-gene model trained on it (1 epoch)."""
    root = tmp_path_factory.mktemp("embed")
    rng = np.random.default_rng(0)
    n = 90
    iids = [f"{i:07d}" for i in range(1, n + 1)]  # "0000001": a number would lose the zeros
    store = root / "s.zarr"
    write_store(store, iids, rng.normal(size=(n, 2, 3, 2)).astype(np.float32),
                rng.normal(size=(n, len(GENES), 6)).astype(np.float32), GENES, split_fractions=(0.6, 0.2, 0.2))
    out = {}
    for mode in ("sequence", "single"):
        model = ModelConfig(mode=mode, projection_dim=8, transformer_hidden_dim=8, transformer_num_layers=1,
                            transformer_num_heads=2, dropout=0.0, neuro_pca_dim=4, gene_pca_dim=3)
        train(TrainConfig(store=str(store), output_dir=str(root / mode), mode=mode, batch_size=16, num_epochs=1,
                          save_every=0, device="cpu", single_gene_name="BDNF" if mode == "single" else None), model)
        out[mode] = root / mode / "best_model.pt"
    return store, out


def own_encodings(checkpoint: Path, store: Path, split: str):
    """The model's encode_neuro / encode_gene of the store's raw rows, float32 on CPU."""
    model = MultiGeneAlignmentModel.from_checkpoint(checkpoint).eval()
    view = open_store(store)
    rows = view.indices(split)
    neuro, genes = view.read_rows(rows)
    if not model.config.use_transformer:
        genes = genes[:, view.gene_index("BDNF")]  # the single-gene model's gene
    with torch.no_grad():
        return view.iid[rows], model.encode_neuro(torch.from_numpy(neuro)).numpy(), model.encode_gene(torch.from_numpy(genes)).numpy()


@pytest.mark.parametrize("mode", ["sequence", "single"])
@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_rows_equal_the_models_own_encodings(runs, tmp_path, mode, suffix):
    store, checkpoints = runs
    out = tmp_path / f"emb{suffix}"
    result = export_embeddings(EmbedConfig(checkpoint=checkpoints[mode], store=store, split="all", out=out, device="cpu"))
    table = pd.read_parquet(out) if suffix == ".parquet" else pd.read_csv(out, dtype={"IID": str})
    iid, neuro, gene = own_encodings(checkpoints[mode], store, "all")
    width = neuro.shape[1]
    assert result.n_subjects == len(table) == len(iid) and result.width == width
    assert list(table.columns) == ["IID", *[f"neuro_{k}" for k in range(width)], *[f"gene_{k}" for k in range(width)], "split"]
    assert table["IID"].tolist() == list(iid) and table["IID"].iloc[0] == "0000001"  # text, zeros kept
    np.testing.assert_array_equal(table[[f"neuro_{k}" for k in range(width)]].to_numpy(np.float32), neuro)
    np.testing.assert_array_equal(table[[f"gene_{k}" for k in range(width)]].to_numpy(np.float32), gene)
    view = open_store(store)
    assert sorted(set(table["split"])) == ["test", "train", "val"]
    assert (table["split"] == "test").sum() == len(view.indices("test"))


def test_one_split_only(runs, tmp_path):
    store, checkpoints = runs
    out = tmp_path / "test.parquet"
    export_embeddings(EmbedConfig(checkpoint=checkpoints["sequence"], store=store, split="test", out=out, device="cpu"))
    table = pd.read_parquet(out)
    iid, neuro, _ = own_encodings(checkpoints["sequence"], store, "test")
    assert set(table["split"]) == {"test"} and table["IID"].tolist() == list(iid)
    np.testing.assert_array_equal(table.filter(like="neuro_").to_numpy(np.float32), neuro)


def test_refusals(runs, tmp_path):
    store, checkpoints = runs
    with pytest.raises(GenealignError, match=r"\.parquet or \.csv"):
        export_embeddings(EmbedConfig(checkpoint=checkpoints["sequence"], store=store, out=tmp_path / "e.xlsx"))
    existing = tmp_path / "e.csv"
    existing.write_text("someone's file\n")
    with pytest.raises(GenealignError, match="--overwrite"):
        export_embeddings(EmbedConfig(checkpoint=checkpoints["sequence"], store=store, out=existing, device="cpu"))
    assert existing.read_text() == "someone's file\n"
    export_embeddings(EmbedConfig(checkpoint=checkpoints["sequence"], store=store, out=existing, device="cpu", overwrite=True))
    assert pd.read_csv(existing, dtype={"IID": str})["IID"].iloc[0] == "0000001"


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(result, *needles):
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    text = " ".join(result.output.split())
    for needle in needles:
        assert needle in text, (needle, text)


def test_cli(runs, tmp_path):
    store, checkpoints = runs
    out = tmp_path / "e.parquet"
    result = run("embed", "--checkpoint", checkpoints["sequence"].parent, "--store", store, "--split", "train",
                 "--out", out, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "Wrote" in result.output and len(pd.read_parquet(out)) == len(open_store(store).indices("train"))
    one_line_error(run("embed", "--checkpoint", checkpoints["sequence"], "--out", out, "--device", "cpu"), "exists", "--overwrite")
    one_line_error(run("embed", "--checkpoint", checkpoints["sequence"], "--out", tmp_path / "e.txt"), ".parquet or .csv", ".txt")
    one_line_error(run("embed", "--checkpoint", checkpoints["sequence"], "--out", tmp_path / "f.csv", "--split", "dev"), "--split")


def test_help_fits_80_columns():
    result = run("embed", "--help")
    assert result.exit_code == 0 and "…" not in result.output
    assert max(len(line) for line in result.output.splitlines()) <= 80
    assert "--out" in result.output and "--split" in result.output
