"""Training: from an ingested store to `best_model.pt`, in three readable pieces.

`train(config, model_config)` reads top to bottom: `_setup` (store, model and its train-split
front-end, loader, AdamW, schedule, output folder), then per epoch `_train_epoch` (warmup + cosine
LR, correct gradient accumulation through `alignment.step.contrastive_step`, clipping, the optional
group-lasso proximal step) and `_validate_and_checkpoint` (whole-val-pool retrieval, atomic
checkpoints, early stopping). The test split is never touched here.

Run under torchrun for several GPUs: `torchrun --nproc_per_node N -m alignment.train --store ...`
(same flags as `genealign train`). Rank 0 alone writes files.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from alignment.embed import autocast_dtype, embed_model, model_covariates, resolve_device
from alignment.loss import group_soft_threshold
from alignment.metrics import val_retrieval
from alignment.model import ModelConfig, MultiGeneAlignmentModel, fit_dims
from alignment.screening import init_gene_projection, screened_store
from alignment.step import contrastive_step
from pipeline import GenealignError, open_store
from pipeline.atomic import atomic_write, atomic_write_json, atomic_write_text
from pipeline.loader import BatchLoader, LoaderConfig
from pipeline.residualize import describe_setting, design_terms, relatedness_note, select_covariates, term_name

CHECKPOINT_BEST = "best_model.pt"
CHECKPOINT_LAST = "last.pt"
CONFIG_NAME = "config.json"
METRICS_NAME = "metrics.jsonl"
CURVES_NAME = "curves.png"
RUN_FILES = (CONFIG_NAME, METRICS_NAME, CHECKPOINT_BEST, CHECKPOINT_LAST, CURVES_NAME)
OOM_HINT = (
    "CUDA out of memory. Lower the batch (--batch_size 16) and use gradient accumulation "
    "(--gradient_accumulation_steps 4), shrink the transformer (--transformer_hidden_dim 256 "
    "--transformer_num_layers 2), or keep the data off the GPU (--data_placement memory)."
)


@dataclass
class TrainConfig:
    """How to train (the model's shape lives in ModelConfig). Defaults are the seed's; named presets
    (`alignment.presets`) are layered on top of them."""

    store: str
    output_dir: str
    mode: str = "sequence"  # 'single' | 'sequence'
    single_gene_name: str | None = None
    batch_size: int = 64  # per process and per micro-batch; optimizer batch = B x K x world
    gradient_accumulation_steps: int = 1
    num_epochs: int = 100
    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    warmup_fraction: float = 0.05  # of all optimizer steps
    min_learning_rate: float = 1e-7
    grad_clip: float = 1.0
    seed: int = 42
    save_every: int = 10
    patience: int = 0  # epochs without val improvement before stopping; 0 = never stop early
    data_placement: str = "auto"  # auto | device | memory | stream
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    frontend_max_rows: int = 20_000  # train rows used to fit z-scoring/PCA (deterministic subsample)
    eval_batch_size: int = 1024
    resume: bool = False
    overwrite: bool = False  # replace a previous run's files in output_dir (train's own files only)
    # Group lasso on the per-gene input projections (sequence mode, gene_projection='per_gene'): after
    # every optimizer step each gene's (d_in, H) block shrinks in norm by lr x this x sqrt(d_in x H) /
    # steps per epoch. A pull per epoch, not per step: a fixed penalty against a loss summed over the
    # train split, so it weakens against the data as the cohort grows instead of pruning every gene
    # of a large one within a few epochs. 0 = off.
    gene_group_lasso: float = 0.0
    # Set by `--extend`: (step, lr at that step, ramp steps) where a longer schedule took over; the LR
    # ramps from the old curve's value to the new cosine so the curve stays continuous.
    lr_restart: tuple | None = None
    log: str = "none"  # 'none' | 'tensorboard': per-epoch figures also go to OUTPUT_DIR/tensorboard
    # Covariates regressed out of both modalities before the front-end (fitted on train): 'all' (every
    # stored covariate; nothing for a store without covariates), 'none', or source names 'age,sex'.
    residualize: str = "all"
    # Sequence mode (`alignment.screening`): keep the K genes a per-gene ridge ranks best on val (0 =
    # every gene), and start the first Q columns of each gene's input map from joint PCs (0 = off).
    screen_genes: int = 0
    gene_projection_init_pca: int = 0


@dataclass
class TrainResult:
    output_dir: Path
    best_checkpoint: Path
    best_epoch: int
    best_val: dict
    epochs_run: int
    stopped_early: bool
    history: list = field(default_factory=list)
    n_train: int = 0
    n_val: int = 0
    placement: str = ""
    device: str = ""
    world_size: int = 1
    residualized: str = ""  # which covariates were residualised, in words
    relatedness: str | None = None  # the warning when relatives were not kept within one split


@dataclass
class _Run:
    """Everything `_setup` builds for the epoch loop."""

    config: TrainConfig
    store: object
    gene_index: int | None
    gene_names: tuple
    model: MultiGeneAlignmentModel
    loader: BatchLoader
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    device: torch.device
    rank: int
    world: int
    out_dir: Path
    full_config: dict
    steps_per_epoch: int
    global_batch: int
    lasso_scale: float
    train_rows: np.ndarray
    val_rows: np.ndarray
    writer: object = None  # a tensorboard SummaryWriter on rank 0 with --log tensorboard
    replaced: list = field(default_factory=list)  # a previous run's files, removed when training starts

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass
class _State:
    """What survives a restart: the last finished epoch, the history and early-stopping counters."""

    epoch: int = 0
    history: list = field(default_factory=list)
    best_score: float = -math.inf
    best_epoch: int = 0
    since_best: int = 0


def lr_at(step: int, *, base_lr: float, warmup_steps: int, total_steps: int, min_lr: float,
          restart: tuple | None = None) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then cosine decay to min_lr.
    With `restart` = (s0, lr0, ramp) (a run extended at step s0) the LR ramps linearly from lr0 to the
    cosine's value over `ramp` steps, then follows the cosine of the new `total_steps`."""
    if restart is not None and step >= restart[0]:
        s0, lr0, ramp = int(restart[0]), float(restart[1]), max(1, int(restart[2]))
        if step < s0 + ramp:
            target = lr_at(s0 + ramp, base_lr=base_lr, warmup_steps=warmup_steps, total_steps=total_steps, min_lr=min_lr)
            return lr0 + (target - lr0) * (step - s0) / ramp
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def check_config(config: TrainConfig) -> None:
    """Counts and sizes, checked before anything is read."""
    if config.mode not in ("single", "sequence"):
        raise GenealignError(f"--mode {config.mode!r} is not a mode: use single or sequence.")
    checks = [
        (config.num_epochs >= 1, f"--num_epochs must be >= 1, got {config.num_epochs}."),
        (config.batch_size >= 2, f"--batch_size must be >= 2 (a contrastive batch needs negatives), got {config.batch_size}."),
        (config.gradient_accumulation_steps >= 1, "--gradient_accumulation_steps must be >= 1."),
        (config.learning_rate > 0, f"--learning_rate must be > 0, got {config.learning_rate}."),
        (config.weight_decay >= 0, f"--weight_decay must be >= 0, got {config.weight_decay}."),
        (0 <= config.warmup_fraction < 1, f"--warmup_fraction must be in [0, 1), got {config.warmup_fraction}."),
        (config.patience >= 0 and config.save_every >= 0, "--patience and --save_every must be >= 0."),
        (config.gene_group_lasso >= 0, f"--gene_group_lasso must be >= 0, got {config.gene_group_lasso}."),
        (config.screen_genes >= 0 and config.gene_projection_init_pca >= 0,
         "--screen_genes and --gene_projection_init_pca must be >= 0."),
        (config.mode == "sequence" or not (config.screen_genes or config.gene_projection_init_pca),
         "--screen_genes and --gene_projection_init_pca apply to --mode sequence."),
        (config.log in ("none", "tensorboard"), f"--log {config.log!r} is not a logger: use tensorboard (or leave it out)."),
    ]
    for ok, message in checks:
        if not ok:
            raise GenealignError(message)


def _init_distributed(device_name: str) -> tuple[int, int, int]:
    """(rank, world_size, local_rank); initialises torch.distributed when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_name != "cpu"
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(local_rank)
    return dist.get_rank(), dist.get_world_size(), local_rank


def frontend_rows(train_rows: np.ndarray, max_rows: int, seed: int) -> np.ndarray:
    if len(train_rows) <= max_rows:
        return train_rows
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(train_rows, size=max_rows, replace=False))


def build_model(model_config: ModelConfig, store, gene_names, n_train: int | None = None,
                explicit: frozenset = frozenset()) -> MultiGeneAlignmentModel:
    """The model for a store: input shapes and gene list come from the store, dimension defaults are
    capped by what the data allows (`fit_dims`), the rest comes from the config."""
    single = model_config.mode == "single"
    cfg = fit_dims(
        replace(model_config, use_transformer=not single),
        neuro_input_dim=store.neuro_dim, gene_input_dim=store.embedding_dim,
        num_genes=1 if single else store.n_genes,
        n_train=len(store.indices("train")) if n_train is None else n_train, explicit=frozenset(explicit),
    )
    cfg = replace(cfg, gene_names=tuple(gene_names), latent_shape=tuple(store.latent_shape))
    return MultiGeneAlignmentModel.from_config(cfg)


def run_files(out_dir: Path) -> list[Path]:
    """The files a previous run of `train` left in out_dir."""
    if not out_dir.is_dir():
        return []
    found = [out_dir / name for name in RUN_FILES if (out_dir / name).exists()]
    return found + sorted(out_dir.glob("checkpoint_epoch_*.pt"))


def _previous_run(config: TrainConfig) -> list[Path]:
    """The previous run's files that --overwrite will remove; an error if they may not be replaced."""
    out_dir = Path(config.output_dir)
    previous = run_files(out_dir)
    if not previous or config.resume:
        return []
    if not config.overwrite:
        raise GenealignError(
            f"{out_dir} holds another run ({', '.join(p.name for p in previous[:3])}); continue it with "
            f"--resume {out_dir}, replace it with --overwrite, or choose another --output_dir."
        )
    evaluations = sorted(p.parent for p in out_dir.glob("*/metrics.json"))
    if evaluations:
        raise GenealignError(
            f"--overwrite would leave {evaluations[0]} (an evaluation of the previous run) beside a new model; "
            "move or delete it first, or choose another --output_dir."
        )
    return previous


def _model_and_data(config: TrainConfig, model_config: ModelConfig, explicit: frozenset):
    store = open_store(config.store)
    gene_index = None
    if config.mode == "single":
        if not config.single_gene_name:
            raise GenealignError(
                "--mode single needs --single_gene_name GENE (e.g. APOE); `genealign info --store "
                f"{config.store} --list_genes` lists the genes."
            )
        gene_index = store.gene_index(config.single_gene_name)
        gene_names = (config.single_gene_name,)
    else:
        gene_names = tuple(store.gene_names)
    train_rows, val_rows = store.indices("train"), store.indices("val")
    if len(val_rows) < 2:
        raise GenealignError(
            f"The val split of {config.store} has {len(val_rows)} subjects; validation needs at least 2. "
            "Ingest more subjects or raise the val fraction (genealign ingest --split_fractions)."
        )
    model_config = replace(model_config, mode=config.mode, **residual_fields(config.residualize, store))
    fit = frontend_rows(train_rows, config.frontend_max_rows, config.seed)
    screening = None
    if 0 < config.screen_genes < store.n_genes:
        store, screening = screened_store(store, config.screen_genes, fit, model_config, build_model)
        gene_names = tuple(store.gene_names)
    model = build_model(model_config, store, gene_names, len(train_rows), explicit)
    neuro_fit, genes_fit = store.read_rows(fit, gene_index)
    covariates = model_covariates(model, store)  # (N, C) | None
    cov_fit = None if covariates is None else torch.from_numpy(covariates[fit])
    model.fit_frontend(torch.from_numpy(neuro_fit), torch.from_numpy(genes_fit), covariates=cov_fit)
    if config.gene_projection_init_pca:
        init_gene_projection(model, torch.from_numpy(genes_fit), config.gene_projection_init_pca, cov_fit)
    return store, gene_index, gene_names, model, train_rows, val_rows, screening


def residual_fields(selection: str, store) -> dict:
    """ModelConfig's covariate_names / residual_terms for `--residualize selection` on this store."""
    groups = select_covariates(selection, store.covariate_groups)
    if not groups:
        return {"covariate_names": None, "residual_terms": None}
    return {"covariate_names": tuple(store.covariate_names), "residual_terms": design_terms(groups, store.covariate_groups)}


def residual_record(selection: str, store) -> dict:
    """What config.json / metrics.json say about residualisation and relatives."""
    groups = select_covariates(selection, store.covariate_groups)
    terms = design_terms(groups, store.covariate_groups)
    return {"residualize": {"setting": selection, "covariates": list(groups), "terms": [term_name(t) for t in terms],
                            "summary": describe_setting(groups, store.covariates is not None)},
            "relatedness": {**store.relatedness, "note": relatedness_note(store.relatedness)}}


def _lasso_scale(config: TrainConfig, model: MultiGeneAlignmentModel, steps_per_epoch: int) -> float:
    """The proximal threshold per step in units of lr: the per-epoch pull spread over the epoch's steps."""
    weight = model.gene_input_weight()  # (G, d_in, H) | None
    if config.gene_group_lasso > 0 and weight is None:
        raise GenealignError(
            "--gene_group_lasso needs per-gene input projections: use --mode sequence with "
            "--gene_projection per_gene, or leave --gene_group_lasso at 0."
        )
    return config.gene_group_lasso * math.sqrt(weight[0].numel()) / steps_per_epoch if weight is not None else 0.0


def _setup(config: TrainConfig, model_config: ModelConfig, explicit: frozenset) -> _Run:
    check_config(config)
    replaced = _previous_run(config)
    rank, world, local_rank = _init_distributed(config.device)
    device = resolve_device(config.device, local_rank)
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    store, gene_index, gene_names, model, train_rows, val_rows, screening = _model_and_data(config, model_config, explicit)
    global_batch = config.batch_size * config.gradient_accumulation_steps * world
    if len(train_rows) < global_batch:
        raise GenealignError(
            f"The train split of {config.store} has {len(train_rows)} subjects, fewer than one batch "
            f"({global_batch} = batch_size x gradient_accumulation_steps x processes); lower --batch_size."
        )
    model.to(device)
    loader = BatchLoader(
        store, train_rows, LoaderConfig(batch_size=config.batch_size, placement=config.data_placement, seed=config.seed),
        device=device, gene_index=gene_index, rank=rank, world_size=world, covariates=model_covariates(model, store),
    )
    steps_per_epoch = loader.steps_per_epoch // config.gradient_accumulation_steps
    lasso_scale = _lasso_scale(config, model, steps_per_epoch)
    total_steps = steps_per_epoch * config.num_epochs
    warmup_steps = int(config.warmup_fraction * total_steps)
    optimizer = torch.optim.AdamW(model.param_groups(config.weight_decay), lr=config.learning_rate, betas=(0.9, 0.999), eps=1e-8)
    schedule = dict(base_lr=config.learning_rate, warmup_steps=warmup_steps, total_steps=total_steps,
                    min_lr=config.min_learning_rate, restart=config.lr_restart)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, **schedule) / config.learning_rate)
    full_config = {
        "model": model.config.to_dict(),
        "train": asdict(config),
        "store": {
            "path": str(Path(config.store).resolve()), "gene_names": list(gene_names),
            "latent_shape": list(store.latent_shape), "embedding_dim": store.embedding_dim,
            "n_train": int(len(train_rows)), "n_val": int(len(val_rows)),
            "split_fractions": list(store.attrs.get("split_fractions", [])),
        },
        "runtime": {"world_size": world, "device": str(device), "placement": loader.placement},
        **residual_record(config.residualize, store),
        **({"screening": screening} if screening else {}),
    }
    return _Run(config, store, gene_index, gene_names, model, loader, optimizer, scheduler, device, rank, world,
                Path(config.output_dir), full_config, steps_per_epoch, global_batch, lasso_scale, train_rows, val_rows,
                replaced=replaced)


