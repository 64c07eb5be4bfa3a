"""Training: one flat function from an ingested store to `best_model.pt`.

Reads the store through `pipeline` (train split for fitting, val split for model selection; the test
split is never touched here), fits the model's front-end (z-scoring, optional PCA whitening) on the
train split, then runs AdamW with linear warmup + cosine decay, gradient clipping, correct gradient
accumulation (`alignment.step.contrastive_step`: negatives span the whole accumulated and, under
torchrun, the global batch), validation retrieval over the whole val pool every epoch, atomic
checkpoints, resume and early stopping.

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

from alignment.evaluate import embed_model
from alignment.loss import group_soft_threshold
from alignment.metrics import val_retrieval
from alignment.model import ModelConfig, MultiGeneAlignmentModel
from alignment.step import contrastive_step
from pipeline import GenealignError, open_store
from pipeline.atomic import atomic_write, atomic_write_json, atomic_write_text
from pipeline.loader import BatchLoader, LoaderConfig

CHECKPOINT_BEST = "best_model.pt"
CHECKPOINT_LAST = "last.pt"
OOM_HINT = (
    "CUDA out of memory. Lower the batch (--batch_size 16) and use gradient accumulation "
    "(--gradient_accumulation_steps 4), shrink the transformer (--transformer_hidden_dim 256 "
    "--transformer_num_layers 2), or keep the data off the GPU (--data_placement memory)."
)


@dataclass
class TrainConfig:
    """How to train (the model's shape lives in ModelConfig). Defaults follow the seed."""

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
    # Group lasso on the per-gene input projections (sequence mode, gene_projection='per_gene'): after
    # every optimizer step each gene's (d_in, H) weight block shrinks in norm by
    # lr x gene_group_lasso x sqrt(d_in x H) (proximal step, `group_soft_threshold`), so a gene whose
    # gradient does not keep pointing one way goes to exactly 0 and leaves the model. The sqrt: AdamW
    # moves each weight by about lr per step, so a block whose gradient is consistent grows by up to
    # lr x sqrt(d_in x H); the setting is the fraction of that drift a gene must beat to stay in.
    # On the demo cohort 1.0 removed every gene; 0.3 removed none but lifted held-out top-1 by ~30%
    # (the shrinkage itself regularises). Block norms are not a gene ranking: there the largest
    # blocks belong to noise genes. The pull adds up over steps: with 4x the steps per epoch (22,057
    # train subjects) 0.3 left 3 genes by epoch 8 and 0.1 did best, so choose it on val. 0 = off.
    gene_group_lasso: float = 0.0


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


def lr_at(step: int, *, base_lr: float, warmup_steps: int, total_steps: int, min_lr: float) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then cosine decay to min_lr."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def _resolve_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise GenealignError(f"--device {name} was asked for but no CUDA GPU is visible; use --device cpu.")
        return torch.device("cuda", local_rank if name == "cuda" else int(name.split(":")[1]))
    return torch.device(name)


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


def _val_loss(model, neuro_f, gene_f, pool: int) -> float:
    """Mean contrastive loss over consecutive val pools of the optimizer's batch size."""
    losses = []
    for start in range(0, len(neuro_f) - pool + 1, pool):
        out = model.contrastive_loss(neuro_f[start : start + pool], gene_f[start : start + pool])
        losses.append(float(out))
    return float(np.mean(losses)) if losses else float("nan")


def _save(path: Path, payload: dict) -> None:
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def _frontend_rows(train_rows: np.ndarray, max_rows: int, seed: int) -> np.ndarray:
    if len(train_rows) <= max_rows:
        return train_rows
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(train_rows, size=max_rows, replace=False))


def build_model(model_config: ModelConfig, store, gene_names) -> MultiGeneAlignmentModel:
    """The model for a store: input shapes and gene list come from the store, the rest from config."""
    single = model_config.mode == "single"
    cfg = replace(
        model_config,
        neuro_input_dim=store.neuro_dim,
        gene_input_dim=store.embedding_dim,
        num_genes=1 if single else store.n_genes,
        use_transformer=not single,
        gene_names=tuple(gene_names),
        latent_shape=tuple(store.latent_shape),
    )
    return MultiGeneAlignmentModel.from_config(cfg)


