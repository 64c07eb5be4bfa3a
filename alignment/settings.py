"""Where a training run's settings come from: dataclass defaults, a named preset, the user's flags,
or a saved run being resumed.

`ModelConfig` and `TrainConfig` hold the seed's defaults (the `seed` preset is exactly them). Other
presets are named sets of overrides, per mode. `resolve(request)` layers: defaults < preset < flags,
and for `--resume DIR` takes everything from DIR/config.json, accepting only flags that agree with
it (or runtime ones such as --device) and a longer schedule when it is asked for with --extend.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch

from alignment.model import ModelConfig
from alignment.train import CHECKPOINT_LAST, CONFIG_NAME, TrainConfig, lr_at, train
from pipeline import GenealignError, open_store

_CPU_TRAIN = dict(batch_size=256, num_epochs=20, learning_rate=3e-3, weight_decay=0.3, patience=6)
_GPU_TRAIN = dict(batch_size=1024, num_epochs=60, learning_rate=1e-3, weight_decay=0.1, patience=8)
PRESETS: dict[str, dict[str, dict[str, dict]]] = {
    # The seed's defaults exactly (for reproducing the predecessor).
    "seed": {"single": {"model": {}, "train": {}}, "sequence": {"model": {}, "train": {}}},
    # Measured on the demo cohort (8,000 subjects, 2 CPU cores); see README "What the demo measures".
    "cpu-small": {
        "single": {"model": dict(projection_dim=32, neuro_pca_dim=32, gene_pca_dim=16, dropout=0.2),
                   "train": dict(_CPU_TRAIN)},
        # Chosen on the demo cohort's val split by the search in benchmarks/results/model_search_2026-12-03.jsonl
        # (issue #12): 12 screened genes, a quadratic head, a PCA start of the input maps, 40 epochs. Group
        # lasso 6.3 per epoch: 0.3 per step at the demo's 21 steps per epoch, where it was chosen. Study:
        # benchmarks/results/tune_demo_2026-12-03/study.db (`genealign tune`, 21 trials on the demo's val
        # split): its best trial (20, val 0.420) is this preset; TPE's 20 other trials reached 0.394.
        "sequence": {"model": dict(projection_dim=32, transformer_hidden_dim=32, transformer_num_layers=1,
                                   transformer_num_heads=4, neuro_pca_dim=64, gene_pca_dim=24,
                                   gene_projection="per_gene", gene_head="quadratic", dropout=0.2),
                     "train": dict(_CPU_TRAIN, num_epochs=40, patience=10, gene_group_lasso=6.3, screen_genes=12,
                                   gene_projection_init_pca=16)},
    },
    # A starting point for one GPU and a large cohort, not yet measured on one: tune on val.
    "gpu": {
        "single": {"model": dict(projection_dim=128, neuro_pca_dim=256, gene_pca_dim=32, dropout=0.2),
                   "train": dict(_GPU_TRAIN)},
        "sequence": {"model": dict(projection_dim=256, transformer_hidden_dim=256, transformer_num_layers=2,
                                   transformer_num_heads=8, neuro_pca_dim=256, gene_pca_dim=32,
                                   gene_projection="per_gene", dropout=0.1),
                     "train": dict(_GPU_TRAIN, gene_group_lasso=0.5)},
    },
}
GPU_PRESET_MIN_TRAIN = 10_000  # below this many train subjects the small model is the safer start
RUNTIME_FLAGS = frozenset({"device", "data_placement", "eval_batch_size", "frontend_max_rows"})


@dataclass
class TrainRequest:
    """What the user asked for: only the flags they gave are in model_flags / train_flags."""

    output_dir: str | None = None
    store: str | None = None
    mode: str | None = None
    preset: str | None = None
    model_flags: dict = field(default_factory=dict)
    train_flags: dict = field(default_factory=dict)
    resume: str | None = None
    extend: bool = False
    overwrite: bool = False
    # A settings file (`--config FILE`, e.g. tune's best_config.json): {"preset", "mode", "model",
    # "train"}, layered between the preset and the flags; its dimensions are capped like a preset's.
    config: dict = field(default_factory=dict)


@dataclass
class Resolved:
    train: TrainConfig
    model: ModelConfig
    explicit: frozenset  # ModelConfig fields the user set (not capped to fit the data)
    preset: str
    notes: list = field(default_factory=list)
    extra_config: dict = field(default_factory=dict)


_CLI_ONLY = frozenset({"gene_embedding_dir", "brain_latent_dir", "iid_column"})


def train_request(given: dict) -> TrainRequest:
    """A TrainRequest from the options a user gave (name -> value, unset ones left out)."""
    given = {k: v for k, v in given.items() if k not in _CLI_ONLY}
    mode = given.pop("mode", None)
    if given.pop("use_transformer", False):
        mode = "sequence"
    request = TrainRequest(
        output_dir=_text(given.pop("output_dir", None)), store=_text(given.pop("store", None)), mode=mode,
        preset=given.pop("preset", None), resume=_text(given.pop("resume", None)),
        extend=bool(given.pop("extend", False)), overwrite=bool(given.pop("overwrite", False)),
    )
    settings_file = given.pop("config", None)
    request.config = load_config(settings_file) if settings_file is not None else {}
    model_names = {f.name for f in fields(ModelConfig)}
    request.model_flags = {k: v for k, v in given.items() if k in model_names}
    request.train_flags = {k: v for k, v in given.items() if k not in model_names}
    _check_names(request.train_flags, TrainConfig)
    return request


def _text(value) -> str | None:
    return None if value is None else str(value)


def run_training(request: TrainRequest, progress=None, say=lambda message: None):
    """Resolve the settings, say what was chosen, train; returns (Resolved, TrainResult)."""
    resolved = resolve(request)
    for note in resolved.notes:
        say(note)
    result = train(resolved.train, resolved.model, progress, resolved.explicit, resolved.extra_config)
    return resolved, result


def preset_values(name: str, mode: str) -> tuple[dict, dict]:
    """(model overrides, train overrides) of a preset for a mode."""
    if name not in PRESETS:
        raise GenealignError(f"--preset {name!r} is not a preset: use one of {', '.join(PRESETS)}.")
    entry = PRESETS[name][mode]
    return dict(entry["model"]), dict(entry["train"])


def auto_preset(n_train: int, has_cuda: bool) -> tuple[str, str]:
    """The preset used when none is named, and why."""
    if has_cuda and n_train >= GPU_PRESET_MIN_TRAIN:
        return "gpu", f"a CUDA GPU and {n_train:,} train subjects"
    where = "no CUDA GPU" if not has_cuda else f"only {n_train:,} train subjects"
    return "cpu-small", where


def resolve(request: TrainRequest) -> Resolved:
    """The run's TrainConfig and ModelConfig, or a one-line error naming the conflicting flag."""
    if request.resume:
        return _resolve_resume(request)
    if request.extend:
        raise GenealignError("--extend lengthens a saved run: use it with --resume DIR --num_epochs N.")
    if not request.output_dir:
        raise GenealignError("Give --output_dir DIR for the new run (or --resume DIR to continue one).")
    if not request.store:
        raise GenealignError("Give --store S.zarr (from `genealign ingest`), or both --gene_embedding_dir and --brain_latent_dir.")
    mode = request.mode or request.config.get("mode") or "sequence"
    n_train = len(open_store(request.store).indices("train"))
    notes = []
    preset = request.preset or request.config.get("preset")
    if not preset:
        preset, why = auto_preset(n_train, torch.cuda.is_available())
        notes.append(f"Preset {preset} ({why}); name another with --preset ({', '.join(PRESETS)}).")
    model_values, train_values = preset_values(preset, mode)
    model_values.update(request.config.get("model", {}))
    train_values.update(request.config.get("train", {}))
    model_values.update(request.model_flags)
    train_values.update(request.train_flags)
    _check_names(model_values, ModelConfig)
    _check_names(train_values, TrainConfig)
    train = TrainConfig(store=str(request.store), output_dir=str(request.output_dir), mode=mode,
                        overwrite=request.overwrite, **train_values)
    train, batch_note = fit_batch(train, n_train, "batch_size" in request.train_flags)
    notes += batch_note
    model = ModelConfig(**{**model_values, "mode": mode})
    extra = {"preset": preset, **({"settings_from": request.config["source"]} if "source" in request.config else {})}
    return Resolved(train, model, frozenset(request.model_flags), preset, notes, extra)


