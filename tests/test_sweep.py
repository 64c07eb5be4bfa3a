"""The gene sweep: equal to separate single-gene trainings, its table, its checkpoints, its CLI."""

from __future__ import annotations

import csv
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import false_discovery_control
from typer.testing import CliRunner

from alignment.cli import app
from alignment.metrics import pooled_ranks, retrieval_ranks
from alignment.model import ModelConfig, MultiGeneAlignmentModel
from alignment.sweep import (CSV_NAME, SweepConfig, epoch_batches, mrr_permutation_test, pairing_permutations,
                             pool_expectations, sweep)
from alignment.train import TrainConfig, train
from pipeline import GenealignError, open_store
from pipeline.loader import BatchLoader, LoaderConfig

GENES = ("G0", "G1", "G3")  # signal, signal, noise genes of the signal store (conftest): G3 stops first, G1 improves after
# No dropout in the path (no neuro hidden layer): the sweep must then match train to float rounding.
MODEL = ModelConfig(mode="single", projection_dim=16, dropout=0.0, neuro_pca_dim=8, gene_pca_dim=4)
TRAIN = dict(batch_size=32, num_epochs=6, learning_rate=3e-3, weight_decay=0.1, patience=2, seed=7, device="cpu",
             grad_clip=0.05)  # small enough to clip: each gene by its own norm


