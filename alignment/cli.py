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
from rich.table import Table

from pipeline.errors import GenealignError

app = typer.Typer(
    name="genealign",
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


def _names(name: str) -> tuple[str, ...]:
    """Both spellings of an option: --batch-size and --batch_size."""
    dashed = "--" + name.replace("_", "-")
    under = "--" + name
    return (dashed, under) if dashed != under else (dashed,)


def opt(name: str, help: str, **kwargs):
    return typer.Option(*_names(name), help=help, **kwargs)


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
    null: Annotated[bool, opt("null", "No gene->brain signal at all (for leakage checks).")] = False,
) -> None:
    """Generate a realistic cohort in the seed's exact file formats, with known ground truth."""
    from pipeline.synth import SynthConfig, synthesize

    result = synthesize(
        SynthConfig(
            out_dir=out_dir, subjects=subjects, genes=genes, embedding_dim=embedding_dim,
            latent_shape=_shape(latent_shape), seed=seed, signal=signal, null=null,
        )
    )
    console.print(
        f"Wrote {result.n_subjects:,} subjects x {result.n_genes} genes in {result.seconds:.1f}s:\n"
        f"  gene embeddings  {result.gene_embedding_dir}\n  brain latents    {result.brain_latent_dir}\n"
        f"  ground truth     {result.truth_path}"
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
    workers: Annotated[int, opt("workers", "Processes parsing CSVs and writing the store in parallel; 1 = this process, on two threads.")] = 2,
    overwrite: Annotated[bool, opt("overwrite", "Rebuild the store even if it is up to date.")] = False,
    direct_io: Annotated[bool, typer.Option(
        "--direct-io/--no-direct-io", "--direct_io/--no_direct_io",
        help="Write the store and its scratch past the page cache (O_DIRECT) where the filesystem allows: "
             "pays where new memory is slow to come by (some VMs) or the page cache is someone else's.")] = False,
) -> None:
    """Ingest the gene CSVs and the npz latents into one subject-aligned Zarr store."""
    from pipeline.ingest import IngestConfig, ingest as run_ingest, parse_gene_list

    result = run_ingest(
        IngestConfig(
            gene_embedding_dir=gene_embedding_dir, brain_latent_dir=brain_latent_dir, store=store,
            iid_column=iid_column, latent_key=latent_key, dtype=dtype,
            genes=parse_gene_list(genes, genes_file), workers=workers, overwrite=overwrite,
            split_fractions=_fractions(split_fractions), direct_io=direct_io,
        )
    )
    _print_ingest(result)


def _print_ingest(result) -> None:
    if result.reused:
        console.print(f"[green]Store {result.store} is up to date[/green] (inputs unchanged); use --overwrite to rebuild.")
    table = Table(title="Ingest", show_header=True, header_style="bold")
    table.add_column("what")
    table.add_column("subjects", justify="right")
    for key, value in result.found.items():
        table.add_row(f"found: {key}", f"{value:,}")
    table.add_row("[bold]kept (paired)[/bold]", f"[bold]{result.n_kept:,}[/bold]")
    for reason, count in result.dropped_by_kind.items():  # per-gene detail is in ingest_report.json
        table.add_row(f"dropped: {reason}", f"{count:,}")
    console.print(table)
    console.print(
        f"Store {result.store}: {result.n_kept:,} subjects x {result.n_genes} genes, latent "
        f"{tuple(result.latent_shape)}; dropped subjects and reasons in {result.store}/ingest_report.json "
        f"({result.seconds:.1f}s)."
    )


@app.command()
@friendly
def info(
    store: Annotated[Path, opt("store", "Store written by `genealign ingest`.")],
    list_genes: Annotated[bool, opt("list_genes", "Print every gene name.")] = False,
) -> None:
    """Summarise a store: subjects per split, genes, shapes, sources, what was dropped."""
    from pipeline import open_store
    from pipeline.ingest import store_summary

    view = open_store(store)
    summary = store_summary(view)
    table = Table(title=f"Store {view.path}", show_header=False)
    table.add_column("key", style="bold")
    table.add_column("value")
    for key, value in summary.items():
        if key == "gene_names" and not list_genes:
            value = ", ".join(list(value)[:8]) + (f", ... ({len(value)} in all; --list_genes)" if len(value) > 8 else "")
        elif isinstance(value, dict):
            value = ", ".join(f"{k}: {v}" for k, v in value.items())
        elif isinstance(value, (list, tuple)):
            value = ", ".join(str(v) for v in value)
        table.add_row(str(key), str(value))
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


