"""One-shot ingest: the gene CSVs and the npz latents -> one subject-aligned Zarr store.

Owns `IngestConfig`, `ingest()` and `IngestResult`; the store layout and `store_summary` are
`pipeline/store.py`'s, the input formats and their readers `pipeline/sources.py`'s.

- Subjects: kept when they have a usable latent and a finite row in every selected gene CSV. Every
  other IID seen on either side is listed with its first reason in `ingest_report.json` (unreadable
  latent / NaN or inf in latent / latent of wrong shape / no latent / in no gene CSV / missing from
  gene X / NaN or inf in gene X). IIDs are the text in the files, joined as text.
- Rows are sorted by IID text; the gene axis is sorted gene names, or the order of --genes. The
  latent shape is the most common one (ties: the first by IID). Splits: `assign_split`, whole
  families together with --kinship; --covariates adds a covariates array (`pipeline.covariates`).
- Existing store: same input fingerprints and options -> reused; else an error naming what changed,
  unless --overwrite. A directory that is not a genealign store is never replaced.
- Atomic: all is written in one held temp dir `.NAME.*.partial` (scratch/, store/), and store/ is
  renamed into place at the end. Disk: about twice the store while it runs.
- Memory does not grow with the number of genes. Parse: one task per gene CSV (on `workers` spawn
  processes, or THREADS threads with workers=1) writes its rows, sorted by IID, in the store dtype,
  to a scratch file, and its sorted IIDs beside it, while this thread appends the latents (np.load)
  to a scratch file per shape. Plan: gene IID lists loaded one at a time give the kept subjects,
  the drop reasons and each kept subject's row in every scratch file ((1 + G, N) int32, on disk).
  Copy: tasks of whole chunks gather their rows into a (T, G, D) buffer and write it through zarr.
"""

from __future__ import annotations

import errno
import os
import shutil
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.atomic import atomic_write_json, hold, recover_dir, remove_dead_temp_dirs, replace_dir, temp_dir_for
from pipeline.covariates import DEFAULT_KINSHIP_THRESHOLD, SideFiles, read_side_files
from pipeline.errors import GenealignError
from pipeline.sources import (
    DEFAULT_IID_COLUMN, LATENT_FILE_SUFFIX, editor_lines, embedding_width, existing_dir, gene_file_name,
    gene_names_in, latent_files_in, load_latent, no_pairs_message, parse_gene_list, read_gene_csv, read_header,
)
from pipeline.sources import fingerprints as input_fingerprints
from pipeline.store import (
    DEFAULT_SPLIT_FRACTIONS, FINGERPRINTS_NAME, REPORT_NAME, SPLIT_CODES, base_attrs,
    create_store_arrays, drop_kind, gene_not_found, open_store, read_json, split_fractions_valid, stale_reasons,
    store_attrs, store_summary,
)

DTYPES = ("float32", "float16")
THREADS = 2  # threads parsing CSVs with workers=1, and copying into the store in every case
COPY_TASK_BYTES = 32 << 20  # rows gathered per copy task (whole chunks, at least one)
GAP_ROWS = 64  # unwanted scratch rows read through rather than skipped with a second read


# ------------------------------------------------------------------------------------------ public API
@dataclass(frozen=True)
class IngestConfig:
    """What `ingest` reads and writes. workers > 1 starts spawn processes, so a script calling
    `ingest` with workers > 1 needs the usual `if __name__ == "__main__":` guard (the CLI has it)."""

    gene_embedding_dir: Path
    brain_latent_dir: Path
    store: Path
    iid_column: str = DEFAULT_IID_COLUMN
    latent_key: str | None = None
    dtype: str = "float32"
    genes: tuple[str, ...] | None = None  # None: every gene CSV, sorted by name; else this order
    workers: int = 1  # processes parsing CSVs; 1 = this process, on THREADS threads
    overwrite: bool = False
    split_fractions: tuple[float, float, float] = DEFAULT_SPLIT_FRACTIONS
    covariates: Path | None = None  # CSV/TSV of covariates keyed by iid_column (pipeline.covariates)
    categorical: tuple[str, ...] = ()  # covariate columns one-hot encoded even when numeric
    kinship: Path | None = None  # ukb_rel.dat-style pairs: families are kept in one split
    kinship_threshold: float = DEFAULT_KINSHIP_THRESHOLD


