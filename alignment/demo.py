"""The demo: the whole job on the embedded default cohort, end to end.

synth the default cohort -> ingest -> train single mode on the strongest causal gene (by the truth)
-> train sequence mode with a CPU-sized transformer -> evaluate both against PCA+CCA, PCA+PLS, the
oracle and chance -> one comparison table and `report.md`. Every step writes its outputs atomically
and a finished step is reused when the demo is run again with the same settings.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from alignment.baselines import BASELINES
from alignment.evaluate import EvalConfig, evaluate
from alignment.model import ModelConfig
from alignment.settings import fit_batch, preset_values
from alignment.train import TrainConfig, train
from pipeline import open_store
from pipeline.atomic import atomic_write_json, atomic_write_text
from pipeline.errors import GenealignError
from pipeline.ingest import IngestConfig, ingest
from pipeline.oracle import strongest_gene
from pipeline.store import relatedness_in_words
from pipeline.synth import SynthConfig, causal_genes, load_truth, synthesize

DONE = ".done.json"
MARKER = ".genealign-demo.json"
DEMO_PRESET = "cpu-small"


@dataclass
class DemoConfig:
    """The demo's cohort, models and evaluation. Defaults: the embedded default cohort, CPU-sized models."""

    output_dir: Path = Path("data/demo")
    subjects: int = 8000
    genes: int = 111
    embedding_dim: int = 256
    latent_shape: tuple = (3, 15, 18, 15)
    seed: int = 0
    null: bool = False
    # A confounded, related cohort (synth --confounds --families), ingested with --covariates and
    # --kinship; training and evaluation then residualise every covariate (their default).
    confounds: bool = False
    families: float = 0.3  # UK Biobank: 30.3% have a third-degree or closer relative in the cohort
    # Test split >= 1,000 subjects so "top-1 out of 1,000" is measured on held-out subjects.
    split_fractions: tuple = (0.7, 0.1, 0.2)
    # The cpu-small preset (alignment.settings), the one `genealign train` picks on a CPU.
    single_model: ModelConfig = field(default_factory=lambda: _preset("single")[0])
    sequence_model: ModelConfig = field(default_factory=lambda: _preset("sequence")[0])
    single_train: dict = field(default_factory=lambda: _preset("single")[1])
    sequence_train: dict = field(default_factory=lambda: _preset("sequence")[1])
    pool_sizes: tuple = ("300", "1000", "all")
    draws: int = 30
    bootstrap: int = 1000
    # 10,000 shuffles: p can reach 1e-4, so it stays below 0.01 after Holm over a table of 16 p-values.
    permutations: int = 10_000
    device: str = "auto"
    gene_analyses: bool = True  # also run `sweep` and `explain` and name the top genes beside the truth
    explain_repeats: int = 3
    overwrite: bool = False  # use an output_dir holding files the demo did not write


def _preset(mode: str) -> tuple[ModelConfig, dict]:
    model_values, train_values = preset_values(DEMO_PRESET, mode)
    return ModelConfig(mode=mode, **model_values), train_values


@dataclass
class DemoResult:
    output_dir: Path
    store: Path
    report: Path
    rows: list  # one dict per method: name, top-1 both directions at the headline pool, p-value
    pool_size: int
    n_test: int
    versus: list = field(default_factory=list)  # per model: its figure against the strongest baseline on val


def _marker(path: Path) -> Path:
    """A finished step's marker sits beside its folder, so the tool that owns the folder never meets it."""
    return path.parent / f".{path.name}{DONE}"


def _done(path: Path, settings: dict) -> bool:
    marker = _marker(path)
    return marker.exists() and json.loads(marker.read_text()) == json.loads(json.dumps(settings, default=str))


def _mark(path: Path, settings: dict) -> None:
    atomic_write_json(_marker(path), json.loads(json.dumps(settings, default=str)))


def _claim(root: Path, overwrite: bool) -> None:
    """The demo writes into an empty or missing folder, or one holding its own earlier output."""
    if root.is_dir() and not (root / MARKER).exists():
        foreign = sorted(p.name for p in root.iterdir())
        if foreign and not overwrite:
            raise GenealignError(
                f"{root / foreign[0]} was not written by genealign demo; choose another --output-dir or pass --overwrite "
                "(the demo then writes its own files beside it)."
            )
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_json(root / MARKER, {"written_by": "genealign demo"})