@app.command()
@friendly
def train(
    output_dir: Annotated[Path, opt("output_dir", "Where checkpoints, config.json, metrics.jsonl and curves.png go.")],
    store: Annotated[Optional[Path], opt("store", "Store written by `genealign ingest`.")] = None,
    gene_embedding_dir: Annotated[Optional[Path], opt("gene_embedding_dir", "Seed-style input: ingest this folder first (cached in OUTPUT_DIR/store.zarr).")] = None,
    brain_latent_dir: Annotated[Optional[Path], opt("brain_latent_dir", "Seed-style input, with --gene_embedding_dir.")] = None,
    iid_column: Annotated[str, opt("iid_column", "IID column (seed-style input only).")] = "IID",
    mode: Annotated[str, opt("mode", "single (one gene, linear projections) or sequence (transformer over all genes).")] = "sequence",
    single_gene_name: Annotated[Optional[str], opt("single_gene_name", "Gene for --mode single, e.g. APOE.")] = None,
    batch_size: Annotated[int, opt("batch_size", "Subjects per micro-batch per process.")] = 64,
    num_epochs: Annotated[int, opt("num_epochs", "Epochs.")] = 100,
    learning_rate: Annotated[float, opt("learning_rate", "Peak learning rate (AdamW).")] = 1e-4,
    weight_decay: Annotated[float, opt("weight_decay", "AdamW weight decay (not on biases, norms, temperature, CLS, positions).")] = 0.01,
    warmup_fraction: Annotated[float, opt("warmup_fraction", "Fraction of steps of linear LR warmup before cosine decay.")] = 0.05,
    gradient_accumulation_steps: Annotated[int, opt("gradient_accumulation_steps", "Micro-batches per optimizer step; negatives span all of them.")] = 1,
    projection_dim: Annotated[int, opt("projection_dim", "Width of the shared embedding space.")] = 512,
    transformer_hidden_dim: Annotated[int, opt("transformer_hidden_dim", "Transformer width (sequence mode).")] = 512,
    transformer_num_layers: Annotated[int, opt("transformer_num_layers", "Transformer layers.")] = 4,
    transformer_num_heads: Annotated[int, opt("transformer_num_heads", "Attention heads.")] = 8,
    transformer_pooling: Annotated[str, opt("transformer_pooling", "mean, max or cls.")] = "mean",
    neuro_hidden_dim: Annotated[Optional[int], opt("neuro_hidden_dim", "Optional hidden layer of the neuro encoder.")] = None,
    dropout: Annotated[float, opt("dropout", "Dropout.")] = 0.1,
    logit_scale_init: Annotated[float, opt("logit_scale_init", "Initial log inverse temperature (ln(1/0.07)).")] = 2.6592,
    use_transformer: Annotated[bool, opt("use_transformer", "Seed flag: implies --mode sequence.")] = False,
    loss: Annotated[str, opt("loss", "clip (symmetric InfoNCE) or siglip (sigmoid, for small batches).")] = "clip",
    neuro_pca_dim: Annotated[int, opt("neuro_pca_dim", "PCA-whitening front-end for the latent, fitted on train (0 = off).")] = 256,
    gene_pca_dim: Annotated[int, opt("gene_pca_dim", "Per-gene PCA-whitening front-end, fitted on train (0 = off).")] = 32,
    gene_projection: Annotated[str, opt("gene_projection", "Sequence mode input projection: per_gene (one per gene) or shared (the seed's).")] = "per_gene",
    gene_group_lasso: Annotated[float, opt("gene_group_lasso", "Group lasso on the per-gene input projections: shrinks each gene's block after every step; a block without a consistent gradient reaches exactly 0 (0 = off; the demo uses 0.3).")] = 0.0,
    seed: Annotated[int, opt("seed", "One seed for init, batches and dropout.")] = 42,
    save_every: Annotated[int, opt("save_every", "Also keep checkpoint_epoch_N.pt every N epochs (0 = never).")] = 10,
    patience: Annotated[int, opt("patience", "Stop after N epochs without val improvement (0 = off).")] = 0,
    data_placement: Annotated[str, opt("data_placement", "auto, device (GPU), memory (host RAM) or stream (chunks from disk).")] = "auto",
    device: Annotated[str, opt("device", "auto, cpu, cuda or cuda:N.")] = "auto",
    resume: Annotated[Optional[Path], opt("resume", "Continue the killed run in this OUTPUT_DIR from its last.pt.")] = None,
) -> None:
    """Train single-gene or multi-gene (sequence) alignment from a store."""
    from alignment.model import ModelConfig
    from alignment.train import TrainConfig, train as run_train

    if use_transformer and mode == "single":
        raise GenealignError("--use_transformer needs --mode sequence (single mode uses linear projections).")
    if resume is not None and Path(resume) != Path(output_dir):
        raise GenealignError(f"--resume {resume} must be the run's --output_dir ({output_dir}).")
    store = _store_for_training(store, gene_embedding_dir, brain_latent_dir, iid_column, output_dir)
    model_config = ModelConfig(
        mode=mode, projection_dim=projection_dim, transformer_hidden_dim=transformer_hidden_dim,
        transformer_num_layers=transformer_num_layers, transformer_num_heads=transformer_num_heads,
        transformer_pooling=transformer_pooling, neuro_hidden_dim=neuro_hidden_dim, dropout=dropout,
        logit_scale_init=logit_scale_init, loss=loss, neuro_pca_dim=neuro_pca_dim, gene_pca_dim=gene_pca_dim,
        gene_projection=gene_projection,
    )
    config = TrainConfig(
        store=str(store), output_dir=str(output_dir), mode=mode, single_gene_name=single_gene_name,
        batch_size=batch_size, gradient_accumulation_steps=gradient_accumulation_steps, num_epochs=num_epochs,
        learning_rate=learning_rate, weight_decay=weight_decay, warmup_fraction=warmup_fraction, seed=seed,
        save_every=save_every, patience=patience, data_placement=data_placement, device=device,
        resume=resume is not None, gene_group_lasso=gene_group_lasso,
    )
    bar = _TrainProgress() if _is_main_process() else None
    try:
        result = run_train(config, model_config, progress=bar)
    finally:
        if bar:
            bar.close()
    if _is_main_process():
        best = result.best_val
        console.print(
            f"[bold]Best epoch {result.best_epoch}[/bold] of {result.epochs_run}"
            + (" (stopped early)" if result.stopped_early else "")
            + f": val top-1 neuro->gene {best.get('val_top1_neuro_to_gene', float('nan')):.3f}, "
            f"gene->neuro {best.get('val_top1_gene_to_neuro', float('nan')):.3f} out of a pool of "
            f"{best.get('val_pool_size', 0)} (chance {best.get('val_chance_top1', float('nan')):.4f}).\n"
            f"Checkpoint {result.best_checkpoint}; curves {result.output_dir / 'curves.png'}. "
            f"Next: genealign evaluate --checkpoint {result.best_checkpoint} --store {store}"
        )


