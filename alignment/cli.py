"""The `genealign` command line: a thin Typer layer over the library.

Each command builds a config dataclass from its options, calls one library function and prints a
summary with rich. It is the only module that imports typer or rich. Every option takes the seed's
underscore spelling (`--batch_size`) and the dashed one (`--batch-size`). A `GenealignError` (a
user's mistake) becomes one red line on stderr and exit code 1, never a traceback.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from typer.core import TyperGroup
from rich.table import Table

from pipeline.errors import GenealignError

class _Group(TyperGroup):
    """Accepts the seed's underscore spelling of every option (`--batch_size`) as the dashed one
    (`--batch-size`), so help shows one name per option and fits 80 columns."""

    def parse_args(self, ctx, args):
        return super().parse_args(ctx, [_dashed(a) for a in args])

    def get_help_option(self, ctx):
        return _as_flag(super().get_help_option(ctx))

    def get_command(self, ctx, name):
        command = super().get_command(ctx, name)
        if command is not None:
            _as_flag(command.get_help_option(ctx))
        return command


def _as_flag(option):
    """Show --help as the flag it is (no value placeholder)."""
    if option is not None:
        option.metavar = ""
    return option


def _dashed(arg: str) -> str:
    if not arg.startswith("--") or arg == "--":
        return arg
    name, sep, value = arg.partition("=")
    return name.replace("_", "-") + sep + value


app = typer.Typer(
    name="genealign",
    cls=_Group,
    help=(
        "Align per-gene embeddings with brain MRI latents by contrastive learning, and measure the "
        "alignment honestly (cross-modal retrieval with pool size, direction, chance level, CIs and "
        "baselines). Typical run: synth (or your own data) -> ingest -> train -> evaluate; `demo` "
        "does all of it on a generated cohort."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
console = Console()
err_console = Console(stderr=True)


def opt(name: str, help: str, panel: str | None = None, **kwargs):
    """An option spelled --dashed-name (the seed's --underscored_name is accepted too, see _Group)."""
    return typer.Option("--" + name.replace("_", "-"), help=help, rich_help_panel=panel, **kwargs)


def flag(name: str, help: str, panel: str | None = None):
    """An on/off option: --name / --no-name."""
    dashed = name.replace("_", "-")
    return typer.Option(f"--{dashed}/--no-{dashed}", help=help, rich_help_panel=panel, metavar="")


def switch(name: str, help: str, panel: str | None = None):
    """An option that is off unless given: --name."""
    return typer.Option("--" + name.replace("_", "-"), help=help, rich_help_panel=panel, metavar="")


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        console.print(f"genealign {version('genealign')}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, metavar="", help="Print the version and exit.")] = False,
) -> None:
    """Align per-gene embeddings with brain MRI latents; measure the alignment honestly."""


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def friendly(fn):
    """Turn the project's exception into one red line and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except GenealignError as exc:
            err_console.print(f"[bold red]Error:[/bold red] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(1)
        except KeyboardInterrupt:
            err_console.print("[bold red]Interrupted.[/bold red] Outputs written so far are complete (writes are atomic).")
            raise typer.Exit(130)

    return wrapper


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in text.replace("x", ",").split(",") if s.strip())
    except ValueError:
        raise GenealignError(f"--latent_shape {text!r} is not a shape; write it like 3,15,18,15.") from None
    if not shape or min(shape) < 1:
        raise GenealignError(f"--latent_shape {text!r} must be positive integers, like 3,15,18,15.")
    return shape


def _fractions(text: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(s) for s in text.split(","))
    except ValueError:
        raise GenealignError(f"--split_fractions {text!r}: write three numbers, like 0.8,0.1,0.1.") from None
    if len(parts) != 3:
        raise GenealignError(f"--split_fractions {text!r}: write three numbers (train,val,test), like 0.8,0.1,0.1.")
    return parts  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------- synth
@app.command()
@friendly
def synth(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write gene_embeddings/, brain_latent/ and truth.json into.")],
    subjects: Annotated[int, opt("subjects", "Number of subjects.")] = 8000,
    genes: Annotated[int, opt("genes", "Number of genes (real HGNC symbols, brain-relevant first).")] = 111,
    embedding_dim: Annotated[int, opt("embedding_dim", "Width of each gene embedding.")] = 256,
    latent_shape: Annotated[str, opt("latent_shape", "Shape of each brain latent.")] = "3,15,18,15",
    seed: Annotated[int, opt("seed", "Random seed (same seed, same files).")] = 0,
    signal: Annotated[float, opt("signal", "Strength of the gene->brain effect (1.0 = calibrated default).")] = 1.0,
    null: Annotated[bool, flag("null", "No gene->brain signal at all (for leakage checks).")] = False,
    confounds: Annotated[bool, flag("confounds", "Write covariates.csv; age, sex, site, head size and ancestry PCs drive the data.")] = False,
    families: Annotated[float, opt("families", "Fraction of subjects in sibling pairs/trios; writes kinship.dat.")] = 0.0,
    overwrite: Annotated[bool, switch("overwrite", "Replace synth's own earlier cohort made with other settings (never other files).")] = False,
) -> None:
    """Generate a realistic cohort in the seed's exact file formats, with known ground truth.
    OUT_DIR must be empty, missing, or hold synth's own earlier output."""
    from pipeline.synth import SynthConfig, synthesize

    result = synthesize(
        SynthConfig(
            out_dir=out_dir, subjects=subjects, genes=genes, embedding_dim=embedding_dim,
            latent_shape=_shape(latent_shape), seed=seed, signal=signal, null=null, confounds=confounds,
            families=families,
        ),
        overwrite=overwrite,
    )
    console.print(
        f"Wrote {result.n_subjects:,} subjects x {result.n_genes} genes in {result.seconds:.1f}s:\n"
        f"  gene embeddings  {result.gene_embedding_dir}\n  brain latents    {result.brain_latent_dir}\n"
        f"  ground truth     {result.truth_path}"
        + "".join(f"\n  {label:<16} {result.out_dir / name}" for label, name, on in (
            ("covariates", "covariates.csv", confounds), ("kinship", "kinship.dat", families > 0)) if on)
    )


# -------------------------------------------------------------------------------------------- ingest
@app.command()
@friendly
def ingest(
    gene_embedding_dir: Annotated[Path, opt("gene_embedding_dir", "Folder of {GENE}_brain_gene_embeddingUKB.csv files.")],
    brain_latent_dir: Annotated[Path, opt("brain_latent_dir", "Folder of {IID}_latent.npz files.")],
    store: Annotated[Path, opt("store", "Zarr store to create (e.g. cohort.zarr).")],
    iid_column: Annotated[str, opt("iid_column", "Subject ID column of the gene CSVs.")] = "IID",
    latent_key: Annotated[Optional[str], opt("latent_key", "Array key inside each npz (default: 'latent', else the only array).")] = None,
    dtype: Annotated[str, opt("dtype", "Storage dtype: float32 or float16.")] = "float32",
    genes: Annotated[Optional[str], opt("genes", "Comma-separated subset of genes, e.g. APOE,BDNF (default: all).")] = None,
    genes_file: Annotated[Optional[Path], opt("genes_file", "File with one gene per line (alternative to --genes).")] = None,
    split_fractions: Annotated[str, opt("split_fractions", "train,val,test fractions; assignment is a hash of the IID.")] = "0.8,0.1,0.1",
    workers: Annotated[int, opt("workers", "Processes parsing the gene CSVs in parallel; 1 = this process, on two threads.")] = 2,
    overwrite: Annotated[bool, opt("overwrite", "Rebuild the store even if it is up to date.")] = False,
    covariates: Annotated[Optional[Path], opt("covariates", "CSV/TSV of covariates (age, sex, site, PCs...) keyed by the IID column.", panel="Covariates and relatedness")] = None,
    categorical: Annotated[Optional[str], opt("categorical", "Comma-separated covariate columns to one-hot encode even if numeric (text columns always are).", panel="Covariates and relatedness")] = None,
    kinship: Annotated[Optional[Path], opt("kinship", "UK Biobank relatedness file (ID1 ID2 HetHet IBS0 Kinship): families stay in one split.", panel="Covariates and relatedness")] = None,
    kinship_threshold: Annotated[float, opt("kinship_threshold", "Kinship at or above which a pair is related (0.0442: third degree).", panel="Covariates and relatedness")] = 0.0442,
) -> None:
    """Ingest the gene CSVs and the npz latents into one subject-aligned Zarr store."""
    from pipeline.ingest import IngestConfig, ingest as run_ingest, parse_gene_list

    result = run_ingest(
        IngestConfig(
            gene_embedding_dir=gene_embedding_dir, brain_latent_dir=brain_latent_dir, store=store,
            iid_column=iid_column, latent_key=latent_key, dtype=dtype,
            genes=parse_gene_list(genes, genes_file), workers=workers, overwrite=overwrite,
            split_fractions=_fractions(split_fractions), covariates=covariates, kinship=kinship,
            categorical=tuple(c.strip() for c in (categorical or "").split(",") if c.strip()),
            kinship_threshold=kinship_threshold,
        )
    )
    _print_ingest(result)


def _print_ingest(result, rebuild_hint: bool = True) -> None:
    """The ingest's counts; `rebuild_hint`: mention --overwrite (only `ingest` has it)."""
    if result.reused:
        console.print(f"[green]Store {result.store} is up to date[/green] (inputs unchanged)"
                      + ("; use --overwrite to rebuild." if rebuild_hint else "."))
    table = Table(title="Ingest", show_header=True, header_style="bold")
    table.add_column("what", overflow="fold")
    table.add_column("subjects", justify="right", no_wrap=True)
    for key, value in result.found.items():
        table.add_row(f"found: {key}", f"{value:,}")
    table.add_row("[bold]kept (paired)[/bold]", f"[bold]{result.n_kept:,}[/bold]")
    for reason, count in result.dropped_by_kind.items():  # per-gene detail is in ingest_report.json
        table.add_row(f"dropped: {reason}", f"{count:,}")
    console.print(table)
    console.print(
        f"Store {result.store}: {result.n_kept:,} subjects x {result.n_genes:,} genes, latent "
        f"{tuple(result.latent_shape)}; dropped subjects and reasons in {result.store}/ingest_report.json "
        f"({result.seconds:.1f}s).", markup=False, highlight=False
    )
    from pipeline.store import relatedness_in_words

    console.print(f"Covariates: {', '.join(result.covariate_names) or 'none'}. Relatedness "
                  f"{relatedness_in_words(result.relatedness or {})}.", markup=False, highlight=False)


def _shown(value) -> str:
    """A summary value for 80 columns: counts with thousands separators, a dict one item a line."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, dict):
        return "\n".join(f"{k}: {_shown(v)}" for k, v in value.items()) or "none"
    if isinstance(value, (list, tuple)):
        return ", ".join(_shown(v) for v in value)
    return str(value)


@app.command()
@friendly
def info(
    store: Annotated[Path, opt("store", "Store written by `genealign ingest`.")],
    list_genes: Annotated[bool, switch("list_genes", "Print every gene name.")] = False,
) -> None:
    """Summarise a store: subjects per split, genes, shapes, sources, what was dropped."""
    from pipeline import open_store
    from pipeline.ingest import store_summary

    view = open_store(store)
    summary = store_summary(view)
    names = summary["gene_names"]
    if not list_genes and len(names) > 8:
        summary["gene_names"] = ", ".join(names[:8]) + f", ... ({len(names):,} in all; --list-genes)"
    table = Table(title=f"Store {view.path}", show_header=False)
    table.add_column("key", style="bold", no_wrap=True)
    table.add_column("value", overflow="fold")
    for key, value in summary.items():
        table.add_row(key.replace("_", " "), _shown(value))
    console.print(table)


# --------------------------------------------------------------------------------------------- train
class _TrainProgress:
    """Rich progress bar per epoch, fed by train()'s progress events."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(
            TextColumn("[bold]epoch {task.fields[epoch]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}  T {task.fields[temp]:.1f}  {task.fields[sps]:,.0f} samples/s"),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        )
        self.task = None
        self.steps = 0

    def __call__(self, event: dict) -> None:
        kind = event["event"]
        if kind == "start":
            self.steps = event["steps_per_epoch"]
            console.print(
                f"Training on {event['device']} ({event['world_size']} process(es)), data placement "
                f"{event['placement']}: {event['n_train']:,} train / {event['n_val']:,} val subjects, "
                f"optimizer batch {event['global_batch']}, {self.steps} steps per epoch."
            )
            screening = event.get("screening")
            if screening:
                console.print(f"Screened genes ({screening['by']}): kept {len(screening['kept'])} of "
                              f"{len(screening['ranked'])}: {', '.join(screening['kept'])}.", markup=False, highlight=False)
            self.progress.start()
        elif kind == "step":
            if self.task is None:
                self.task = self.progress.add_task("", total=self.steps, epoch=event["epoch"], loss=0.0, lr=0.0, temp=0.0, sps=0.0)
            self.progress.update(
                self.task, completed=event["step"], epoch=event["epoch"], loss=event["loss"], lr=event["lr"],
                temp=event["temperature"], sps=event["samples_per_s"],
            )
        elif kind == "epoch":
            if self.task is not None:
                self.progress.remove_task(self.task)
                self.task = None
            mark = "[green]*[/green]" if event["improved"] else " "
            console.print(
                f"{mark} epoch {event['epoch']:>3}  train loss {event['train_loss']:.4f}  val loss {event['val_loss']:.4f}  "
                f"val top-1 neuro->gene {event['val_top1_neuro_to_gene']:.3f}  gene->neuro {event['val_top1_gene_to_neuro']:.3f}  "
                f"(pool {event['val_pool_size']}, chance {event['val_chance_top1']:.4f})  T {event['temperature']:.1f}  "
                f"{event['samples_per_s']:,.0f} samples/s"
            )

    def close(self) -> None:
        self.progress.stop()