@dataclass
class IngestResult:
    """What `ingest` did (or found already done: reused=True); the CLI prints it."""

    store: Path
    reused: bool
    n_kept: int
    n_genes: int
    latent_shape: tuple[int, ...]
    found: dict[str, int]  # subject counts per side, e.g. "latent files", "IIDs in every gene CSV"
    dropped_by_reason: dict[str, int]
    dropped: list[tuple[str, str]]  # (iid, reason)
    seconds: float
    gene_names: tuple[str, ...] = ()
    dtype: str = "float32"
    split_counts: dict[str, int] = field(default_factory=dict)
    relatedness: dict = field(default_factory=dict)  # pipeline.covariates.family_split's record
    covariate_names: tuple[str, ...] = ()

    @property
    def dropped_by_kind(self) -> dict[str, int]:
        """`dropped_by_reason` with gene names folded ("missing from gene X" -> "missing from a gene
        CSV"): one line per kind for a summary table, however many genes there are."""
        kinds: Counter = Counter()
        for reason, count in self.dropped_by_reason.items():
            kinds[drop_kind(reason)] += count
        return dict(kinds.most_common())


def get_all_gene_names(gene_embedding_dir: str | Path) -> list[str]:
    """Sorted names of the genes with a `{GENE}_brain_gene_embeddingUKB.csv` in the directory."""
    return gene_names_in(existing_dir(gene_embedding_dir, "--gene_embedding_dir", "Gene embedding"))


def ingest(config: IngestConfig) -> IngestResult:
    """CSVs + npz -> the store at `config.store` (see the module docstring for what is decided)."""
    started = time.perf_counter()
    options = _validated_options(config)
    store = Path(config.store)
    sources = _scan_sources(config)
    sources.side = read_side_files(config.covariates, config.categorical, config.iid_column, config.kinship,
                                   config.kinship_threshold)
    options.update(sources.side.options(), gene_names=list(sources.gene_names))
    fingerprints = input_fingerprints(sources.gene_dir, sources.latent_dir, sources.gene_paths, sources.latents)
    existing = _existing_store(store, options, fingerprints, config.overwrite)
    if existing is not None:
        existing.seconds = time.perf_counter() - started
        return existing
    remove_dead_temp_dirs(store, "scratch")
    work = temp_dir_for(store)
    lock = hold(work)
    try:
        (work / "scratch").mkdir()
        plan, split_counts, dropped_by_reason, extra = _build(sources, options, fingerprints, work, int(config.workers))
        replace_dir(work / "store", store)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise GenealignError(
                f"{store.parent}: no space left on the device ({exc.strerror}); free some space or put the store "
                "on another disk (an ingest needs about twice the store's size free while it runs)."
            ) from exc
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
        os.close(lock)
    return IngestResult(
        store=store, reused=False, n_kept=plan.n_kept, n_genes=len(sources.gene_names),
        latent_shape=plan.latent_shape, found=plan.found, dropped_by_reason=dropped_by_reason,
        dropped=[(entry["iid"], entry["reason"]) for entry in plan.dropped],
        seconds=time.perf_counter() - started, gene_names=tuple(sources.gene_names), dtype=options["dtype"],
        split_counts=split_counts, relatedness=extra["relatedness"],
        covariate_names=tuple((extra["covariates"] or {}).get("columns", ())),
    )


