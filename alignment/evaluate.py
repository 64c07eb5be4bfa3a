"""`genealign evaluate`: a checkpoint's retrieval figures on one split, with everything that gives
them meaning: pool size, direction, chance level, uncertainty and baselines.

    evaluate(EvalConfig(checkpoint=..., store=..., split="test", output_dir=...)) -> EvalResult

1. Rebuild the model from the checkpoint alone (`MultiGeneAlignmentModel.from_checkpoint`: config,
   weights and its own train-split normalisation) and check it fits the store: latent shape,
   embedding width and genes (single mode: its one gene must be in the store; sequence mode: every
   gene of the checkpoint must be, and they are read in the checkpoint's order).
2. Embed the split in batches under no_grad (bf16 autocast on CUDA, features float32).
3. Baselines on the same split and the same genes (`alignment.baselines`, fitted on the train split
   only), and the oracle when the store came from `genealign synth` (its truth.json is found beside
   the store's source folders; the oracle's features are scored by dot product, not cosine). With
   covariates residualised (the checkpoint's setting; `--residualize` may only repeat it) the
   baselines see the rows the model's residualiser returns and the oracle's features are
   residualised with coefficients fitted on train rows. A store with covariates adds the
   "covariates only" row: the gene side replaced by the covariate design.
4. For every method and the chance row: `alignment.metrics.method_metrics` (both directions, the
   whole split with bootstrap CIs and a permutation p-value, random pools with percentile
   intervals over draws, top-k curves, matched vs unmatched similarity). Random pools and bootstrap
   resamples are the same for every method.
5. Write OUTPUT_DIR/report.md, the plots and OUTPUT_DIR/metrics.json (last; every write atomic).
"""

from __future__ import annotations

import datetime
import difflib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from alignment.embed import embed_model, model_covariates, residual_inputs, resolve_device
from alignment.baselines import (BASELINES, LABELS, BaselineConfig, fit_baselines, fit_covariate_baseline, fit_rows,
                                 read_batches)
from alignment.metrics import CI_LEVEL, chance_figures, method_metrics
from alignment.model import MultiGeneAlignmentModel
from pipeline import GenealignError, open_store
from pipeline.atomic import atomic_write_json
from pipeline.residualize import describe_setting, relatedness_note, select_covariates
from pipeline.store import StoreView

SCHEMA = "genealign-eval/1"
METRICS_NAME = "metrics.json"
ORACLE_BATCH_ROWS = 4096
MIN_BASELINE_TRAIN = 20  # the oracle rebuilds the generator per call: few, large calls
STATISTICS = {
    "ranks": "rank = 1 + number of other gallery items with score >= the true pair's (ties pessimistic)",
    "whole_split_interval": (
        "bootstrap percentile interval: queries resampled with replacement, each keeping its rank against the "
        "full fixed gallery (re-ranking inside a resampled pool would tie duplicated subjects with their "
        "partners); the same resamples for every method"
    ),
    "pool_interval": "2.5-97.5 percentiles over random pools drawn without replacement; the same pools for every method",
    "p_value": "permutation test of whole-split top-1: gallery pairing shuffled; p = (1 + #{null >= observed}) / (1 + n)",
    "cohens_d": "(mean matched - mean unmatched) / sqrt((sd matched^2 + sd unmatched^2) / 2), over all N(N-1) unmatched pairs",
    "chance": "top-k: k/pool; mean and median rank: (pool+1)/2; MRR: H_pool/pool",
}


@dataclass
class EvalConfig:
    """What to evaluate and how. Pool sizes: integers and/or 'all' (the whole split, always scored)."""

    checkpoint: Path | str  # a checkpoint file, or a run folder (its best_model.pt)
    store: Path | str | None = None  # default: the store the checkpoint was trained on
    split: str = "test"
    pool_sizes: tuple = ("300", "1000", "all")
    draws: int = 30
    bootstrap: int = 1000
    permutations: int = 1000
    baselines: tuple = BASELINES
    output_dir: Path | str | None = None  # default: <checkpoint folder>/eval_<split>
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    batch_size: int = 512
    oracle: bool = True
    overwrite: bool = False  # replace an output_dir holding another checkpoint's evaluation
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    # Covariates residualised: None = the checkpoint's setting (what the model was trained with);
    # 'all' | 'none' | 'NAME,NAME' must name the same covariates as the checkpoint's.
    residualize: str | None = None


