"""`genealign tune`: a resumable Optuna study on val whose best settings `train --config` accepts."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from alignment.cli import app
from alignment.settings import preset_values
from alignment.tune import TuneConfig, tune
from pipeline import GenealignError

runner = CliRunner()


def test_study_resumes_and_best_config_trains(signal_store, tmp_path):
    out = tmp_path / "tune"
    config = TuneConfig(store=str(signal_store), output_dir=str(out), trials=2, num_epochs=2, device="cpu")
    first = tune(config)
    assert [t["state"] for t in first.trials] == ["complete", "complete"]
    model, training = preset_values("cpu-small", "sequence")  # trial 0 is the preset itself
    assert first.trials[0]["params"] == {name: {**model, **training}[name] for name in first.trials[0]["params"]}
    assert len(first.trials[0]["params"]) == 9 and first.trials[1]["params"] != first.trials[0]["params"]
    again = tune(TuneConfig(**{**config.__dict__, "trials": 3}))  # continues the same study
    assert len(again.trials) == 3 and again.trials[:2] == first.trials  # the preset is not queued again
    best = json.loads(again.best_config.read_text())
    values = [t["value"] for t in again.trials]
    assert best["study"]["trial"] == values.index(max(values)) and best["study"]["val_top1_mean"] == max(values)
    assert set(best["model"]) == {"projection_dim", "neuro_pca_dim", "gene_pca_dim", "dropout"}
    run_dir = tmp_path / "run"
    result = runner.invoke(app, ["train", "--store", str(signal_store), "--config", str(again.best_config),
                                 "--output-dir", str(run_dir), "--num-epochs", "1", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["settings_from"] == str(again.best_config.resolve())
    for key, value in best["model"].items():  # dimensions capped to the data, like a preset's
        assert saved["model"][key] == value or key.endswith("pca_dim") and saved["model"][key] < value
    assert saved["train"]["learning_rate"] == best["train"]["learning_rate"]


def test_tune_refuses_a_foreign_folder(signal_store, tmp_path):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "keep.txt").write_text("x")
    with pytest.raises(GenealignError, match="keep.txt was not written by genealign tune"):
        tune(TuneConfig(store=str(signal_store), output_dir=str(tmp_path / "t"), trials=1))


def test_bad_config_file_is_one_line(signal_store, tmp_path):
    bad = tmp_path / "c.json"
    bad.write_text(json.dumps({"model": {"widht": 3}}))
    result = runner.invoke(app, ["train", "--store", str(signal_store), "--config", str(bad), "--output-dir", str(tmp_path / "r")])
    assert result.exit_code == 1 and "widht" in result.output and "Traceback" not in result.output


def test_tune_command_prints_the_trials_table(signal_store, tmp_path):
    result = runner.invoke(app, ["tune", "--store", str(signal_store), "--output-dir", str(tmp_path / "t"), "--trials", "1",
                                 "--num-epochs", "1", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "Trials" in text and "complete" in text and "best_config.json" in text and "learning_rate=" in text
