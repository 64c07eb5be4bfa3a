"""`genealign sweep`: one single-gene model per gene, trained together in one vectorised pass.

- One read of the store. The neuro front-end (z-scoring, PCA whitening) is fitted and applied once
  (it depends only on the train rows); each gene's on its own column. Training then runs on the
  front-ended rows: neuro (n, kN), shared by every gene, and genes (G, n, kG).
- One pass. The encoders are the single-mode model's own modules (as `alignment.train.build_model`
  builds it for the store), their parameters stacked on a leading gene axis (G, ...) and run with
  `torch.vmap(functional_call(...))`. The loss is the sum of each gene's `clip_loss` (or
  `siglip_loss`), so each gene's gradient is exactly its own model's.
- The recipe of `genealign train --mode single`: initial weights from torch.manual_seed(seed) then the
  model build (the same for every gene: they depend only on the seed and the shapes); the loader's
  batch order for (seed, epoch) (`epoch_batches`); AdamW (betas 0.9/0.999, eps 1e-8, decay on
  matrices only; elementwise, so stacking changes nothing); warmup + cosine from `lr_at`; clipping at
  `grad_clip` by each gene's own global norm; early stopping per gene on whole-val mean top-1 with
  `patience`. A stopped gene keeps its best epoch's parameters and leaves the stack.
- Test split, per gene: top-1 both directions and MRR in a pool of `pool_size` (the whole split if
  smaller), expected over every random pool of that size (`pool_expectations`, exact); a permutation
  p of the MRR on the whole split (`mrr_permutation_test`); Benjamini-Hochberg q over the genes
  (scipy's `false_discovery_control`). Genes are ranked by MRR (mean of both directions).

Writes OUTPUT_DIR/sweep.csv (one row per gene, rank 1 = strongest), report.md, sweep.png, sweep.json
(settings, each gene's val history) and, with `save_models`, models/GENE/best_model.pt (read by
`MultiGeneAlignmentModel.from_checkpoint` and `genealign evaluate`). OUTPUT_DIR must be new, empty or
an earlier sweep's; `overwrite` replaces only the files a sweep wrote.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from alignment.embed import autocast, autocast_dtype, model_covariates, resolve_device
from alignment.loss import clip_loss, siglip_loss
from alignment.metrics import DIRECTIONS, chance_levels, chunk_for, retrieval_ranks, val_retrieval
from alignment.model import ModelConfig, MultiGeneAlignmentModel
from alignment.settings import fit_batch, load_config, preset_values
from alignment.train import TrainConfig, build_model, check_config, frontend_rows, lr_at, residual_fields
from pipeline import GenealignError, open_store
from pipeline.atomic import atomic_write, atomic_write_csv, atomic_write_json, atomic_write_text
from pipeline.loader import shard_batches
from pipeline.synth import causal_genes, load_truth

CSV_NAME = "sweep.csv"
REPORT_NAME = "report.md"
PLOT_NAME = "sweep.png"
SUMMARY_NAME = "sweep.json"
MODELS_DIR = "models"
MARKER = ".genealign-sweep.json"
OUTPUTS = (CSV_NAME, REPORT_NAME, PLOT_NAME, SUMMARY_NAME)
DEFAULT_PRESET = "cpu-small"
SPLITS = ("train", "val", "test")
VAL_KEYS = ("top1_neuro_to_gene", "top1_gene_to_neuro", "top1_mean", "pool_size", "chance_top1")
FRONTEND_ROWS = 4096  # rows front-ended per block: bounds the (block, V) z-scored temporary
PERMUTATION_MAX_N = 4096  # test subjects the permutation test's (n, n) tables may hold
TEST_TOP_K = 100  # ranks the permutation test's statistic counts (1/rank; 0 beyond)
STOP_EXCEEDANCES = 50  # null values >= the observed one after which a gene's shuffles stop
CSV_COLUMNS = ("gene", "rank", "top1_neuro_to_gene", "top1_gene_to_neuro", "mrr", "mrr_ci_low", "mrr_ci_high",
               "mrr_neuro_to_gene", "mrr_gene_to_neuro", "p_value", "q_value", "significant", "best_epoch", "epochs_trained",
               "val_top1_neuro_to_gene", "val_top1_gene_to_neuro", "val_top1_mean", "pool_size", "n_test",
               "n_permutation_test", "n_permutations", "chance_top1", "chance_mrr")
_UNSUPPORTED = {"gradient_accumulation_steps": 1, "gene_group_lasso": 0.0, "resume": False}  # flag -> its only value


@dataclass
class SweepConfig:
    """What to sweep and how. `model` and `train` (TrainConfig fields) default to the cpu-small
    single-mode preset, the settings `genealign train --mode single` picks on a CPU."""

    store: str
    output_dir: str
    genes: tuple[str, ...] | None = None  # None = every gene of the store, in the store's order
    model: ModelConfig = field(default_factory=lambda: ModelConfig(mode="single", **preset_values(DEFAULT_PRESET, "single")[0]))
    train: dict = field(default_factory=lambda: preset_values(DEFAULT_PRESET, "single")[1])  # TrainConfig fields
    explicit: frozenset = frozenset()  # model/train fields the user set: never capped or lowered to fit
    pool_size: int = 1000  # test pool; the whole split when it is smaller
    bootstrap: int = 1000  # resamples (of the test subjects) of the effect's 95% interval
    permutations: int = 10_000  # pairing shuffles of the permutation p (p can reach 1e-4)
    fdr: float = 0.05  # q level a gene is called significant at
    eval_seed: int = 0  # of the bootstrap and the permutations (as `genealign evaluate --seed`)
    save_models: bool = False
    overwrite: bool = False


@dataclass
class SweepResult:
    output_dir: Path
    csv: Path
    report: Path
    plot: Path
    rows: list  # one dict per gene (the columns of sweep.csv), rank 1 first
    pool_size: int
    n_test: int
    n_significant: int
    precision: dict | None  # synth store: top k -> fraction of the top k that are truly causal
    causal: dict | None  # synth store: the truth's causal genes -> strength
    models: dict = field(default_factory=dict)  # gene -> best_model.pt (save_models)
    train_seconds: float = 0.0
    seconds: float = 0.0


def sweep_request(given: dict) -> SweepConfig:
    """A SweepConfig from the options a user gave (name -> value, unset ones left out): a preset's
    single-mode values (`preset`, default cpu-small) < a settings file's (`config`) < the given ones."""
    from pipeline.ingest import parse_gene_list

    given = dict(given)
    settings = load_config(path) if (path := given.pop("config", None)) is not None else {}
    if settings.get("mode", "single") != "single":
        raise GenealignError(f"--config {settings['source']} is for a {settings['mode']}-mode model; sweep needs single-mode settings.")
    model_values, train_values = preset_values(given.pop("preset", None) or settings.get("preset") or DEFAULT_PRESET, "single")
    model_values, train_values = {**model_values, **settings.get("model", {})}, {**train_values, **settings.get("train", {})}
    genes = parse_gene_list(given.pop("genes", None), given.pop("genes_file", None))
    model_names = {f.name for f in fields(ModelConfig)}
    sweep_names = {f.name for f in fields(SweepConfig)} - {"model", "train", "explicit", "genes"}
    model_flags = {k: given.pop(k) for k in list(given) if k in model_names}
    options = {k: given.pop(k) for k in list(given) if k in sweep_names}
    options["store"], options["output_dir"] = str(options["store"]), str(options["output_dir"])
    return SweepConfig(genes=genes, model=ModelConfig(**{**model_values, **model_flags, "mode": "single"}),
                       train={**train_values, **given}, explicit=frozenset(model_flags) | frozenset(given), **options)


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """Positions (into the train rows) of each batch of epoch `epoch`: the order `BatchLoader` gives
    one process for (seed, epoch) when the rows are held in memory or on the device."""
    order = np.random.default_rng((int(seed), int(epoch))).permutation(n)
    return shard_batches(order, batch_size, 1, 0, True)