D, M, T, O = "Data", "Model", "Training", "Output"
_PRESET_HELP = "Default: from the preset."


@app.command()
@friendly
def train(
    store: Annotated[Optional[Path], opt("store", "Store written by `genealign ingest`.", D)] = None,
    gene_embedding_dir: Annotated[Optional[Path], opt("gene_embedding_dir", "Seed-style input: ingest this folder first (into OUTPUT_DIR/store.zarr).", D)] = None,
    brain_latent_dir: Annotated[Optional[Path], opt("brain_latent_dir", "Seed-style input, with --gene-embedding-dir.", D)] = None,
    iid_column: Annotated[str, opt("iid_column", "IID column (seed-style input only).", D)] = "IID",
    mode: Annotated[Optional[str], opt("mode", "single (one gene, linear) or sequence (transformer over all genes; default).", D)] = None,
    single_gene_name: Annotated[Optional[str], opt("single_gene_name", "Gene for --mode single, e.g. APOE.", D)] = None,
    residualize: Annotated[Optional[str], opt("residualize", "Covariates regressed out of both modalities (fitted on train): all (default; none if the store has no covariates), none, or names like age,sex,site.", D)] = None,
    config: Annotated[Optional[Path], opt("config", "Settings file (e.g. `genealign tune`'s best_config.json), between the preset and the flags.", M)] = None,
    preset: Annotated[Optional[str], opt("preset", "cpu-small (measured demo settings), gpu (a starting point) or seed (the seed's defaults). Default: chosen from the data and device.", M)] = None,
    projection_dim: Annotated[Optional[int], opt("projection_dim", "Width of the shared embedding space. " + _PRESET_HELP, M)] = None,
    transformer_hidden_dim: Annotated[Optional[int], opt("transformer_hidden_dim", "Transformer width. " + _PRESET_HELP, M)] = None,
    transformer_num_layers: Annotated[Optional[int], opt("transformer_num_layers", "Transformer layers. " + _PRESET_HELP, M)] = None,
    transformer_num_heads: Annotated[Optional[int], opt("transformer_num_heads", "Attention heads. " + _PRESET_HELP, M)] = None,
    transformer_pooling: Annotated[Optional[str], opt("transformer_pooling", "mean, max or cls. " + _PRESET_HELP, M)] = None,
    neuro_hidden_dim: Annotated[Optional[int], opt("neuro_hidden_dim", "Optional hidden layer of the neuro encoder.", M)] = None,
    dropout: Annotated[Optional[float], opt("dropout", "Dropout. " + _PRESET_HELP, M)] = None,
    logit_scale_init: Annotated[Optional[float], opt("logit_scale_init", "Initial log inverse temperature (ln(1/0.07)).", M)] = None,
    use_transformer: Annotated[bool, switch("use_transformer", "Seed flag: same as --mode sequence.", M)] = False,
    loss: Annotated[Optional[str], opt("loss", "clip (symmetric InfoNCE) or siglip (sigmoid).", M)] = None,
    neuro_pca_dim: Annotated[Optional[int], opt("neuro_pca_dim", "Latent PCA-whitening width, fitted on train (0 = off). Preset values are capped to fit the data.", M)] = None,
    gene_pca_dim: Annotated[Optional[int], opt("gene_pca_dim", "Per-gene PCA-whitening width (0 = off). Capped like --neuro-pca-dim.", M)] = None,
    gene_projection: Annotated[Optional[str], opt("gene_projection", "Sequence input projection: per_gene or shared (the seed's).", M)] = None,
    gene_head: Annotated[Optional[str], opt("gene_head", "Sequence read-out: linear (the seed's) or quadratic (+ pairwise products). " + _PRESET_HELP, M)] = None,
    screen_genes: Annotated[Optional[int], opt("screen_genes", "Sequence: keep the K genes a per-gene ridge ranks best on val (0 = all). " + _PRESET_HELP, T)] = None,
    gene_projection_init_pca: Annotated[Optional[int], opt("gene_projection_init_pca", "Sequence: start Q columns of each gene's input map from joint train PCs (0 = off). " + _PRESET_HELP, T)] = None,
    batch_size: Annotated[Optional[int], opt("batch_size", "Subjects per micro-batch per process. " + _PRESET_HELP, T)] = None,
    num_epochs: Annotated[Optional[int], opt("num_epochs", "Epochs. " + _PRESET_HELP, T)] = None,
    learning_rate: Annotated[Optional[float], opt("learning_rate", "Peak learning rate (AdamW). " + _PRESET_HELP, T)] = None,
    weight_decay: Annotated[Optional[float], opt("weight_decay", "AdamW weight decay on matrices. " + _PRESET_HELP, T)] = None,
    warmup_fraction: Annotated[Optional[float], opt("warmup_fraction", "Fraction of steps of linear LR warmup.", T)] = None,
    gradient_accumulation_steps: Annotated[Optional[int], opt("gradient_accumulation_steps", "Micro-batches per optimizer step; negatives span all.", T)] = None,
    gene_group_lasso: Annotated[Optional[float], opt("gene_group_lasso", "Group lasso on per-gene input projections, pull per epoch (0 = off). " + _PRESET_HELP, T)] = None,
    seed: Annotated[Optional[int], opt("seed", "One seed for init, batches and dropout.", T)] = None,
    patience: Annotated[Optional[int], opt("patience", "Stop after N epochs without val gain (0 = off). " + _PRESET_HELP, T)] = None,
    data_placement: Annotated[Optional[str], opt("data_placement", "auto, device (GPU), memory (RAM) or stream (disk).", T)] = None,
    device: Annotated[Optional[str], opt("device", "auto, cpu, cuda or cuda:N.", T)] = None,
    output_dir: Annotated[Optional[Path], opt("output_dir", "Folder for checkpoints, config.json, metrics.jsonl, curves.png.", O)] = None,
    save_every: Annotated[Optional[int], opt("save_every", "Also keep checkpoint_epoch_N.pt every N epochs (0 = never).", O)] = None,
    resume: Annotated[Optional[Path], opt("resume", "Continue the run in this folder; its settings come from its config.json.", O)] = None,
    extend: Annotated[bool, switch("extend", "With --resume and --num-epochs N: lengthen the saved schedule.", O)] = False,
    overwrite: Annotated[bool, switch("overwrite", "Replace a previous run in --output-dir (its train files only).", O)] = False,
    log: Annotated[Optional[str], opt("log", "Also log per-epoch figures: tensorboard (pip install 'genealign\\[tensorboard]').", O)] = None,
) -> None:
    """Train single-gene or multi-gene (sequence) alignment from a store."""
    given = {k: v for k, v in locals().items() if v is not None}
    from alignment.settings import run_training, train_request

    if use_transformer and mode == "single":
        raise GenealignError("--use-transformer needs --mode sequence (single mode uses linear projections).")
    if resume is None:
        given["store"] = _store_for_training(store, gene_embedding_dir, brain_latent_dir, iid_column, output_dir)
    bar = _TrainProgress() if _is_main_process() else None
    try:
        resolved, result = run_training(train_request(given), progress=bar, say=lambda m: console.print(m, style="dim", markup=False, highlight=False))
    finally:
        if bar:
            bar.close()
    if _is_main_process():
        best = result.best_val
        console.print(
            f"[bold]Best epoch {result.best_epoch}[/bold] of {result.epochs_run}"
            + (" (stopped early)" if result.stopped_early else "")
            + f": val top-1 neuro->gene {best.get('val_top1_neuro_to_gene', float('nan')):.3f}, "
            f"gene->neuro {best.get('val_top1_gene_to_neuro', float('nan')):.3f}, pool "
            f"{best.get('val_pool_size', 0):,} (chance {best.get('val_chance_top1', float('nan')):.4f}).\n"
            f"Checkpoint {result.best_checkpoint}. Next: genealign evaluate --checkpoint {result.output_dir}"
        )
        for line in (result.residualized, result.relatedness):
            if line:
                console.print(line, markup=False, highlight=False)