def _build(sources, options: dict, fingerprints: dict, work: Path, workers: int):
    """Parse into work/scratch, plan, then write work/store whole. Returns (plan, split counts, drops,
    the side files' record)."""
    if workers > 1:
        import multiprocessing

        # spawn, not fork: zarr 3 runs an event-loop thread that a forked child would inherit.
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
    else:
        pool = ThreadPoolExecutor(max_workers=THREADS)
    try:
        results, latents = _parse_sources(sources, options, work / "scratch", pool)
    finally:  # waits for running tasks: none may write into the scratch once it is gone
        pool.shutdown(wait=True, cancel_futures=True)
    plan = _plan(sources, results, latents, work / "scratch")
    group = create_store_arrays(
        work / "store", plan.n_kept, plan.latent_shape, len(sources.gene_names), sources.width, dtype=options["dtype"]
    )
    split, extra = sources.side.write(group, plan.kept_iids, plan.covariate_rows, options["split_fractions"])
    group["iid"][:] = plan.kept_iids
    group["gene_names"][:] = np.asarray(sources.gene_names, dtype=str)
    group["split"][:] = split
    _copy(plan, group)
    split_counts = {name: int(np.sum(split == code)) for name, code in SPLIT_CODES.items()}
    dropped_by_reason = dict(Counter(entry["reason"] for entry in plan.dropped))
    attrs = base_attrs(plan.n_kept, plan.latent_shape, len(sources.gene_names), sources.width, options["dtype"],
                       options["split_fractions"])
    attrs.update(
        sources={"gene_embedding_dir": str(sources.gene_dir), "brain_latent_dir": str(sources.latent_dir)},
        fingerprints={"digest": fingerprints["digest"], "gene_files": fingerprints["gene_files"],
                      "latent_files": {"count": len(sources.latent_iids), "sha256": fingerprints["latent_digest"]}},
        ingest={"options": options, "digest": fingerprints["digest"]},
        counts={"kept": plan.n_kept, "dropped": len(plan.dropped), "found": plan.found, "split": split_counts,
                "dropped_by_reason": dropped_by_reason},
        relatedness=extra["relatedness"], covariate_groups=(extra["covariates"] or {}).get("groups", {}),
    )
    group.attrs.update(attrs)
    atomic_write_json(work / "store" / REPORT_NAME, {
        "kept": plan.n_kept, "found": plan.found, "rows_per_gene": plan.rows_per_gene,
        "dropped_by_reason": dropped_by_reason, "dropped": plan.dropped, **extra,
    })
    atomic_write_json(work / "store" / FINGERPRINTS_NAME,
                      {"gene_files": fingerprints["gene_files"], "latent_files": fingerprints["latent_files"]})
    return plan, split_counts, dropped_by_reason, extra


# --------------------------------------------------------------------------------------------- sources
@dataclass
class _Sources:
    gene_dir: Path  # absolute
    latent_dir: Path  # absolute
    gene_names: list[str]  # the store's gene axis order
    gene_paths: list[Path]
    gene_columns: list[list[str]]  # each CSV's header
    width: int  # D, the embedding width shared by every gene CSV
    latents: list[tuple[str, int, int]]  # (IID, size, mtime_ns) per latent file, sorted by IID
    latent_iids: np.ndarray  # (L,) str, the same order
    side: SideFiles = field(default_factory=SideFiles)  # --covariates / --kinship


def _validated_options(config: IngestConfig) -> dict:
    if config.dtype not in DTYPES:
        raise GenealignError(f"Unknown --dtype '{config.dtype}': use float32 or float16.")
    if int(config.workers) < 1:
        raise GenealignError(f"--workers must be at least 1 (got {config.workers}).")
    if not config.iid_column:
        raise GenealignError("--iid_column must not be empty.")
    return {"iid_column": config.iid_column, "latent_key": config.latent_key, "dtype": config.dtype,
            "split_fractions": list(split_fractions_valid(config.split_fractions))}


def _scan_sources(config: IngestConfig) -> _Sources:
    gene_dir = existing_dir(config.gene_embedding_dir, "--gene_embedding_dir", "Gene embedding")
    latent_dir = existing_dir(config.brain_latent_dir, "--brain_latent_dir", "Brain latent")
    available = gene_names_in(gene_dir)
    requested = parse_gene_list(config.genes, None) if isinstance(config.genes, str) else config.genes
    known = set(available)
    for name in requested or ():
        if name not in known:
            raise gene_not_found(name, available, str(gene_dir), f"`ls {gene_dir}`")
    gene_names = available if requested is None else list(dict.fromkeys(requested))
    gene_paths = [gene_dir / gene_file_name(name) for name in gene_names]
    gene_columns = [read_header(path) for path in gene_paths]
    width = embedding_width(gene_paths, gene_columns, config.iid_column)
    latents = latent_files_in(latent_dir)
    return _Sources(
        gene_dir=gene_dir, latent_dir=latent_dir, gene_names=gene_names, gene_paths=gene_paths,
        gene_columns=gene_columns, width=width, latents=latents,
        latent_iids=np.array([iid for iid, _, _ in latents], dtype=str),
    )


