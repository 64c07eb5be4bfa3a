"""explain: permutation importance (exact zeros, the planted genes first), intervals, p and BH q,
attention, precision against a synth truth, output-folder protection, and the CLI."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from alignment.cli import app
from alignment.explain import (ExplainConfig, encode_shuffled, explain, gene_side, genes_in_use, mean_attention,
                               permutation_drops, reciprocal_ranks, sign_flip_p)
from alignment.model import ModelConfig, MultiGeneAlignmentModel
from alignment.train import TrainConfig, train
from pipeline import GenealignError, open_store

runner = CliRunner()


def tiny_model(mode: str = "sequence", **kw) -> ModelConfig:
    base = dict(mode=mode, projection_dim=16, transformer_hidden_dim=16, transformer_num_layers=1,
                transformer_num_heads=2, dropout=0.0, neuro_pca_dim=8, gene_pca_dim=4, gene_projection="per_gene")
    base.update(kw)
    return ModelConfig(**base)


def tiny_train(store, out, **kw) -> TrainConfig:
    base = dict(store=str(store), output_dir=str(out), batch_size=32, num_epochs=2, learning_rate=3e-3,
                save_every=0, data_placement="memory", device="cpu", seed=7)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory):
    """A sequence model trained on a store where G0 and G1 carry the signal (conftest), about 120 test subjects."""
    from conftest import _make_signal_store

    root = tmp_path_factory.mktemp("explain")
    store = _make_signal_store(root / "s.zarr", n=300, split_fractions=(0.5, 0.1, 0.4))
    train(tiny_train(store, root / "run", num_epochs=10, learning_rate=1e-2), tiny_model())
    return store, root / "run" / "best_model.pt"


def fast(checkpoint, store, out, **kw) -> ExplainConfig:
    base = dict(checkpoint=checkpoint, store=store, output_dir=out, repeats=3, bootstrap=200, flips=2000, device="cpu")
    base.update(kw)
    return ExplainConfig(**base)


def test_a_gene_with_zero_input_weights_has_importance_exactly_zero():
    """Gene 2's per-gene input block set to zero: shuffling it changes no feature, so its drop is 0 for
    every subject and p = 1 -- and re-encoding it (which explain skips) gives bit-identical ranks."""
    torch.manual_seed(0)
    model = MultiGeneAlignmentModel.from_config(tiny_model(neuro_input_dim=12, gene_input_dim=6, num_genes=4))
    neuro, genes = torch.randn(60, 12), torch.randn(60, 4, 6)
    model.fit_frontend(neuro, genes)
    model.eval()
    with torch.no_grad():
        model.gene_input_weight()[2].zero_()
    assert genes_in_use(model).tolist() == [True, True, False, True]
    neuro_f = model.encode_neuro(neuro).detach()
    config = ExplainConfig(checkpoint="unused", repeats=2, batch_size=16, device="cpu")
    rr0, drops, shuffled = permutation_drops(model, neuro_f, genes, config, lambda m: None)
    assert np.all(drops[2] == 0.0) and np.all(shuffled[2] == rr0.mean())
    assert np.abs(drops[[0, 1, 3]]).sum() > 0  # the used genes do move the ranks
    # explain encodes front-ended rows; unshuffled, that is exactly the model's own encode_gene.
    inputs, encode = gene_side(model, genes, 16)
    torch.testing.assert_close(encode_shuffled(encode, inputs, 16), model.encode_gene(genes).detach(), rtol=0, atol=1e-6)
    perm = torch.from_numpy(np.random.default_rng(1).permutation(60))
    assert np.array_equal(reciprocal_ranks(neuro_f, encode_shuffled(encode, inputs, 16, 2, perm)), rr0)
    assert sign_flip_p(drops, 500, seed=0)[2] == 1.0


def test_sign_flip_p_against_its_definition():
    rng = np.random.default_rng(0)
    drops = np.stack([rng.normal(1.0, 0.1, 50), rng.normal(0.0, 1.0, 50), np.zeros(50)])
    p = sign_flip_p(drops, 999, seed=3)
    assert p[0] == pytest.approx(1 / 1000)  # every flip is below an all-positive mean
    assert 0.01 < p[1] <= 1 and p[2] == 1.0


def test_planted_genes_rank_first_with_significant_q(planted_run, tmp_path):
    store, checkpoint = planted_run
    result = explain(fast(checkpoint, store, tmp_path / "ex"))
    assert set(result.top_genes[:2]) == {"G0", "G1"}, result.rows
    by_gene = {r["gene"]: r for r in result.rows}
    for gene in ("G0", "G1"):
        assert by_gene[gene]["ci_low"] > 0 and by_gene[gene]["q_value"] < 0.05
    assert result.mrr > result.chance_mrr and result.n_subjects == len(open_store(store).indices("test"))
    assert result.planted is None and result.precision is None  # no truth.json beside this store


def test_q_values_are_scipy_bh_and_monotone_in_p(planted_run, tmp_path):
    from scipy.stats import false_discovery_control

    store, checkpoint = planted_run
    out = tmp_path / "ex"
    explain(fast(checkpoint, store, out))
    with open(out / "importance.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert {"gene", "rank", "importance", "ci_low", "ci_high", "p_value", "q_value"} <= set(rows[0])
    assert [int(r["rank"]) for r in rows] == list(range(1, len(rows) + 1))
    p = np.array([float(r["p_value"]) for r in rows])
    q = np.array([float(r["q_value"]) for r in rows])
    np.testing.assert_allclose(q, false_discovery_control(p, method="bh"))
    order = np.argsort(p, kind="stable")
    assert np.all(np.diff(q[order]) >= -1e-15) and np.all(q >= p - 1e-15)
    importance = np.array([float(r["importance"]) for r in rows])
    assert np.all(np.diff(importance) <= 0)
    for name in ("report.md", "importance.png", "attention.png", "explain.json"):
        assert (out / name).stat().st_size > 0
    report = (out / "report.md").read_text()
    for needle in ("pool =", "neuro→gene", "gene→neuro", "chance MRR", "sign-flip", "Benjamini-Hochberg", "not importance"):
        assert needle in report, needle


def test_mean_attention_rows_sum_to_one(planted_run):
    store, checkpoint = planted_run
    model = MultiGeneAlignmentModel.from_checkpoint(checkpoint).eval()
    view = open_store(store)
    _, genes = view.read_rows(view.indices("test")[:20])
    attention = mean_attention(model, torch.from_numpy(genes))
    assert attention.shape == (6, 6)
    np.testing.assert_allclose(attention.sum(axis=1), 1.0, atol=1e-5)


def test_output_dir_protection(planted_run, tmp_path):
    store, checkpoint = planted_run
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(GenealignError, match="not written by genealign explain"):
        explain(fast(checkpoint, store, foreign, repeats=1))
    out = tmp_path / "ex"
    explain(fast(checkpoint, store, out, repeats=1))
    with pytest.raises(GenealignError, match="--overwrite"):
        explain(fast(checkpoint, store, out, repeats=1))
    explain(fast(checkpoint, store, out, repeats=1, overwrite=True))
    assert json.loads((out / "explain.json").read_text())["status"] == "done"
    (out / "notes.txt").write_text("mine")
    with pytest.raises(GenealignError, match="notes.txt was not written"):
        explain(fast(checkpoint, store, out, repeats=1, overwrite=True))
    assert (out / "notes.txt").read_text() == "mine"


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(result, *needles):
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    text = " ".join(result.output.split())
    for needle in needles:
        assert needle in text, (needle, text)


def test_cli_on_a_synth_cohort_reports_precision_against_the_truth(tmp_path):
    cohort, store = tmp_path / "cohort", tmp_path / "s.zarr"
    assert run("synth", cohort, "--subjects", "200", "--genes", "8", "--embedding_dim", "8", "--latent_shape", "2,4,4,4",
               "--seed", "1").exit_code == 0
    assert run("ingest", "--gene_embedding_dir", cohort / "gene_embeddings", "--brain_latent_dir", cohort / "brain_latent",
               "--store", store, "--split_fractions", "0.6,0.1,0.3", "--workers", "1").exit_code == 0
    tiny = ("--projection_dim", "8", "--transformer_hidden_dim", "8", "--transformer_num_layers", "1",
            "--transformer_num_heads", "2", "--neuro_pca_dim", "4", "--gene_pca_dim", "4", "--device", "cpu")
    seq, single = tmp_path / "seq", tmp_path / "single"
    assert run("train", "--store", store, "--mode", "sequence", "--output_dir", seq, "--num_epochs", "2", "--batch_size", "32",
               *tiny).exit_code == 0
    out = tmp_path / "ex"
    result = run("explain", "--checkpoint", seq, "--store", store, "--split", "test", "--output_dir", out,
                 "--repeats", "2", "--bootstrap", "100", "--flips", "500", "--device", "cpu")
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "planted" in text and "importance.csv" in text
    summary = json.loads((out / "explain.json").read_text())
    truth = json.loads((cohort / "truth.json").read_text())
    planted = set(truth["causal_genes"]) | set((truth.get("interaction") or {}).get("genes", []))
    assert set(summary["planted"]) == planted and summary["precision"]
    assert "Against the truth" in (out / "report.md").read_text()
    # Rerunning into the same folder needs --overwrite; a single-gene model is refused in one line.
    one_line_error(run("explain", "--checkpoint", seq, "--output_dir", out, "--device", "cpu"), "--overwrite")
    assert run("train", "--store", store, "--mode", "single", "--single_gene_name", "APOE", "--output_dir", single,
               "--num_epochs", "1", "--batch_size", "32", *tiny).exit_code == 0
    one_line_error(run("explain", "--checkpoint", single, "--output_dir", tmp_path / "ex2", "--device", "cpu"),
                   "single-gene model of APOE", "genealign sweep")
    one_line_error(run("explain", "--checkpoint", seq, "--output_dir", tmp_path / "ex3", "--repeats", "0"), "--repeats")


def test_help_fits_80_columns():
    result = run("explain", "--help")
    assert result.exit_code == 0 and "…" not in result.output
    assert max(len(line) for line in result.output.splitlines()) <= 80
    assert "--repeats" in result.output and "--overwrite" in result.output