STEPS = 7


def run_demo(config: DemoConfig, log: Callable[[str], None] = print, progress=None) -> DemoResult:
    _claim(Path(config.output_dir), config.overwrite)
    # The null and confounded cohorts' runs and reports live in their own folders, so they never
    # replace the default demo's.
    out = Path(config.output_dir) / ("null" if config.null else "") / ("confounds" if config.confounds else "")
    cohort, store = out / "cohort", out / "cohort.zarr"
    _make_cohort(config, cohort, store, log)
    gene = strongest_gene(load_truth(cohort / "truth.json"))
    runs = [
        ("single", f"single-gene ({gene})", out / f"single_{gene}", config.single_model, config.single_train, gene),
        ("sequence", "sequence (transformer)", out / "sequence", config.sequence_model, config.sequence_train, None),
    ]
    evaluations = [_train_and_evaluate(config, store, out, 3 + i, run, log, progress) for i, run in enumerate(runs)]
    genes = _which_genes(config, store, out, log) if config.gene_analyses else []
    log(f"[{STEPS}/{STEPS}] comparison")
    return _summarise(out, store, evaluations, genes)


def _make_cohort(config: DemoConfig, cohort: Path, store: Path, log) -> None:
    synth_settings = {"subjects": config.subjects, "genes": config.genes, "embedding_dim": config.embedding_dim,
                      "latent_shape": list(config.latent_shape), "seed": config.seed, "null": config.null}
    if config.confounds:
        synth_settings.update(confounds=True, families=config.families)
    if _done(cohort, synth_settings):
        log(f"[1/{STEPS}] cohort {cohort} already generated; reusing it")
    else:
        log(f"[1/{STEPS}] generating {config.subjects:,} subjects x {config.genes} genes into {cohort}")
        res = synthesize(SynthConfig(out_dir=cohort, subjects=config.subjects, genes=config.genes,
                                     embedding_dim=config.embedding_dim, latent_shape=tuple(config.latent_shape),
                                     seed=config.seed, null=config.null, confounds=config.confounds,
                                     families=config.families if config.confounds else 0.0), overwrite=True)
        log(f"      {res.n_subjects:,} subjects in {res.seconds:.1f}s")
        _mark(cohort, synth_settings)
    log(f"[2/{STEPS}] ingesting into {store}")
    side = dict(covariates=cohort / "covariates.csv", kinship=cohort / "kinship.dat") if config.confounds else {}
    ing = ingest(IngestConfig(gene_embedding_dir=cohort / "gene_embeddings", brain_latent_dir=cohort / "brain_latent",
                              store=store, workers=2, split_fractions=tuple(config.split_fractions), **side))
    log(f"      {ing.n_kept:,} subjects kept, dropped: {ing.dropped_by_kind or 'none'}"
        + (" (reused)" if ing.reused else f" ({ing.seconds:.1f}s)"))
    if config.confounds:
        log(f"      covariates {', '.join(ing.covariate_names)}; relatedness {relatedness_in_words(ing.relatedness)}")


def _train_and_evaluate(config: DemoConfig, store: Path, out: Path, step: int, run, log, progress) -> tuple[str, Path]:
    mode, label, run_dir, model_cfg, train_kw, single_gene = run
    settings = {"model": model_cfg.to_dict(), "train": train_kw, "store": str(store)}
    if _done(run_dir, settings):
        log(f"[{step}/{STEPS}] {label}: {run_dir}/best_model.pt already trained; reusing it")
    else:
        log(f"[{step}/{STEPS}] training {label} -> {run_dir}")
        tcfg = TrainConfig(store=str(store), output_dir=str(run_dir), mode=mode, single_gene_name=single_gene,
                           device=config.device, save_every=0, overwrite=True, **train_kw)
        tcfg, notes = fit_batch(tcfg, len(open_store(store).indices("train")), explicit=False)
        for note in notes:
            log(f"      {note}")
        result = train(tcfg, replace(model_cfg, mode=mode), progress=progress)
        log(f"      best epoch {result.best_epoch}: val top-1 {result.best_val.get('val_top1_mean', float('nan')):.3f} "
            f"(pool {result.best_val.get('val_pool_size')})")
        _mark(run_dir, settings)
    eval_dir = out / f"eval_{run_dir.name}"
    eval_settings = {"checkpoint_settings": settings, "pools": list(config.pool_sizes), "draws": config.draws,
                     "bootstrap": config.bootstrap, "permutations": config.permutations, "baselines": list(BASELINES)}
    if not _done(eval_dir, eval_settings):
        log(f"      evaluating {label} on the test split -> {eval_dir}")
        evaluate(EvalConfig(checkpoint=run_dir / "best_model.pt", store=store, split="test",
                            pool_sizes=tuple(config.pool_sizes), draws=config.draws, bootstrap=config.bootstrap,
                            permutations=config.permutations, output_dir=eval_dir, seed=config.seed,
                            device=config.device, overwrite=True))
        _mark(eval_dir, eval_settings)
    return label, eval_dir