# ---------------------------------------------------------------------------------- fingerprints/reuse
def _existing_store(store: Path, options: dict, fingerprints: dict, overwrite: bool) -> IngestResult | None:
    """The result of the previous ingest when `store` is up to date; None when it must be (re)built;
    an error when it is out of date and --overwrite was not given, or is not a store at all."""
    recover_dir(store)
    if not store.exists() or (store.is_dir() and not any(store.iterdir())):
        return None
    attrs = store_attrs(store)
    if attrs is None:
        raise GenealignError(
            f"{store} exists and is not a genealign store; refusing to replace it. Choose another --store path."
        )
    if overwrite:
        return None
    changes = stale_reasons(store, attrs, options, fingerprints)
    if changes:
        raise GenealignError(
            f"Store {store} is out of date ({'; '.join(changes)}); pass --overwrite to rebuild it "
            "(existing subjects keep their split), or choose another --store path."
        )
    report, counts, view = read_json(store / REPORT_NAME) or {}, attrs.get("counts", {}), open_store(store)
    return IngestResult(
        store=store, reused=True, n_kept=int(attrs.get("n_subjects", 0)), n_genes=int(attrs.get("n_genes", 0)),
        latent_shape=tuple(attrs.get("latent_shape", ())), found=dict(report.get("found", counts.get("found", {}))),
        dropped_by_reason=dict(report.get("dropped_by_reason", {})),
        dropped=[(entry["iid"], entry["reason"]) for entry in report.get("dropped", [])], seconds=0.0,
        gene_names=view.gene_names, dtype=str(attrs.get("dtype")), split_counts=dict(counts.get("split", {})),
        relatedness=view.relatedness, covariate_names=view.covariate_names,
    )


# ------------------------------------------------------------------------------------------------ parse
@dataclass(frozen=True)
class _GeneTask:
    index: int
    path: Path
    columns: list[str]
    iid_column: str
    dtype: str
    values: Path  # (n, D) raw, store dtype, rows sorted by IID
    iids: Path  # (n,) .npy, sorted


def _parse_gene_csv(task: _GeneTask) -> dict:
    """Worker entry point: one CSV into scratch. A user's error comes back as text (always picklable)."""
    try:
        iids, values = read_gene_csv(task.path, task.columns, task.iid_column, task.dtype)
    except GenealignError as exc:
        return {"error": str(exc)}
    order = np.argsort(iids, kind="stable")
    sorted_iids = iids[order]
    duplicate = np.flatnonzero(sorted_iids[1:] == sorted_iids[:-1])
    if duplicate.size:
        iid = sorted_iids[duplicate[0]]
        first, second = editor_lines(task.path, np.flatnonzero(iids == iid)[:2])
        return {"error": f"{task.path}: {task.iid_column} '{iid}' appears twice, on lines {first} and {second}; "
                         "each subject needs exactly one row per gene CSV."}
    finite = np.isfinite(values).all(axis=1)  # (n,)
    np.take(values, order, axis=0).astype(task.dtype, copy=False).tofile(task.values)
    np.save(task.iids, sorted_iids)
    return {"n_rows": len(iids), "nonfinite": sorted_iids[~finite[order]].tolist()}


@dataclass
class _Latents:
    """Per latent file (sorted by IID): its shape (None: unusable) and why not; per shape the scratch
    file of those latents' values (store dtype, in IID order) and their indices."""

    shapes: list[tuple[int, ...] | None] = field(default_factory=list)
    problems: list[tuple[str, str] | None] = field(default_factory=list)
    files: dict[tuple[int, ...], Path] = field(default_factory=dict)
    members: dict[tuple[int, ...], list[int]] = field(default_factory=dict)


def _read_latents(sources: _Sources, options: dict, scratch: Path) -> _Latents:
    latents, handles = _Latents(), {}
    try:
        for index, iid in enumerate(sources.latent_iids.tolist()):
            array, problem = load_latent(sources.latent_dir / f"{iid}{LATENT_FILE_SUFFIX}", options["latent_key"],
                                         options["dtype"])
            shape = None if array is None else tuple(int(s) for s in array.shape)
            latents.shapes.append(shape)
            latents.problems.append(problem)
            if shape is None:
                continue
            if shape not in handles:
                latents.files[shape] = scratch / f"latent{len(handles):03d}.bin"
                latents.members[shape] = []
                handles[shape] = open(latents.files[shape], "wb", buffering=4 << 20)
            handles[shape].write(np.ascontiguousarray(array, dtype=options["dtype"]).data)
            latents.members[shape].append(index)
    finally:
        for handle in handles.values():
            handle.close()
    return latents