def load_config(path) -> dict:
    """A settings file for `genealign train --config FILE` (JSON: preset, mode, model, train)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise GenealignError(f"--config {path} cannot be read as JSON ({exc}); give a file like tune's best_config.json.") from None
    if not isinstance(data, dict) or not set(data) <= {"preset", "mode", "model", "train", "study"}:
        raise GenealignError(f"--config {path}: expected keys preset, mode, model, train (and study); got {sorted(data)}.")
    _check_names(data.get("model", {}), ModelConfig)
    _check_names(data.get("train", {}), TrainConfig)
    return {**data, "source": str(path.resolve())}


def _check_names(values: dict, cls) -> None:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise GenealignError(f"Unknown {cls.__name__} setting(s) {', '.join(unknown)}.")


def fit_batch(train: TrainConfig, n_train: int, explicit: bool) -> tuple[TrainConfig, list]:
    """A preset's batch larger than the train split is lowered to fit (an explicit one is checked by train)."""
    per_step = train.gradient_accumulation_steps
    if explicit or train.batch_size * per_step <= n_train:
        return train, []
    batch = max(2, n_train // per_step)
    return replace(train, batch_size=batch), [f"Batch size {train.batch_size} lowered to {batch}: the train split has {n_train:,} subjects."]


def _saved_run(run_dir: Path) -> dict:
    path = run_dir / CONFIG_NAME
    if not path.is_file():
        raise GenealignError(f"--resume {run_dir}: no {CONFIG_NAME} there; give the output folder of a `genealign train` run.")
    try:
        saved = json.loads(path.read_text())
        return {"train": dict(saved["train"]), "model": dict(saved["model"]), **saved}
    except (ValueError, KeyError, TypeError) as exc:
        raise GenealignError(f"--resume {run_dir}: {path} is not a genealign run description ({exc}); start a new run.") from None


def _resolve_resume(request: TrainRequest) -> Resolved:
    run_dir = Path(request.resume)
    if request.output_dir and Path(request.output_dir).resolve() != run_dir.resolve():
        raise GenealignError(f"--resume {run_dir} continues the run in that folder; drop --output_dir {request.output_dir}.")
    if request.config:
        raise GenealignError(f"--resume {run_dir} takes its settings from the saved run; drop --config.")
    saved = _saved_run(run_dir)
    train_saved, model_saved = saved["train"], saved["model"]
    train_saved.setdefault("residualize", "none")  # a run saved before residualisation existed had none
    if request.store and Path(request.store).resolve() != Path(train_saved["store"]).resolve():
        raise GenealignError(f"--store {request.store} contradicts the saved run ({train_saved['store']}); drop --store to resume.")
    given = {**request.train_flags, **({"mode": request.mode} if request.mode else {})}
    epochs = given.pop("num_epochs", None)
    for key, value in given.items():
        if key not in RUNTIME_FLAGS and train_saved.get(key) != value:
            raise GenealignError(f"--{key} {value} contradicts the saved run ({train_saved.get(key)}); drop it to resume as saved.")
    for key, value in request.model_flags.items():
        if model_saved.get(key) != value:
            raise GenealignError(f"--{key} {value} contradicts the saved run's model ({model_saved.get(key)}); drop it to resume.")
    if request.preset and request.preset != saved.get("preset"):
        raise GenealignError(f"--preset {request.preset} contradicts the saved run ({saved.get('preset')}); drop it to resume.")
    train_saved.update({k: v for k, v in given.items() if k in RUNTIME_FLAGS})
    if train_saved.get("lr_restart") is not None:
        train_saved["lr_restart"] = tuple(train_saved["lr_restart"])
    train = TrainConfig(**{**train_saved, "output_dir": str(run_dir), "resume": True, "overwrite": False})
    extra = {k: saved[k] for k in ("preset", "extensions") if k in saved}
    train, extra = _extended(run_dir, train, epochs, request.extend, extra)
    model = ModelConfig.from_dict(model_saved)
    explicit = frozenset(f.name for f in fields(ModelConfig))
    return Resolved(train, model, explicit, str(saved.get("preset", "")), [f"Resuming {run_dir}."], extra)


def _extended(run_dir: Path, train: TrainConfig, epochs: int | None, extend: bool, extra: dict):
    """Apply `--num_epochs N --extend`; refuse a schedule change that was not asked for explicitly."""
    last = run_dir / CHECKPOINT_LAST
    if not last.is_file():
        raise GenealignError(f"--resume {run_dir}: {last} does not exist (the run saved no epoch yet); start it again.")
    state = torch.load(last, map_location="cpu", weights_only=True, mmap=True)
    done, step = int(state["epoch"]), int(state.get("step", 0))
    if epochs is None or epochs == train.num_epochs:
        if extend:
            raise GenealignError(f"--extend needs --num_epochs larger than the saved run's {train.num_epochs}.")
        if done >= train.num_epochs:
            raise GenealignError(
                f"{run_dir} finished its {train.num_epochs} epochs; train longer with --num_epochs N --extend."
            )
        return train, extra
    if not extend:
        raise GenealignError(
            f"--num_epochs {epochs} changes the saved run's schedule ({train.num_epochs} epochs); add --extend to "
            "lengthen it (the learning rate then continues from where it is)."
        )
    if epochs <= max(done, train.num_epochs):
        raise GenealignError(f"--extend: --num_epochs {epochs} must exceed the saved run's {train.num_epochs} epochs.")
    steps_per_epoch = step // max(done, 1)
    old_total = steps_per_epoch * train.num_epochs
    lr0 = lr_at(step, base_lr=train.learning_rate, warmup_steps=int(train.warmup_fraction * old_total),
                total_steps=old_total, min_lr=train.min_learning_rate, restart=train.lr_restart)
    restart = (step, lr0, max(1, steps_per_epoch))
    record = {"from_epochs": train.num_epochs, "to_epochs": epochs, "at_step": step, "lr_at_step": lr0}
    extra = {**extra, "extensions": [*extra.get("extensions", []), record]}
    return replace(train, num_epochs=epochs, lr_restart=restart), extra