@dataclass
class EvalResult:
    output_dir: Path
    metrics: dict  # exactly what metrics.json holds
    metrics_path: Path
    report_path: Path
    plot_paths: dict  # name -> Path
    headline: list  # one dict per method (model, baselines, oracle, chance): see report.headline_rows
    seconds: float = 0.0


# ------------------------------------------------------------------------------------ config checks
def _as_list(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = value.split(",")
    return [str(v).strip() for v in value if str(v).strip()]


def resolve_pools(requested, n: int) -> tuple[list[int], list[str]]:
    """Random pool sizes to draw (each < n) and notes on skipped ones. 'all' is the whole split,
    which is always scored."""
    sizes, notes = [], []
    for item in _as_list(requested):
        if item.lower() == "all":
            continue
        try:
            size = int(item)
        except ValueError:
            raise GenealignError(f"--pool_sizes: {item!r} is not a pool size; write integers and/or all, like 300,1000,all.") from None
        if size < 2:
            raise GenealignError(f"--pool_sizes: a pool needs at least 2 subjects; got {size}.")
        if size > n:
            notes.append(f"Pool size {size:,} skipped: the split has only {n:,} subjects.")
        elif size == n:
            notes.append(f"Pool size {size:,} is the whole split: reported as 'all'.")
        elif size not in sizes:
            sizes.append(size)
    return sorted(sizes), notes


def _preview(names, k: int = 5) -> str:
    names = list(names)
    return ", ".join(names[:k]) + (", ..." if len(names) > k else "")


def _counted(names) -> str:
    """'X' / 'X, Y' for a few names, '12 (X, Y, Z, ...)' for many."""
    return _preview(names) if len(names) <= 5 else f"{len(names)} ({_preview(names)})"


def match_checkpoint(model_config, ckpt_config: dict, store: StoreView, path) -> tuple[str, tuple, list[int], list[str]]:
    """(mode, gene names in the model's order, their store indices, notes); a GenealignError that
    names the difference when the checkpoint does not fit the store."""
    notes = []
    mode = "sequence" if (model_config.use_transformer or model_config.mode == "sequence") else "single"
    latent = tuple(model_config.latent_shape) if model_config.latent_shape else None
    if latent is not None and latent != tuple(store.latent_shape):
        raise GenealignError(
            f"Checkpoint {path} expects brain latents of shape {latent} ({int(np.prod(latent))} values), store "
            f"{store.path} holds {tuple(store.latent_shape)} ({store.neuro_dim}); evaluate on a store of the same latents."
        )
    if model_config.neuro_input_dim != store.neuro_dim:
        raise GenealignError(
            f"Checkpoint {path} expects {model_config.neuro_input_dim} latent values per subject, store "
            f"{store.path} has {store.neuro_dim} (shape {tuple(store.latent_shape)}); evaluate on a store of the same latents."
        )
    if model_config.gene_input_dim != store.embedding_dim:
        raise GenealignError(
            f"Checkpoint {path} expects gene embeddings of width {model_config.gene_input_dim}, store "
            f"{store.path} has {store.embedding_dim}; evaluate on a store of the same embeddings."
        )
    names = model_config.gene_names or tuple(ckpt_config.get("store", {}).get("gene_names") or ())
    if mode == "single":
        gene = names[0] if names else ckpt_config.get("train", {}).get("single_gene_name")
        if not gene:
            raise GenealignError(f"Checkpoint {path} is a single-gene model but does not record its gene; retrain with genealign train.")
        if gene not in store.gene_names:
            close = difflib.get_close_matches(gene, store.gene_names, n=3)
            hint = f" (close: {', '.join(close)})" if close else ""
            raise GenealignError(
                f"Checkpoint {path} is a single-gene model of {gene}, but store {store.path} has no gene {gene}{hint}; "
                f"its {store.n_genes} genes are {_preview(store.gene_names)}. Evaluate on a store ingested with {gene}."
            )
        return mode, (gene,), [store.gene_names.index(gene)], notes
    if not names:
        if model_config.num_genes != store.n_genes:
            raise GenealignError(
                f"Checkpoint {path} expects {model_config.num_genes} genes, store {store.path} has {store.n_genes}."
            )
        notes.append("The checkpoint does not record its gene names: the store's gene order was assumed.")
        return mode, tuple(store.gene_names), list(range(store.n_genes)), notes
    names = tuple(names)
    missing = [g for g in names if g not in store.gene_names]
    extra = [g for g in store.gene_names if g not in names]
    if missing:
        raise GenealignError(
            f"Checkpoint {path} expects {len(names)} genes ({_preview(names)}), store {store.path} has "
            f"{store.n_genes}: missing {_counted(missing)}. Evaluate on a store ingested with the checkpoint's "
            "genes (genealign ingest --genes_file ...)."
        )
    if extra:  # the model reads only its own genes, so a superset store is fine
        notes.append(f"The store has {len(extra)} gene(s) the checkpoint does not use ({_preview(extra)}); "
                     "the model and the baselines use the checkpoint's genes only.")
    elif names != tuple(store.gene_names):
        notes.append("The store holds the checkpoint's genes in another order; they were re-ordered to the checkpoint's.")
    return mode, names, [store.gene_names.index(g) for g in names], notes


def checkpoint_file(path) -> Path:
    """A checkpoint file, or the best_model.pt of a run folder."""
    path = Path(path)
    if path.is_dir():
        best = path / "best_model.pt"
        if not best.is_file():
            raise GenealignError(f"--checkpoint {path} is a folder without best_model.pt; give a run folder of `genealign train` or a .pt file.")
        return best
    return path


def store_of(config: EvalConfig, meta: dict) -> Path:
    """--store, or the store the checkpoint records."""
    if config.store is not None:
        return Path(config.store)
    recorded = meta["config"].get("store", {}).get("path") or meta["config"].get("train", {}).get("store")
    if not recorded:
        raise GenealignError(f"Checkpoint {config.checkpoint} does not record its store; pass --store S.zarr.")
    if not Path(recorded).exists():
        raise GenealignError(f"Checkpoint {config.checkpoint} was trained on {recorded}, which is not there any more; pass --store S.zarr.")
    return Path(recorded)


def claim_output_dir(out_dir: Path, checkpoint: Path, overwrite: bool) -> None:
    """Refuse to write over files evaluate did not write, or over another checkpoint's evaluation."""
    from alignment.report import PLOTS, REPORT_NAME

    ours = [out_dir / name for name in (METRICS_NAME, REPORT_NAME, *PLOTS.values()) if (out_dir / name).exists()]
    if not ours:
        return
    metrics = out_dir / METRICS_NAME
    try:
        previous = json.loads(metrics.read_text()) if metrics.is_file() else {}
    except ValueError:
        previous = {}
    if previous.get("schema") != SCHEMA:
        raise GenealignError(f"{ours[0]} was not written by genealign evaluate; choose another --output-dir.")
    same = Path(previous.get("checkpoint", "")).resolve() == checkpoint.resolve()
    if not same and not overwrite:
        raise GenealignError(
            f"{out_dir} holds the evaluation of {previous.get('checkpoint')}; replace it with --overwrite or "
            "choose another --output-dir."
        )


def _checkpoint_meta(path) -> dict:
    """The checkpoint's config/epoch/val metrics (weights are not needed: memory-mapped load)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # an old non-zip file cannot be memory-mapped
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    return {"config": ckpt.get("config", {}), "epoch": ckpt.get("epoch"), "val_metrics": ckpt.get("val_metrics") or {}}


# -------------------------------------------------------------------------------------- features
def embed_baselines(baselines, store, rows, gene_indices, batch_size, inputs=None) -> dict:
    """name -> (neuro features, gene features) (n, c) float32, unit norm, for each fitted baseline
    (rows through `inputs`, the residualisation, as in `alignment.baselines.read_batches`)."""
    neuro_pc, gene_pc = [], []
    for _, neuro, genes in read_batches(store, rows, batch_size, gene_indices, inputs):
        neuro_pc.append(baselines.frontend.transform_neuro(neuro))  # (b, p)
        gene_pc.append(baselines.frontend.transform_genes(genes))  # (b, q)
    neuro_pc, gene_pc = np.concatenate(neuro_pc), np.concatenate(gene_pc)
    return {name: fitted.embed(neuro_pc, gene_pc) for name, fitted in baselines.methods.items()}


def oracle_features(truth: dict, store, rows, gene_indices) -> tuple[np.ndarray, np.ndarray]:
    """(neuro side, gene side) (n, k) float64 whose dot product is the oracle's score."""
    from pipeline.oracle import oracle_embeddings

    names = [store.gene_names[i] for i in gene_indices]
    neuro_parts, gene_parts = [], []
    for _, neuro, genes in read_batches(store, rows, ORACLE_BATCH_ROWS, gene_indices):
        gene_side, neuro_side = oracle_embeddings(truth, names, genes, neuro)
        neuro_parts.append(neuro_side)
        gene_parts.append(gene_side)
    return np.concatenate(neuro_parts), np.concatenate(gene_parts)


def residual_setting(config: EvalConfig, model, ckpt_config: dict, store) -> dict:
    """What the checkpoint residualised (its --residualize, covariates, terms, a summary line); a
    GenealignError when config.residualize names other covariates than the model was trained with."""
    spec = model.residualizer()
    trained = ckpt_config.get("train", {}).get("residualize") or ("all" if spec else "none")
    mains = {t[0] for t in spec.terms if len(t) == 1} if spec else set()
    derived = [g for g, columns in store.covariate_groups.items() if mains & set(columns)]
    groups = list(ckpt_config.get("residualize", {}).get("covariates", derived))
    if config.residualize is not None:
        asked = select_covariates(config.residualize, store.covariate_groups)
        if set(asked) != set(groups):
            raise GenealignError(
                f"--residualize {config.residualize} means {', '.join(asked) or 'no covariates'}, but the model was trained "
                f"with --residualize {trained} ({', '.join(groups) or 'nothing residualised'}); the baselines and the oracle "
                "must see what the model saw: drop --residualize, or retrain with the setting you want."
            )
    return {"setting": trained, "covariates": groups, "terms": spec.term_names if spec else [],
            "summary": describe_setting(groups, store.covariates is not None)}


def method_features(config, store, model, mode, gene_indices, rows, device, notes) -> tuple[dict, dict]:
    """Features of every method on the split, name -> (neuro side, gene side) tensors on `device`
    (row i = subject i), and what to record about each method's fit. Appends to `notes`."""
    features = {"model": embed_model(model.to(device), store, rows, gene_indices, device, config.batch_size)}
    fits = {}
    inputs = residual_inputs(model, store)
    methods = [m.lower() for m in _as_list(config.baselines) if m.lower() != "none"]
    n_train = len(store.indices("train"))
    if (methods or store.covariates is not None) and n_train < MIN_BASELINE_TRAIN:
        # e.g. an external cohort ingested as all-test: nothing to fit the baselines on.
        notes.append(f"Baselines skipped: the train split of {store.path} has {n_train} subjects "
                     f"(at least {MIN_BASELINE_TRAIN} are needed to fit them).")
    elif methods or store.covariates is not None:
        _baseline_features(config, store, gene_indices, methods, rows, device, inputs, features, fits, notes)
    _oracle_features(config, store, model, rows, gene_indices, device, features, fits, notes)
    return features, fits


def _baseline_features(config, store, gene_indices, methods, rows, device, inputs, features, fits, notes) -> None:
    """The linear baselines and the covariates-only row, fitted on train, into `features` / `fits`."""
    as_tensors = lambda pair: tuple(torch.from_numpy(side).to(device) for side in pair)  # noqa: E731
    if methods:
        baselines = fit_baselines(store, store.indices("train"), gene_indices, methods, config.baseline, device, inputs)
        for name, pair in embed_baselines(baselines, store, rows, gene_indices, config.batch_size, inputs).items():
            features[name] = as_tensors(pair)
            fitted = baselines.methods[name]
            fits[name] = {**baselines.describe(), **fitted.describe(), "strongest_on_val": name == baselines.strongest()}
            notes += fitted.notes
        notes += baselines.notes
    if store.covariates is None:
        return
    covariate_only = fit_covariate_baseline(store, store.indices("train"), config.baseline, device, inputs)
    if covariate_only is None:
        notes.append("No covariates-only row: the train or val split is too small to fit it.")
        return
    features["covariates"] = as_tensors(covariate_only.embed(store, rows, inputs))
    fits["covariates"] = {**covariate_only.describe(), "brain_residualised": inputs is not None}


def _oracle_features(config, store, model, rows, gene_indices, device, features, fits, notes) -> None:
    """The oracle's features when the store came from `genealign synth`; residualised like the model's
    inputs (the checkpoint's terms, coefficients fitted on train rows' oracle features)."""
    truth_path = store.cohort_truth_path()
    if not config.oracle:
        return
    if truth_path is None:
        notes.append("No oracle: the store was not made from a `genealign synth` cohort (no truth.json beside its sources).")
        return
    from pipeline.oracle import oracle_refusal
    from pipeline.synth import load_truth

    truth = load_truth(truth_path)
    if oracle_refusal(truth):
        notes.append(f"No oracle: {oracle_refusal(truth)}.")
        return
    sides = oracle_features(truth, store, rows, gene_indices)
    spec = model.residualizer()
    if spec is not None:
        covariates = model_covariates(model, store)  # (N, C)
        train = fit_rows(store.indices("train"), config.baseline.fit_max_rows, config.baseline.seed)
        fitted = oracle_features(truth, store, train, gene_indices)
        sides = tuple(spec.apply(side, covariates[np.sort(rows)], spec.fit(covariates[train], fit_side))
                      for side, fit_side in zip(sides, fitted))
    features["oracle"] = tuple(torch.from_numpy(np.ascontiguousarray(side)).to(device) for side in sides)
    fits["oracle"] = {"truth": str(truth_path), "genes": [store.gene_names[i] for i in gene_indices],
                      "residualised": spec is not None}


# ------------------------------------------------------------------------------------------ evaluate
def evaluate(config: EvalConfig, progress: Callable[[str], None] | None = None) -> EvalResult:
    """Score a checkpoint, its baselines, the oracle and chance on one split; write the report.
    `progress(message)` (optional) is told what each phase is doing; the CLI prints it."""
    from alignment.report import headline_rows, write_report

    say = progress or (lambda message: None)
    started = time.perf_counter()
    methods = _check(config)
    device = resolve_device(config.device)
    checkpoint = checkpoint_file(config.checkpoint)
    model = MultiGeneAlignmentModel.from_checkpoint(checkpoint, map_location="cpu")
    meta = _checkpoint_meta(checkpoint)
    store = open_store(store_of(config, meta))
    mode, gene_names, gene_indices, notes = match_checkpoint(model.config, meta["config"], store, checkpoint)
    residual = residual_setting(config, model, meta["config"], store)
    rows = store.indices(config.split)
    n = len(rows)
    if n < 2:
        raise GenealignError(f"The {config.split} split of {store.path} has {n} subjects; retrieval needs at least 2.")
    pool_sizes, pool_notes = resolve_pools(config.pool_sizes, n)
    for note in pool_notes:
        say(note)
    notes += pool_notes + _split_notes(config.split, meta["config"], store)
    out_dir = Path(config.output_dir) if config.output_dir else checkpoint.parent / f"eval_{config.split}"
    claim_output_dir(out_dir, checkpoint, config.overwrite)

    say(f"Embedding {n:,} {config.split} subjects ({mode} mode, {len(gene_names)} gene(s)) on {device}"
        + (f"; fitting {', '.join(methods)} on the train split" if methods else ""))
    features, fits = method_features(config, store, model, mode, gene_indices, rows, device, notes)
    figures, plot_data = _score(config, features, fits, mode, gene_names, n, pool_sizes, say)
    metrics = _document(config, checkpoint, meta, store, mode, gene_names, str(device), n, pool_sizes, figures, notes)
    metrics.update(residualize=residual, relatedness={**store.relatedness, "note": relatedness_note(store.relatedness)})
    say(f"Writing {out_dir}/report.md, plots and metrics.json")
    report_path, plot_paths = write_report(metrics, plot_data, out_dir)
    metrics["files"] = {"report": str(report_path), "plots": {k: str(v) for k, v in plot_paths.items()}}
    metrics["seconds"] = round(time.perf_counter() - started, 2)
    metrics = _jsonable(metrics)
    metrics_path = atomic_write_json(out_dir / METRICS_NAME, metrics)
    return EvalResult(
        output_dir=out_dir, metrics=metrics, metrics_path=metrics_path, report_path=report_path,
        plot_paths=plot_paths, headline=headline_rows(metrics), seconds=metrics["seconds"],
    )


def _check(config: EvalConfig) -> list[str]:
    """Counts and names checked before anything is read; returns the baselines asked for."""
    methods = [m.lower() for m in _as_list(config.baselines) if m.lower() != "none"]
    unknown = [m for m in methods if m not in BASELINES]
    if unknown:
        raise GenealignError(f"--baselines: unknown {', '.join(unknown)}; use any of {', '.join(BASELINES)} or none.")
    if config.draws < 1 or config.bootstrap < 0 or config.permutations < 0 or config.batch_size < 1:
        raise GenealignError("--draws and --batch-size must be >= 1, --bootstrap and --permutations >= 0.")
    return methods


def _score(config, features, fits, mode, gene_names, n, pool_sizes, say) -> tuple[dict, dict]:
    """Every method's figures (and plot data) on the same pools, resamples and permutations."""
    figures, plot_data = {}, {}
    pools = f"pools of {', '.join(f'{p:,}' for p in pool_sizes)} x {config.draws} draws" if pool_sizes else "no smaller pools"
    for name, (neuro_f, gene_f) in features.items():
        say(f"Scoring {name}: whole split ({n:,}), {pools}, "
            f"{config.bootstrap:,} bootstrap resamples, {config.permutations:,} permutations")
        figures[name], plot_data[name] = method_metrics(
            neuro_f, gene_f, pool_sizes=pool_sizes, draws=config.draws, bootstrap=config.bootstrap,
            permutations=config.permutations, seed=config.seed,
        )
        figures[name].update(label=_label(name, mode, gene_names, fits.get(name)), score=_score_kind(name), fit=fits.get(name))
    figures["chance"] = {**chance_figures(n, pool_sizes), "label": "chance", "score": None, "fit": None}
    return figures, plot_data


def _document(config, checkpoint, meta, store, mode, gene_names, device, n, pool_sizes, figures, notes) -> dict:
    """What metrics.json holds (before the file list and timing are added)."""
    return {
        "schema": SCHEMA,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "checkpoint": str(checkpoint),
        "checkpoint_epoch": meta["epoch"],
        "checkpoint_val_metrics": meta["val_metrics"],
        "store": str(store.path),
        "split": config.split,
        "n_subjects": n,
        "mode": mode,
        "gene_names": list(gene_names),
        "device": device,
        "pool_sizes": [*pool_sizes, n],
        "pool_keys": [*(str(s) for s in pool_sizes), "all"],
        "headline_pool": "1000" if 1000 in pool_sizes else "all",
        "draws": config.draws,
        "bootstrap": config.bootstrap,
        "permutations": config.permutations,
        "seed": config.seed,
        "ci_level": CI_LEVEL,
        "directions": {
            "neuro_to_gene": "query = a subject's brain latent, gallery = the gene features of every subject in the pool",
            "gene_to_neuro": "query = a subject's gene features, gallery = the brain latents of every subject in the pool",
        },
        "statistics": STATISTICS,
        "strongest_baseline": next((m for m, fit in ((m, f.get("fit") or {}) for m, f in figures.items())
                                    if fit.get("strongest_on_val")), None),
        "methods_order": list(figures),
        "methods": figures,
        "notes": notes,
    }


def _label(name: str, mode: str, gene_names, fit: dict | None = None) -> str:
    kept = (fit or {}).get("screened_genes")
    genes = gene_names[0] if mode == "single" else f"{len(kept) if kept else len(gene_names)} genes"
    if name == "model":
        return f"model ({mode}, {genes})"
    if name == "oracle":
        return f"oracle ({genes})"
    if name == "covariates":
        return f"{LABELS[name]}; brain {'residualised' if (fit or {}).get('brain_residualised') else 'not residualised'}"
    return f"{LABELS[name]} ({genes})"


def _score_kind(name: str) -> str:
    if name == "oracle":
        return "dot product of the oracle's features = its log-likelihood ratio (not a cosine)"
    return "cosine similarity"


def _split_notes(split: str, ckpt_config: dict, store) -> list[str]:
    notes = []
    if split == "train":
        notes.append("Evaluated on the train split, which the model (and the baselines) were fitted on: optimistic.")
    elif split == "all":
        notes.append("Evaluated on all subjects, including the train split the model was fitted on: optimistic.")
    elif split == "val":
        notes.append("Evaluated on the val split, which selected the checkpoint: slightly optimistic; report the test split.")
    trained_on = ckpt_config.get("store", {}).get("path")
    if trained_on and Path(trained_on).resolve() != Path(store.path).resolve():
        notes.append(
            f"The checkpoint was trained on store {trained_on}; evaluated on {store.path}. The split is a hash of the "
            "IID, so a subject is in the same split in both stores, but check that both came from the same cohort."
        )
    return notes


def _jsonable(value):
    """numpy scalars/arrays -> Python; NaN/inf -> None (metrics.json stays strict JSON)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return value if np.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value