def _store_for_training(store, gene_embedding_dir, brain_latent_dir, iid_column, output_dir) -> Path:
    """--store, or the seed's --gene_embedding_dir/--brain_latent_dir ingested into OUTPUT_DIR/store.zarr."""
    if store is not None:
        return store
    if output_dir is None:
        raise GenealignError("Give --output-dir DIR for the new run (or --resume DIR to continue one).")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise GenealignError("Under torchrun pass --store (run `genealign ingest` once before launching).")
    if gene_embedding_dir is None or brain_latent_dir is None:
        raise GenealignError(
            "Give --store S.zarr (from `genealign ingest`), or both --gene_embedding_dir and --brain_latent_dir."
        )
    from pipeline.ingest import IngestConfig, ingest as run_ingest

    path = Path(output_dir) / "store.zarr"
    if _is_main_process():
        _print_ingest(
            run_ingest(IngestConfig(gene_embedding_dir=gene_embedding_dir, brain_latent_dir=brain_latent_dir,
                                    store=path, iid_column=iid_column, workers=2)),
            rebuild_hint=False,
        )
    return path


# ------------------------------------------------------------------------------------------ evaluate
def _print_rows(rows: list[dict], pool_size: int, n: int, title: str) -> None:
    """The headline table, sized for 80 columns: top-1 with its 95% interval in both directions at
    the headline pool and the whole-split permutation p-value (raw, Holm-adjusted over the table).
    report.md has every figure (whole split, other pools, top-5/10, MRR)."""
    from alignment.report import holm_cells

    directions = {"neuro_to_gene": "neuro→gene", "gene_to_neuro": "gene→neuro"}
    holm = holm_cells(rows, directions)
    table = Table(title=title, header_style="bold", caption=f"top-1 in a pool of {pool_size:,} [95% CI]; p: "
                  f"permutation p of whole-split top-1 (N = {n:,}), (Holm over {len(holm)})")
    table.add_column("method", overflow="fold", max_width=30)
    for arrow in directions.values():
        table.add_column(arrow, justify="right", no_wrap=True)
    table.add_column("p n→g\n(Holm)", justify="right", no_wrap=True)
    table.add_column("p g→n\n(Holm)", justify="right", no_wrap=True)
    for i, row in enumerate(rows):
        cells = [f"[bold]{row['name']}[/bold]" if row["method"] == "model" else row["name"]]
        for direction in directions:
            ci = row.get(f"ci_{direction}")
            cells.append(f"{row[f'top1_{direction}']:.3f}" + (f"\n[{ci[0]:.3f},{ci[1]:.3f}]" if ci else ""))
        for direction in directions:
            p = row.get(f"p_{direction}")
            cells.append("—" if p is None else f"{p:.2g}\n({holm[(i, direction)]:.2g})")
        table.add_row(*cells)
    console.print(table)


