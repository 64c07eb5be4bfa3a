"""`genealign tune`: hyperparameters chosen by the tool, on the val split, with Optuna's TPE sampler.

Each trial is one `genealign train` run (the preset's recipe with the trial's values) in
OUTPUT_DIR/trials/trial_NNN, scored by its best val top-1 (mean of both directions); the test split
is never read. The preset's own settings are queued as one trial (once), so the best is never below
the recipe the search starts from. The study lives in OUTPUT_DIR/study.db (SQLite), so running the
same command again continues it up to `--trials` finished trials. The best trial's settings are
written to OUTPUT_DIR/best_config.json, which `genealign train --config FILE` takes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from alignment.settings import PRESETS, TrainRequest, preset_values, resolve
from alignment.train import train
from pipeline import GenealignError
from pipeline.atomic import atomic_write_json

STUDY_NAME = "genealign"
STUDY_FILE = "study.db"
BEST_CONFIG = "best_config.json"
MARKER = ".genealign-tune.json"


@dataclass
class TuneConfig:
    store: str
    output_dir: str
    mode: str = "sequence"
    single_gene_name: str | None = None
    trials: int = 20  # finished trials the study should hold
    preset: str = "cpu-small"  # the recipe the search starts from (its other settings are kept)
    num_epochs: int | None = None  # per trial; default: the preset's
    seed: int = 0  # of the sampler (the trials train with the preset's seed)
    device: str = "auto"


@dataclass
class TuneResult:
    output_dir: Path
    best_config: Path
    best_value: float
    best_trial: int
    trials: list = field(default_factory=list)  # dicts: number, state, value, params


# The search space: name -> choices (a list) or (low, high, log) for a float; "model" or "train" side.
# The settings that mattered most on the demo cohort; the sequence rows are issue #12's recipe.
SPACE = {
    "model": {"projection_dim": [16, 32, 64], "neuro_pca_dim": [16, 32, 64, 128], "gene_pca_dim": [8, 16, 24, 32],
              "dropout": (0.0, 0.4, False)},
    "train": {"learning_rate": (3e-4, 1e-2, True), "weight_decay": (1e-3, 1.0, True)},
    "sequence": {"gene_group_lasso": (0.0, 12.0, False), "screen_genes": [8, 12, 16, 0],
                 "gene_projection_init_pca": [0, 12, 16, 24]},
}


def _space(mode: str) -> list[tuple[str, str, object]]:
    """(side, name, domain) of every searched setting, in suggestion order."""
    rows = [(side, name, domain) for side in ("model", "train") for name, domain in SPACE[side].items()]
    return rows + [("train", name, domain) for name, domain in SPACE["sequence"].items()] if mode == "sequence" else rows


def suggest(trial, mode: str) -> tuple[dict, dict]:
    """(model values, train values) of one trial."""
    values: dict[str, dict] = {"model": {}, "train": {}}
    for side, name, domain in _space(mode):
        if isinstance(domain, list):
            values[side][name] = trial.suggest_categorical(name, domain)
        else:
            low, high, log = domain
            values[side][name] = trial.suggest_float(name, low, high, log=log)
    return values["model"], values["train"]


def _enqueue_preset(study, config: "TuneConfig") -> None:
    """The preset's own settings as a trial of the study (once), so the study's best on val is never
    below the recipe it starts from. Skipped when the preset leaves a setting unset or outside the space."""
    model, training = preset_values(config.preset, config.mode)
    preset = {**model, **training}
    point = {name: preset.get(name) for _, name, _ in _space(config.mode)}
    inside = all(value in domain if isinstance(domain, list) else value is not None and domain[0] <= value <= domain[1]
                 for (_, name, domain), value in zip(_space(config.mode), point.values()))
    if inside:
        study.enqueue_trial(point, skip_if_exists=True)


def _claim(out: Path) -> None:
    if out.is_dir() and not (out / MARKER).exists() and any(out.iterdir()):
        first = sorted(p.name for p in out.iterdir())[0]
        raise GenealignError(f"{out / first} was not written by genealign tune; choose another --output-dir.")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / MARKER, {"written_by": "genealign tune"})


def _study(out: Path, seed: int):
    import optuna
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name=STUDY_NAME, storage=f"sqlite:///{out / STUDY_FILE}", direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=seed), load_if_exists=True,
    )
    # A trial left RUNNING by a killed command will never report: close it as failed.
    for stale in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(stale.number, state=TrialState.FAIL)
    return study


def _request(config: TuneConfig, run_dir: Path, model: dict, training: dict) -> TrainRequest:
    train_flags = {**training, "device": config.device, "save_every": 0}
    if config.num_epochs is not None:
        train_flags["num_epochs"] = config.num_epochs
    if config.single_gene_name:
        train_flags["single_gene_name"] = config.single_gene_name
    return TrainRequest(output_dir=str(run_dir), store=config.store, mode=config.mode, preset=config.preset,
                        config={"model": model}, train_flags=train_flags)


def tune(config: TuneConfig, on_trial: Callable[[dict], None] | None = None) -> TuneResult:
    """Run (or continue) the study until it holds `config.trials` finished trials."""
    if config.trials < 1:
        raise GenealignError(f"--trials must be >= 1, got {config.trials}.")
    if config.preset not in PRESETS:
        raise GenealignError(f"--preset {config.preset!r} is not a preset: use one of {', '.join(PRESETS)}.")
    out = Path(config.output_dir)
    _claim(out)
    study = _study(out, config.seed)
    _enqueue_preset(study, config)

    def objective(trial) -> float:
        model, training = suggest(trial, config.mode)
        run_dir = out / "trials" / f"trial_{trial.number:03d}"
        resolved = resolve(_request(config, run_dir, model, training))
        result = train(resolved.train, resolved.model, explicit=resolved.explicit, extra_config=resolved.extra_config)
        trial.set_user_attr("run_dir", str(run_dir))
        trial.set_user_attr("best_epoch", result.best_epoch)
        return float(result.best_val["val_top1_mean"])

    def report(study_, trial) -> None:
        if on_trial:
            on_trial(_row(trial) | {"finished": _finished(study_), "total": config.trials})

    remaining = config.trials - _finished(study)
    if remaining > 0:
        study.optimize(objective, n_trials=remaining, callbacks=[report], catch=(GenealignError,))
    return _write_best(config, out, study)


def _finished(study) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


def _row(trial) -> dict:
    return {"number": trial.number, "state": trial.state.name.lower(), "value": trial.value, "params": dict(trial.params)}


def _write_best(config: TuneConfig, out: Path, study) -> TuneResult:
    if _finished(study) == 0:
        raise GenealignError(f"No trial of the study in {out} finished; see the errors above and {out / 'trials'}.")
    best = study.best_trial
    run_config = json.loads((Path(best.user_attrs["run_dir"]) / "config.json").read_text())
    chosen = set(best.params)
    document = {
        "preset": config.preset,
        "mode": config.mode,
        "model": {k: v for k, v in run_config["model"].items() if k in chosen},
        "train": {k: v for k, v in run_config["train"].items() if k in chosen or k == "num_epochs"},
        "study": {"path": str((out / STUDY_FILE).resolve()), "name": STUDY_NAME, "trial": best.number,
                  "val_top1_mean": best.value, "finished_trials": _finished(study), "sampler": "TPE",
                  "sampler_seed": config.seed, "store": str(Path(config.store).resolve())},
    }
    path = atomic_write_json(out / BEST_CONFIG, document)
    trials = [_row(t) for t in study.get_trials(deepcopy=False)]
    return TuneResult(output_dir=out, best_config=path, best_value=float(best.value), best_trial=best.number, trials=trials)
