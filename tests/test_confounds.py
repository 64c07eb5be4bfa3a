"""Issue #13 end to end: a confounded null cohort from `synth` through ingest --covariates, train and
evaluate; the gene analyses (sweep, explain) on a residualising run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from alignment.evaluate import EvalConfig, evaluate
from alignment.model import ModelConfig, MultiGeneAlignmentModel
from alignment.train import TrainConfig, train
from pipeline import open_store
from pipeline.ingest import IngestConfig, ingest
from pipeline.synth import SynthConfig, synthesize

SMALL = ModelConfig(mode="sequence", projection_dim=16, transformer_hidden_dim=16, transformer_num_layers=1,
                    transformer_num_heads=2, dropout=0.1, neuro_pca_dim=16, gene_pca_dim=4)


@pytest.fixture(scope="module")
def null_confounded(tmp_path_factory):
    """A `--null --confounds` cohort (no gene->brain signal; age, sex, site, head size and ancestry
    in the modalities), 2,000 subjects x 74 genes (three X-linked) x 4 dims, ingested with covariates."""
    root = tmp_path_factory.mktemp("null_confounded")
    cohort = synthesize(SynthConfig(out_dir=root / "cohort", subjects=2000, genes=74, embedding_dim=4,
                                    latent_shape=(2, 4, 4, 4), null=True, confounds=True, seed=3))
    store = root / "s.zarr"
    ingest(IngestConfig(cohort.gene_embedding_dir, cohort.brain_latent_dir, store, workers=1,
                        covariates=cohort.out_dir / "covariates.csv", split_fractions=(0.5, 0.2, 0.3)))
    runs = {}
    for setting in ("none", "all"):
        run = train(TrainConfig(store=str(store), output_dir=str(root / setting), batch_size=256, num_epochs=2,
                                learning_rate=3e-3, device="cpu", residualize=setting, seed=0), SMALL)
        runs[setting] = evaluate(EvalConfig(checkpoint=run.best_checkpoint, split="test", pool_sizes=("all",),
                                            draws=2, bootstrap=20, permutations=1000, output_dir=root / f"eval_{setting}",
                                            baselines=("rrr", "cca"), device="cpu"))
    return store, runs


def _p_values(metrics) -> dict[str, float]:
    return {f"{method} {d}": metrics["methods"][method]["retrieval"][d]["all"]["p_value_top1"]
            for method in metrics["methods_order"] if method not in ("chance", "oracle")
            for d in ("neuro_to_gene", "gene_to_neuro")}


def test_confounds_pass_for_signal_unless_residualised(null_confounded):
    _, runs = null_confounded
    raw, residualised = _p_values(runs["none"].metrics), _p_values(runs["all"].metrics)
    assert min(raw.values()) < 0.01, raw  # the trap: confounds alone look like a gene-brain link
    assert min(residualised.values()) >= 0.01, residualised
    assert {"model neuro_to_gene", "rrr neuro_to_gene", "covariates neuro_to_gene"} <= set(residualised)


def test_gene_analyses_run_on_a_residualising_model(null_confounded, tmp_path):
    from alignment.explain import ExplainConfig, explain
    from alignment.sweep import SweepConfig, sweep

    store, runs = null_confounded
    model = MultiGeneAlignmentModel.from_checkpoint(str(store.parent / "all" / "best_model.pt"))
    assert model.residualizes
    result = explain(ExplainConfig(checkpoint=store.parent / "all" / "best_model.pt", store=store, split="test",
                                   output_dir=tmp_path / "explain", repeats=1, bootstrap=20, flips=100,
                                   max_subjects=300, device="cpu"))
    assert len(result.rows) == 74 and np.isfinite([r["importance"] for r in result.rows]).all()
    genes = ("MAOA", "APOE")
    out = sweep(SweepConfig(store=str(store), output_dir=str(tmp_path / "sweep"), genes=genes, save_models=True,
                            train={"num_epochs": 2, "batch_size": 128, "device": "cpu"}, permutations=100, bootstrap=20))
    assert {r["gene"] for r in out.rows} == set(genes)
    saved = MultiGeneAlignmentModel.from_checkpoint(str(tmp_path / "sweep" / "models" / "MAOA" / "best_model.pt"))
    assert saved.residualizes
    # The saved per-gene model residualises MAOA: its residuals on the train rows are orthogonal to
    # the covariates (sex among them, which MAOA carries strongly).
    view = open_store(store)
    rows = view.indices("train")
    _, maoa = view.read_rows(rows, gene_index=view.gene_index("MAOA"))
    cov = torch.from_numpy(view.covariates[rows])
    resid = saved.residualize_genes(torch.from_numpy(maoa), cov).numpy()
    sex = view.covariates[rows, view.covariate_names.index("sex")]
    assert np.abs(np.corrcoef(np.column_stack([sex, resid]).T)[0, 1:]).max() < 1e-3
    assert np.abs(np.corrcoef(np.column_stack([sex, maoa]).T)[0, 1:]).max() > 0.3