def train(
    config: TrainConfig,
    model_config: ModelConfig,
    progress: Callable[[dict], None] | None = None,
) -> TrainResult:
    """Train one model; returns where the best checkpoint is and the per-epoch history.

    `progress(event)` (optional) receives dicts: {"event": "start"|"step"|"epoch", ...}; the CLI turns
    them into a progress bar. It is only called on rank 0."""
    if config.mode not in ("single", "sequence"):
        raise GenealignError(f"--mode {config.mode!r} is not a mode: use single or sequence.")
    if config.gradient_accumulation_steps < 1 or config.batch_size < 2:
        raise GenealignError("--batch_size must be >= 2 and --gradient_accumulation_steps >= 1.")
    rank, world, local_rank = _init_distributed(config.device)
    is_main = rank == 0
    device = _resolve_device(config.device, local_rank)
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)

    out_dir = Path(config.output_dir)
    store = open_store(config.store)
    gene_index = None
    if config.mode == "single":
        if not config.single_gene_name:
            raise GenealignError(
                "--mode single needs --single_gene_name GENE (e.g. APOE); `genealign info --store "
                f"{config.store}` lists the genes."
            )
        gene_index = store.gene_index(config.single_gene_name)
        gene_names = (config.single_gene_name,)
    else:
        gene_names = store.gene_names
    model_config = replace(model_config, mode=config.mode)

    train_rows, val_rows = store.indices("train"), store.indices("val")
    global_batch = config.batch_size * config.gradient_accumulation_steps * world
    if len(train_rows) < global_batch:
        raise GenealignError(
            f"The train split of {config.store} has {len(train_rows)} subjects, fewer than one batch "
            f"({global_batch} = batch_size x gradient_accumulation_steps x processes); lower --batch_size."
        )
    if len(val_rows) < 2:
        raise GenealignError(
            f"The val split of {config.store} has {len(val_rows)} subjects; validation needs at least 2. "
            "Ingest more subjects or raise the val fraction (--split_fractions)."
        )

    model = build_model(model_config, store, gene_names)
    neuro_fit, genes_fit = store.read_rows(_frontend_rows(train_rows, config.frontend_max_rows, config.seed), gene_index)
    model.fit_frontend(torch.from_numpy(neuro_fit), torch.from_numpy(genes_fit))
    del neuro_fit, genes_fit
    model.to(device)
    # After fit_frontend, which may rebuild the input projection. The loop asks the model again at
    # every use: loading a checkpoint (resume) may rebuild it too.
    gene_weight = model.gene_input_weight()  # (G, d_in, H) | None
    if config.gene_group_lasso < 0:
        raise GenealignError(f"--gene_group_lasso must be >= 0, got {config.gene_group_lasso}.")
    if config.gene_group_lasso > 0 and gene_weight is None:
        raise GenealignError(
            "--gene_group_lasso needs per-gene input projections: use --mode sequence with "
            "--gene_projection per_gene, or leave --gene_group_lasso at 0."
        )
    group_lasso_scale = config.gene_group_lasso * math.sqrt(gene_weight[0].numel()) if gene_weight is not None else 0.0

    loader = BatchLoader(
        store,
        train_rows,
        LoaderConfig(batch_size=config.batch_size, placement=config.data_placement, seed=config.seed),
        device=device,
        gene_index=gene_index,
        rank=rank,
        world_size=world,
    )
    steps_per_epoch = loader.steps_per_epoch // config.gradient_accumulation_steps
    total_steps = steps_per_epoch * config.num_epochs
    warmup_steps = int(config.warmup_fraction * total_steps)
    optimizer = torch.optim.AdamW(
        model.param_groups(config.weight_decay), lr=config.learning_rate, betas=(0.9, 0.999), eps=1e-8
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_at(
            step,
            base_lr=config.learning_rate,
            warmup_steps=warmup_steps,
            total_steps=total_steps,
            min_lr=config.min_learning_rate,
        )
        / config.learning_rate,
    )
    autocast_dtype = torch.bfloat16 if device.type == "cuda" else None

    full_config = {
        "model": model.config.to_dict(),
        "train": asdict(config),
        "store": {
            "path": str(Path(config.store).resolve()),
            "gene_names": list(gene_names),
            "latent_shape": list(store.latent_shape),
            "embedding_dim": store.embedding_dim,
            "n_train": int(len(train_rows)),
            "n_val": int(len(val_rows)),
            "split_fractions": list(store.attrs.get("split_fractions", [])),
        },
        "runtime": {"world_size": world, "device": str(device), "placement": loader.placement},
    }

    start_epoch, history, best_score, best_epoch, since_best = 1, [], -math.inf, 0, 0
    if config.resume:
        last = out_dir / CHECKPOINT_LAST
        if not last.exists():
            raise GenealignError(f"--resume: {last} does not exist; start without --resume.")
        state = torch.load(last, map_location=device, weights_only=True)
        model.load_state_dict(state["model_state_dict"])
        optimizer.load_state_dict(state["optimizer_state_dict"])
        scheduler.load_state_dict(state["scheduler_state_dict"])
        torch.set_rng_state(state["rng_state"]["torch"])
        if device.type == "cuda" and state["rng_state"].get("cuda") is not None:
            torch.cuda.set_rng_state(state["rng_state"]["cuda"])
        start_epoch = int(state["epoch"]) + 1
        history = list(state["history"])
        best_score, best_epoch, since_best = float(state["best_score"]), int(state["best_epoch"]), int(state["since_best"])
    elif is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out_dir / "config.json", full_config)

    if is_main and progress:
        progress({"event": "start", "total_epochs": config.num_epochs, "steps_per_epoch": steps_per_epoch,
                  "n_train": len(train_rows), "n_val": len(val_rows), "placement": loader.placement,
                  "device": str(device), "world_size": world, "start_epoch": start_epoch,
                  "global_batch": global_batch})

    stopped_early = False
    epoch = start_epoch - 1
    k = config.gradient_accumulation_steps
    for epoch in range(start_epoch, config.num_epochs + 1):
        model.train()
        epoch_start, losses = time.perf_counter(), []
        micro: list = []
        step_in_epoch = 0
        for neuro, genes in loader.epoch(epoch):
            micro.append((neuro, genes))
            if len(micro) < k:
                continue
            try:
                loss = contrastive_step(model, micro, autocast_dtype=autocast_dtype, distributed=world > 1)
            except torch.cuda.OutOfMemoryError as exc:
                raise GenealignError(OOM_HINT) from exc
            micro = []
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            if group_lasso_scale > 0:
                # The proximal step of the group lasso at the lr this step used; identical on every
                # rank (same weights, same lr), so DDP replicas stay equal.
                with torch.no_grad():
                    weight, lr = model.gene_input_weight(), optimizer.param_groups[0]["lr"]
                    weight.copy_(group_soft_threshold(weight, lr * group_lasso_scale))
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss)
            step_in_epoch += 1
            if is_main and progress:
                elapsed = time.perf_counter() - epoch_start
                progress({"event": "step", "epoch": epoch, "step": step_in_epoch, "steps": steps_per_epoch,
                          "loss": loss, "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                          "temperature": float(model.logit_scale.detach().exp().clamp(max=100)),
                          "samples_per_s": step_in_epoch * global_batch / max(elapsed, 1e-9)})
            if step_in_epoch >= steps_per_epoch:
                break
        train_seconds = time.perf_counter() - epoch_start

        # Validation on rank 0 only; the stop decision is broadcast so all ranks leave together.
        stop = torch.zeros(1, device=device)
        if is_main:
            gene_indices = [gene_index] if gene_index is not None else list(range(store.n_genes))
            neuro_f, gene_f = embed_model(model, store, val_rows, gene_indices, config.mode, device, config.eval_batch_size)
            model.train()
            val = val_retrieval(neuro_f, gene_f)
            with torch.no_grad():
                val["loss"] = _val_loss(model, neuro_f, gene_f, min(global_batch, len(val_rows)))
            row = {
                "epoch": epoch,
                "train_loss": float(np.mean(losses)) if losses else float("nan"),
                "val_loss": val["loss"],
                "val_top1_neuro_to_gene": val["top1_neuro_to_gene"],
                "val_top1_gene_to_neuro": val["top1_gene_to_neuro"],
                "val_top1_mean": val["top1_mean"],
                "val_pool_size": val["pool_size"],
                "val_chance_top1": val["chance_top1"],
                "lr": scheduler.get_last_lr()[0],
                "temperature": float(model.logit_scale.detach().exp().clamp(max=100)),
                "samples_per_s": len(losses) * global_batch / max(train_seconds, 1e-9),
                "epoch_seconds": time.perf_counter() - epoch_start,
            }
            if gene_weight is not None:
                # Genes the model still uses: their input block is not all zeros.
                blocks = model.gene_input_weight().detach().flatten(1)  # (G, d_in * H)
                row["genes_in_use"] = int((blocks.abs().amax(dim=1) > 0).sum())
            history.append(row)
            improved = row["val_top1_mean"] > best_score
            if improved:
                best_score, best_epoch, since_best = row["val_top1_mean"], epoch, 0
            else:
                since_best += 1
            payload = {
                "model_state_dict": model.state_dict(),
                "optimizer_state_dict": optimizer.state_dict(),
                "scheduler_state_dict": scheduler.state_dict(),
                "epoch": epoch,
                "step": epoch * steps_per_epoch,
                "val_metrics": {k_: v for k_, v in row.items()},
                "config": full_config,
                "history": history,
                "best_score": best_score,
                "best_epoch": best_epoch,
                "since_best": since_best,
                "rng_state": {
                    "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None,
                },
            }
            atomic_write_text(out_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))
            if improved:
                _save(out_dir / CHECKPOINT_BEST, payload)
            if config.save_every and epoch % config.save_every == 0:
                _save(out_dir / f"checkpoint_epoch_{epoch}.pt", payload)
            _save(out_dir / CHECKPOINT_LAST, payload)
            if progress:
                progress({"event": "epoch", **row, "improved": improved, "best_epoch": best_epoch})
            if config.patience and since_best >= config.patience:
                stop[0] = 1
        if world > 1:
            import torch.distributed as dist

            dist.broadcast(stop, src=0)
        if stop.item():
            stopped_early = True
            break

    if is_main and history:
        from alignment.report import plot_training_curves

        plot_training_curves(history, out_dir / "curves.png")
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    best = next((r for r in history if r["epoch"] == best_epoch), {})
    return TrainResult(
        output_dir=out_dir,
        best_checkpoint=out_dir / CHECKPOINT_BEST,
        best_epoch=best_epoch,
        best_val=best,
        epochs_run=epoch,
        stopped_early=stopped_early,
        history=history,
        n_train=len(train_rows),
        n_val=len(val_rows),
        placement=loader.placement,
        device=str(device),
        world_size=world,
    )


if __name__ == "__main__":  # torchrun --nproc_per_node N -m alignment.train <genealign train flags>
    import sys

    from alignment.cli import main

    main(["train", *sys.argv[1:]])