def _tensorboard(out_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise GenealignError("--log tensorboard needs the tensorboard package: pip install 'genealign[tensorboard]'.") from None
    return SummaryWriter(log_dir=str(out_dir / "tensorboard"))


def _log_row(writer, row: dict) -> None:
    """The same per-epoch figures as metrics.jsonl, as tensorboard scalars."""
    for key, value in row.items():
        if key != "epoch" and isinstance(value, (int, float)) and math.isfinite(value):
            writer.add_scalar(key, value, row["epoch"])
    writer.flush()


def _start(run: _Run, extra_config: dict | None) -> _State:
    """A fresh state (config.json written), or the one in last.pt when resuming."""
    config = run.config
    if not config.resume:
        if run.is_main:
            for path in run.replaced:
                path.unlink(missing_ok=True)
            run.out_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(run.out_dir / CONFIG_NAME, {**run.full_config, **(extra_config or {})})
        run.writer = _tensorboard(run.out_dir) if run.is_main and config.log == "tensorboard" else None
        return _State()
    run.writer = _tensorboard(run.out_dir) if run.is_main and config.log == "tensorboard" else None
    last = run.out_dir / CHECKPOINT_LAST
    if not last.exists():
        raise GenealignError(f"--resume: {last} does not exist; start without --resume.")
    state = torch.load(last, map_location=run.device, weights_only=True)
    run.model.load_state_dict(state["model_state_dict"])
    run.optimizer.load_state_dict(state["optimizer_state_dict"])
    run.scheduler.load_state_dict(state["scheduler_state_dict"])
    torch.set_rng_state(state["rng_state"]["torch"])
    if run.device.type == "cuda" and state["rng_state"].get("cuda") is not None:
        torch.cuda.set_rng_state(state["rng_state"]["cuda"])
    if run.is_main and extra_config:  # an extended schedule is recorded where the run is described
        atomic_write_json(run.out_dir / CONFIG_NAME, {**run.full_config, **extra_config})
    return _State(int(state["epoch"]), list(state["history"]), float(state["best_score"]),
                  int(state["best_epoch"]), int(state["since_best"]))


def _train_epoch(run: _Run, epoch: int, progress) -> tuple[list[float], float]:
    """One epoch of optimizer steps; returns the step losses and the seconds it took."""
    config, model, optimizer = run.config, run.model, run.optimizer
    model.train()
    started, losses, micro = time.perf_counter(), [], []
    for batch in run.loader.epoch(epoch):  # (neuro, genes[, covariates])
        micro.append(batch)
        if len(micro) < config.gradient_accumulation_steps:
            continue
        try:
            loss = contrastive_step(model, micro, autocast_dtype=autocast_dtype(run.device), distributed=run.world > 1)
        except torch.cuda.OutOfMemoryError as exc:
            raise GenealignError(OOM_HINT) from exc
        micro = []
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        if run.lasso_scale > 0:
            # The group lasso's proximal step at the LR this step used; identical on every rank.
            with torch.no_grad():
                weight, lr = model.gene_input_weight(), optimizer.param_groups[0]["lr"]
                weight.copy_(group_soft_threshold(weight, lr * run.lasso_scale))
        run.scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss)
        if run.is_main and progress:
            elapsed = time.perf_counter() - started
            progress({"event": "step", "epoch": epoch, "step": len(losses), "steps": run.steps_per_epoch,
                      "loss": loss, "lr": run.scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                      "temperature": _temperature(model), "samples_per_s": len(losses) * run.global_batch / max(elapsed, 1e-9)})
        if len(losses) >= run.steps_per_epoch:
            break
    return losses, time.perf_counter() - started