def _parse_sources(sources: _Sources, options: dict, scratch: Path, pool) -> tuple[list[dict], _Latents]:
    """The CSVs on the pool while this thread reads the latents. Errors: the latents' first, then the
    first failing CSV in gene order (whichever finished first)."""
    tasks = [_GeneTask(index, path, columns, options["iid_column"], options["dtype"],
                       scratch / f"gene{index:05d}.bin", scratch / f"gene{index:05d}.iid.npy")
             for index, (path, columns) in enumerate(zip(sources.gene_paths, sources.gene_columns))]
    futures = [pool.submit(_parse_gene_csv, task) for task in tasks]
    latents = _read_latents(sources, options, scratch)
    results = []
    for task, future in zip(tasks, futures):
        result = future.result()
        if "error" in result:
            raise GenealignError(result["error"])
        results.append({**result, "values": task.values, "iids": task.iids})
    return results, latents


# ------------------------------------------------------------------------------------------------- plan
@dataclass
class _Plan:
    kept_iids: np.ndarray  # (N,) str, sorted
    latent_shape: tuple[int, ...]
    files: list[Path]  # the latents' scratch file, then one per gene
    positions: Path  # (1 + G, N) int32: row of each kept subject in each of `files`
    covariate_rows: np.ndarray  # (N,) row of each kept subject in the covariates table (-1: none given)
    dropped: list[dict]
    found: dict[str, int]
    rows_per_gene: dict[str, int]

    @property
    def n_kept(self) -> int:
        return int(len(self.kept_iids))