@app.command()
@friendly
def evaluate(
    checkpoint: Annotated[Path, opt("checkpoint", "A run folder of `genealign train`, or a checkpoint file in it.", D)],
    store: Annotated[Optional[Path], opt("store", "Store to evaluate on. Default: the one the checkpoint was trained on.", D)] = None,
    split: Annotated[str, opt("split", "train, val, test or all.", D)] = "test",
    pool_sizes: Annotated[str, opt("pool_sizes", "Comma-separated pool sizes; 'all' = the whole split.", "Retrieval")] = "300,1000,all",
    draws: Annotated[int, opt("draws", "Random pools drawn per pool size.", "Retrieval")] = 30,
    bootstrap: Annotated[int, opt("bootstrap", "Bootstrap resamples for the 95% intervals.", "Retrieval")] = 1000,
    permutations: Annotated[int, opt("permutations", "Pairing permutations for the p-value.", "Retrieval")] = 1000,
    baselines: Annotated[str, opt("baselines", "Baselines fitted on train: all, none, or some of cca, pls, rrr, rrr_screened, rcca, rcca_screened, qrr_screened.", "Retrieval")] = "all",
    residualize: Annotated[Optional[str], opt("residualize", "Covariate residualisation of baselines and oracle: default the checkpoint's; if given it must match it (all, none, or names).", "Retrieval")] = None,
    oracle: Annotated[bool, flag("oracle", "Add the generator's oracle (stores made by `genealign synth`).", "Retrieval")] = True,
    seed: Annotated[int, opt("seed", "Seed of pools, bootstrap and permutations.", "Retrieval")] = 0,
    device: Annotated[str, opt("device", "auto, cpu, cuda or cuda:N.", "Retrieval")] = "auto",
    batch_size: Annotated[int, opt("batch_size", "Rows embedded per batch.", "Retrieval")] = 512,
    output_dir: Annotated[Optional[Path], opt("output_dir", "Where metrics.json, report.md and plots go. Default: RUN/eval_SPLIT.", O)] = None,
    overwrite: Annotated[bool, switch("overwrite", "Replace another checkpoint's evaluation in --output-dir.", O)] = False,
) -> None:
    """Evaluate a checkpoint on a held-out split: retrieval both ways with pools, CIs, p-values, baselines."""
    from alignment.evaluate import EvalConfig, evaluate as run_evaluate

    from alignment.baselines import BASELINES

    chosen = BASELINES if baselines.strip() == "all" else tuple(b.strip() for b in baselines.split(",") if b.strip() and b.strip() != "none")
    result = run_evaluate(
        EvalConfig(checkpoint=checkpoint, store=store, split=split,
                   pool_sizes=tuple(p.strip() for p in pool_sizes.split(",") if p.strip()), draws=draws,
                   bootstrap=bootstrap, permutations=permutations, baselines=chosen, output_dir=output_dir,
                   seed=seed, device=device, batch_size=batch_size, oracle=oracle, overwrite=overwrite,
                   residualize=residualize),
        progress=lambda message: console.print(message, style="dim", markup=False, highlight=False),
    )
    rows = result.headline
    pool = rows[0]["pool_size"] if rows else 0
    _print_rows(rows, pool, result.metrics["n_subjects"], f"{split} split: top-1 retrieval, chance = 1/pool")
    from alignment.report import versus_strongest

    if versus_strongest(result.metrics):
        console.print(versus_strongest(result.metrics), markup=False, highlight=False)
    for line in (result.metrics["residualize"]["summary"], result.metrics["relatedness"].get("note")):
        if line:
            console.print(line, markup=False, highlight=False)
    console.print(f"Report {result.report_path} ({result.seconds:.0f}s).", markup=False, highlight=False)