def _temperature(model) -> float:
    return float(model.logit_scale.detach().exp().clamp(max=100))


def _val_loss(model, neuro_f, gene_f, pool: int) -> float:
    """Mean contrastive loss over consecutive val pools of the optimizer's batch size."""
    losses = []
    with torch.no_grad():
        for start in range(0, len(neuro_f) - pool + 1, pool):
            losses.append(float(model.contrastive_loss(neuro_f[start : start + pool], gene_f[start : start + pool])))
    return float(np.mean(losses)) if losses else float("nan")


def _val_row(run: _Run, epoch: int, losses: list, seconds: float, started: float) -> dict:
    gene_indices = [run.gene_index] if run.gene_index is not None else list(range(run.store.n_genes))
    neuro_f, gene_f = embed_model(run.model, run.store, run.val_rows, gene_indices, run.device, run.config.eval_batch_size)
    val = val_retrieval(neuro_f, gene_f)
    row = {
        "epoch": epoch,
        "train_loss": float(np.mean(losses)) if losses else float("nan"),
        "val_loss": _val_loss(run.model, neuro_f, gene_f, min(run.global_batch, len(run.val_rows))),
        **{f"val_{key}": val[key] for key in ("top1_neuro_to_gene", "top1_gene_to_neuro", "top1_mean", "pool_size", "chance_top1")},
        "lr": run.scheduler.get_last_lr()[0],
        "temperature": _temperature(run.model),
        "samples_per_s": len(losses) * run.global_batch / max(seconds, 1e-9),
        "epoch_seconds": time.perf_counter() - started,
    }
    weight = run.model.gene_input_weight()
    if weight is not None:  # genes the model still uses: their input block is not all zeros
        row["genes_in_use"] = int((weight.detach().flatten(1).abs().amax(dim=1) > 0).sum())
    return row


