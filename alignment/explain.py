"""`genealign explain`: which genes a trained sequence model relies on, and where it looks.

    explain(ExplainConfig(checkpoint=..., store=..., split="test", output_dir=...)) -> ExplainResult

1. Rebuild the model from its checkpoint and check it fits the store (`evaluate.match_checkpoint`).
   A single-gene model has nothing to attribute: a one-line error pointing at `genealign sweep`.
2. Read the split's rows once (at most `max_subjects`, a fixed random subset beyond that). The neuro
   features are encoded once: shuffling a gene changes only the gene side.
3. Permutation importance. For each gene g and repeat r, gene g's embedding is shuffled across the
   subjects with the r-th permutation (the same R permutations for every gene), the gene side is
   re-encoded and every subject's reciprocal rank recomputed against the whole split (pool = n, both
   directions, ties pessimistic as in `alignment.metrics`). A subject's drop is its reciprocal rank
   (mean of the two directions) unshuffled minus its mean over the R shuffles; the gene's importance
   is the mean drop = MRR - mean shuffled MRR. Interval: bootstrap percentile interval over subjects
   (the same resamples for every gene). p: one-sided paired sign-flip test of the per-subject drops
   (H0: drops symmetric about 0; p = (1 + #{flipped mean >= observed}) / (1 + flips), the same flips
   for every gene). q: Benjamini-Hochberg over the genes (`scipy.stats.false_discovery_control`).
   A gene whose per-gene input weights are all zero cannot change the output: its drop is exactly 0
   and it is not re-encoded.
4. Attention: the model's gene-gene attention weights averaged over subjects, layers and heads (the
   CLS token left out). Attention shows where the model looks, not what it relies on.
5. Writes OUTPUT_DIR/importance.csv (rank 1 = most important), report.md, importance.png,
   attention.png and explain.json (first as a marker, last with the figures; every write atomic).
   OUTPUT_DIR must be new, empty or an earlier explain's; `overwrite` replaces only explain's files.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from alignment.embed import autocast, autocast_dtype, model_covariates, model_genes, resolve_device
from alignment.evaluate import _checkpoint_meta, checkpoint_file, match_checkpoint, store_of
from alignment.metrics import chance_levels, chunk_for, harmonic, retrieval_ranks
from alignment.model import MultiGeneAlignmentModel
from pipeline import GenealignError, open_store
from pipeline.atomic import atomic_write_csv, atomic_write_json, atomic_write_text

SCHEMA = "genealign-explain/1"
CSV_NAME = "importance.csv"
REPORT_NAME = "report.md"
IMPORTANCE_PLOT = "importance.png"
ATTENTION_PLOT = "attention.png"
SUMMARY_NAME = "explain.json"
OUTPUTS = (CSV_NAME, REPORT_NAME, IMPORTANCE_PLOT, ATTENTION_PLOT, SUMMARY_NAME)
CSV_COLUMNS = ("gene", "rank", "importance", "ci_low", "ci_high", "p_value", "q_value", "mrr_shuffled",
               "repeat_sd", "attention_received", "in_use", "planted")
ATTENTION_BATCH = 128  # (b, layers, heads, S, S) weights per batch stay small


@dataclass
class ExplainConfig:
    """What to explain and how. Defaults fit a CPU: R = 5 shuffles of every gene."""

    checkpoint: Path | str  # a sequence-mode checkpoint file, or a run folder (its best_model.pt)
    store: Path | str | None = None  # default: the store the checkpoint was trained on
    split: str = "test"
    output_dir: Path | str | None = None  # default: <checkpoint folder>/explain_<split>
    repeats: int = 5  # shuffles per gene
    bootstrap: int = 1000  # resamples of the subjects for the 95% interval
    flips: int = 10_000  # sign flips of the p-value (smallest p = 1 / (1 + flips))
    max_subjects: int = 5000  # a fixed random subset of a larger split (memory: n x G x D floats)
    seed: int = 0
    device: str = "auto"
    batch_size: int = 512
    overwrite: bool = False  # replace an earlier explain's files in output_dir


@dataclass
class ExplainResult:
    output_dir: Path
    csv: Path
    report: Path
    plots: dict  # name -> Path
    rows: list  # one dict per gene (CSV_COLUMNS), ranked
    top_genes: list  # gene names, most important first
    mrr: float  # unshuffled MRR (mean of both directions) on the explained subjects
    chance_mrr: float
    n_subjects: int
    planted: list | None  # synth store: causal genes + interaction pair; else None
    precision: dict | None  # synth store: top k -> fraction of the top k that are planted
    seconds: float = 0.0

    def planted_in_top(self, k: int) -> list[str]:
        """The planted genes among the k most important (a synth store; [] for any other)."""
        return [g for g in self.top_genes[:k] if g in (self.planted or ())]


# ------------------------------------------------------------------------------------- outputs dir
def claim_output_dir(out_dir: Path, overwrite: bool) -> None:
    """An error if out_dir holds anything explain did not write, or an earlier explain and
    `overwrite` is off."""
    if out_dir.exists() and not out_dir.is_dir():
        raise GenealignError(f"--output_dir {out_dir} is a file; give a folder.")
    entries = sorted(p.name for p in out_dir.iterdir()) if out_dir.is_dir() else []
    if not entries:
        return
    foreign = [e for e in entries if e not in OUTPUTS and not (e.startswith(".") and e.endswith(".tmp"))]
    marker = out_dir / SUMMARY_NAME
    try:
        ours = marker.is_file() and json.loads(marker.read_text()).get("schema") == SCHEMA
    except ValueError:
        ours = False
    if foreign or not ours:
        raise GenealignError(f"{out_dir / (foreign or entries)[0]} was not written by genealign explain; choose "
                             "another --output_dir (explain writes only into a new, empty or earlier explain's folder).")
    if not overwrite:
        raise GenealignError(f"{out_dir} holds an earlier explain; replace it with --overwrite or choose another --output_dir.")


# ----------------------------------------------------------------------------------- computation
def reciprocal_ranks(neuro_f: torch.Tensor, gene_f: torch.Tensor) -> np.ndarray:
    """(n,) float64 per-subject reciprocal rank, mean of both directions, pool = all n rows."""
    chunk = chunk_for(neuro_f.shape[0])
    n2g = retrieval_ranks(neuro_f, gene_f, chunk)
    g2n = retrieval_ranks(gene_f, neuro_f, chunk)
    return 0.5 * (1.0 / n2g + 1.0 / g2n)


@torch.no_grad()
def gene_side(model, genes: torch.Tensor, batch_size: int, covariates: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, Callable]:
    """(inputs (n, G, k), encode): the gene rows (n, G, D) after the model's front-end, and the rest
    of `encode_gene` on such rows ((b, G, k) -> normalised (b, P)). The front-end works gene by gene
    (z-scoring, per-gene PCA), so shuffling a gene before or after it is the same; applying it once
    saves re-normalising the raw rows for every shuffle (a test checks encode == encode_gene).
    `covariates` (n, C): the subjects' raw covariates, for a model that residualises them."""
    parts = []
    for lo in range(0, genes.shape[0], batch_size):
        block = genes[lo : lo + batch_size]
        cov = None if covariates is None else covariates[lo : lo + batch_size]
        with model._no_autocast(block):
            parts.append(model._gene_frontend(block.to(model.gene_mean.dtype), cov))  # (b, G, k)
    return torch.cat(parts), lambda x: torch.nn.functional.normalize(model.gene_encoder(x), dim=-1)