# ---------------------------------------------------------------------------------------------- demo
@app.command()
@friendly
def demo(
    output_dir: Annotated[Path, opt("output_dir", "Where the cohort, store, runs and report go.")] = Path("data/demo"),
    subjects: Annotated[int, opt("subjects", "Cohort size (the test split must hold >= 1,000 subjects).")] = 8000,
    null: Annotated[bool, flag("null", "Use a cohort with no gene->brain signal (every figure should sit at chance).")] = False,
    confounds: Annotated[bool, flag("confounds", "A confounded cohort with relatives: ingest with covariates and kinship, residualise.")] = False,
    device: Annotated[str, opt("device", "auto, cpu, cuda or cuda:N.")] = "auto",
    overwrite: Annotated[bool, switch("overwrite", "Use --output-dir even if it holds files the demo did not write.")] = False,
) -> None:
    """The whole job on the built-in cohort: synth -> ingest -> train both modes -> evaluate -> compare."""
    from alignment.demo import DemoConfig, run_demo

    bar = _TrainProgress()
    try:
        result = run_demo(DemoConfig(output_dir=output_dir, subjects=subjects, null=null, confounds=confounds,
                                     device=device, overwrite=overwrite),
                          log=lambda message: console.print(message, highlight=False, markup=False), progress=bar)
    finally:
        bar.close()
    _print_rows(result.rows, result.pool_size, result.n_test,
                f"Held-out test split (N = {result.n_test:,}): top-1, chance = 1/pool")
    for line in result.versus:
        console.print(line, markup=False, highlight=False)
    console.print(f"Report: {result.report}", markup=False, highlight=False)