# --------------------------------------------------------------------------------- settings
def _train_config(config: SweepConfig, store) -> tuple[TrainConfig, list[str]]:
    """The TrainConfig every gene's model follows (single mode), checked like `genealign train`'s."""
    unknown = sorted(set(config.train) - ({f.name for f in fields(TrainConfig)} - {"store", "output_dir", "mode", "single_gene_name"}))
    checks = [
        (not unknown, f"Unknown training setting(s) for sweep: {', '.join(unknown)}."),
        (all(config.train.get(k, v) == v for k, v in _UNSUPPORTED.items()),
         f"sweep trains each gene's small model in one process: leave out --{' / --'.join(_UNSUPPORTED)}."),
        (config.pool_size >= 2, f"--pool_size must be >= 2, got {config.pool_size}."),
        (config.bootstrap >= 1, f"--bootstrap must be >= 1, got {config.bootstrap}."),
        (config.permutations >= 1, f"--permutations must be >= 1, got {config.permutations}."),
        (0 < config.fdr < 1, f"--fdr must be in (0, 1), got {config.fdr}."),
        (config.genes is None or 0 < len(config.genes) == len(set(config.genes)), "--genes must name distinct genes."),
        (not config.model.use_transformer and config.model.mode == "single",
         "sweep trains single-gene models: leave --mode / --use_transformer out."),
    ]
    for ok, message in checks:
        if not ok:
            raise GenealignError(message)
    train = TrainConfig(store=str(config.store), output_dir=str(config.output_dir), mode="single", **config.train)
    check_config(train)
    n = {split: len(store.indices(split)) for split in SPLITS}
    train, notes = fit_batch(train, n["train"], "batch_size" in config.explicit)
    if n["train"] < train.batch_size:
        raise GenealignError(f"The train split of {store.path} has {n['train']} subjects, fewer than one batch "
                             f"({train.batch_size}); lower --batch_size.")
    for split in ("val", "test"):
        if n[split] < 2:
            raise GenealignError(f"The {split} split of {store.path} has {n[split]} subjects; sweep needs at least 2. "
                                 "Ingest more subjects or change --split_fractions (genealign ingest).")
    return train, notes


def _claim(out_dir: Path, overwrite: bool) -> list[Path]:
    """The previous sweep's files to remove before writing; an error if out_dir holds anything a
    sweep did not write, or a previous sweep and `overwrite` is off."""
    if out_dir.exists() and not out_dir.is_dir():
        raise GenealignError(f"--output_dir {out_dir} is a file; give a folder.")
    entries = sorted(p.name for p in out_dir.iterdir()) if out_dir.is_dir() else []
    if not entries:
        return []
    marker = out_dir / MARKER
    owned = {*OUTPUTS, MARKER, MODELS_DIR}
    foreign = [e for e in entries if e not in owned and not (e.startswith(".") and e.endswith(".tmp"))]
    if not marker.is_file() or foreign:
        raise GenealignError(f"{out_dir / (foreign or entries)[0]} was not written by genealign sweep; choose another "
                             "--output_dir (a sweep writes only into a new, empty or earlier sweep's folder).")
    if not overwrite:
        raise GenealignError(f"{out_dir} holds an earlier sweep; replace it with --overwrite or choose another --output_dir.")
    return [out_dir / name for name in (*OUTPUTS, *json.loads(marker.read_text()).get("models", []))]