@torch.no_grad()
def encode_shuffled(encode: Callable, inputs: torch.Tensor, batch_size: int, gene: int | None = None,
                    permutation: torch.Tensor | None = None) -> torch.Tensor:
    """Gene features (n, P) float32 of front-ended rows (n, G, k), column `gene` replaced by
    inputs[permutation, gene] when given (one gene shuffled across the subjects)."""
    device = inputs.device
    out = []
    with autocast(device, autocast_dtype(device)):
        for lo in range(0, inputs.shape[0], batch_size):
            x = inputs[lo : lo + batch_size]  # (b, G, k)
            if gene is not None:
                x = x.clone()
                x[:, gene] = inputs[permutation[lo : lo + batch_size], gene]
            out.append(encode(x).float())  # (b, P)
    return torch.cat(out)


def genes_in_use(model) -> np.ndarray:
    """(G,) bool: False where a gene's per-gene input weights are all zero (it cannot change the
    output); all True for a shared input projection."""
    weight = model.gene_input_weight()  # (G, d_in, H) | None
    if weight is None:
        return np.ones(model.config.num_genes, dtype=bool)
    return (weight.detach().flatten(1).abs().amax(dim=1) > 0).cpu().numpy()


def permutation_drops(model, neuro_f, genes, config: ExplainConfig, say,
                      covariates=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rr0 (n,), drops (G, n), shuffled MRR per repeat (G, R)) for raw gene rows genes (n, G, D):
    each subject's reciprocal rank unshuffled, its mean drop over the R shuffles of each gene, and
    each shuffle's MRR."""
    n, n_genes = genes.shape[0], genes.shape[1]
    inputs, encode = gene_side(model, genes, config.batch_size, covariates)  # (n, G, k)
    rr0 = reciprocal_ranks(neuro_f, encode_shuffled(encode, inputs, config.batch_size))
    rng = np.random.default_rng([config.seed, n, 31])
    perms = torch.from_numpy(np.stack([rng.permutation(n) for _ in range(config.repeats)])).to(genes.device)
    used = genes_in_use(model)
    drops = np.zeros((n_genes, n))
    shuffled = np.tile(rr0.mean(), (n_genes, config.repeats))
    started = time.perf_counter()
    for done, g in enumerate(np.flatnonzero(used), start=1):
        rr = np.stack([reciprocal_ranks(neuro_f, encode_shuffled(encode, inputs, config.batch_size, int(g), perm))
                       for perm in perms])  # (R, n)
        drops[g] = rr0 - rr.mean(axis=0)
        shuffled[g] = rr.mean(axis=1)
        if done == 1 or done % 20 == 0:
            left = (time.perf_counter() - started) / done * (used.sum() - done)
            say(f"  {done}/{int(used.sum())} genes shuffled ({left:.0f}s left)")
    return rr0, drops, shuffled


