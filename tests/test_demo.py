"""The demo's pipeline end to end on a tiny cohort with tiny models (the full-size demo is `make demo`)."""

from __future__ import annotations

import json

from alignment.demo import DemoConfig, run_demo
from alignment.model import ModelConfig


def tiny_demo(tmp_path, **kw) -> DemoConfig:
    return DemoConfig(
        output_dir=tmp_path / "demo", subjects=400, genes=12, embedding_dim=8, latent_shape=(2, 4, 3, 4),
        split_fractions=(0.5, 0.2, 0.3),
        single_model=ModelConfig(mode="single", projection_dim=8, neuro_pca_dim=8, gene_pca_dim=4),
        sequence_model=ModelConfig(mode="sequence", projection_dim=8, transformer_hidden_dim=8, transformer_num_layers=1,
                                   transformer_num_heads=2, neuro_pca_dim=8, gene_pca_dim=4, gene_projection="per_gene"),
        single_train=dict(batch_size=32, num_epochs=2, learning_rate=3e-3),
        sequence_train=dict(batch_size=32, num_epochs=2, learning_rate=3e-3),
        pool_sizes=("50", "all"), draws=5, bootstrap=50, permutations=50, device="cpu", explain_repeats=1, **kw,
    )


def test_demo_end_to_end_and_reuse(tmp_path):
    messages: list[str] = []
    result = run_demo(tiny_demo(tmp_path), log=messages.append)
    out = tmp_path / "demo"
    assert result.report.exists() and result.report.parent == out
    text = result.report.read_text()
    for needle in ("PCA+CCA", "PCA+PLS", "oracle", "chance", f"pools of {result.pool_size}", "p-value"):
        assert needle.lower() in text.lower(), needle
    names = [row["name"] for row in result.rows]
    assert any(name.startswith("single-gene") for name in names) and "sequence (transformer)" in names
    assert names[-1].lower().startswith("chance")
    assert result.pool_size == result.n_test > 50  # no pool of 1,000 here: the headline is the whole split
    assert "Strongest baseline (best on the val split)" in text and "Top 12 of the 12 genes, sweep" in text
    assert "genes the model kept, explain" in text and "causal genes" in text
    assert (out / "sweep" / "sweep.csv").exists() and (out / "explain_sequence" / "importance.csv").exists()
    # every evaluation wrote its machine-readable figures
    for path in out.glob("eval_*/metrics.json"):
        metrics = json.loads(path.read_text())
        assert metrics["n_subjects"] == result.n_test

    # A second run reuses every finished step.
    again: list[str] = []
    run_demo(tiny_demo(tmp_path), log=again.append)
    assert sum("reusing" in m or "reused" in m for m in again) >= 3
    assert not any(m.strip().startswith("training") or "evaluating" in m for m in again)


def test_demo_refuses_a_folder_it_did_not_write(tmp_path):
    import pytest

    from pipeline.errors import GenealignError

    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "thesis.tex").write_text("mine")
    with pytest.raises(GenealignError, match="thesis.tex was not written by genealign demo"):
        run_demo(tiny_demo(tmp_path), log=lambda message: None)
    assert (tmp_path / "demo" / "thesis.tex").read_text() == "mine"
    assert not (tmp_path / "demo" / "cohort").exists()


def test_demo_confounds_ingests_covariates_and_kinship_and_residualises(tmp_path):
    messages: list[str] = []
    result = run_demo(tiny_demo(tmp_path, confounds=True, gene_analyses=False), log=messages.append)
    assert result.output_dir == tmp_path / "demo" / "confounds"
    assert any("0 pairs across splits" in m for m in messages) and any("site=site_2" in m for m in messages)
    metrics = json.loads((result.output_dir / "eval_sequence" / "metrics.json").read_text())
    assert metrics["residualize"]["covariates"] == ["age", "sex", "site", "head_size"] + [f"PC{k}" for k in range(1, 11)]
    assert metrics["relatedness"]["controlled"] and metrics["relatedness"]["cross_split_pairs"] == 0
    assert "covariates" in metrics["methods_order"]
    assert not (tmp_path / "demo" / "cohort").exists()  # the default demo's folders are left alone