def _store_for_training(store, gene_embedding_dir, brain_latent_dir, iid_column, output_dir) -> Path:
    """--store, or the seed's --gene_embedding_dir/--brain_latent_dir ingested into OUTPUT_DIR/store.zarr."""
    if store is not None:
        return store
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
                                    store=path, iid_column=iid_column, workers=2))
        )
    return path


# ------------------------------------------------------------------------------------------ evaluate
def _print_rows(rows: list[dict], pool_size: int, n: int, title: str) -> None:
    """Rich version of report.md's headline table: top-1 with 95% intervals in both directions at the
    headline pool, the whole split's figures when that is a different pool, permutation p-values raw
    and Holm-adjusted over the table."""
    from alignment.report import holm_cells

    directions = {"neuro_to_gene": "neuro→gene", "gene_to_neuro": "gene→neuro"}
    whole_too = pool_size != n
    holm = holm_cells(rows, directions)
    table = Table(title=title, header_style="bold", caption=f"pool = {pool_size:,} subjects; [95% CI]; "
                  f"p = permutation p-value of whole-split top-1 (N = {n:,}), (Holm-adjusted over "
                  f"the table's {len(holm)} p-values)")
    table.add_column("method", overflow="fold")
    for arrow in directions.values():
        table.add_column(f"{arrow}\npool {pool_size:,}", justify="right")
        if whole_too:
            table.add_column(f"{arrow}\nall {n:,}", justify="right")
        table.add_column("p", justify="right")

    def fmt(value, ci=None) -> str:
        text = f"{value:.3f}"
        return text + (f"\n[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")

    for i, row in enumerate(rows):
        cells = [f"[bold]{row['name']}[/bold]" if row["method"] == "model" else row["name"]]
        for direction in directions:
            p = row.get(f"p_{direction}")
            cells.append(fmt(row[f"top1_{direction}"], row.get(f"ci_{direction}")))
            if whole_too:
                cells.append(fmt(row[f"top1_all_{direction}"], row.get(f"ci_all_{direction}")))
            cells.append("—" if p is None else f"{p:.2g}\n({holm[(i, direction)]:.2g})")
        table.add_row(*cells)
    console.print(table)