def bootstrap_means(values: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, k) means of the k rows of values (k, n) over resamples of the n subjects (with
    replacement); the same resamples for every row."""
    k, n = values.shape
    rng = np.random.default_rng([seed, n, 37])
    out = np.empty((n_boot, k))
    block = max(1, (1 << 22) // max(1, n))
    for lo in range(0, n_boot, block):
        idx = rng.integers(0, n, size=(min(block, n_boot - lo), n))  # (b, n)
        weights = np.stack([np.bincount(row, minlength=n) for row in idx]).astype(np.float64)  # (b, n) counts
        out[lo : lo + len(idx)] = weights @ values.T / n  # (b, k)
    return out


def sign_flip_p(drops: np.ndarray, flips: int, seed: int) -> np.ndarray:
    """(G,) one-sided p of mean drop > 0 per row of drops (G, n): p = (1 + #{mean(s * d) >=
    mean(d)}) / (1 + flips) over random signs s, the same signs for every gene. A row of zeros
    (an unused gene) gets p = 1."""
    n_genes, n = drops.shape
    observed = drops.mean(axis=1)
    tolerance = 1e-12 * np.maximum(1.0, np.abs(drops).max(axis=1))
    exceed = np.zeros(n_genes, dtype=np.int64)
    rng = np.random.default_rng([seed, n, 41])
    block = max(1, (1 << 22) // max(1, n))
    for lo in range(0, flips, block):
        signs = rng.choice(np.array([-1.0, 1.0]), size=(min(block, flips - lo), n))  # (b, n)
        null = signs @ drops.T / n  # (b, G)
        exceed += np.sum(null >= observed - tolerance, axis=0)
    return (1 + exceed) / (1 + flips)


@torch.no_grad()
def mean_attention(model, genes: torch.Tensor, covariates: torch.Tensor | None = None) -> np.ndarray:
    """(G, G) gene-gene attention averaged over subjects, layers and heads; rows = queries. With cls
    pooling the CLS row and column are left out (rows then sum to slightly below 1)."""
    model.eval()
    total = None
    for lo in range(0, genes.shape[0], ATTENTION_BATCH):
        cov = None if covariates is None else covariates[lo : lo + ATTENTION_BATCH]
        weights = model.gene_attention(genes[lo : lo + ATTENTION_BATCH], cov)  # (b, L, h, S, S)
        part = weights.float().sum(dim=(0, 1, 2)).double()  # (S, S)
        total = part if total is None else total + part
    layers_heads = model.config.transformer_num_layers * model.config.transformer_num_heads
    mean = (total / (genes.shape[0] * layers_heads)).cpu().numpy()
    return mean[1:, 1:] if model.config.transformer_pooling == "cls" else mean


def importance_rows(names, drops, shuffled, rr0, attention, used, config: ExplainConfig, planted) -> list[dict]:
    """One dict per gene (CSV_COLUMNS), ranked by importance (ties: smaller p, then model order)."""
    from scipy.stats import false_discovery_control

    boot = bootstrap_means(drops, config.bootstrap, config.seed)  # (B, G)
    low, high = np.quantile(boot, [0.025, 0.975], axis=0)
    p = sign_flip_p(drops, config.flips, config.seed)
    q = false_discovery_control(p, method="bh")
    received = attention.mean(axis=0)  # (G,) attention each gene receives, averaged over query genes
    rows = []
    for g, name in enumerate(names):
        rows.append({
            "gene": name, "importance": float(drops[g].mean()), "ci_low": float(low[g]), "ci_high": float(high[g]),
            "p_value": float(p[g]), "q_value": float(q[g]), "mrr_shuffled": float(shuffled[g].mean()),
            "repeat_sd": float(shuffled[g].std(ddof=1)) if shuffled.shape[1] > 1 else 0.0,
            "attention_received": float(received[g]), "in_use": bool(used[g]), "planted": planted.get(name, ""),
            "_order": g,
        })
    rows.sort(key=lambda r: (-r["importance"], r["p_value"], r["_order"]))
    for rank, row in enumerate(rows, start=1):
        row["rank"] = rank
        del row["_order"]
    return rows


# ------------------------------------------------------------------------------------------ truth
def planted_genes(store) -> dict[str, str]:
    """gene -> 'causal' | 'interaction' for a `genealign synth` store (the truth's causal genes and
    its interaction pair); {} for any other store."""
    path = store.cohort_truth_path()
    if path is None:
        return {}
    from pipeline.synth import causal_genes, load_truth

    truth = load_truth(path)
    planted = {g: "causal" for g in causal_genes(truth)}
    pair = truth.get("interaction") or {}
    if pair.get("active", True):
        planted.update({g: "interaction" for g in pair.get("genes", []) if g not in planted})
    return planted


# ----------------------------------------------------------------------------------------- explain
def explain(config: ExplainConfig, progress: Callable[[str], None] | None = None) -> ExplainResult:
    """Permutation importance and mean attention of every gene of a sequence model on one split;
    writes the outputs listed in the module docstring. `progress(message)` hears each phase."""
    say = progress or (lambda message: None)
    started = time.perf_counter()
    _check(config)
    checkpoint = checkpoint_file(config.checkpoint)
    meta = _checkpoint_meta(checkpoint)
    model = MultiGeneAlignmentModel.from_checkpoint(checkpoint, map_location="cpu")
    store = open_store(store_of(config, meta))
    mode, names, gene_indices, notes = match_checkpoint(model.config, meta["config"], store, checkpoint)
    if mode != "sequence":
        raise GenealignError(f"Checkpoint {checkpoint} is a single-gene model of {names[0]}: explain attributes a "
                             "sequence model's output to its genes; rank genes one model each with `genealign sweep`.")
    out_dir = Path(config.output_dir) if config.output_dir else checkpoint.parent / f"explain_{config.split}"
    claim_output_dir(out_dir, config.overwrite)
    rows, subset_note = _subjects(store, config)
    notes += [subset_note] if subset_note else []
    device = resolve_device(config.device)
    atomic_write_json(out_dir / SUMMARY_NAME, {"schema": SCHEMA, "status": "running", "checkpoint": str(checkpoint)})
    model = model.to(device).eval()

    say(f"Reading {len(rows):,} {config.split} subjects x {len(names)} genes; encoding on {device}")
    neuro, genes = store.read_rows(rows)
    genes_t = torch.from_numpy(model_genes(genes, gene_indices, single=False)).to(device)  # (n, G, D)
    del genes
    covariates = model_covariates(model, store)  # (N, C) or None
    cov_t = None if covariates is None else torch.from_numpy(covariates[rows]).to(device)  # (n, C)
    neuro_f = _encode_neuro(model, torch.from_numpy(neuro).to(device), config.batch_size, cov_t)  # (n, P)
    del neuro
    used = genes_in_use(model)
    if not used.all():
        notes.append(f"{int((~used).sum())} gene(s) have all-zero input weights (removed by the group lasso): "
                     "their importance is exactly 0 and p = 1, without re-encoding.")
    say(f"Shuffling each of {int(used.sum())} genes {config.repeats} times")
    rr0, drops, shuffled = permutation_drops(model, neuro_f, genes_t, config, say, cov_t)
    say("Mean attention, intervals, p-values, BH q")
    attention = mean_attention(model, genes_t, cov_t)
    planted = planted_genes(store)
    result_rows = importance_rows(names, drops, shuffled, rr0, attention, used, config, planted)
    ranked = [r["gene"] for r in result_rows]
    precision = None
    if planted:
        from alignment.sweep import truth_precision

        precision = truth_precision(result_rows, planted)
    n = len(rows)
    mrr_ci = np.quantile(bootstrap_means(rr0[None], config.bootstrap, config.seed)[:, 0], [0.025, 0.975])
    summary = {"schema": SCHEMA, "status": "done", "checkpoint": str(checkpoint), "store": str(store.path),
               "split": config.split, "n_subjects": n, "n_genes": len(names), "device": str(device),
               "settings": {k: v for k, v in asdict(config).items() if k not in ("checkpoint", "store", "output_dir")},
               "mrr": float(rr0.mean()), "mrr_ci": [float(v) for v in mrr_ci], "chance_mrr": harmonic(n) / n,
               "chance_top1": chance_levels(n)["chance_top1"], "top_genes": ranked[:20],
               "planted": planted or None, "precision": {str(k): v for k, v in (precision or {}).items()} or None,
               "notes": notes}
    say(f"Writing {out_dir}/{CSV_NAME}, {REPORT_NAME}, {IMPORTANCE_PLOT}, {ATTENTION_PLOT}")
    csv_path = atomic_write_csv(out_dir / CSV_NAME, result_rows, CSV_COLUMNS)
    plots = {"importance": plot_importance(result_rows, summary, out_dir / IMPORTANCE_PLOT),
             "attention": plot_attention(attention, names, planted, out_dir / ATTENTION_PLOT)}
    report = atomic_write_text(out_dir / REPORT_NAME, explain_markdown(result_rows, summary, attention, names))
    summary["seconds"] = round(time.perf_counter() - started, 2)
    atomic_write_json(out_dir / SUMMARY_NAME, summary)
    return ExplainResult(
        output_dir=out_dir, csv=csv_path, report=report, plots=plots, rows=result_rows, top_genes=ranked,
        mrr=summary["mrr"], chance_mrr=summary["chance_mrr"], n_subjects=n, planted=sorted(planted) or None,
        precision=precision, seconds=summary["seconds"],
    )


def _check(config: ExplainConfig) -> None:
    for name, low in (("repeats", 1), ("bootstrap", 1), ("flips", 1), ("max_subjects", 2), ("batch_size", 1)):
        if getattr(config, name) < low:
            raise GenealignError(f"--{name} must be >= {low}; got {getattr(config, name)}.")


def _subjects(store, config: ExplainConfig) -> tuple[np.ndarray, str | None]:
    """The split's rows, or a fixed random subset of `max_subjects` of them (sorted), and a note."""
    rows = store.indices(config.split)
    if len(rows) < 2:
        raise GenealignError(f"The {config.split} split of {store.path} has {len(rows)} subjects; explain needs at least 2.")
    if len(rows) <= config.max_subjects:
        return rows, None
    rng = np.random.default_rng([config.seed, len(rows), 43])
    subset = np.sort(rng.choice(rows, config.max_subjects, replace=False))
    return subset, (f"The {config.split} split has {len(rows):,} subjects: a fixed random {config.max_subjects:,} of them "
                    "were explained (--max_subjects).")