def _payload(run: _Run, state: _State, epoch: int, row: dict) -> dict:
    return {
        "model_state_dict": run.model.state_dict(),
        "optimizer_state_dict": run.optimizer.state_dict(),
        "scheduler_state_dict": run.scheduler.state_dict(),
        "epoch": epoch,
        "step": epoch * run.steps_per_epoch,
        "val_metrics": dict(row),
        "val_loss": row["val_loss"],  # the seed's keys
        "val_acc": row["val_top1_mean"],
        "args": asdict(run.config),
        "config": run.full_config,
        "history": state.history,
        "best_score": state.best_score,
        "best_epoch": state.best_epoch,
        "since_best": state.since_best,
        "rng_state": {"torch": torch.get_rng_state(),
                      "cuda": torch.cuda.get_rng_state() if run.device.type == "cuda" else None},
    }


def _save(path: Path, payload: dict) -> None:
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def _validate_and_checkpoint(run: _Run, state: _State, epoch: int, losses: list, seconds: float,
                             started: float, progress) -> bool:
    """Validate on rank 0, write metrics and checkpoints, and decide (for every rank) whether to stop."""
    stop = torch.zeros(1, device=run.device)
    if run.is_main:
        row = _val_row(run, epoch, losses, seconds, started)
        state.history.append(row)
        state.epoch = epoch
        improved = row["val_top1_mean"] > state.best_score
        if improved:
            state.best_score, state.best_epoch, state.since_best = row["val_top1_mean"], epoch, 0
        else:
            state.since_best += 1
        payload = _payload(run, state, epoch, row)
        atomic_write_text(run.out_dir / METRICS_NAME, "".join(json.dumps(r) + "\n" for r in state.history))
        if run.writer is not None:
            _log_row(run.writer, row)
        if improved:
            _save(run.out_dir / CHECKPOINT_BEST, payload)
        if run.config.save_every and epoch % run.config.save_every == 0:
            _save(run.out_dir / f"checkpoint_epoch_{epoch}.pt", payload)
        _save(run.out_dir / CHECKPOINT_LAST, payload)
        if progress:
            progress({"event": "epoch", **row, "improved": improved, "best_epoch": state.best_epoch})
        if run.config.patience and state.since_best >= run.config.patience:
            stop[0] = 1
    if run.world > 1:
        import torch.distributed as dist

        dist.broadcast(stop, src=0)
    return bool(stop.item())