# --------------------------------------------------------------------------------------------- sweep
@app.command()
@friendly
def sweep(
    store: Annotated[Path, opt("store", "Store written by `genealign ingest`.", D)],
    output_dir: Annotated[Path, opt("output_dir", "Folder for sweep.csv, report.md, sweep.png (and models/).", O)],
    genes: Annotated[Optional[str], opt("genes", "Comma-separated genes, e.g. APOE,BDNF (default: every gene).", D)] = None,
    genes_file: Annotated[Optional[Path], opt("genes_file", "File with one gene per line (alternative to --genes).", D)] = None,
    config: Annotated[Optional[Path], opt("config", "Settings file (e.g. `genealign tune`'s best_config.json), between the preset and the flags.", M)] = None,
    preset: Annotated[Optional[str], opt("preset", "Single-mode settings to start from: cpu-small (default), gpu or seed.", M)] = None,
    projection_dim: Annotated[Optional[int], opt("projection_dim", "Width of the shared embedding space. " + _PRESET_HELP, M)] = None,
    neuro_hidden_dim: Annotated[Optional[int], opt("neuro_hidden_dim", "Optional hidden layer of the neuro encoder.", M)] = None,
    dropout: Annotated[Optional[float], opt("dropout", "Dropout of the hidden layer. " + _PRESET_HELP, M)] = None,
    loss: Annotated[Optional[str], opt("loss", "clip (symmetric InfoNCE) or siglip (sigmoid).", M)] = None,
    neuro_pca_dim: Annotated[Optional[int], opt("neuro_pca_dim", "Latent PCA-whitening width (0 = off). " + _PRESET_HELP, M)] = None,
    gene_pca_dim: Annotated[Optional[int], opt("gene_pca_dim", "Per-gene PCA-whitening width (0 = off). " + _PRESET_HELP, M)] = None,
    batch_size: Annotated[Optional[int], opt("batch_size", "Subjects per batch. " + _PRESET_HELP, T)] = None,
    num_epochs: Annotated[Optional[int], opt("num_epochs", "Epochs. " + _PRESET_HELP, T)] = None,
    learning_rate: Annotated[Optional[float], opt("learning_rate", "Peak learning rate (AdamW). " + _PRESET_HELP, T)] = None,
    weight_decay: Annotated[Optional[float], opt("weight_decay", "AdamW weight decay on matrices. " + _PRESET_HELP, T)] = None,
    warmup_fraction: Annotated[Optional[float], opt("warmup_fraction", "Fraction of steps of linear LR warmup.", T)] = None,
    patience: Annotated[Optional[int], opt("patience", "Stop a gene after N epochs without val gain (0 = off). " + _PRESET_HELP, T)] = None,
    seed: Annotated[Optional[int], opt("seed", "Seed of init and batches (a gene's model = train's with this seed).", T)] = None,
    device: Annotated[Optional[str], opt("device", "auto, cpu, cuda or cuda:N.", T)] = None,
    pool_size: Annotated[int, opt("pool_size", "Test pool of top-1 and MRR (the whole split if smaller).", "Scoring")] = 1000,
    bootstrap: Annotated[int, opt("bootstrap", "Bootstrap resamples of the test subjects for the 95% interval.", "Scoring")] = 1000,
    permutations: Annotated[int, opt("permutations", "Most pairing permutations of each gene's p-value.", "Scoring")] = 10_000,
    fdr: Annotated[float, opt("fdr", "Benjamini-Hochberg q level a gene is called at.", "Scoring")] = 0.05,
    save_models: Annotated[bool, switch("save_models", "Also write models/GENE/best_model.pt for every gene.", O)] = False,
    overwrite: Annotated[bool, switch("overwrite", "Replace an earlier sweep in --output-dir (its files only).", O)] = False,
) -> None:
    """One single-gene model per gene, trained together in one pass; genes ranked on the test split with FDR."""
    given = {k: v for k, v in locals().items() if v is not None}
    from alignment.sweep import sweep as run_sweep, sweep_request

    result = run_sweep(sweep_request(given), progress=lambda m: console.print(m, style="dim", markup=False, highlight=False))
    first = result.rows[0]
    table = Table(title=f"Genes ranked by test MRR (pool {result.pool_size:,}, N = {result.n_test:,})", header_style="bold",
                  caption=f"chance: MRR {first['chance_mrr']:.4f}, top-1 {first['chance_top1']:.4f}; q: BH over {len(result.rows)} genes")
    for column in ("rank", "gene", "MRR [95% CI]", "top-1 n→g", "top-1 g→n", "q"):
        table.add_column(column, justify="left" if column == "gene" else "right", no_wrap=True)
    for r in result.rows[:15]:
        table.add_row(str(r["rank"]), r["gene"], f"{r['mrr']:.3f} [{r['mrr_ci_low']:.3f},{r['mrr_ci_high']:.3f}]",
                      f"{r['top1_neuro_to_gene']:.3f}", f"{r['top1_gene_to_neuro']:.3f}", f"{r['q_value']:.2g}")
    console.print(table)
    if result.precision:
        console.print("Against the truth's causal genes: " + ", ".join(f"top {k} precision {p:.2f}" for k, p in result.precision.items()))
    console.print(f"{result.n_significant} gene(s) at q <= {fdr:g}. {result.csv}; report {result.report} ({result.seconds:.0f}s).",
                  markup=False, highlight=False)