@torch.no_grad()
def _encode_neuro(model, neuro: torch.Tensor, batch_size: int, covariates=None) -> torch.Tensor:
    out = torch.empty(neuro.shape[0], model.config.projection_dim, device=neuro.device)
    with autocast(neuro.device, autocast_dtype(neuro.device)):
        for lo in range(0, neuro.shape[0], batch_size):
            cov = None if covariates is None else covariates[lo : lo + batch_size]
            out[lo : lo + batch_size] = model.encode_neuro(neuro[lo : lo + batch_size], covariates=cov).float()  # (b, P)
    return out


# ----------------------------------------------------------------------------------------- outputs
def plot_importance(rows: list[dict], summary: dict, path: Path) -> Path:
    """Genes ranked by importance (drop in MRR when shuffled) with 95% intervals; planted genes of a
    synth store ringed; the unshuffled MRR and chance as reference lines in the title."""
    from alignment.report import _figure, _save

    x = np.arange(1, len(rows) + 1)
    value = np.array([r["importance"] for r in rows])
    err = np.array([[r["importance"] - r["ci_low"], r["ci_high"] - r["importance"]] for r in rows]).T.clip(min=0)
    fig, axes = _figure(1, 1, width=max(7.0, 0.12 * len(rows)), height=3.6)
    ax = axes[0][0]
    ax.errorbar(x, value, yerr=err, fmt="o", ms=3, color="tab:blue", elinewidth=0.8, label="importance [95% CI]")
    planted = np.array([bool(r["planted"]) for r in rows])
    if planted.any():
        ax.scatter(x[planted], value[planted], s=60, facecolors="none", edgecolors="k", linewidths=0.8, label="planted (truth)")
    ax.axhline(0, color="0.3", linewidth=0.8)
    ax.set_xticks(x, [r["gene"] for r in rows], rotation=90, fontsize=6)
    ax.set_xlim(0.3, len(rows) + 0.7)
    ax.set_ylabel("drop in MRR when shuffled")
    ax.set_title(f"permutation importance on {summary['split']} (N = {summary['n_subjects']:,}, pool = N): MRR "
                 f"{summary['mrr']:.3f}, chance {summary['chance_mrr']:.4f}", fontsize=9)
    ax.legend(fontsize=7, loc="upper right")
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, Path(path))


