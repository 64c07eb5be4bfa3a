"""evaluate() end to end on a tiny synth cohort: both modes, baselines, oracle, chance, the files it
writes, and a clear error for every way a checkpoint can fail to fit a store."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from alignment.baselines import BASELINES
from alignment.evaluate import EvalConfig, evaluate, resolve_pools
from alignment.metrics import val_retrieval
from alignment.model import ModelConfig, MultiGeneAlignmentModel
from alignment.train import build_model
from pipeline import GenealignError, open_store, write_store
from pipeline.ingest import IngestConfig, ingest
from pipeline.oracle import strongest_gene
from pipeline.synth import SynthConfig, load_truth, synthesize

FAST = dict(pool_sizes=("40", "100000", "all"), draws=4, bootstrap=100, permutations=100, device="cpu")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("cohort")
    result = synthesize(SynthConfig(out_dir=root / "cohort", subjects=300, genes=6, embedding_dim=16,
                                    latent_shape=(2, 4, 4, 3), seed=1, signal=3.0))
    store = root / "cohort.zarr"
    ingest(IngestConfig(gene_embedding_dir=result.gene_embedding_dir, brain_latent_dir=result.brain_latent_dir,
                        store=store, split_fractions=(0.5, 0.1, 0.4)))
    return store, load_truth(result.truth_path)


def make_checkpoint(store_path: Path, out: Path, mode: str, gene: str | None = None) -> Path:
    """A checkpoint as `genealign train` writes it: untrained weights, front-end fitted on train rows."""
    store = open_store(store_path)
    names = (gene,) if mode == "single" else store.gene_names
    config = ModelConfig(mode=mode, projection_dim=16, transformer_hidden_dim=16, transformer_num_layers=1,
                         transformer_num_heads=2, dropout=0.0, neuro_pca_dim=8, gene_pca_dim=4)
    model = build_model(config, store, names)
    neuro, genes = store.read_rows(store.indices("train"))
    if mode == "single":
        genes = genes[:, store.gene_index(gene)]
    model.fit_frontend(torch.from_numpy(neuro), torch.from_numpy(np.ascontiguousarray(genes)))
    torch.save({
        "model_state_dict": model.state_dict(),
        "config": {"model": model.config.to_dict(), "train": {"mode": mode, "single_gene_name": gene},
                   "store": {"path": str(store_path), "gene_names": list(names)}},
        "epoch": 0, "val_metrics": {},
    }, out)
    return out


@pytest.fixture(scope="module")
def sequence_eval(cohort, tmp_path_factory):
    store, _ = cohort
    root = tmp_path_factory.mktemp("seq")
    ckpt = make_checkpoint(store, root / "seq.pt", "sequence")
    messages = []
    result = evaluate(EvalConfig(checkpoint=ckpt, store=store, output_dir=root / "eval", **FAST), progress=messages.append)
    assert any("Scoring oracle" in m for m in messages)
    return ckpt, result


@pytest.fixture(scope="module")
def single_eval(cohort, tmp_path_factory):
    store, truth = cohort
    root = tmp_path_factory.mktemp("single")
    ckpt = make_checkpoint(store, root / "single.pt", "single", strongest_gene(truth))
    return ckpt, evaluate(EvalConfig(checkpoint=ckpt, store=store, output_dir=root / "e", baselines=("cca",), **FAST))


def test_sequence_mode_end_to_end(cohort, sequence_eval):
    store, truth = cohort
    ckpt, result = sequence_eval
    out = result.output_dir
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == result.metrics
    view = open_store(store)
    n = len(view.indices("test"))
    assert metrics["split"] == "test" and metrics["n_subjects"] == n and metrics["mode"] == "sequence"
    assert metrics["pool_sizes"] == [40, n] and metrics["pool_keys"] == ["40", "all"]
    assert any("100,000 skipped" in note for note in metrics["notes"])
    assert metrics["methods_order"] == ["model", *BASELINES, "oracle", "chance"]
    assert metrics["strongest_baseline"] in BASELINES
    for method in metrics["methods_order"]:
        figures = metrics["methods"][method]
        for direction in ("neuro_to_gene", "gene_to_neuro"):
            for key, size in (("40", 40), ("all", n)):
                cell = figures["retrieval"][direction][key]
                assert cell["pool_size"] == size
                assert cell["chance_top1"] == pytest.approx(1 / size)
                assert cell["chance_mean_rank"] == pytest.approx((size + 1) / 2)
                for m in ("top1", "top5", "top10", "mean_rank", "median_rank", "mrr"):
                    assert m in cell
                if method != "chance":
                    lo, hi = cell["ci"]["top1"]
                    assert lo <= cell["top1"] <= hi
            if method != "chance":
                assert 0 < figures["retrieval"][direction]["all"]["p_value_top1"] <= 1
                assert figures["retrieval"][direction]["40"]["n_draws"] == 4
        assert len(figures["topk_curve"]["k"]) == 50
    assert metrics["methods"]["cca"]["fit"]["genes"] == list(view.gene_names)
    assert metrics["methods"]["oracle"]["score"].startswith("dot product")
    # The oracle knows the generator: far above chance on a strong-signal cohort.
    oracle = metrics["methods"]["oracle"]["retrieval"]["neuro_to_gene"]["all"]
    assert oracle["top1"] > 5 * oracle["chance_top1"] and oracle["p_value_top1"] < 0.05

    # The model's figures are those of its own features on the test split (its own normalisation).
    model = MultiGeneAlignmentModel.from_checkpoint(ckpt)
    neuro, genes = view.read_rows(view.indices("test"))
    with torch.no_grad():
        direct = val_retrieval(model.encode_neuro(torch.from_numpy(neuro)), model.encode_gene(torch.from_numpy(genes)))
    assert metrics["methods"]["model"]["retrieval"]["neuro_to_gene"]["all"]["top1"] == pytest.approx(direct["top1_neuro_to_gene"])
    assert metrics["methods"]["model"]["retrieval"]["gene_to_neuro"]["all"]["top1"] == pytest.approx(direct["top1_gene_to_neuro"])

    report = (out / "report.md").read_text()
    for needle in ("N = ", "top-1 out of", "chance", "PCA+CCA", "PCA+PLS", "oracle", "neuro→gene", "gene→neuro",
                   "bootstrap", "permutation", "Cohen's d", "draws", "Strongest baseline (best on the val split)",
                   "(strongest on val)"):
        assert needle in report, needle
    for name in ("topk_curves.png", "rank_histogram.png", "similarity.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".*.tmp"))  # atomic writes left no temp files
    rows = result.headline
    assert [r["method"] for r in rows] == ["model", *BASELINES, "oracle", "chance"]
    assert rows[0]["pool_size"] == n  # no pool of 1000 here: the headline is the whole split
    assert rows[-1]["top1_neuro_to_gene"] == pytest.approx(1 / n)


def test_single_mode_uses_its_gene_everywhere(cohort, single_eval):
    gene = strongest_gene(cohort[1])
    _, result = single_eval
    metrics = result.metrics
    assert metrics["mode"] == "single" and metrics["gene_names"] == [gene]
    assert metrics["methods_order"] == ["model", "cca", "oracle", "chance"]
    assert metrics["methods"]["cca"]["fit"]["genes"] == [gene]
    assert metrics["methods"]["oracle"]["fit"]["genes"] == [gene]
    assert gene in metrics["methods"]["model"]["label"]
    assert f"gene {gene}" in result.report_path.read_text()


def test_a_checkpoint_written_by_train(cohort, tmp_path):
    from alignment.train import TrainConfig, train

    store, _ = cohort
    run = train(TrainConfig(store=str(store), output_dir=str(tmp_path / "run"), mode="sequence", batch_size=32,
                            num_epochs=1, save_every=0, data_placement="memory", device="cpu"),
                ModelConfig(projection_dim=16, transformer_hidden_dim=16, transformer_num_layers=1,
                            transformer_num_heads=2, neuro_pca_dim=8, gene_pca_dim=4))
    result = evaluate(EvalConfig(checkpoint=run.best_checkpoint, store=store, baselines=(), oracle=False, **FAST))
    assert result.output_dir == run.best_checkpoint.parent / "eval_test"
    assert result.metrics["methods_order"] == ["model", "chance"]
    assert result.metrics["checkpoint_epoch"] == 1


def test_store_without_truth_has_no_oracle_row(cohort, tmp_path):
    store, _ = cohort
    view = open_store(store)
    neuro, genes = view.read_rows(np.arange(view.n_subjects))
    plain = write_store(tmp_path / "plain.zarr", view.iid, neuro.reshape(-1, *view.latent_shape), genes,
                        view.gene_names, split_fractions=(0.5, 0.1, 0.4))
    ckpt = make_checkpoint(store, tmp_path / "seq.pt", "sequence")
    result = evaluate(EvalConfig(checkpoint=ckpt, store=plain.path, output_dir=tmp_path / "e", baselines="none", **FAST))
    assert "oracle" not in result.metrics["methods"]
    assert any("No oracle" in note for note in result.metrics["notes"])
    assert any("trained on store" in note for note in result.metrics["notes"])


def _copy_store(view, path: Path, genes_keep=None, latent_shape=None):
    neuro, genes = view.read_rows(np.arange(view.n_subjects))
    names = list(view.gene_names)
    if genes_keep is not None:
        genes, names = genes[:, genes_keep], [names[i] for i in genes_keep]
    shape = latent_shape or view.latent_shape
    neuro = neuro[:, : int(np.prod(shape))].reshape(-1, *shape)
    return write_store(path, view.iid, neuro, genes, names, split_fractions=(0.5, 0.1, 0.4)).path


def test_mismatched_checkpoint_and_store_are_clear_errors(cohort, tmp_path):
    store, truth = cohort
    view = open_store(store)
    seq = make_checkpoint(store, tmp_path / "seq.pt", "sequence")
    gene = strongest_gene(truth)
    single = make_checkpoint(store, tmp_path / "single.pt", "single", gene)
    missing = view.gene_names[-1]
    fewer = _copy_store(view, tmp_path / "fewer.zarr", genes_keep=list(range(view.n_genes - 1)))
    with pytest.raises(GenealignError, match=rf"expects 6 genes \(.*\), store .* has 5: missing {missing}"):
        evaluate(EvalConfig(checkpoint=seq, store=fewer, output_dir=tmp_path / "x", **FAST))

    # The other way round is fine: a store with more genes than the checkpoint reads only its genes.
    small = make_checkpoint(fewer, tmp_path / "small.pt", "sequence")
    result = evaluate(EvalConfig(checkpoint=small, store=store, output_dir=tmp_path / "ok", baselines="cca", **FAST))
    assert result.metrics["gene_names"] == list(view.gene_names[:-1])
    assert result.metrics["methods"]["cca"]["fit"]["genes"] == list(view.gene_names[:-1])
    assert any(f"does not use ({missing})" in note for note in result.metrics["notes"])

    others = [i for i, g in enumerate(view.gene_names) if g != gene]
    no_gene = _copy_store(view, tmp_path / "nogene.zarr", genes_keep=others)
    with pytest.raises(GenealignError, match=rf"single-gene model of {gene}, but store .* has no gene {gene}"):
        evaluate(EvalConfig(checkpoint=single, store=no_gene, output_dir=tmp_path / "x", **FAST))

    smaller = _copy_store(view, tmp_path / "latent.zarr", latent_shape=(2, 4, 4, 2))
    with pytest.raises(GenealignError, match=r"expects brain latents of shape \(2, 4, 4, 3\) \(96 values\).*\(2, 4, 4, 2\)"):
        evaluate(EvalConfig(checkpoint=seq, store=smaller, output_dir=tmp_path / "x", **FAST))

    with pytest.raises(GenealignError, match="does not exist"):
        evaluate(EvalConfig(checkpoint=tmp_path / "none.pt", store=store, output_dir=tmp_path / "x", **FAST))
    with pytest.raises(GenealignError, match="not a pool size"):
        evaluate(EvalConfig(checkpoint=seq, store=store, output_dir=tmp_path / "x", **{**FAST, "pool_sizes": ("ten",)}))
    with pytest.raises(GenealignError, match="unknown ridge"):
        evaluate(EvalConfig(checkpoint=seq, store=store, output_dir=tmp_path / "x", baselines=("ridge",), **FAST))
    assert not (tmp_path / "x").exists()  # nothing written on a user error


def test_resolve_pools():
    assert resolve_pools("300,1000,all", 5000) == ([300, 1000], [])
    sizes, notes = resolve_pools(("300", 1000, "all"), 1000)
    assert sizes == [300] and "whole split" in notes[0]
    sizes, notes = resolve_pools(("300", "1000"), 500)
    assert sizes == [300] and "1,000 skipped" in notes[0]
    with pytest.raises(GenealignError, match="at least 2"):
        resolve_pools(("1",), 50)


def test_comparison_table_across_evaluations(sequence_eval, single_eval, tmp_path):
    from alignment.report import comparison_markdown, comparison_rows

    evaluations = [("sequence model", sequence_eval[1].metrics), ("single model", single_eval[1].metrics)]
    rows, pool, n = comparison_rows(evaluations)
    names = [r["name"] for r in rows]
    assert names[0] == "sequence model" and "single model" in names and names[-1] == "chance"
    assert len(names) == len(set(names))
    assert pool == n == sequence_eval[1].metrics["n_subjects"]
    assert all({"top1_neuro_to_gene", "top1_gene_to_neuro", "p_neuro_to_gene", "chance_top1"} <= set(r) for r in rows)
    reports = [("sequence model", sequence_eval[1].report_path)]
    text = comparison_markdown(rows, pool, n, reports, base=sequence_eval[1].output_dir.parent)
    assert "| chance |" in text and "single model" in text and "(eval/report.md)" in text
    from alignment.metrics import holm_adjust

    tested = [r[f"p_{d}"] for r in rows for d in ("neuro_to_gene", "gene_to_neuro") if r[f"p_{d}"] is not None]
    assert f"(Holm, {len(tested)} tests)" in text
    first = rows[0]["p_neuro_to_gene"]
    assert f"{first:.2g} ({holm_adjust(tested)[0]:.2g})" in text


def test_training_curves_plot(tmp_path):
    from alignment.report import plot_training_curves

    history = [{"epoch": e, "train_loss": 4 - e * 0.1, "val_loss": 4.1 - e * 0.1, "val_top1_neuro_to_gene": 0.01 * e,
                "val_top1_gene_to_neuro": 0.012 * e, "val_chance_top1": 0.01, "val_pool_size": 100,
                "lr": 1e-3 / e, "temperature": 14.0 + e} for e in range(1, 6)]
    path = plot_training_curves(history, tmp_path / "curves.png")
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_external_store_without_train_split_skips_baselines(cohort, sequence_eval, tmp_path):
    """A checkpoint evaluated on another cohort ingested as all-test: no baselines, a note, no crash."""
    store, _ = cohort
    view = open_store(store)
    neuro, genes = view.read_rows(np.arange(view.n_subjects))
    external = write_store(tmp_path / "ext.zarr", view.iid, neuro.reshape(-1, *view.latent_shape), genes,
                           view.gene_names, split_fractions=(0.0, 0.0, 1.0))
    result = evaluate(EvalConfig(checkpoint=sequence_eval[0], store=external.path, output_dir=tmp_path / "e", **FAST))
    assert result.metrics["n_subjects"] == view.n_subjects
    assert result.metrics["methods_order"] == ["model", "chance"]
    assert any("Baselines skipped" in note for note in result.metrics["notes"])


@pytest.fixture(scope="module")
def confounded_evals(tmp_path_factory):
    """One tiny run per residualisation setting on a store whose genes and brain share only confounds."""
    from conftest import _make_confounded_store
    from alignment.train import TrainConfig, train

    root = tmp_path_factory.mktemp("confounded")
    store = _make_confounded_store(root / "c.zarr")
    model = ModelConfig(mode="sequence", projection_dim=16, transformer_hidden_dim=16, transformer_num_layers=1,
                        transformer_num_heads=2, dropout=0.0, neuro_pca_dim=8, gene_pca_dim=4)
    out = {}
    for setting in ("all", "none"):
        run = train(TrainConfig(store=str(store), output_dir=str(root / setting), batch_size=32, num_epochs=1,
                                device="cpu", residualize=setting), model)
        out[setting] = run.best_checkpoint, evaluate(EvalConfig(checkpoint=run.best_checkpoint, baselines=("rrr",), **FAST))
    return store, out


def test_covariates_only_row_and_residualised_baselines(confounded_evals):
    _, evals = confounded_evals
    top1 = lambda metrics, m: np.mean([metrics["methods"][m]["retrieval"][d]["all"]["top1"]  # noqa: E731
                                       for d in ("neuro_to_gene", "gene_to_neuro")])
    on, off = evals["all"][1].metrics, evals["none"][1].metrics
    chance = 1 / on["n_subjects"]
    for metrics in (on, off):
        assert "covariates" in metrics["methods_order"] and "p_value_top1" in metrics["methods"]["covariates"]["retrieval"]["neuro_to_gene"]["all"]
        assert metrics["relatedness"]["note"].startswith("Relatedness not controlled")
    assert "brain residualised" in on["methods"]["covariates"]["label"]
    assert "not residualised" in off["methods"]["covariates"]["label"]
    # Confounds alone retrieve well; residualised on them, the covariates and rrr rows fall to chance.
    assert top1(off, "covariates") > 10 * chance and top1(off, "rrr") > 10 * chance
    assert top1(on, "covariates") < 4 * chance and top1(on, "rrr") < 4 * chance
    assert on["residualize"]["covariates"] == ["age", "sex", "site"] and off["residualize"]["covariates"] == []
    report = evals["all"][1].report_path.read_text()
    assert "covariates only" in report and "Residualised on covariates age, sex, site" in report
    assert "Relatedness not controlled: the split is by IID hash" in report
    assert "No covariates residualised (--residualize none)." in evals["none"][1].report_path.read_text()


def test_evaluate_residualize_must_match_the_checkpoint(confounded_evals, tmp_path):
    store, evals = confounded_evals
    with pytest.raises(GenealignError, match="the model was trained with --residualize all \\(age, sex, site\\)"):
        evaluate(EvalConfig(checkpoint=evals["all"][0], residualize="none", output_dir=tmp_path / "x", **FAST))
    with pytest.raises(GenealignError, match="not among the store's covariates"):
        evaluate(EvalConfig(checkpoint=evals["all"][0], residualize="bogus", output_dir=tmp_path / "x", **FAST))
    same = evaluate(EvalConfig(checkpoint=evals["none"][0], residualize="none", baselines="none",
                               output_dir=tmp_path / "ok", **FAST))
    assert same.metrics["residualize"]["setting"] == "none"


def _with_p(metrics: dict, method: str, p: float) -> None:
    for direction in metrics["directions"]:
        metrics["methods"][method]["retrieval"][direction]["all"]["p_value_top1"] = p


@pytest.mark.parametrize("p_model,p_base,ratio", [(0.001, 0.001, True), (0.4, 0.001, False), (0.001, 0.3, False)])
def test_versus_strongest_gives_no_ratio_at_chance(sequence_eval, p_model, p_base, ratio):
    """The headline ratio against the strongest baseline, unless either side is at chance both ways."""
    import copy

    from alignment.report import method_row, versus_strongest

    metrics = copy.deepcopy(sequence_eval[1].metrics)
    base = metrics["strongest_baseline"] = next(m for m in metrics["methods_order"] if m in BASELINES)
    _with_p(metrics, "model", p_model)
    _with_p(metrics, base, p_base)
    rows = [method_row(metrics, m, metrics["headline_pool"]) for m in ("model", base)]
    mean_model, mean_base = ((r["top1_neuro_to_gene"] + r["top1_gene_to_neuro"]) / 2 for r in rows)
    sentence = versus_strongest(metrics)
    assert (f"= {mean_model / mean_base:.2f}x the strongest baseline" in sentence) == ratio
    assert ("no ratio" in sentence) == (not ratio)
    assert ("(the model" in sentence) == (p_model >= 0.05)
    assert ("the baseline at chance" in sentence) == (p_base >= 0.05)