# ---------------------------------------------------------------------------------------------- tune
@app.command()
@friendly
def tune(
    store: Annotated[Path, opt("store", "Store written by `genealign ingest`.", D)],
    output_dir: Annotated[Path, opt("output_dir", "Folder for study.db, trials/ and best_config.json (rerun to continue).", O)],
    mode: Annotated[str, opt("mode", "single or sequence.", D)] = "sequence",
    single_gene_name: Annotated[Optional[str], opt("single_gene_name", "Gene for --mode single.", D)] = None,
    trials: Annotated[int, opt("trials", "Finished trials the study should hold.", T)] = 20,
    preset: Annotated[str, opt("preset", "Recipe the search starts from.", T)] = "cpu-small",
    num_epochs: Annotated[Optional[int], opt("num_epochs", "Epochs per trial. Default: the preset's.", T)] = None,
    seed: Annotated[int, opt("seed", "Seed of the TPE sampler.", T)] = 0,
    device: Annotated[str, opt("device", "auto, cpu, cuda or cuda:N.", T)] = "auto",
) -> None:
    """Choose hyperparameters on the val split (Optuna TPE); writes best_config.json for train --config."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from alignment.tune import TuneConfig, tune as run_tune

    with Progress(TextColumn("[bold]trials"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[best]}"),
                  TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task("", total=trials, best="")
        best = [float("-inf")]

        def on_trial(row: dict) -> None:
            best[0] = max(best[0], row["value"] if row["value"] is not None else best[0])
            bar.update(task, completed=row["finished"], best=f"best val top-1 {best[0]:.3f}")

        result = run_tune(TuneConfig(store=str(store), output_dir=str(output_dir), mode=mode, single_gene_name=single_gene_name,
                                     trials=trials, preset=preset, num_epochs=num_epochs, seed=seed, device=device), on_trial)
    table = Table(title="Trials (val top-1, mean of both directions)", header_style="bold")
    for name, justify in (("#", "right"), ("state", "left"), ("val top-1", "right"), ("settings", "left")):
        table.add_column(name, justify=justify, overflow="fold")
    for row in result.trials:
        value = "—" if row["value"] is None else f"{row['value']:.3f}"
        settings = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row["params"].items())
        table.add_row(str(row["number"]), row["state"], value, settings)
    console.print(table)
    console.print(f"Best: trial {result.best_trial}, val top-1 {result.best_value:.3f}. Train with it: genealign train "
                  f"--store {store} --config {result.best_config} --output-dir DIR", markup=False, highlight=False)


# -------------------------------------------------------------------------------------------- explain
@app.command()
@friendly
def explain(
    checkpoint: Annotated[Path, opt("checkpoint", "A sequence-mode run folder of `genealign train`, or its checkpoint.", D)],
    store: Annotated[Optional[Path], opt("store", "Store to explain on. Default: the one the checkpoint was trained on.", D)] = None,
    split: Annotated[str, opt("split", "train, val, test or all.", D)] = "test",
    output_dir: Annotated[Optional[Path], opt("output_dir", "Folder for importance.csv, report.md and plots. Default: RUN/explain_SPLIT.", O)] = None,
    repeats: Annotated[int, opt("repeats", "Shuffles of each gene.", "Importance")] = 5,
    bootstrap: Annotated[int, opt("bootstrap", "Bootstrap resamples of the subjects (95% CI).", "Importance")] = 1000,
    flips: Annotated[int, opt("flips", "Sign flips of the one-sided p-value.", "Importance")] = 10_000,
    max_subjects: Annotated[int, opt("max_subjects", "Explain a fixed random subset of a larger split.", "Importance")] = 5000,
    seed: Annotated[int, opt("seed", "Seed of shuffles, resamples and flips.", "Importance")] = 0,
    device: Annotated[str, opt("device", "auto, cpu, cuda or cuda:N.", "Importance")] = "auto",
    batch_size: Annotated[int, opt("batch_size", "Rows encoded per batch.", "Importance")] = 512,
    overwrite: Annotated[bool, switch("overwrite", "Replace an earlier explain in --output-dir (its files only).", O)] = False,
) -> None:
    """Which genes a sequence model relies on: permutation importance with CIs and BH q, and its attention."""
    from alignment.explain import ExplainConfig, explain as run_explain

    result = run_explain(
        ExplainConfig(checkpoint=checkpoint, store=store, split=split, output_dir=output_dir, repeats=repeats,
                      bootstrap=bootstrap, flips=flips, max_subjects=max_subjects, seed=seed, device=device,
                      batch_size=batch_size, overwrite=overwrite),
        progress=lambda message: console.print(message, style="dim", markup=False, highlight=False),
    )
    table = Table(title=f"Genes ranked by importance ({split}, N = {result.n_subjects:,}, pool = N)", header_style="bold",
                  caption=f"importance = drop in MRR (both directions) when the gene is shuffled; MRR "
                          f"{result.mrr:.3f}, chance {result.chance_mrr:.4f}; q: BH over {len(result.rows)} genes")
    for column in ("rank", "gene", "importance [95% CI]", "q"):
        table.add_column(column, justify="left" if column == "gene" else "right", no_wrap=True)
    for r in result.rows[:15]:
        table.add_row(str(r["rank"]), r["gene"] + (" *" if r["planted"] else ""),
                      f"{r['importance']:.4f} [{r['ci_low']:.4f},{r['ci_high']:.4f}]", f"{r['q_value']:.2g}")
    console.print(table)
    if result.precision:
        console.print("* planted (truth). Precision against the planted genes: "
                      + ", ".join(f"top {k} {p:.2f}" for k, p in result.precision.items()), markup=False, highlight=False)
    console.print(f"{result.csv}; report {result.report} ({result.seconds:.0f}s).", markup=False, highlight=False)


# ---------------------------------------------------------------------------------------------- embed
@app.command()
@friendly
def embed(
    checkpoint: Annotated[Path, opt("checkpoint", "A run folder of `genealign train`, or a checkpoint file in it.", D)],
    out: Annotated[Path, opt("out", "FILE.parquet or FILE.csv: one row per subject (IID, neuro_*, gene_*, split).", O)],
    store: Annotated[Optional[Path], opt("store", "Store to embed. Default: the one the checkpoint was trained on.", D)] = None,
    split: Annotated[str, opt("split", "all, train, val or test.", D)] = "all",
    device: Annotated[str, opt("device", "auto, cpu, cuda or cuda:N.")] = "auto",
    batch_size: Annotated[int, opt("batch_size", "Rows encoded per batch.")] = 1024,
    overwrite: Annotated[bool, switch("overwrite", "Replace an existing --out file.", O)] = False,
) -> None:
    """Export every subject's learned features (both sides) as Parquet or CSV, e.g. for a GWAS."""
    from alignment.export import EmbedConfig, export_embeddings

    result = export_embeddings(EmbedConfig(checkpoint=checkpoint, out=out, store=store, split=split, device=device,
                                           batch_size=batch_size, overwrite=overwrite))
    counts = ", ".join(f"{k} {v:,}" for k, v in result.split_counts.items())
    console.print(f"Wrote {result.n_subjects:,} subjects ({counts}) x {result.width} features per side "
                  f"({result.mode} model) to {result.out} ({result.seconds:.1f}s).", markup=False, highlight=False)


def main(argv: list[str] | None = None) -> None:
    app(args=argv, prog_name="genealign")


if __name__ == "__main__":
    main()