def _sorted_member(haystack: np.ndarray, needles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(found mask, position) of each needle in the sorted unique `haystack`."""
    if len(haystack) == 0:
        return np.zeros(len(needles), dtype=bool), np.zeros(len(needles), dtype=np.int64)
    pos = np.minimum(np.searchsorted(haystack, needles), len(haystack) - 1)
    return haystack[pos] == needles, pos


def _join(results: list[dict], latent_iids: np.ndarray):
    """Every IID seen anywhere (sorted) and per IID: in how many gene CSVs, the first gene it is
    missing from and the first with a NaN row (-1: none). One gene IID list in memory at a time."""
    universe = latent_iids
    for result in results:
        gene_iids = np.load(result["iids"])
        new = ~_sorted_member(universe, gene_iids)[0]
        if new.any():
            universe = np.union1d(universe, gene_iids[new])
    n_present = np.zeros(len(universe), dtype=np.int32)
    first_missing = np.full(len(universe), -1, dtype=np.int32)
    first_nonfinite = np.full(len(universe), -1, dtype=np.int32)
    for index, result in enumerate(results):
        present = _sorted_member(np.load(result["iids"]), universe)[0]
        n_present += present
        first_missing[~present & (first_missing < 0)] = index
        if result["nonfinite"]:
            bad = _sorted_member(np.sort(np.asarray(result["nonfinite"], dtype=str)), universe)[0]
            first_nonfinite[bad & (first_nonfinite < 0)] = index
    return universe, n_present, first_missing, first_nonfinite


def _plan(sources: _Sources, results: list[dict], latents: _Latents, scratch: Path) -> _Plan:
    n_genes = len(sources.gene_names)
    # The most common shape wins; ties go to the shape met first (smallest IID).
    latent_shape = max(latents.members, key=lambda s: (len(latents.members[s]), -latents.members[s][0]), default=None)
    universe, n_present, first_missing, first_nonfinite = _join(results, sources.latent_iids)
    has_latent, latent_index = _sorted_member(sources.latent_iids, universe)
    shape_ok = np.array([shape == latent_shape for shape in latents.shapes], dtype=bool)  # (L,)
    latent_ok = has_latent & shape_ok[latent_index]
    covariate_rows, side_reasons = sources.side.reasons(universe)
    kept = latent_ok & (n_present == n_genes) & (first_nonfinite < 0) & np.array([r is None for r in side_reasons])
    dropped = []
    for u in np.flatnonzero(~kept).tolist():
        i = int(latent_index[u])
        if has_latent[u] and not latent_ok[u]:
            reason, detail = latents.problems[i] or ("latent of wrong shape", f"{latents.shapes[i]} != {latent_shape}")
        elif not has_latent[u]:
            reason, detail = "no latent", ""
        elif n_present[u] == 0:
            reason, detail = "in no gene CSV", ""
        elif n_present[u] < n_genes:
            reason = f"missing from gene {sources.gene_names[first_missing[u]]}"
            detail = f"missing from {n_genes - n_present[u]} of {n_genes} genes"
        elif first_nonfinite[u] >= 0:
            reason, detail = f"NaN or inf in gene {sources.gene_names[first_nonfinite[u]]}", ""
        else:
            reason, detail = side_reasons[u], ""
        dropped.append({"iid": str(universe[u]), "reason": reason, "detail": detail})
    found = {
        "latent files": int(len(sources.latent_iids)),
        "usable latents": len(latents.members.get(latent_shape, [])),
        "IIDs in any gene CSV": int((n_present > 0).sum()),
        "IIDs in every gene CSV": int((n_present == n_genes).sum()),
    }
    if sources.side.covariates is not None:
        found["IIDs in covariates file"] = int(len(sources.side.covariates.iids))
    if not kept.any():
        raise GenealignError(no_pairs_message(universe, has_latent, n_present, n_genes, dropped, found))
    kept_iids = universe[kept]
    positions = scratch / "positions.i32"
    with open(positions, "wb") as fh:
        members = np.asarray(latents.members[latent_shape], dtype=np.int64)
        np.searchsorted(members, latent_index[kept]).astype(np.int32).tofile(fh)
        for result in results:
            np.searchsorted(np.load(result["iids"]), kept_iids).astype(np.int32).tofile(fh)
    return _Plan(
        kept_iids=kept_iids, latent_shape=latent_shape, files=[latents.files[latent_shape]] + [r["values"] for r in results],
        positions=positions, covariate_rows=covariate_rows[kept], dropped=dropped, found=found,
        rows_per_gene={name: int(r["n_rows"]) for name, r in zip(sources.gene_names, results)},
    )


# ------------------------------------------------------------------------------------------------- copy
def _copy(plan: _Plan, group) -> None:
    """The store's neuro and genes, a task of whole chunks at a time on THREADS threads: each gathers
    its rows from every scratch file, then writes its chunks whole through zarr."""
    # Every chunk is written as it is: by default zarr first compares each chunk with the fill value
    # (another pass over the data, which only pays for sparse arrays). A runtime setting, so it goes
    # on the arrays written here, not into the store's metadata.
    neuro, genes = (group[name].with_config({"write_empty_chunks": True}) for name in ("neuro", "genes"))
    chunk_rows, n_genes, dim = int(genes.chunks[0]), int(genes.shape[1]), int(genes.shape[2])
    width = int(np.prod(plan.latent_shape))
    dtype = np.dtype(genes.dtype)
    step = chunk_rows * max(1, COPY_TASK_BYTES // (chunk_rows * (width + n_genes * dim) * dtype.itemsize))

    def copy_rows(lo: int) -> None:
        hi = min(plan.n_kept, lo + step)
        block_neuro = np.empty((hi - lo, width), dtype)  # (T, V)
        block_genes = np.empty((hi - lo, n_genes, dim), dtype)  # (T, G, D)
        for t, path in enumerate(plan.files):
            rows = np.fromfile(plan.positions, np.int32, count=hi - lo, offset=(t * plan.n_kept + lo) * 4)
            _read_rows(path, rows.astype(np.int64), block_neuro if t == 0 else block_genes[:, t - 1])
        neuro[lo:hi] = block_neuro.reshape(hi - lo, *plan.latent_shape)
        genes[lo:hi] = block_genes

    with ThreadPoolExecutor(max_workers=THREADS) as pool:
        for _ in pool.map(copy_rows, range(0, plan.n_kept, step)):
            pass


def _read_rows(path: Path, positions: np.ndarray, out: np.ndarray) -> None:
    """Rows `positions` (increasing) of a raw (rows, width) scratch file into `out` (len, width):
    one read per run of wanted rows fewer than GAP_ROWS apart."""
    width = out.shape[1]
    breaks = (np.flatnonzero(np.diff(positions) > GAP_ROWS) + 1).tolist()
    for a, b in zip([0, *breaks], [*breaks, len(positions)]):
        first, last = int(positions[a]), int(positions[b - 1])
        rows = np.fromfile(path, out.dtype, count=(last - first + 1) * width, offset=first * width * out.dtype.itemsize)
        rows = rows.reshape(-1, width)  # (span, width)
        out[a:b] = rows if len(rows) == b - a else rows[positions[a:b] - first]


__all__ = ["IngestConfig", "IngestResult", "ingest", "get_all_gene_names", "parse_gene_list", "store_summary"]