def plot_attention(attention: np.ndarray, names, planted: dict, path: Path) -> Path:
    """Heatmap of the mean gene-gene attention (rows: querying gene, columns: attended gene)."""
    from alignment.report import _figure, _save

    size = max(6.0, 0.09 * len(names))
    fig, axes = _figure(1, 1, width=size + 1.2, height=size)
    ax = axes[0][0]
    image = ax.imshow(attention, cmap="viridis", aspect="equal")
    fig.colorbar(image, ax=ax, shrink=0.8, label="mean attention weight")
    labels = [f"{g}*" if g in planted else g for g in names]
    font = 6 if len(names) <= 60 else 4
    ax.set_xticks(range(len(names)), labels, rotation=90, fontsize=font)
    ax.set_yticks(range(len(names)), labels, fontsize=font)
    ax.set_xlabel("attended gene (key)")
    ax.set_ylabel("querying gene")
    ax.set_title("ATTENTION, not importance: mean over subjects, layers and heads" + ("  (* planted)" if planted else ""),
                 fontsize=9)
    return _save(fig, Path(path))


def _fmt(value: float) -> str:
    return f"{value:.4f}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2g}"


def explain_markdown(rows: list[dict], summary: dict, attention: np.ndarray, names) -> str:
    """report.md: how importance is measured (pool, directions, chance, test), against the truth on a
    synth store, the ranked genes, and the attention heatmap with its caveat."""
    s = summary["settings"]
    n = summary["n_subjects"]
    lines = [
        f"# Which genes the sequence model relies on ({summary['split']} split)", "",
        f"Checkpoint `{summary['checkpoint']}`, store `{summary['store']}`, {n:,} subjects, {summary['n_genes']} genes.", "",
        "## How importance is measured", "",
        f"- **Retrieval**: both directions (neuro→gene and gene→neuro), every subject a query against the whole split "
        f"(pool = {n:,}), ties counted against the model. MRR = mean over subjects of the mean of the two reciprocal ranks.",
        f"- **Unshuffled MRR** {_fmt(summary['mrr'])} [95% CI {_fmt(summary['mrr_ci'][0])}, {_fmt(summary['mrr_ci'][1])}]; "
        f"chance MRR = H_N/N = {_fmt(summary['chance_mrr'])} (chance top-1 = 1/N = {_fmt(summary['chance_top1'])}).",
        f"- **Importance** of a gene = MRR − mean MRR over {s['repeats']} shuffles of that gene's embedding across the "
        "subjects (the same shuffles for every gene); only the gene side is re-encoded, the brain side is unchanged.",
        f"- **95% CI**: bootstrap percentile interval of the per-subject drops ({s['bootstrap']} resamples of the subjects, "
        "the same for every gene).",
        f"- **p**: one-sided paired sign-flip test of the per-subject drops (H0: drops symmetric about 0; {s['flips']:,} "
        f"flips, smallest possible p {1 / (1 + s['flips']):.1g}). **q**: Benjamini-Hochberg over the {summary['n_genes']} "
        "genes (`scipy.stats.false_discovery_control`).", "",
    ]
    lines += [f"- {note}" for note in summary["notes"]] + ([""] if summary["notes"] else [])
    if summary["planted"]:
        lines += _truth_lines(rows, summary)
    lines += ["## Genes, ranked by importance", "", f"![importance]({IMPORTANCE_PLOT})", "",
              "| rank | gene | importance [95% CI] | p | q | attention received |" + (" planted |" if summary["planted"] else ""),
              "|" + "---|" * (7 if summary["planted"] else 6)]
    for r in rows:
        lines.append(f"| {r['rank']} | {r['gene']} | {_fmt(r['importance'])} [{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}] | "
                     f"{r['p_value']:.2g} | {r['q_value']:.2g} | {r['attention_received']:.4f} |"
                     + (f" {r['planted']} |" if summary["planted"] else ""))
    lines += ["", "## Attention (not importance)", "", f"![attention]({ATTENTION_PLOT})", "",
              "Mean attention weights between genes, over subjects, layers and heads (rows: querying gene). Attention "
              "shows where the model looks, not what its output depends on: a gene can draw attention and carry "
              "nothing, and a gene can matter through the feed-forward path with little attention. Use the importance "
              f"above to say which genes matter. Spearman correlation of attention received with importance: "
              f"{_spearman([r['attention_received'] for r in rows], [r['importance'] for r in rows]):.2f}.", ""]
    return "\n".join(lines)


def _truth_lines(rows: list[dict], summary: dict) -> list[str]:
    planted = summary["planted"]
    rank_of = {r["gene"]: r["rank"] for r in rows}
    kinds = sorted(set(planted.values()))
    lines = ["## Against the truth (synthetic cohort)", "",
             f"The truth plants {len(planted)} genes ({', '.join(f'{sum(v == k for v in planted.values())} {k}' for k in kinds)}). "
             "Precision of the top k (the fraction of the k most important genes that are planted):", "",
             "| top k | planted among them | precision |", "|---|---|---|"]
    lines += [f"| {k} | {round(p * int(k))} | {p:.2f} |" for k, p in summary["precision"].items()]
    lines += ["", "Planted genes' ranks: " + ", ".join(f"{g} ({kind}) {rank_of.get(g, '—')}" for g, kind in planted.items()), ""]
    return lines


def _spearman(a, b) -> float:
    from scipy.stats import spearmanr

    value = spearmanr(a, b).statistic
    return float(value) if np.isfinite(value) else 0.0