@app.command()
@friendly
def evaluate(
    checkpoint: Annotated[Path, opt("checkpoint", "A checkpoint written by `genealign train` (e.g. D/best_model.pt).")],
    store: Annotated[Path, opt("store", "The store to evaluate on (the one it was trained from, or a compatible one).")],
    output_dir: Annotated[Optional[Path], opt("output_dir", "Where metrics.json, report.md and plots go (default: next to the checkpoint).")] = None,
    split: Annotated[str, opt("split", "train, val, test or all.")] = "test",
    pool_sizes: Annotated[str, opt("pool_sizes", "Comma-separated pool sizes; 'all' = the whole split.")] = "300,1000,all",
    draws: Annotated[int, opt("draws", "Random pools drawn per pool size.")] = 30,
    bootstrap: Annotated[int, opt("bootstrap", "Bootstrap resamples for the whole-split 95% intervals.")] = 1000,
    permutations: Annotated[int, opt("permutations", "Pairing permutations for the top-1 p-value.")] = 1000,
    baselines: Annotated[str, opt("baselines", "Comma-separated baselines fitted on train: cca, pls, or none.")] = "cca,pls",
    oracle: Annotated[bool, typer.Option(
        "--oracle/--no-oracle", " /--no_oracle",
        help="Add the generator's oracle when the store came from `genealign synth`.")] = True,
    seed: Annotated[int, opt("seed", "Seed of pools, bootstrap and permutations.")] = 0,
    device: Annotated[str, opt("device", "auto, cpu, cuda or cuda:N.")] = "auto",
    batch_size: Annotated[int, opt("batch_size", "Rows embedded per batch.")] = 512,
) -> None:
    """Evaluate a checkpoint on a held-out split: retrieval both ways with pools, CIs, p-values, baselines."""
    from alignment.evaluate import EvalConfig, evaluate as run_evaluate

    chosen = tuple(b.strip() for b in baselines.split(",") if b.strip() and b.strip() != "none")
    result = run_evaluate(
        EvalConfig(checkpoint=checkpoint, store=store, split=split,
                   pool_sizes=tuple(p.strip() for p in pool_sizes.split(",") if p.strip()), draws=draws,
                   bootstrap=bootstrap, permutations=permutations, baselines=chosen, output_dir=output_dir,
                   seed=seed, device=device, batch_size=batch_size, oracle=oracle),
        progress=lambda message: console.print(f"[dim]{message}[/dim]"),
    )
    rows = result.headline
    pool = rows[0]["pool_size"] if rows else 0
    _print_rows(rows, pool, result.metrics["n_subjects"],
                f"{split} split: top-1 retrieval (chance = 1/pool)")
    console.print(f"Report {result.report_path}; figures in {result.output_dir} ({result.seconds:.0f}s).")


# ---------------------------------------------------------------------------------------------- demo
@app.command()
@friendly
def demo(
    output_dir: Annotated[Path, opt("output_dir", "Where the cohort, store, runs and report go.")] = Path("data/demo"),
    subjects: Annotated[int, opt("subjects", "Cohort size (the test split must hold >= 1,000 subjects).")] = 8000,
    null: Annotated[bool, opt("null", "Run on a cohort with no gene->brain signal (every figure should sit at chance).")] = False,
    device: Annotated[str, opt("device", "auto, cpu, cuda or cuda:N.")] = "auto",
) -> None:
    """The whole job on the built-in cohort: synth -> ingest -> train both modes -> evaluate -> compare."""
    from alignment.demo import DemoConfig, run_demo

    bar = _TrainProgress()
    try:
        result = run_demo(DemoConfig(output_dir=output_dir, subjects=subjects, null=null, device=device),
                          log=lambda message: console.print(message, highlight=False), progress=bar)
    finally:
        bar.close()
    _print_rows(result.rows, result.pool_size, result.n_test,
                f"Held-out test split (N = {result.n_test:,}): top-1 retrieval, chance = 1/pool")
    console.print(f"Report: [bold]{result.report}[/bold]")


def main(argv: list[str] | None = None) -> None:
    app(args=argv, prog_name="genealign")


if __name__ == "__main__":
    main()