# -------------------------------------------------------------------------------- front-end
@dataclass
class _Data:  # every split front-ended: the neuro side once, each gene's side with its own front-end
    rows: dict  # split -> store rows (n,)
    neuro: dict  # split -> (n, kN) float32 on the device
    genes: dict  # split -> (G, n, kG) float32 on the device
    gene_frontend: dict  # state_dict name -> (G, ...) each gene's front-end buffers (gene_mean, ...)


def _gene_fitter(model_config: ModelConfig, genes: np.ndarray, covariates) -> MultiGeneAlignmentModel:
    """A single-gene model holding one gene's fitted front-end (its residualiser, gene_mean, gene_std,
    gene_pca); its neuro side is one constant column, so `fit_frontend` costs only the gene side."""
    cfg = replace(model_config, neuro_input_dim=1, neuro_pca_dim=0, neuro_hidden_dim=None, latent_shape=None)
    fitter = MultiGeneAlignmentModel.from_config(cfg)
    fitter.fit_frontend(torch.zeros(len(genes), 1), torch.from_numpy(genes), covariates)
    return fitter


@torch.no_grad()
def _front_end(template, fitters, neuro: np.ndarray, genes: np.ndarray, device,
               covariates=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw rows neuro (n, V), genes (n, G, D) and covariates (n, C) (residualising models only) ->
    (n, kN) and (G, n, kG), as the models' encoders see them."""
    neuro_t, genes_t = torch.from_numpy(neuro), torch.from_numpy(genes)
    cov = None if covariates is None else torch.from_numpy(covariates)
    x_neuro = torch.cat([template._neuro_frontend(neuro_t[lo : lo + FRONTEND_ROWS],
                                                  None if cov is None else cov[lo : lo + FRONTEND_ROWS])
                         for lo in range(0, len(neuro_t), FRONTEND_ROWS)])  # (n, kN)
    x_genes = torch.stack([fitter._gene_frontend(genes_t[:, j], cov) for j, fitter in enumerate(fitters)])  # (G, n, kG)
    return x_neuro.to(device), x_genes.to(device)


def _read(store, rows, gene_indices) -> tuple[np.ndarray, np.ndarray]:
    neuro, genes = store.read_rows(rows)  # (n, V), (n, G_store, D) float32
    return neuro, genes if list(gene_indices) == list(range(store.n_genes)) else genes[:, gene_indices]  # (n, G, D)


def _load(store, gene_indices, template, train: TrainConfig, device, say) -> _Data:
    """One read of each split; the front-ends fitted on the train rows (as train fits them)."""
    rows = {split: store.indices(split) for split in SPLITS}
    say(f"Reading {len(rows['train']):,} train / {len(rows['val']):,} val / {len(rows['test']):,} test subjects "
        f"x {len(gene_indices)} genes; fitting the front-ends on the train split")
    neuro, genes = _read(store, rows["train"], gene_indices)
    fit = np.searchsorted(rows["train"], frontend_rows(rows["train"], train.frontend_max_rows, train.seed))
    covariates = model_covariates(template, store)  # (N, C) | None
    cov = {split: None if covariates is None else covariates[rows[split]] for split in SPLITS}
    cov_fit = None if covariates is None else torch.from_numpy(cov["train"][fit])
    template.fit_frontend(torch.from_numpy(neuro if len(fit) == len(neuro) else neuro[fit]), torch.from_numpy(genes[fit, 0]),
                          cov_fit)
    # One thread: each gene's (D, D) eigendecomposition is too small to gain from threads, which
    # only add overhead (much more of it when the cores are busy).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fitters = [_gene_fitter(template.config, genes[fit, j], cov_fit) for j in range(len(gene_indices))]
    finally:
        torch.set_num_threads(threads)
    states = [fitter.state_dict() for fitter in fitters]
    buffers = [name for name in ("gene_mean", "gene_std", "gene_pca", "covariate_residualizer.gene_beta")
               if name in states[0]]
    data = _Data(rows, {}, {}, {name: torch.stack([s[name] for s in states]) for name in buffers})
    for split in SPLITS:
        if split != "train":
            neuro, genes = _read(store, rows[split], gene_indices)
        data.neuro[split], data.genes[split] = _front_end(template, fitters, neuro, genes, device, cov[split])
    return data


# --------------------------------------------------------------------------- stacked models
@dataclass
class _Stack:  # the parameters of the genes still training, stacked on a leading gene axis; their AdamW
    genes: torch.Tensor  # (Ga,) positions in the sweep's gene list
    params: dict  # name (as in the single-gene model) -> nn.Parameter (Ga, *shape)
    optimizer: torch.optim.Optimizer
    decay: set  # names of the parameters with weight decay (the matrices, as model.param_groups)


def _adamw(params: dict, decay: set, train: TrainConfig) -> torch.optim.Optimizer:
    """AdamW as train builds it from `model.param_groups`: decay on `decay` (the matrices) only."""
    groups = [{"params": [p for n, p in params.items() if n in decay], "weight_decay": float(train.weight_decay)},
              {"params": [p for n, p in params.items() if n not in decay], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=train.learning_rate, betas=(0.9, 0.999), eps=1e-8)


def _stack(template, n_genes: int, train: TrainConfig, device) -> _Stack:
    """Every gene starts from the template's initial weights (a separate run's, same seed)."""
    params = {name: nn.Parameter(p.detach().to(device).expand(n_genes, *p.shape).clone())
              for name, p in template.named_parameters()}
    ids = {id(p) for p in template.param_groups(1.0)[0]["params"]}
    decay = {name for name, p in template.named_parameters() if id(p) in ids}
    return _Stack(torch.arange(n_genes, device=device), params, _adamw(params, decay, train), decay)


def _keep(stack: _Stack, keep: torch.Tensor, train: TrainConfig) -> _Stack:
    """The stack without the genes that stopped (`keep` (Ga,) bool): parameters and AdamW moments sliced."""
    params = {name: nn.Parameter(p.detach()[keep].clone()) for name, p in stack.params.items()}
    optimizer = _adamw(params, stack.decay, train)
    for name, old in stack.params.items():
        state = stack.optimizer.state.get(old)
        if state:
            optimizer.state[params[name]] = {k: v[keep].clone() if torch.is_tensor(v) and v.dim() > 0 else v
                                             for k, v in state.items()}
    return _Stack(stack.genes[keep], params, optimizer, stack.decay)


def _features(template, params: dict, neuro_x: torch.Tensor, genes_x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised features of every stacked gene, ((Ga, B, P), (Ga, B, P)), from the shared neuro rows
    neuro_x (B, kN) and each gene's rows genes_x (Ga, B, kG): the model's encoders, vmapped over genes."""
    def encoder(name: str, in_dims: tuple, x: torch.Tensor) -> torch.Tensor:  # one gene's module, vmapped
        prefix, module = name + ".", getattr(template, name)
        own = {key[len(prefix):]: p for key, p in params.items() if key.startswith(prefix)}
        one = lambda p, rows: F.normalize(functional_call(module, p, (rows,)), dim=-1)  # noqa: E731
        return torch.vmap(one, in_dims=in_dims, randomness="different")(own, x)

    return encoder("neuro_encoder", (0, None), neuro_x), encoder("gene_encoder", (0, 0), genes_x)


def _losses(template, params: dict, neuro_f: torch.Tensor, gene_f: torch.Tensor) -> torch.Tensor:
    """(Ga,) each gene's contrastive loss, the model's loss function vmapped over genes."""
    if template.loss_type == "siglip":
        return torch.vmap(siglip_loss)(neuro_f, gene_f, params["logit_scale"], params["logit_bias"])
    return torch.vmap(clip_loss)(neuro_f, gene_f, params["logit_scale"])


def _clip_per_gene(params, max_norm: float) -> None:
    """clip_grad_norm_ per gene: each gene's gradient scaled by min(1, max_norm / (its norm + 1e-6)),
    its norm taken over its slices of every parameter."""
    grads = [p.grad for p in params if p.grad is not None]
    norms = torch.stack([g.reshape(len(g), -1).norm(dim=1) for g in grads]).norm(dim=0)  # (Ga,)
    scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(scale.view(-1, *[1] * (g.dim() - 1)).to(g.dtype))


def _train_epoch(template, stack: _Stack, data: _Data, train: TrainConfig, schedule: dict, step: int,
                 epoch: int, device) -> tuple[np.ndarray, int]:
    """One epoch of optimizer steps for every active gene; (mean train loss per gene (Ga,), next step)."""
    template.train()
    batches = epoch_batches(len(data.rows["train"]), train.batch_size, train.seed, epoch)
    genes_train = data.genes["train"][stack.genes]  # (Ga, n, kG)
    total = torch.zeros(len(stack.genes), device=device)
    for positions in batches:
        index = torch.from_numpy(positions).to(device)
        with autocast(device, autocast_dtype(device)):
            neuro_f, gene_f = _features(template, stack.params, data.neuro["train"][index], genes_train[:, index])
        # Summed: each gene's loss depends on its own slices only, so its gradient is its own model's.
        losses = _losses(template, stack.params, neuro_f.float(), gene_f.float())  # (Ga,)
        losses.sum().backward()
        _clip_per_gene(stack.params.values(), train.grad_clip)
        lr = train.learning_rate * (lr_at(step, **schedule) / train.learning_rate)  # as LambdaLR computes it
        for group in stack.optimizer.param_groups:
            group["lr"] = lr
        stack.optimizer.step()
        stack.optimizer.zero_grad(set_to_none=True)
        total += losses.detach()
        step += 1
    return (total / len(batches)).cpu().numpy(), step


@torch.no_grad()
def _encode(template, params: dict, data: _Data, split: str, genes: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode features (Ga, n, P) float32 of one split for the genes at positions `genes`."""
    template.eval()
    with autocast(device, autocast_dtype(device)):
        neuro_f, gene_f = _features(template, params, data.neuro[split], data.genes[split][genes])
    return neuro_f.float(), gene_f.float()


# -------------------------------------------------------------------------------- training
@dataclass
class _Best:  # per gene: the best val epoch so far, its parameters, and the val history
    score: np.ndarray  # (G,) best val mean top-1 (-inf before epoch 1)
    epoch: np.ndarray  # (G,) int
    since: np.ndarray  # (G,) epochs since the best one
    params: dict  # name -> (G, *shape) each gene's parameters at its best epoch
    history: list  # per gene: one dict per epoch trained


def _record(best: _Best, stack: _Stack, epoch: int, losses: np.ndarray, vals: list, patience: int) -> np.ndarray:
    """Note one epoch's val figures; returns (Ga,) bool: the active genes that go on training."""
    genes = stack.genes.cpu().numpy()
    scores = np.array([v["top1_mean"] for v in vals])
    for gene, loss, val in zip(genes, losses, vals):
        best.history[gene].append({"epoch": epoch, "train_loss": float(loss), **{f"val_{k}": val[k] for k in VAL_KEYS}})
    improved = scores > best.score[genes]
    best.since[genes] = np.where(improved, 0, best.since[genes] + 1)
    best.score[genes] = np.where(improved, scores, best.score[genes])
    best.epoch[genes] = np.where(improved, epoch, best.epoch[genes])
    if improved.any():
        at = torch.from_numpy(np.flatnonzero(improved)).to(stack.genes.device)
        for name, p in stack.params.items():
            best.params[name][stack.genes[at]] = p.detach()[at]
    return best.since[genes] < patience if patience else np.ones(len(genes), dtype=bool)


def _train(template, data: _Data, train: TrainConfig, device, say) -> _Best:
    """Every gene's model, trained together; early stopping per gene on val mean top-1."""
    n_genes = data.genes["train"].shape[0]
    stack = _stack(template, n_genes, train, device)
    steps_per_epoch = len(data.rows["train"]) // train.batch_size
    total = steps_per_epoch * train.num_epochs
    schedule = dict(base_lr=train.learning_rate, warmup_steps=int(train.warmup_fraction * total), total_steps=total,
                    min_lr=train.min_learning_rate)
    best = _Best(np.full(n_genes, -math.inf), np.zeros(n_genes, int), np.zeros(n_genes, int),
                 {name: p.detach().clone() for name, p in stack.params.items()}, [[] for _ in range(n_genes)])
    say(f"Training {n_genes} single-gene models together on {device}: {steps_per_epoch} steps per epoch, "
        f"batch {train.batch_size}, up to {train.num_epochs} epochs")
    step = 0
    for epoch in range(1, train.num_epochs + 1):
        started = time.perf_counter()
        losses, step = _train_epoch(template, stack, data, train, schedule, step, epoch, device)
        neuro_f, gene_f = _encode(template, stack.params, data, "val", stack.genes, device)
        vals = [val_retrieval(neuro_f[a], gene_f[a]) for a in range(len(stack.genes))]
        keep = _record(best, stack, epoch, losses, vals, train.patience)
        say(f"epoch {epoch:>3}: {len(stack.genes)} genes trained, {int((~keep).sum())} stopped; best val top-1 among them "
            f"{max(v['top1_mean'] for v in vals):.3f} (chance {vals[0]['chance_top1']:.4f}), {time.perf_counter() - started:.1f}s")
        if not keep.any():
            break
        if not keep.all():
            stack = _keep(stack, torch.from_numpy(keep).to(device), train)
    return best


# ------------------------------------------------------------------------------ evaluation
def pool_expectations(ranks, pool: int) -> tuple[np.ndarray, np.ndarray]:
    """Per query, its expected top-1 hit and reciprocal rank over every random pool of `pool` subjects
    holding it, from its rank among all n. Exact: the c = rank - 1 others scoring >= it are
    hypergeometric among the pool's pool - 1 others, so E[top-1] = C(n-1-c, m-1) / C(n-1, m-1) and
    E[1 / (1 + X)] = n / (m (c + 1)) * (1 - C(n-1-c, m) / C(n, m)) (Vandermonde's identity); pool = n
    gives the whole split's own figures. Returns ((n,), (n,)) float64."""
    from scipy.special import gammaln

    ranks = np.asarray(ranks, dtype=np.float64)
    n, m, c = len(ranks), int(pool), ranks - 1.0

    def log_choose(a, b):  # log C(a, b), -inf where a < b
        a = np.asarray(a, dtype=np.float64)
        with np.errstate(invalid="ignore"):
            return np.where(a >= b, gammaln(a + 1) - gammaln(b + 1) - gammaln(np.maximum(a - b, 0) + 1), -np.inf)

    top1 = np.exp(log_choose(n - 1 - c, m - 1) - log_choose(n - 1, m - 1))
    reciprocal = n / (m * (c + 1)) * (1.0 - np.exp(log_choose(n - 1 - c, m) - log_choose(n, m)))
    return top1, reciprocal


def pairing_permutations(n: int, count: int, seed: int = 0) -> np.ndarray:
    """(count, n) random permutations of range(n), a function of (seed, n) only: every gene is
    tested against the same shuffles."""
    rng = np.random.default_rng([seed, n, 19])
    return rng.permuted(np.tile(np.arange(n, dtype=np.int64), (count, 1)), axis=1)


def mrr_permutation_test(neuro_f, gene_f, permutations: np.ndarray, top_k: int = TEST_TOP_K) -> dict:
    """Permutation test of the MRR (both directions; ranks beyond `top_k` count 0) of features (n, P),
    shuffling which gene row pairs with which neuro row. A shuffle pi gives neuro query i the rank of
    column pi(i) in row i of S = neuro_f @ gene_f.T, and gene query pi(i) the rank of row i in column
    pi(i), so one (n, n) table W = (1/row rank + 1/column rank) / 2 (`torch.topk`, ties in gallery
    order) serves every shuffle: the null MRR is the mean of W[i, pi(i)]. Shuffles stop once
    STOP_EXCEEDANCES null values reach the observed one (Besag & Clifford 1991); p = (1 + exceedances)
    / (1 + shuffles run)."""
    scores = torch.as_tensor(neuro_f).float() @ torch.as_tensor(gene_f).float().T  # (n, n)
    n = scores.shape[0]
    k = min(int(top_k), n)

    def reciprocal(s: torch.Tensor) -> torch.Tensor:  # (n, n): 1/rank of column j in row i, 0 beyond k
        table = torch.zeros_like(s)
        weights = 1.0 / torch.arange(1, k + 1, dtype=s.dtype, device=s.device)
        return table.scatter_(1, s.topk(k, dim=1).indices, weights.expand(n, k))

    table = (0.5 * (reciprocal(scores) + reciprocal(scores.T.contiguous()).T)).flatten()  # (n * n,) W
    observed = float(table[:: n + 1].sum()) / n
    offsets = torch.arange(n, device=table.device) * n
    exceed, done, null_sum = 0, 0, 0.0
    for block in np.array_split(permutations, max(1, len(permutations) // 500)):
        null = table[torch.from_numpy(block).to(table.device) + offsets].mean(dim=1)  # (c,) null MRRs
        exceed += int((null >= observed - 1e-6).sum())  # float32 sums: near-equal counts as >=
        done, null_sum = done + len(block), null_sum + float(null.sum())
        if exceed >= STOP_EXCEEDANCES:
            break
    return {"mrr": observed, "p_value": (1 + exceed) / (1 + done), "n_permutations": done, "null_mrr_mean": null_sum / done}


def gene_figures(neuro_f: torch.Tensor, gene_f: torch.Tensor, pool: int, permutations: np.ndarray,
                 config: SweepConfig, tested: np.ndarray | None = None) -> dict:
    """One gene's test figures from its features (n, P): top-1 and MRR per direction expected in pools of
    `pool`; the effect `mrr` (both directions) with a 95% bootstrap interval over the subjects; the
    permutation p (`mrr_permutation_test`, on the rows `tested` if given)."""
    n = neuro_f.shape[0]
    out, per_query = {}, []
    for direction, (query, gallery) in zip(DIRECTIONS, ((neuro_f, gene_f), (gene_f, neuro_f))):
        top1, reciprocal = pool_expectations(retrieval_ranks(query, gallery, chunk_for(n)), pool)
        out[f"top1_{direction}"], out[f"mrr_{direction}"] = float(top1.mean()), float(reciprocal.mean())
        per_query.append(reciprocal)
    effect = (per_query[0] + per_query[1]) / 2  # (n,) each subject's reciprocal rank, both directions
    resamples = np.random.default_rng([config.eval_seed, n, 11]).integers(0, n, size=(config.bootstrap, n))
    out["mrr"] = float(effect.mean())
    out["mrr_ci_low"], out["mrr_ci_high"] = (float(v) for v in np.quantile(effect[resamples].mean(axis=1), [0.025, 0.975]))
    at = slice(None) if tested is None else torch.from_numpy(tested).to(neuro_f.device)
    test = mrr_permutation_test(neuro_f[at], gene_f[at], permutations)
    out["p_value"], out["n_permutations"] = test["p_value"], test["n_permutations"]
    return out


def _evaluate(template, best: _Best, data: _Data, names, config: SweepConfig, device, say) -> list[dict]:
    """Every gene's test figures, BH q over the genes, ranked by MRR (rank 1 = strongest)."""
    from scipy.stats import false_discovery_control

    n = len(data.rows["test"])
    pool = min(config.pool_size, n)
    # The permutation test holds (m, m) tables: above PERMUTATION_MAX_N subjects, a fixed random subset.
    tested = None if n <= PERMUTATION_MAX_N else np.sort(np.random.default_rng([config.eval_seed, n, 23]).choice(
        n, PERMUTATION_MAX_N, replace=False))
    permutations = pairing_permutations(n if tested is None else len(tested), config.permutations, config.eval_seed)
    say(f"Scoring {len(names)} genes on {n:,} test subjects (pool {pool:,}" + (")" if pool < n else ", the whole split)"))
    everyone = torch.arange(len(names), device=data.neuro["test"].device)
    neuro_f, gene_f = _encode(template, best.params, data, "test", everyone, device)
    chance = chance_levels(pool)
    rows = []
    for j, gene in enumerate(names):
        val = best.history[j][int(best.epoch[j]) - 1]
        rows.append({"gene": gene, **gene_figures(neuro_f[j], gene_f[j], pool, permutations, config, tested),
                     "best_epoch": int(best.epoch[j]), "epochs_trained": len(best.history[j]),
                     **{k: val[k] for k in ("val_top1_neuro_to_gene", "val_top1_gene_to_neuro", "val_top1_mean")},
                     "pool_size": pool, "n_test": n, "n_permutation_test": n if tested is None else len(tested),
                     "chance_top1": chance["chance_top1"], "chance_mrr": chance["chance_mrr"]})
    q = false_discovery_control([r["p_value"] for r in rows], method="bh")
    for row, q_value in zip(rows, q):
        row["q_value"] = float(q_value)
        row["significant"] = bool(q_value <= config.fdr)
    rows.sort(key=lambda r: (-r["mrr"], r["p_value"], r["gene"]))
    for rank, row in enumerate(rows, start=1):
        row["rank"] = rank
    return rows


def truth_precision(rows: list[dict], causal: dict) -> dict[int, float]:
    """Top k -> the fraction of the k best-ranked genes among the truth's `causal` ones (k = 5, 10, n, 2n)."""
    ranked = [r["gene"] for r in sorted(rows, key=lambda r: r["rank"])]
    ks = sorted({k for k in (5, 10, len(causal), 2 * len(causal)) if 1 <= k <= len(ranked)})
    return {k: sum(g in causal for g in ranked[:k]) / k for k in ks}


# ---------------------------------------------------------------------------------- outputs
def _checkpoint(template, data: _Data, best: _Best, j: int, gene: str, train: TrainConfig, store, out: Path) -> dict:
    """Gene j's best model as `genealign train` would have saved it (config + model_state_dict)."""
    state = {name: value.detach().cpu().clone() for name, value in template.state_dict().items()}
    for name, value in {**data.gene_frontend, **best.params}.items():  # this gene's slices
        state[name] = value[j].detach().cpu().clone()
    row = best.history[j][int(best.epoch[j]) - 1]
    run = replace(train, single_gene_name=gene, output_dir=str(out))
    config = {
        "model": replace(template.config, gene_names=(gene,)).to_dict(),
        "train": asdict(run),
        "store": {"path": str(Path(store.path).resolve()), "gene_names": [gene], "latent_shape": list(store.latent_shape),
                  "embedding_dim": store.embedding_dim, "n_train": len(data.rows["train"]), "n_val": len(data.rows["val"]),
                  "split_fractions": list(store.attrs.get("split_fractions", []))},
        "sweep": {"written_by": "genealign sweep"},
    }
    return {"model_state_dict": state, "config": config, "epoch": int(best.epoch[j]), "val_metrics": dict(row),
            "val_acc": row["val_top1_mean"], "args": asdict(run), "history": best.history[j]}


def plot_sweep(rows: list[dict], fdr: float, path: Path, causal: dict | None = None) -> Path:
    """Ranked genes: the effect (MRR, mean of both directions) with its 95% interval against chance,
    coloured by q <= fdr (truly causal genes of a synth store ringed), and -log10 q against the FDR line."""
    from alignment.report import _figure, _save

    rows = sorted(rows, key=lambda r: r["rank"])
    x = np.arange(1, len(rows) + 1)
    mrr = np.array([r["mrr"] for r in rows])
    err = np.array([[r["mrr"] - r["mrr_ci_low"], r["mrr_ci_high"] - r["mrr"]] for r in rows]).T.clip(min=0)
    significant = np.array([r["significant"] for r in rows])
    fig, axes = _figure(1, 2, width=max(7.0, 0.12 * len(rows)), height=3.2)
    ax = axes[0][0]
    for mask, colour, label in ((significant, "tab:red", f"q <= {fdr:g}"), (~significant, "0.5", f"q > {fdr:g}")):
        if mask.any():
            ax.errorbar(x[mask], mrr[mask], yerr=err[:, mask], fmt="o", ms=3, color=colour, elinewidth=0.8, label=label)
    if causal:
        truly = np.array([r["gene"] in causal for r in rows])
        ax.scatter(x[truly], mrr[truly], s=60, facecolors="none", edgecolors="k", linewidths=0.8, label="causal (truth)")
    ax.axhline(rows[0]["chance_mrr"], color="0.3", linestyle="--", linewidth=0.8, label="chance")
    ax.set_ylabel(f"test MRR (pool {rows[0]['pool_size']:,})")
    ax.set_title("each gene's single-gene model, ranked: MRR (both directions) with 95% interval")
    ax.legend(fontsize=7, loc="upper right")
    ax = axes[1][0]
    ax.bar(x, -np.log10(np.clip([r["q_value"] for r in rows], 1e-300, 1)), color=np.where(significant, "tab:red", "0.6"))
    ax.axhline(-math.log10(fdr), color="k", linestyle="--", linewidth=0.8, label=f"FDR {fdr:g}")
    ax.set_ylabel("-log10 q (BH)")
    ax.legend(fontsize=7, loc="upper right")
    for ax in (axes[0][0], axes[1][0]):
        ax.set_xticks(x, [r["gene"] for r in rows], rotation=90, fontsize=6)
        ax.set_xlim(0.3, len(rows) + 0.7)
        ax.grid(alpha=0.3, axis="y")
    return _save(fig, Path(path))


def sweep_markdown(rows: list[dict], summary: dict, causal: dict | None, precision: dict | None, interaction) -> str:
    """report.md: how the figures are computed (pool, directions, chance), the ranked genes, and on a
    synth store the precision of the top k against the truth."""
    first, _fmt = rows[0], lambda value: f"{value:.3f}" if value >= 0.001 else f"{value:.2g}"  # noqa: E731
    pool, n = first["pool_size"], first["n_test"]
    pools = "the whole test split" if pool == n else f"expected over every random pool of {pool:,} of the {n:,} test subjects"
    significant = [r["gene"] for r in rows if r["significant"]]
    lines = [
        "# Gene sweep: one single-gene model per gene", "",
        f"Store `{summary['store']}`: {summary['n_train']:,} train / {summary['n_val']:,} val / {n:,} test subjects, "
        f"{len(rows)} genes, each with its own single-gene model (trained together in {summary['train_seconds']:.0f}s; "
        f"early stopping per gene on val mean top-1).", "",
        f"Figures on the held-out test split, in a pool of **{pool:,}** ({pools}): top-1 in both directions "
        f"(neuro→gene: a brain latent retrieves its subject's gene embedding among {pool:,}; gene→neuro the reverse), "
        f"chance top-1 = 1/{pool:,} = {first['chance_top1']:.4f}; MRR = mean reciprocal rank of the true partner, both "
        f"directions averaged, chance H_n/n = {first['chance_mrr']:.4f}; its 95% interval: bootstrap over the "
        f"test subjects. p = permutation test of the whole-split MRR (ranks beyond {TEST_TOP_K} counted as 0; "
        f"{first['n_permutation_test']:,} subjects; up to {summary['permutations']:,} shuffles of the pairing, fewer once "
        f"{STOP_EXCEEDANCES} shuffles reach the observed value); q = Benjamini-Hochberg over the {len(rows)} genes. Genes are ranked by MRR.", "",
        f"**{len(significant)} gene(s) at q <= {summary['fdr']:g}**" + (f": {', '.join(significant)}." if significant else "."), "",
    ]
    if causal is not None:
        lines += _truth_lines(rows, causal, precision, interaction)
    header = "| rank | gene | MRR [95% CI] | top-1 n→g | top-1 g→n | p | q | best epoch | val top-1 |"
    lines += ["## Genes, ranked", "", f"![ranked genes]({PLOT_NAME})", "", header + (" causal strength |" if causal else ""),
              "|" + "---|" * (10 if causal else 9)]
    for r in rows:
        truth = (f" {causal[r['gene']]:.2f} |" if r["gene"] in causal else " |") if causal else ""
        lines.append(f"| {r['rank']} | {'**' + r['gene'] + '**' if r['significant'] else r['gene']} | {_fmt(r['mrr'])} "
                     f"[{_fmt(r['mrr_ci_low'])}, {_fmt(r['mrr_ci_high'])}] | {_fmt(r['top1_neuro_to_gene'])} | "
                     f"{_fmt(r['top1_gene_to_neuro'])} | {r['p_value']:.2g} | {r['q_value']:.2g} | {r['best_epoch']} | "
                     f"{_fmt(r['val_top1_mean'])} |{truth}")
    lines += ["", f"Settings: {json.dumps(summary['settings'])}", ""]
    return "\n".join(lines)


def _truth_lines(rows, causal: dict, precision: dict | None, interaction) -> list[str]:
    rank_of = {r["gene"]: r["rank"] for r in rows}
    lines = ["## Against the truth (synthetic cohort)", ""]
    if not causal:
        return lines + ["The cohort has no gene→brain signal (a null cohort): every gene should sit at chance.", ""]
    lines += [f"The truth plants {len(causal)} causal genes (main effects). Precision of the top k:", "",
              "| top k | causal genes among them | precision |", "|---|---|---|"]
    lines += [f"| {k} | {round(p * k)} | {p:.2f} |" for k, p in (precision or {}).items()]
    found = ", ".join(f"{g} ({s:.2f}): rank {rank_of.get(g, '—')}" for g, s in causal.items())
    lines += ["", f"Causal genes (strength): {found}."]
    if interaction:
        lines.append(f"The interaction pair {' x '.join(interaction['genes'])} acts only jointly; a single-gene model cannot see it "
                     f"(ranks {', '.join(str(rank_of.get(g, '—')) for g in interaction['genes'])}).")
    return lines + [""]


# -------------------------------------------------------------------------------------- sweep
def sweep(config: SweepConfig, progress: Callable[[str], None] | None = None) -> SweepResult:
    """Train one single-gene model per gene in one pass, score each on the test split, write the
    outputs (see the module docstring). `progress(message)` is told what each phase is doing."""
    say = progress or (lambda message: None)
    started = time.perf_counter()
    store = open_store(config.store)
    names = tuple(store.gene_names) if config.genes is None else tuple(config.genes)
    indices = [store.gene_index(name) for name in names]  # the store's "not found, did you mean" error
    train, notes = _train_config(config, store)
    for note in notes:
        say(note)
    out_dir = Path(config.output_dir)
    previous = _claim(out_dir, config.overwrite)
    device = resolve_device(train.device)
    torch.manual_seed(train.seed)  # as train seeds before it builds the model: every gene's initial weights
    np.random.seed(train.seed)
    explicit = frozenset(config.explicit) & {f.name for f in fields(ModelConfig)}
    model_config = replace(config.model, mode="single", **residual_fields(train.residualize, store))
    template = build_model(model_config, store, names[:1], len(store.indices("train")), explicit)
    data = _load(store, indices, template, train, device, say)
    for path in previous:
        path.unlink(missing_ok=True)
    models = [f"{MODELS_DIR}/{gene}/best_model.pt" for gene in names] if config.save_models else []
    atomic_write_json(out_dir / MARKER, {"written_by": "genealign sweep", "models": models})
    trained_at = time.perf_counter()
    best = _train(template, data, train, device, say)
    train_seconds = time.perf_counter() - trained_at
    rows = _evaluate(template, best, data, names, config, device, say)
    truth = load_truth(store.cohort_truth_path()) if store.cohort_truth_path() is not None else {}
    causal, interaction = (causal_genes(truth), truth.get("interaction")) if truth else (None, None)
    precision = truth_precision(rows, causal) if causal else None
    summary = _summary(config, train, template, store, data, rows, best, names, train_seconds)
    say(f"Writing {out_dir}/{CSV_NAME}, {REPORT_NAME}, {PLOT_NAME}" + (f" and {len(names)} checkpoints" if models else ""))
    paths = {}
    for j, gene in enumerate(names if config.save_models else ()):
        payload = _checkpoint(template, data, best, j, gene, train, store, out_dir / MODELS_DIR / gene)
        paths[gene] = atomic_write(out_dir / models[j], lambda tmp: torch.save(payload, tmp))
    csv_path = atomic_write_csv(out_dir / CSV_NAME, rows, CSV_COLUMNS)
    plot = plot_sweep(rows, config.fdr, out_dir / PLOT_NAME, causal)
    report = atomic_write_text(out_dir / REPORT_NAME, sweep_markdown(rows, summary, causal, precision, interaction))
    summary["seconds"] = round(time.perf_counter() - started, 2)
    atomic_write_json(out_dir / SUMMARY_NAME, summary)
    return SweepResult(out_dir, csv_path, report, plot, rows, rows[0]["pool_size"], rows[0]["n_test"],
                       sum(r["significant"] for r in rows), precision, causal, paths, train_seconds, summary["seconds"])


def _summary(config, train, template, store, data, rows, best, names, train_seconds) -> dict:
    """sweep.json: the settings, the counts and each gene's val history."""
    return {
        "written_by": "genealign sweep", "store": str(Path(store.path).resolve()), "genes": list(names),
        **{f"n_{split}": len(data.rows[split]) for split in SPLITS},
        "settings": {"model": {k: v for k, v in template.config.to_dict().items() if k not in ("gene_names", "latent_shape")},
                     "train": {k: v for k, v in asdict(train).items() if k not in ("store", "output_dir", "single_gene_name")}},
        **{key: getattr(config, key) for key in ("pool_size", "bootstrap", "permutations", "fdr", "eval_seed")},
        "pool_size": rows[0]["pool_size"], "train_seconds": round(train_seconds, 2),
        "history": {gene: best.history[j] for j, gene in enumerate(names)},
    }