@pytest.fixture(scope="module")
def swept(signal_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "out"
    config = SweepConfig(store=str(signal_store), output_dir=str(out), genes=GENES, model=MODEL, train=dict(TRAIN),
                         save_models=True, permutations=200, bootstrap=200)
    return sweep(config)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_sweep_equals_separate_single_gene_trainings(swept, signal_store, tmp_path):
    by_gene = {r["gene"]: r for r in swept.rows}
    for gene in GENES:
        run = tmp_path / gene
        result = train(TrainConfig(store=str(signal_store), output_dir=str(run), mode="single", single_gene_name=gene,
                                   save_every=0, data_placement="memory", **TRAIN), MODEL)
        separate = torch.load(run / "best_model.pt", weights_only=True)["model_state_dict"]
        together = torch.load(swept.models[gene], weights_only=True)["model_state_dict"]
        assert separate.keys() == together.keys()
        for name in separate:
            torch.testing.assert_close(together[name], separate[name], atol=1e-5, rtol=0, msg=f"{gene} {name}")
        row = by_gene[gene]
        assert row["best_epoch"] == result.best_epoch
        assert row["epochs_trained"] == result.epochs_run  # early stopping stopped both at the same epoch
        for key in ("val_top1_neuro_to_gene", "val_top1_gene_to_neuro", "val_top1_mean"):
            assert row[key] == pytest.approx(result.best_val[key])


def test_sweep_csv_is_ranked_with_bh_q(swept):
    rows = read_csv(swept.output_dir / CSV_NAME)
    for column in ("gene", "rank", "top1_neuro_to_gene", "top1_gene_to_neuro", "mrr", "p_value", "q_value"):
        assert column in rows[0]
    assert sorted(r["gene"] for r in rows) == sorted(GENES)
    assert [int(r["rank"]) for r in rows] == list(range(1, len(GENES) + 1))
    mrr = [float(r["mrr"]) for r in rows]
    assert mrr == sorted(mrr, reverse=True)
    p = np.array([float(r["p_value"]) for r in rows])
    np.testing.assert_allclose([float(r["q_value"]) for r in rows], false_discovery_control(p, method="bh"))
    assert all(0 < v <= 1 for v in p)
    for name in ("report.md", "sweep.png", "sweep.json"):
        assert (swept.output_dir / name).stat().st_size > 0
    assert "pool of" in (swept.output_dir / "report.md").read_text()


def test_checkpoints_load_and_give_the_swept_figures(swept, signal_store):
    """Each checkpoint is the evaluated model: its own encodings of the raw test rows give the table's MRR."""
    store = open_store(signal_store)
    neuro, genes = store.read_rows(store.indices("test"))
    for row in swept.rows:
        model = MultiGeneAlignmentModel.from_checkpoint(swept.models[row["gene"]])
        assert model.config.gene_names == (row["gene"],)
        with torch.no_grad():
            neuro_f = model.encode_neuro(torch.from_numpy(neuro))
            gene_f = model.encode_gene(torch.from_numpy(genes[:, store.gene_index(row["gene"])]))
        assert row["pool_size"] == len(neuro)  # a small test split: the pool is the whole split
        assert row["mrr_neuro_to_gene"] == pytest.approx(np.mean(1.0 / retrieval_ranks(neuro_f, gene_f)), abs=1e-6)
        assert row["mrr_gene_to_neuro"] == pytest.approx(np.mean(1.0 / retrieval_ranks(gene_f, neuro_f)), abs=1e-6)


def test_epoch_batches_are_the_loaders(signal_store):
    store = open_store(signal_store)
    rows = store.indices("train")
    loader = BatchLoader(store, rows, LoaderConfig(batch_size=32, placement="memory", seed=7), device="cpu")
    for epoch in (1, 2):
        expected = loader.epoch_rows(epoch)
        got = [rows[positions] for positions in epoch_batches(len(rows), 32, 7, epoch)]
        assert len(got) == len(expected)
        assert all(np.array_equal(a, b) for a, b in zip(got, expected))


def test_mrr_permutation_test_matches_brute_force():
    rng = np.random.default_rng(3)
    n = 12
    neuro_f = torch.nn.functional.normalize(torch.from_numpy(rng.normal(size=(n, 4))).float(), dim=1)
    gene_f = torch.nn.functional.normalize(neuro_f + torch.from_numpy(rng.normal(size=(n, 4))).float(), dim=1)
    permutations = pairing_permutations(n, 40, seed=1)

    def mrr(g):
        return (np.mean(1.0 / retrieval_ranks(neuro_f, g)) + np.mean(1.0 / retrieval_ranks(g, neuro_f))) / 2

    observed = mrr(gene_f)
    null = np.array([mrr(gene_f[torch.from_numpy(pi)]) for pi in permutations])  # neuro i paired with gene pi(i)
    test = mrr_permutation_test(neuro_f, gene_f, permutations, top_k=n)
    assert test["mrr"] == pytest.approx(observed)
    assert test["null_mrr_mean"] == pytest.approx(null.mean())
    assert test["p_value"] == pytest.approx((1 + np.sum(null >= observed - 1e-6)) / (1 + len(null)))
    assert all(sorted(pi) == list(range(n)) for pi in permutations.tolist())
    truncated = mrr_permutation_test(neuro_f, gene_f, permutations, top_k=3)["mrr"]  # ranks beyond 3 count 0
    ranks = [retrieval_ranks(neuro_f, gene_f), retrieval_ranks(gene_f, neuro_f)]
    assert truncated == pytest.approx(np.mean([np.where(r <= 3, 1.0 / r, 0.0) for r in ranks]))


def test_pool_expectations_average_every_pool():
    """Against enumerating every pool of 4 of 7 subjects: each query's top-1 and reciprocal rank,
    averaged over the pools that hold it."""
    rng = np.random.default_rng(5)
    n, m = 7, 4
    query, gallery = (torch.from_numpy(rng.normal(size=(n, 3))).float() for _ in range(2))
    pools = np.array(list(itertools.combinations(range(n), m)))
    ranks = pooled_ranks(query, gallery, pools)  # (35, 4)
    hits, reciprocal = np.zeros(n), np.zeros(n)
    for pool, pool_ranks in zip(pools, ranks):
        hits[pool] += pool_ranks == 1
        reciprocal[pool] += 1.0 / pool_ranks
    holding = len(pools) * m / n  # pools holding each subject
    top1, rr = pool_expectations(retrieval_ranks(query, gallery), m)
    np.testing.assert_allclose(top1, hits / holding)
    np.testing.assert_allclose(rr, reciprocal / holding)
    whole_top1, whole_rr = pool_expectations(retrieval_ranks(query, gallery), n)
    np.testing.assert_allclose(whole_rr, 1.0 / retrieval_ranks(query, gallery))


def test_sweep_refuses_bad_input(signal_store, tmp_path):
    base = dict(store=str(signal_store), model=MODEL, train=dict(TRAIN, num_epochs=1))
    with pytest.raises(GenealignError, match="not found"):
        sweep(SweepConfig(output_dir=str(tmp_path / "a"), genes=("NOPE",), **base))
    with pytest.raises(GenealignError, match="gradient_accumulation_steps"):
        sweep(SweepConfig(output_dir=str(tmp_path / "b"), **{**base, "train": dict(TRAIN, gradient_accumulation_steps=2)}))


runner = CliRunner()


def test_cli_sweep_writes_and_refuses_foreign_or_earlier_output(signal_store, tmp_path):
    out = tmp_path / "sweep"
    args = ["sweep", "--store", str(signal_store), "--genes", "G0,G3", "--num_epochs", "1", "--batch_size", "32",
            "--projection_dim", "8", "--neuro_pca_dim", "4", "--gene_pca_dim", "4", "--permutations", "20",
            "--bootstrap", "20", "--device", "cpu", "--output_dir"]
    result = runner.invoke(app, args + [str(out)])
    assert result.exit_code == 0, result.output
    assert "Genes ranked by test MRR" in result.output
    assert [r["gene"] for r in read_csv(out / CSV_NAME)] != []

    again = runner.invoke(app, args + [str(out)])
    assert again.exit_code == 1 and "--overwrite" in again.output and "Traceback" not in again.output
    assert runner.invoke(app, args + [str(out), "--overwrite"]).exit_code == 0

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    refused = runner.invoke(app, args + [str(foreign), "--overwrite"])
    assert refused.exit_code == 1 and "not written by genealign sweep" in refused.output
    assert (foreign / "notes.txt").read_text() == "mine" and not (foreign / CSV_NAME).exists()