def train(config: TrainConfig, model_config: ModelConfig, progress: Callable[[dict], None] | None = None,
          explicit: frozenset = frozenset(), extra_config: dict | None = None) -> TrainResult:
    """Train one model; returns where the best checkpoint is and the per-epoch history.

    `explicit`: ModelConfig fields the user set (a default or preset dimension is capped to fit the
    data, an explicit one that does not fit is an error). `extra_config`: more keys for config.json
    (the preset used, schedule extensions). `progress(event)` gets {"event": "start"|"step"|"epoch",
    ...} dicts on rank 0; the CLI turns them into a progress bar."""
    run = _setup(config, model_config, explicit)
    state = _start(run, extra_config)
    if run.is_main and progress:
        progress({"event": "start", "total_epochs": config.num_epochs, "steps_per_epoch": run.steps_per_epoch,
                  "n_train": len(run.train_rows), "n_val": len(run.val_rows), "placement": run.loader.placement,
                  "device": str(run.device), "world_size": run.world, "start_epoch": state.epoch + 1,
                  "global_batch": run.global_batch, "screening": run.full_config.get("screening")})
    stopped_early = False
    for epoch in range(state.epoch + 1, config.num_epochs + 1):
        started = time.perf_counter()
        losses, seconds = _train_epoch(run, epoch, progress)
        if _validate_and_checkpoint(run, state, epoch, losses, seconds, started, progress):
            stopped_early = True
            break
    return _finish(run, state, stopped_early)


def _finish(run: _Run, state: _State, stopped_early: bool) -> TrainResult:
    if run.writer is not None:
        run.writer.close()
    if run.is_main and state.history:
        from alignment.report import plot_training_curves

        plot_training_curves(state.history, run.out_dir / CURVES_NAME)
    if run.world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    best = next((r for r in state.history if r["epoch"] == state.best_epoch), {})
    return TrainResult(
        output_dir=run.out_dir, best_checkpoint=run.out_dir / CHECKPOINT_BEST, best_epoch=state.best_epoch,
        best_val=best, epochs_run=state.epoch, stopped_early=stopped_early, history=state.history,
        n_train=len(run.train_rows), n_val=len(run.val_rows), placement=run.loader.placement,
        device=str(run.device), world_size=run.world,
        residualized=run.full_config["residualize"]["summary"], relatedness=run.full_config["relatedness"]["note"],
    )


if __name__ == "__main__":  # torchrun --nproc_per_node N -m alignment.train <genealign train flags>
    import sys

    from alignment.cli import main

    main(["train", *sys.argv[1:]])