def _which_genes(config: DemoConfig, store: Path, out: Path, log) -> list[str]:
    """The gene-level answers: every single-gene model in one sweep, and the sequence model's
    permutation importance. Returns report lines naming the top genes beside the truth."""
    from alignment.explain import ExplainConfig, explain
    from alignment.sweep import SweepConfig, sweep

    sweep_dir, explain_dir = out / "sweep", out / "explain_sequence"
    sweep_settings = {"model": config.single_model.to_dict(), "train": config.single_train, "store": str(store)}
    if _done(sweep_dir, sweep_settings):
        log(f"[5/{STEPS}] sweep of every gene: reusing {sweep_dir}")
    else:
        log(f"[5/{STEPS}] sweep: one single-gene model per gene -> {sweep_dir}")
        sweep(SweepConfig(store=str(store), output_dir=str(sweep_dir), model=config.single_model,
                          train={**config.single_train, "device": config.device}, overwrite=True))
        _mark(sweep_dir, sweep_settings)
    explain_settings = {"sequence": str(out / "sequence"), "repeats": config.explain_repeats}
    if _done(explain_dir, explain_settings):
        log(f"[6/{STEPS}] gene importance of the sequence model: reusing {explain_dir}")
    else:
        log(f"[6/{STEPS}] gene importance of the sequence model -> {explain_dir}")
        explain(ExplainConfig(checkpoint=out / "sequence" / "best_model.pt", store=store, split="test",
                              output_dir=explain_dir, seed=config.seed, device=config.device,
                              repeats=config.explain_repeats, overwrite=True))
        _mark(explain_dir, explain_settings)
    return _gene_lines(sweep_dir, explain_dir)


def _gene_lines(sweep_dir: Path, explain_dir: Path) -> list[str]:
    import csv

    lines = []
    for title, path in (("sweep (single-gene models, by test MRR)", sweep_dir / "sweep.csv"),
                        ("explain (sequence model, permutation importance)", explain_dir / "importance.csv")):
        with open(path, newline="") as handle:
            rows = sorted(csv.DictReader(handle), key=lambda r: int(r["rank"]))
        top = ", ".join(f"{r['gene']}" + (" (q<0.05)" if float(r["q_value"]) < 0.05 else "") for r in rows[:12])
        of = f"{len(rows)} genes the model kept" if "explain" in title else f"{len(rows)} genes"
        lines.append(f"Top {min(12, len(rows))} of the {of}, {title}: {top}.")
    return lines


def _summarise(out: Path, store: Path, evaluations, gene_lines: list[str]) -> DemoResult:
    """One table across both evaluations: each model, its baselines, the oracle and chance."""
    from alignment.report import REPORT_NAME, comparison_markdown, comparison_rows, versus_strongest

    metrics = [(label, json.loads((d / "metrics.json").read_text())) for label, d in evaluations]
    rows, pool, n_test = comparison_rows(metrics)
    versus = [f"{label}: {versus_strongest(m)}" for label, m in metrics if versus_strongest(m)]
    truth = load_truth(out / "cohort" / "truth.json")
    if gene_lines:
        gene_lines.append("The truth's causal genes (strongest first): " + ", ".join(causal_genes(truth)) + ".")
    text = comparison_markdown(rows, pool, n_test, [(label, d / REPORT_NAME) for label, d in evaluations], base=out,
                               versus=versus + gene_lines)
    report = atomic_write_text(out / REPORT_NAME, text)
    return DemoResult(output_dir=out, store=store, report=report, rows=rows, pool_size=pool, n_test=n_test, versus=versus + gene_lines)
