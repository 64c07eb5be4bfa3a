"""One-shot ingest: the gene CSVs and the npz latents -> one subject-aligned Zarr store.

Owns `IngestConfig`, `ingest()`, `IngestResult`, `get_all_gene_names`, `parse_gene_list` and
`store_summary` (what `genealign info` prints). The store layout is `pipeline/store.py`'s.

Decisions
- Subjects: kept when they have a usable latent and a finite row in every selected gene CSV. Every
  other IID seen on either side is listed with one reason in `ingest_report.json` inside the store
  (the first that applies: unreadable latent / NaN or inf in latent / latent of wrong shape / no
  latent / in no gene CSV / missing from gene X / NaN or inf in gene X; an empty or "NA" cell is a
  NaN). IIDs are the text in the files (read with dtype=str, never via float), so "0012345" and
  "12345" are different subjects.
- Rows are sorted by IID text; the gene axis is sorted gene names, or the order the user gave with
  --genes / --genes_file. Split codes come from `assign_split` (a hash of the IID), so adding
  subjects never moves an existing one.
- Latent array: --latent_key if given, else `latent`, else the only array; several arrays and none
  named `latent` (or a missing --latent_key) is an error. The latent shape is the most common one
  (ties: the first by IID); other shapes and unreadable files are dropped with their reason.
- Existing store: same inputs (fingerprints: size + mtime_ns of every file, plus a SHA-256 of the
  first 64 KiB of each gene CSV) and same options -> reused, a quick no-op. Different inputs or
  options -> an error naming what changed and asking for --overwrite: a store silently rebuilt
  under a running job or a checkpoint could change its rows. --overwrite never replaces a
  directory that is not a genealign store.
- Atomic: everything is written into temporary siblings of the store (`.NAME.*.partial` for the
  store, `.NAME.*.scratch` for scratch) and renamed into place at the end (`replace_dir`). A killed
  ingest leaves the previous store intact; the next ingest removes its leftovers once their owner
  process is gone. Disk: the scratch is about one store's size and shrinks as the store is written.
- I/O: through the page cache by default: the copy reads the scratch back from memory and the store's
  pages reuse the scratch's as it is truncated. `direct_io=True` writes the scratch and the
  store, and reads the scratch, with O_DIRECT instead (`pipeline/direct_io.py` says when that pays).

How memory stays bounded (peak RSS does not grow with the number of genes)
1. Parse: the main thread reads every latent once, checks it and appends it to a scratch table per
   latent shape. One task per gene CSV parses it (IID as str, values as float32), sorts its rows by
   IID and writes the values, in the store dtype, to a scratch table (one file per table), its
   sorted IIDs after them. The tasks run meanwhile on `workers` spawn processes, or with
   workers=1 on two threads of this process (pandas' parse, numpy and file writes release the GIL,
   and plain npz latents are read without zipfile, so the threads overlap). Only a task's current
   CSV is in memory: one per worker process, two with workers=1.
2. Plan: the gene IID lists are loaded one at a time to find the kept subjects, each dropped one's
   reason, and the row of every kept subject in every table (a (1 + G, N) int32 positions file),
   comparing IIDs as integer keys where they fit (`_iid_keys`). Memory O(subjects).
3. Copy: chunks hold whole subjects ((c, G, D) with c from `chunk_rows_for`, about 8 MiB). A task
   of COPY_TASK_CHUNKS chunks (T subjects) reads each table's rows for them in one or two reads
   (tables are sorted by IID like the store) into a (T, G, D) buffer, then writes its chunks whole:
   no read-modify-write. Tasks go to the same workers or threads, one buffer each (~33 MiB), last
   chunk first; as they complete, the main thread truncates each table after the last row a
   remaining task reads.

Compression, measured by `benchmarks/ingest.py --compressors` (2,000 subjects x 111 genes x 256 +
(3, 15, 18, 15) latents, float32 values of a `pipeline.synth` cohort, chunks of 51 subjects, local
ext4 on the 2-core development VM; GB/s of raw data):

    compressor    write GB/s  read GB/s  size ratio
    none               0.35       3.22       0.980
    blosc-lz4          0.31       1.84       1.071
    blosc-zstd1        0.24       0.59       1.091
    blosc-zstd5        0.10       1.23       1.154

Dense float embeddings and latents barely compress (7-15% smaller) while every compressor at least
halves the read speed, so the store is uncompressed: nothing to decode on the loader's hot path.
"""

from __future__ import annotations

import csv
import difflib
import gc
import hashlib
import json
import os
import shutil
import socket
import struct
import tempfile
import time
import zlib
from collections import Counter, defaultdict
from contextlib import contextmanager
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.atomic import atomic_write_json, recover_dir, replace_dir, temp_dir_for
from pipeline.direct_io import aligned_empty, probe_alignment, read_range, staging_bytes, write_file
from pipeline.errors import GenealignError, GeneNotFoundError
from pipeline.sources import (
    DEFAULT_IID_COLUMN,
    DEFAULT_LATENT_KEY,
    GENE_FILE_SUFFIX,
    LATENT_FILE_SUFFIX,
    gene_file_name,
)
from pipeline.store import (
    DEFAULT_SPLIT_FRACTIONS,
    REPORT_NAME,
    SCHEMA_VERSION,
    SPLIT_CODES,
    assign_split,
    base_attrs,
    create_store_arrays,
    split_fractions_valid,
)

DTYPES = ("float32", "float16")
FLOAT16_MAX = float(np.finfo(np.float16).max)
FINGERPRINTS_NAME = "fingerprints.json"
OWNER_NAME = ".genealign-ingest-owner"
HEAD_BYTES = 64 << 10
# workers=1: this process parses two CSVs at a time on threads, and copies on them too. pandas'
# index_col parse runs on the calling thread and mostly without the GIL (12 CSVs measured 1.17 s on
# one thread, 0.70 s on two; a plain read_csv already splits a file over pandas' own threads), as do
# preads, numpy copies and file writes. Two: two CSVs in memory at most; three measured no faster.
THREADS = 2
# The strings pandas reads as NaN by default: such a cell drops the subject ("NaN or inf in gene X").
_NA_STRINGS = frozenset(
    ["", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
     "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"]
)


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
    workers: int = 1  # processes parsing CSVs and copying; 1 = this process, on two threads
    overwrite: bool = False
    # Scratch and store files written (and the scratch read) with O_DIRECT where the filesystem takes
    # it, instead of through the page cache: see `pipeline/direct_io.py` for when that pays. Either
    # way the same bytes.
    direct_io: bool = False
    split_fractions: tuple[float, float, float] = DEFAULT_SPLIT_FRACTIONS


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
    phase_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def dropped_by_kind(self) -> dict[str, int]:
        """`dropped_by_reason` with gene names folded ("missing from gene X" -> "missing from a gene
        CSV"): one line per kind for a summary table, however many genes there are."""
        kinds: Counter = Counter()
        for reason, count in self.dropped_by_reason.items():
            for prefix in ("missing from gene ", "NaN or inf in gene "):
                if reason.startswith(prefix):
                    reason = prefix.replace("gene ", "a gene CSV")
            kinds[reason] += count
        return dict(kinds.most_common())


def get_all_gene_names(gene_embedding_dir: str | Path) -> list[str]:
    """Sorted names of the genes with a `{GENE}_brain_gene_embeddingUKB.csv` in the directory."""
    directory = _existing_dir(gene_embedding_dir, "--gene_embedding_dir", "Gene embedding")
    names = sorted(
        entry.name[: -len(GENE_FILE_SUFFIX)]
        for entry in os.scandir(directory)
        if entry.name.endswith(GENE_FILE_SUFFIX) and entry.is_file()
    )
    if not names:
        raise GenealignError(
            f"No gene embedding files found in {directory}: expected files named "
            f"{{GENE}}{GENE_FILE_SUFFIX} (e.g. {gene_file_name('APOE')}); check --gene_embedding_dir."
        )
    return names


def parse_gene_list(genes: str | None, genes_file: str | Path | None) -> tuple[str, ...] | None:
    """--genes "APOE,BDNF" or --genes_file (one per line or comma separated, '#' starts a comment)
    -> the names in the given order, duplicates removed; None when neither is given (all genes)."""
    if genes is not None and genes_file is not None:
        raise GenealignError("Pass either --genes or --genes_file, not both.")
    if genes is None and genes_file is None:
        return None
    if genes_file is not None:
        path = Path(genes_file)
        if not path.is_file():
            raise GenealignError(f"Genes file {path} does not exist (--genes_file).")
        text, where = path.read_text(), f"genes file {path}"
    else:
        text, where = genes, "--genes"
    names = []
    for line in text.splitlines():
        line = line.split("#", 1)[0]
        names.extend(name.strip() for name in line.split(","))
    names = tuple(dict.fromkeys(name for name in names if name))
    if not names:
        raise GenealignError(f"No gene names in {where}: give names like APOE,BDNF.")
    return names


def ingest(config: IngestConfig) -> IngestResult:
    """CSVs + npz -> the store at `config.store` (see the module docstring for what is decided)."""
    started = time.perf_counter()
    phases: dict[str, float] = {}
    tick = time.perf_counter()
    options = _validated_options(config)
    store = Path(config.store)
    sources = _scan_sources(config)
    options["gene_names"] = list(sources.gene_names)
    fingerprints = _fingerprints(sources)
    existing = _existing_store(store, options, fingerprints, config.overwrite)
    if existing is not None:
        existing.seconds = time.perf_counter() - started
        return existing
    _remove_stale_temp_dirs(store)
    phases["scan"] = time.perf_counter() - tick

    store.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{store.name}.", suffix=".scratch", dir=store.parent))
    _write_owner(scratch)
    align = probe_alignment(scratch) if config.direct_io else 0
    tmp: Path | None = None
    pool = None
    try:
        if config.workers > 1:
            import multiprocessing

            # spawn, not fork: zarr 3 runs an event-loop thread that a forked child would inherit.
            pool = ProcessPoolExecutor(
                max_workers=config.workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker
            )
        else:
            pool = ThreadPoolExecutor(max_workers=THREADS)
        tick = time.perf_counter()
        with _collector_paused():
            gene_tasks, gene_results, latents = _parse_sources(sources, options, scratch, pool, align)
        phases["parse"] = time.perf_counter() - tick

        tick = time.perf_counter()
        plan = _plan(sources, gene_tasks, gene_results, latents, scratch)
        phases["plan"] = time.perf_counter() - tick

        tick = time.perf_counter()
        tmp = temp_dir_for(store)
        group = create_store_arrays(
            tmp, plan.n_kept, plan.latent_shape, len(sources.gene_names), sources.width, dtype=options["dtype"]
        )
        _write_owner(tmp)
        split = assign_split(plan.kept_iids, options["split_fractions"])
        group["iid"][:] = plan.kept_iids
        group["gene_names"][:] = np.asarray(sources.gene_names, dtype=str)
        group["split"][:] = split
        _copy_all(plan, tmp, group, pool, align)
        phases["copy"] = time.perf_counter() - tick

        tick = time.perf_counter()
        split_counts, dropped_by_reason = _write_metadata(group, tmp, plan, split, sources, options, fingerprints)
        (tmp / OWNER_NAME).unlink()
        replace_dir(tmp, store)
        tmp = None
        phases["finalize"] = time.perf_counter() - tick
    finally:
        if pool is not None:  # waits for running tasks: none may write into the scratch once it is gone
            pool.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(scratch, ignore_errors=True)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    return IngestResult(
        store=store,
        reused=False,
        n_kept=plan.n_kept,
        n_genes=len(sources.gene_names),
        latent_shape=plan.latent_shape,
        found=plan.found,
        dropped_by_reason=dropped_by_reason,
        dropped=[(entry["iid"], entry["reason"]) for entry in plan.dropped],
        seconds=time.perf_counter() - started,
        gene_names=tuple(sources.gene_names),
        dtype=options["dtype"],
        split_counts=split_counts,
        phase_seconds=phases,
    )


def _write_metadata(group, tmp: Path, plan, split, sources, options: dict, fingerprints: dict) -> tuple[dict, dict]:
    """Group attributes, `ingest_report.json` and `fingerprints.json` of the store being written."""
    split_counts = {name: int(np.sum(split == code)) for name, code in SPLIT_CODES.items()}
    dropped_by_reason = dict(Counter(entry["reason"] for entry in plan.dropped))
    attrs = base_attrs(
        plan.n_kept, plan.latent_shape, len(sources.gene_names), sources.width, options["dtype"],
        options["split_fractions"],
    )
    attrs.update(
        sources={"gene_embedding_dir": str(sources.gene_dir), "brain_latent_dir": str(sources.latent_dir)},
        fingerprints={
            "digest": fingerprints["digest"],
            "gene_files": fingerprints["gene_files"],
            "latent_files": {"count": len(sources.latent_iids), "sha256": fingerprints["latent_digest"]},
        },
        ingest={"options": options, "digest": fingerprints["digest"]},
        counts={
            "kept": plan.n_kept, "dropped": len(plan.dropped), "found": plan.found, "split": split_counts,
            "dropped_by_reason": dropped_by_reason,
        },
    )
    group.attrs.update(attrs)
    atomic_write_json(
        tmp / REPORT_NAME,
        {
            "kept": plan.n_kept,
            "found": plan.found,
            "rows_per_gene": plan.rows_per_gene,
            "dropped_by_reason": dropped_by_reason,
            "dropped": plan.dropped,
        },
    )
    atomic_write_json(
        tmp / FINGERPRINTS_NAME,
        {"gene_files": fingerprints["gene_files"], "latent_files": fingerprints["latent_files"]},
    )
    return split_counts, dropped_by_reason


def store_summary(view) -> dict:
    """What `genealign info` prints about an opened store (`pipeline.open_store`)."""
    attrs = view.attrs
    counts = attrs.get("counts", {})
    report = view.report()
    size = _size_on_disk(view.path)
    compressors = getattr(view.genes, "compressors", ()) or ()
    return {
        "path": str(view.path),
        "subjects": view.n_subjects,
        "split": {name: int(np.sum(view.split == code)) for name, code in SPLIT_CODES.items()},
        "split_fractions": attrs.get("split_fractions"),
        "genes": view.n_genes,
        "gene_names": list(view.gene_names),
        "embedding_dim": view.embedding_dim,
        "latent_shape": list(view.latent_shape),
        "dtype": view.dtype,
        "chunk_rows": view.chunk_rows,
        "chunks": {"neuro": list(view.neuro.chunks), "genes": list(view.genes.chunks)},
        "compression": ", ".join(type(c).__name__ for c in compressors) or "none",
        "size_on_disk": _human_bytes(size),
        "sources": attrs.get("sources", {}),
        "found": counts.get("found", report.get("found", {})),
        "dropped": len(report.get("dropped", [])),
        "dropped_by_reason": report.get("dropped_by_reason", counts.get("dropped_by_reason", {})),
        "created": attrs.get("created"),
        "tool_version": attrs.get("tool_version"),
        "schema_version": attrs.get("schema_version"),
    }


# --------------------------------------------------------------------------------------------- sources
@dataclass
class _Sources:
    gene_dir: Path  # absolute
    latent_dir: Path  # absolute
    gene_names: list[str]  # the store's gene axis order
    gene_paths: list[Path]
    gene_columns: list[list[str]]  # each CSV's header
    width: int  # D, the embedding width shared by every gene CSV
    latent_iids: np.ndarray  # (L,) str, sorted
    latent_stats: list[tuple[int, int]]  # (size, mtime_ns) per latent, same order


@contextmanager
def _collector_paused():
    """Python's cyclic garbage collector off while CSVs are parsed on threads of this process, the
    objects alive before frozen out of its way. Each CSV's IID index is ~10,000 new str objects, so
    collections run often, and a full one walks every object pandas, numpy and zarr created; it holds
    the GIL throughout, stalling the other parse thread. The parse leaves no data in reference cycles
    (a collection after 30 CSVs found 328 small objects, no arrays). Measured on 10,000 x 111,
    workers=1, three alternating runs each: parse phase 7.0-7.1 s -> 6.3-6.6 s with direct I/O;
    through the page cache 6.1-6.4 s -> 5.9-6.4 s (paired differences -0.29 to +0.11 s: within the
    noise). The caller's collector state is restored afterwards."""
    if not gc.isenabled() or gc.get_freeze_count():  # someone else manages the collector: leave it be
        yield
        return
    gc.freeze()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.unfreeze()


def _init_worker() -> None:
    """Worker processes keep 64 MiB of freed heap instead of handing it back to the kernel. glibc
    trims the main thread's heap once a CSV's ~25 MB of arrays are freed and the next CSV faults them
    in again: ~6,000 page faults and 18-30 ms of kernel time per CSV, vs none and ~7 ms with the pad
    (workers=2 on 10,000 x 111: 8.8 s -> 8.0 s). Only in workers: this process belongs to its caller
    (its pool threads' heaps measured ~1,700 faults per CSV). Other C libraries: left as they are.
    The garbage collector is off in workers for their whole life, pandas' objects frozen first (see
    `_collector_paused`; workers=2 with direct I/O: parse phase 5.2-5.5 s -> 5.1-5.2 s, three runs
    each, worker RSS unchanged)."""
    import ctypes

    import pandas  # noqa: F401  imported before the freeze, so its objects are never walked

    m_top_pad = -2  # glibc's malloc.h
    try:
        ctypes.CDLL(None).mallopt(m_top_pad, 64 << 20)
    except (OSError, AttributeError):
        pass
    gc.freeze()
    gc.disable()


def _validated_options(config: IngestConfig) -> dict:
    if config.dtype not in DTYPES:
        raise GenealignError(f"Unknown --dtype '{config.dtype}': use float32 or float16.")
    if int(config.workers) < 1:
        raise GenealignError(f"--workers must be at least 1 (got {config.workers}).")
    if not config.iid_column:
        raise GenealignError("--iid_column must not be empty.")
    return {
        "iid_column": config.iid_column,
        "latent_key": config.latent_key,
        "dtype": config.dtype,
        "split_fractions": list(split_fractions_valid(config.split_fractions)),
    }


def _existing_dir(path, option: str, what: str) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise GenealignError(f"{what} directory {path} does not exist (check {option}).")
    if not path.is_dir():
        raise GenealignError(f"{what} directory {path} is not a directory (check {option}).")
    return path.resolve()


def _scan_sources(config: IngestConfig) -> _Sources:
    gene_dir = _existing_dir(config.gene_embedding_dir, "--gene_embedding_dir", "Gene embedding")
    latent_dir = _existing_dir(config.brain_latent_dir, "--brain_latent_dir", "Brain latent")
    available = get_all_gene_names(gene_dir)
    requested = config.genes
    if isinstance(requested, str):
        requested = parse_gene_list(requested, None)
    if requested is None:
        gene_names = available
    else:
        known = set(available)
        for name in requested:
            if name not in known:
                raise GeneNotFoundError(_gene_not_found(name, available, gene_dir))
        gene_names = list(dict.fromkeys(requested))

    gene_paths = [gene_dir / gene_file_name(name) for name in gene_names]
    gene_columns = [_read_header(path) for path in gene_paths]
    width = None
    for path, columns in zip(gene_paths, gene_columns):
        if config.iid_column not in columns:
            shown = ", ".join(columns[:6]) + (f", ... ({len(columns)} columns)" if len(columns) > 6 else "")
            raise GenealignError(
                f"{path}: no IID column '{config.iid_column}'; columns found: {shown}. "
                "Pass --iid_column with the name of the subject ID column."
            )
        n_values = len(columns) - 1
        if n_values < 1:
            raise GenealignError(
                f"{path}: only the IID column, no embedding columns; expected IID then one column per dimension."
            )
        if width is None:
            width, width_path = n_values, path
        elif n_values != width:
            raise GenealignError(
                f"Gene embedding widths differ: {width_path.name} has {width} value columns, {path.name} has "
                f"{n_values}; every gene CSV must have the same number of embedding columns."
            )

    latents = []
    for entry in os.scandir(latent_dir):
        if entry.name.endswith(LATENT_FILE_SUFFIX) and entry.is_file():
            stat = entry.stat()
            latents.append((entry.name[: -len(LATENT_FILE_SUFFIX)], stat.st_size, stat.st_mtime_ns))
    if not latents:
        raise GenealignError(
            f"No brain latent files found in {latent_dir}: expected files named {{IID}}{LATENT_FILE_SUFFIX}; "
            "check --brain_latent_dir."
        )
    latents.sort()
    return _Sources(
        gene_dir=gene_dir,
        latent_dir=latent_dir,
        gene_names=gene_names,
        gene_paths=gene_paths,
        gene_columns=gene_columns,
        width=int(width),
        latent_iids=np.array([iid for iid, _, _ in latents], dtype=str),
        latent_stats=[(size, mtime) for _, size, mtime in latents],
    )


def _gene_not_found(name: str, available: list[str], gene_dir: Path) -> str:
    same_case = [a for a in available if a.lower() == name.lower()]
    close = list(dict.fromkeys(same_case + difflib.get_close_matches(name, available, n=5, cutoff=0.6)))
    hint = f" Close matches: {', '.join(close)}." if close else ""
    return (
        f"Gene '{name}' not found in {gene_dir} ({len(available)} genes).{hint} List them all with "
        f"`genealign info --store STORE` after an ingest, or pipeline.ingest.get_all_gene_names('{gene_dir}')."
    )


def _read_header(path: Path) -> list[str]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            header = next(csv.reader(fh), None)
    except (OSError, UnicodeDecodeError) as exc:
        raise GenealignError(f"{path}: cannot read the header ({exc}).") from exc
    if not header:
        raise GenealignError(f"{path} is empty; expected a header line: IID then one column per dimension.")
    return header


# ---------------------------------------------------------------------------------- fingerprints/reuse
def _fingerprints(sources: _Sources) -> dict:
    """size + mtime_ns of every input file and a hash of each gene CSV's first 64 KiB (its header)."""
    gene_files = {}
    for path in sources.gene_paths:
        stat = path.stat()
        with open(path, "rb") as fh:
            head = hashlib.sha256(fh.read(HEAD_BYTES)).hexdigest()
        gene_files[path.name] = [stat.st_size, stat.st_mtime_ns, head]
    latent_files = {
        f"{iid}{LATENT_FILE_SUFFIX}": [size, mtime]
        for iid, (size, mtime) in zip(sources.latent_iids.tolist(), sources.latent_stats)
    }
    latent_digest = hashlib.sha256(json.dumps(latent_files).encode()).hexdigest()
    digest = hashlib.sha256(
        json.dumps({"sources": [str(sources.gene_dir), str(sources.latent_dir)], "genes": gene_files,
                    "latents": latent_digest}).encode()
    ).hexdigest()
    return {"gene_files": gene_files, "latent_files": latent_files, "latent_digest": latent_digest, "digest": digest}


def _existing_store(store: Path, options: dict, fingerprints: dict, overwrite: bool) -> IngestResult | None:
    """The result of the previous ingest when `store` is up to date; None when it must be (re)built;
    an error when it is out of date and --overwrite was not given, or is not a store at all."""
    recover_dir(store)
    if not store.exists():
        return None
    if store.is_dir() and not any(store.iterdir()):
        return None
    attrs = _store_attrs(store)
    if attrs is None:
        raise GenealignError(
            f"{store} exists and is not a genealign store; refusing to replace it. Choose another --store path."
        )
    if overwrite:
        return None
    previous = attrs.get("ingest", {})
    changes = []
    if attrs.get("schema_version") != SCHEMA_VERSION:
        changes.append(f"schema version {attrs.get('schema_version')} -> {SCHEMA_VERSION}")
    old_options = previous.get("options", {})
    for key, value in options.items():
        if previous and old_options.get(key) != value:
            changes.append(f"{key} {_shown(old_options.get(key))} -> {_shown(value)}")
    if not previous:
        changes.append("it was not written by `genealign ingest`")
    elif previous.get("digest") != fingerprints["digest"]:
        changes.append(_describe_input_changes(store, attrs, fingerprints))
    if changes:
        raise GenealignError(
            f"Store {store} is out of date ({'; '.join(changes)}); pass --overwrite to rebuild it "
            "(existing subjects keep their split), or choose another --store path."
        )
    report = _read_json(store / REPORT_NAME) or {}
    counts = attrs.get("counts", {})
    gene_names = _store_gene_names(store)
    return IngestResult(
        store=store,
        reused=True,
        n_kept=int(attrs.get("n_subjects", 0)),
        n_genes=int(attrs.get("n_genes", 0)),
        latent_shape=tuple(attrs.get("latent_shape", ())),
        found=dict(report.get("found", counts.get("found", {}))),
        dropped_by_reason=dict(report.get("dropped_by_reason", {})),
        dropped=[(entry["iid"], entry["reason"]) for entry in report.get("dropped", [])],
        seconds=0.0,
        gene_names=gene_names,
        dtype=str(attrs.get("dtype")),
        split_counts=dict(counts.get("split", {})),
    )


def _store_attrs(store: Path) -> dict | None:
    meta = _read_json(store / "zarr.json")
    if not meta or meta.get("attributes", {}).get("kind") != "genealign-store":
        return None
    return meta["attributes"]


def _store_gene_names(store: Path) -> tuple[str, ...]:
    try:
        from pipeline.store import open_store

        return open_store(store).gene_names
    except GenealignError:
        return ()


def _shown(value) -> str:
    if not isinstance(value, list):
        return str(value)
    return ",".join(str(v) for v in value[:4]) + (f",... ({len(value)})" if len(value) > 4 else "")


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _describe_input_changes(store: Path, attrs: dict, fingerprints: dict) -> str:
    previous = attrs.get("fingerprints", {})
    old_sources = attrs.get("sources", {})
    parts = []
    old_genes, new_genes = previous.get("gene_files", {}), fingerprints["gene_files"]
    added = sorted(set(new_genes) - set(old_genes))
    removed = sorted(set(old_genes) - set(new_genes))
    changed = sorted(n for n in set(old_genes) & set(new_genes) if old_genes[n] != new_genes[n])
    for label, names in (("gene files added", added), ("removed", removed), ("changed", changed)):
        if names:
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            parts.append(f"{label}: {shown}")
    old_latents = (_read_json(store / FINGERPRINTS_NAME) or {}).get("latent_files")
    new_latents = fingerprints["latent_files"]
    if old_latents is not None:
        n_added = len(set(new_latents) - set(old_latents))
        n_removed = len(set(old_latents) - set(new_latents))
        n_changed = sum(1 for n in set(old_latents) & set(new_latents) if old_latents[n] != new_latents[n])
        if n_added or n_removed or n_changed:
            parts.append(f"latent files: {n_added} added, {n_removed} removed, {n_changed} changed")
    elif previous.get("latent_files", {}).get("sha256") != fingerprints["latent_digest"]:
        parts.append("latent files changed")
    if not parts:
        parts.append(
            f"source directories were {old_sources.get('gene_embedding_dir')} and {old_sources.get('brain_latent_dir')}"
        )
    return "inputs changed: " + "; ".join(parts)


# ---------------------------------------------------------------------------------- temp dir hygiene
def _write_owner(directory: Path) -> None:
    (directory / OWNER_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))


def _remove_stale_temp_dirs(store: Path) -> None:
    """Remove temp dirs left by an ingest of this store that was killed (its process is gone)."""
    if not store.parent.exists():
        return
    for candidate in store.parent.glob(f".{store.name}.*"):
        if not (candidate.name.endswith(".partial") or candidate.name.endswith(".scratch")):
            continue
        owner = _read_json(candidate / OWNER_NAME)
        if not owner or owner.get("host") != socket.gethostname():
            continue
        if not _pid_alive(int(owner.get("pid", -1))):
            shutil.rmtree(candidate, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ------------------------------------------------------------------------------------ scratch tables
# A latent table is written a block at a time (latents come one by one); gene tables in one go.
SCRATCH_BLOCK_BYTES = 4 << 20
# Chunks per copy task: the scratch shrinks task by task, and ~1.5 ms of set-up per task is noise.
# A task reads ~T rows of each table at once (T = 4 x 51 = 204 KiB per gene at 10,000 x 111): direct
# reads of one chunk's ~50 KiB ran at a third of the disk's speed, 8 chunks measured no faster than 4.
COPY_TASK_CHUNKS = 4
# The copy frees a scratch table's bytes in steps of 2 MiB (the largest page-cache folio), kept aligned.
TRUNCATE_STEP = 2 << 20


@dataclass(frozen=True)
class _RowTable:
    """A raw (rows, width) scratch table in the store dtype: one file of consecutive blocks of
    `rows_per_block` rows, block b at byte b * block_stride (a multiple of the O_DIRECT alignment, so
    every block is written straight from memory; the rows themselves are contiguous when align is 0).
    One file per table, not a file per block: creating a file cost 0.3-0.7 ms of kernel time on the
    development VM (ext4 without a journal walks the inodes freed in the last minutes), 0.2-0.4 s
    for the ~450 block files of 10,000 x 111. The copy consumes the tables from their ends and
    truncates them as it goes (`truncate_after`), so the scratch shrinks while the store grows
    (temporary disk ~ one store, not two) and its page cache is freed early, dirty pages dropped
    rather than written back."""

    path: Path
    width: int
    dtype: str
    rows_per_block: int  # fixed at creation, so the writer and every reader agree
    align: int  # O_DIRECT alignment of the scratch directory; 0 = through the page cache (`direct_io`)

    @classmethod
    def create(cls, path: Path, width: int, dtype: str, align: int) -> "_RowTable":
        return cls(path, width, dtype, max(1, SCRATCH_BLOCK_BYTES // (width * np.dtype(dtype).itemsize)), align)

    @property
    def row_bytes(self) -> int:
        return self.width * np.dtype(self.dtype).itemsize

    @property
    def block_stride(self) -> int:  # = rows_per_block * row_bytes without O_DIRECT: rows back to back
        size = self.rows_per_block * self.row_bytes
        return -(-size // self.align) * self.align if self.align else size

    def row_offset(self, row: int) -> int:
        """Byte offset of row `row` in the file."""
        b, local = divmod(row, self.rows_per_block)
        return b * self.block_stride + local * self.row_bytes

    def write_block(self, b: int, rows: np.ndarray) -> None:  # (<= rows_per_block, width)
        write_file(self.path, rows, self.align, offset=b * self.block_stride)

    def truncate_after(self, row: int, size: int) -> int:
        """Drop the bytes after row `row` (rows beyond it are no longer needed) from the file, now of
        `size` bytes, once that frees TRUNCATE_STEP; returns the new size. The new end is rounded up
        to TRUNCATE_STEP: the page cache holds a file in folios of up to 2 MiB, and a cut inside one
        zeroes the rest of it (cutting at the exact row end after every copy task measured 0.43 s of
        kernel time for 10,000 x 111, in the main thread while the workers waited)."""
        end = -(-(self.row_offset(row) + self.row_bytes) // TRUNCATE_STEP) * TRUNCATE_STEP
        if size - end < TRUNCATE_STEP:
            return size
        os.truncate(self.path, end)
        return end


class _RowWriter:
    """Appends rows to a `_RowTable` a block at a time: latents come one at a time and are gathered in
    a buffer first (one write each measured 1.47 s of CPU for the latent pass of 10,000 subjects,
    buffered 1.21 s)."""

    def __init__(self, table: _RowTable) -> None:
        self.table, self.blocks, self.buffered = table, 0, 0
        self.buffer = aligned_empty((table.rows_per_block, table.width), table.dtype)  # (rows_per_block, width)

    def write(self, rows: np.ndarray) -> None:  # (k, width)
        rows = rows.reshape(-1, self.table.width)
        while len(rows):
            take = min(len(rows), self.table.rows_per_block - self.buffered)
            self.buffer[self.buffered:self.buffered + take] = rows[:take]
            self.buffered += take
            rows = rows[take:]
            if self.buffered == self.table.rows_per_block:
                self.flush()

    def flush(self) -> None:
        """Writes the buffered rows as the next block (a partial one only at the end)."""
        if self.buffered:
            self.table.write_block(self.blocks, self.buffer[: self.buffered])
            self.blocks += 1
            self.buffered = 0


def _write_table(table: _RowTable, rows: np.ndarray) -> int:
    """All of a table's rows (n, width), a block per write straight from `rows` (aligned when
    align > 0). Returns the byte offset after the last row."""
    for b, start in enumerate(range(0, len(rows), table.rows_per_block)):
        table.write_block(b, rows[start:start + table.rows_per_block])
    return table.row_offset(len(rows) - 1) + table.row_bytes if len(rows) else 0


def _read_table_rows(table: _RowTable, positions: np.ndarray, out: np.ndarray, staging: np.ndarray) -> np.ndarray:
    """Rows `positions` (increasing) of a table into `out` (len(positions), width). A contiguous `out`
    (the latents' (T, V) buffer) gets each run of consecutive rows read straight into it (without
    O_DIRECT); a strided one (one gene of a (T, G, D) buffer) one read per block touched (a copy
    task's rows are sorted like the table's, so usually one), through `staging` (an aligned byte
    buffer of about a block; returned, grown when a read needed more). Either way no buffer grows
    with the task: a staged read of a task's ~200 latents (10 MB) per thread measured +40-80 MiB
    of peak RSS."""
    per_block, row_bytes = table.rows_per_block, table.row_bytes
    if not table.align and out.flags.c_contiguous:  # without O_DIRECT the rows lie back to back
        breaks = np.flatnonzero(np.diff(positions) != 1) + 1  # starts of runs of consecutive rows
        for start, stop in zip([0, *breaks.tolist()], [*breaks.tolist(), len(positions)]):
            at = int(positions[start]) * row_bytes
            read_range(table.path, at, at + (stop - start) * row_bytes, out[start:stop].reshape(-1).view(np.uint8), 0)
        return staging
    start = 0
    for b in range(int(positions[0]) // per_block, int(positions[-1]) // per_block + 1):
        stop = int(np.searchsorted(positions, (b + 1) * per_block))
        if stop == start:
            continue
        local = positions[start:stop] - b * per_block
        first, span = int(local[0]), int(local[-1] - local[0] + 1)
        if staging.nbytes < staging_bytes(span * row_bytes, table.align):
            staging = aligned_empty((staging_bytes(span * row_bytes, table.align),), np.uint8)
        at = b * table.block_stride + first * row_bytes
        data = read_range(table.path, at, at + span * row_bytes, staging, table.align)
        rows = data.view(table.dtype).reshape(span, table.width)
        out[start:stop] = rows if span == stop - start else rows[local - first]
        start = stop
    return staging


# ------------------------------------------------------------------------------------- parse: genes
@dataclass(frozen=True)
class _GeneTask:
    index: int
    path: Path
    columns: list[str]
    iid_column: str
    table: _RowTable  # where the values go, in the store dtype; the sorted IIDs follow them in its file


def _parse_gene_csv(task: _GeneTask) -> dict:
    """Worker entry point: parse one CSV into scratch. Errors come back as text (always picklable)."""
    try:
        return _parse_gene_csv_or_raise(task)
    except GenealignError as exc:
        return {"index": task.index, "error": str(exc)}


def _parse_gene_csv_or_raise(task: _GeneTask) -> dict:
    import pandas as pd

    value_columns = [c for c in task.columns if c != task.iid_column]
    try:
        frame = _read_gene_frame(task)
        values = frame.to_numpy(dtype=np.float32)  # (n, D)
    except ValueError as exc:
        if isinstance(exc, pd.errors.ParserError):
            raise GenealignError(
                f"{task.path}: malformed CSV ({' '.join(str(exc).split())}); every row needs the header's "
                f"{len(task.columns)} columns."
            ) from exc
        if isinstance(exc, UnicodeDecodeError):
            raise GenealignError(f"{task.path}: not UTF-8 text ({exc}).") from exc
        raise GenealignError(_describe_non_numeric(task, exc)) from exc
    except OSError as exc:
        raise GenealignError(f"{task.path}: cannot read ({exc}).") from exc

    iid_index = frame.index
    del frame
    if iid_index.isna().any():
        # The NA-aware parse read "NA", "null", "" ... as missing: re-read the IDs verbatim.
        iid_index = pd.read_csv(task.path, usecols=[task.iid_column], dtype=str, keep_default_na=False)[
            task.iid_column
        ]
    iids = iid_index.to_numpy(dtype=str)  # (n,)
    empty = np.flatnonzero(iids == "")
    if empty.size:
        line = _editor_lines(task.path, empty[:1])[0]
        raise GenealignError(f"{task.path} line {line}: empty {task.iid_column}; every row needs a subject ID.")
    if values.shape[1] != task.table.width:
        raise GenealignError(
            f"{task.path}: {values.shape[1]} value columns where the header has {task.table.width}; "
            "check for stray separators."
        )
    finite = np.isfinite(values).all(axis=1)  # (n,)

    if task.table.dtype == "float16":
        too_big = np.abs(np.where(finite[:, None], values, 0.0)) > FLOAT16_MAX
        if too_big.any():
            row, col = np.argwhere(too_big)[0]
            line = _editor_lines(task.path, [row])[0]
            raise GenealignError(
                f"{task.path} line {line}, column '{value_columns[col]}': {values[row, col]:g} exceeds the "
                "float16 range; use --dtype float32."
            )

    keys = _iid_keys(iids)  # (n,) uint64 that sort like the text, or None: sorted as text (slower)
    order = np.argsort(iids if keys is None else keys, kind="stable")
    sorted_iids = iids[order]
    sorted_ids = sorted_iids if keys is None else keys[order]
    duplicate = np.flatnonzero(sorted_ids[1:] == sorted_ids[:-1])
    if duplicate.size:
        iid = sorted_iids[duplicate[0]]
        first, second = _editor_lines(task.path, np.flatnonzero(iids == iid)[:2])
        raise GenealignError(
            f"{task.path}: {task.iid_column} '{iid}' appears twice, on lines {first} and {second}; each "
            "subject needs exactly one row per gene CSV."
        )
    # sorted straight into an aligned buffer, which O_DIRECT writes from without another copy; mode
    # "clip" because "raise" (the default) fills a temporary array first and copies it into `out`
    sorted_values = aligned_empty(values.shape, task.table.dtype)  # (n, D)
    np.take(values.astype(task.table.dtype, copy=False), order, axis=0, mode="clip", out=sorted_values)
    iid_offset = _write_table(task.table, sorted_values)
    write_file(task.table.path, sorted_iids, 0, offset=iid_offset)  # (n,) fixed-width text, read by the plan
    return {
        "index": task.index,
        "n_rows": int(len(iids)),
        "iid_offset": iid_offset,
        "iid_dtype": sorted_iids.dtype.str,
        "keyable": keys is not None,
        "nonfinite": sorted_iids[~finite[order]].tolist(),
    }


def _gene_iids(task: _GeneTask, result: dict) -> np.ndarray:
    """The sorted IIDs of a parsed gene CSV (n,), from the end of its scratch table."""
    return np.fromfile(task.table.path, dtype=result["iid_dtype"], count=result["n_rows"], offset=result["iid_offset"])


def _read_gene_frame(task: _GeneTask):
    """The CSV as a frame: index = IID text, float32 values (n, D). The IID as the index: measured
    ~10% faster than popping it from the frame afterwards. First parsed without NA detection (measured
    ~15% less CPU): an NA string ("", "NA", "nan", ...) or a non-numeric cell then fails the parse, and
    the file is read again with pandas' NA strings as NaN (where a non-numeric cell fails for good).
    Numbers parse to the same float32 either way; float32 columns are parsed as float64 and rounded,
    as `to_numpy(dtype=np.float32)` of float64 columns does. Typed columns also mean a cell only
    Python's float() reads ("1_0") is an error, not 10.0 via an object column."""
    import pandas as pd

    dtype = defaultdict(lambda: np.float32, {task.iid_column: str})
    try:
        return pd.read_csv(task.path, dtype=dtype, index_col=task.iid_column, na_filter=False)
    except ValueError as exc:
        if isinstance(exc, (pd.errors.ParserError, UnicodeDecodeError)):
            raise
    return pd.read_csv(task.path, dtype=dtype, index_col=task.iid_column)


def _editor_lines(path: Path, rows) -> list[int]:
    """Line numbers (as a text editor shows them) of data rows (0-based, as pandas counts them:
    blank lines skipped). Only called to explain an error, so a slow scan is fine."""
    wanted = {int(r): None for r in rows}
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        next(reader, None)
        row, previous_end = -1, reader.line_num
        for record in reader:
            start, previous_end = previous_end + 1, reader.line_num
            if not record:
                continue
            row += 1
            if row in wanted:
                wanted[row] = start
                if all(v is not None for v in wanted.values()):
                    break
    return [wanted[int(r)] for r in rows]


def _describe_non_numeric(task: _GeneTask, exc: Exception) -> str:
    iid_at = task.columns.index(task.iid_column)
    with open(task.path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        next(reader, None)
        previous_end = reader.line_num
        for record in reader:
            start, previous_end = previous_end + 1, reader.line_num
            for j, cell in enumerate(record):
                if j == iid_at or cell in _NA_STRINGS:
                    continue
                try:
                    float(cell)
                    ok = "_" not in cell
                except ValueError:
                    ok = False
                if not ok:
                    column = task.columns[j] if j < len(task.columns) else f"#{j + 1}"
                    return (
                        f"{task.path} line {start}, column '{column}': '{cell}' is not a number; gene "
                        "embedding values must be numeric (an empty or NaN cell drops the subject instead)."
                    )
    return f"{task.path}: a value is not a number ({exc}); gene embedding values must be numeric."


# ----------------------------------------------------------------------------------- parse: latents
@dataclass
class _Latents:
    """What the latent pass found: per latent file (sorted by IID) its shape or why it is unusable,
    and per shape the scratch file holding those latents' values in the store dtype."""

    problem: list[tuple[str, str] | None]  # (reason, detail) or None when usable
    shape_tables: dict[tuple[int, ...], _RowTable]
    shape_members: dict[tuple[int, ...], list[int]]  # latent indices (increasing) stored per shape


def _read_latents(sources: _Sources, options: dict, scratch: Path, align: int) -> _Latents:
    latents = _Latents(problem=[], shape_tables={}, shape_members={})
    writers: dict[tuple[int, ...], _RowWriter] = {}
    key = options["latent_key"]
    try:
        for index, iid in enumerate(sources.latent_iids.tolist()):
            path = sources.latent_dir / f"{iid}{LATENT_FILE_SUFFIX}"
            array, problem = _load_latent(path, key, options["dtype"])
            latents.problem.append(problem)
            if problem is not None:
                continue
            shape = tuple(int(s) for s in array.shape)
            if shape not in writers:
                table = _RowTable.create(
                    scratch / f"latent{len(writers):03d}.bin", int(np.prod(shape)), options["dtype"], align
                )
                latents.shape_tables[shape] = table
                latents.shape_members[shape] = []
                writers[shape] = _RowWriter(table)
            writers[shape].write(array.reshape(1, -1))
            latents.shape_members[shape].append(index)
    finally:
        for writer in writers.values():
            writer.flush()
    return latents


def _load_latent(path: Path, key: str | None, dtype: str) -> tuple[np.ndarray | None, tuple[str, str] | None]:
    """(array, None) or (None, (reason, detail)). Configuration mistakes raise instead."""
    try:
        array = _read_plain_npz(path, key)
        loaded = array if array is not None else np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):  # the fast path's array, or a bare .npy under an .npz name
            array = loaded
        else:
            with loaded as npz:
                array = npz[_latent_key(list(npz.files), key, path)]
    except GenealignError:
        raise
    except Exception as exc:  # zipfile, zlib, numpy and OS errors all mean "cannot read this file"
        return None, ("unreadable latent", f"{type(exc).__name__}: {exc}")
    if array.dtype.kind not in "fiu":
        return None, ("unreadable latent", f"dtype {array.dtype} is not real numbers")
    if not np.isfinite(array).all():
        return None, ("NaN or inf in latent", "")
    if dtype == "float16" and array.size and float(np.abs(array).max()) > FLOAT16_MAX:
        raise GenealignError(f"{path}: values exceed the float16 range; use --dtype float32.")
    return array, None


_NPY_HEADERS: dict[bytes, tuple[tuple[int, ...], np.dtype] | None] = {}  # header bytes -> (shape, dtype)


def _read_plain_npz(path: Path, key: str | None) -> np.ndarray | None:
    """The array of a plain `np.savez` file (a zip holding one stored, uncompressed member
    '<name>.npy', C order; `key`, when given, must be its name), read without zipfile: ~20 us a file
    instead of np.load's ~85 (10,000 latents: 0.6 s off a pass that runs alone on one thread). The
    member's CRC-32 is checked as zipfile checks it. None for anything else (compressed, several
    arrays, another name, Fortran order, a header it does not know, a damaged file), which np.load
    then reads or explains: this path never decides that a file is unreadable."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
        eocd = len(data) - 22  # end-of-central-directory record, no archive comment
        if data[:4] != b"PK\x03\x04" or data[eocd:eocd + 4] != b"PK\x05\x06":
            return None
        entries, _, directory = struct.unpack_from("<HII", data, eocd + 10)
        if entries != 1 or data[directory:directory + 4] != b"PK\x01\x02":
            return None
        method, crc, size, raw_size, name_len = struct.unpack_from("<H4xIIIH", data, directory + 10)
        local = struct.unpack_from("<I", data, directory + 42)[0]
        name = data[directory + 46:directory + 46 + name_len]
        if method != 0 or size != raw_size or not name.endswith(b".npy") or data[local:local + 4] != b"PK\x03\x04":
            return None
        if key is not None and name != f"{key}.npy".encode():
            return None
        local_name_len, local_extra_len = struct.unpack_from("<HH", data, local + 26)
        start = local + 30 + local_name_len + local_extra_len
        member = memoryview(data)[start:start + size]
        if len(member) != size or zlib.crc32(member) != crc or bytes(member[:6]) != b"\x93NUMPY":
            return None
        # version 1.0: 2-byte header length, 2.0/3.0: 4-byte; the header is identical for every latent
        # of a cohort, so it is parsed once (np.lib.format's parser is most of np.load's cost).
        major = member[6]
        offset = 10 if major == 1 else 12
        header_len = struct.unpack_from("<H" if major == 1 else "<I", member, 8)[0]
        header = bytes(member[:offset + header_len])
        if header not in _NPY_HEADERS:
            _NPY_HEADERS[header] = _npy_header(header)
        parsed = _NPY_HEADERS[header]
        if parsed is None:
            return None
        shape, dtype = parsed
        if size - len(header) != int(np.prod(shape)) * dtype.itemsize:
            return None
        return np.frombuffer(member, dtype=dtype, offset=len(header)).reshape(shape)
    except (OSError, struct.error, ValueError):
        return None


def _npy_header(header: bytes) -> tuple[tuple[int, ...], np.dtype] | None:
    """(shape, dtype) of a C-order, plain-dtype .npy header; None otherwise."""
    import io

    stream = io.BytesIO(header)
    try:
        version = np.lib.format.read_magic(stream)
        if version not in ((1, 0), (2, 0)):  # 3.0 (utf-8 field names): left to np.load
            return None
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read(stream)
    except ValueError:
        return None
    if fortran_order or dtype.hasobject or dtype.fields is not None or stream.tell() != len(header):
        return None
    return tuple(int(s) for s in shape), dtype


def _latent_key(keys: list[str], key: str | None, path: Path) -> str:
    if key is not None:
        if key not in keys:
            raise GenealignError(
                f"{path} has no array '{key}' (arrays: {', '.join(keys) or 'none'}); check --latent_key."
            )
        return key
    if DEFAULT_LATENT_KEY in keys:
        return DEFAULT_LATENT_KEY
    if len(keys) == 1:
        return keys[0]
    if not keys:
        raise ValueError("the npz holds no arrays")
    raise GenealignError(
        f"{path} holds several arrays ({', '.join(keys)}) and none is named '{DEFAULT_LATENT_KEY}'; pass "
        "--latent_key with the one to use."
    )


# --------------------------------------------------------------------------------- parse: orchestration
def _parse_sources(
    sources: _Sources, options: dict, scratch: Path, pool, align: int
) -> tuple[list[_GeneTask], list[dict], _Latents]:
    """Read the latents (in this thread) and parse every gene CSV into scratch (on the pool). Returns
    the CSV tasks (where each gene's scratch is), their results and the latents. Errors: the latents'
    first, then the first failing CSV in gene order."""
    tasks = [
        _GeneTask(
            index, path, columns, options["iid_column"],
            table=_RowTable.create(scratch / f"gene{index:05d}.bin", sources.width, options["dtype"], align),
        )
        for index, (path, columns) in enumerate(zip(sources.gene_paths, sources.gene_columns))
    ]
    futures: list[Future] = []
    try:
        # The pool parses while this thread reads the latents. On threads (workers=1) the overlap
        # pays only since plain npz files skip zipfile (`_read_plain_npz`): with np.load's GIL-bound
        # pass it measured slower than latents-then-CSVs (7.2-7.6 s vs 6.6-6.9 s for 111 CSVs +
        # 10,000 latents); with it, the whole 10,000 x 111 ingest measured a median of 8.4 s
        # overlapped vs 9.3 s in turn (six alternating runs each).
        futures = [pool.submit(_parse_gene_csv, task) for task in tasks]
        latents = _read_latents(sources, options, scratch, align)
        results = []
        for future in futures:
            results.append(future.result())
            if "error" in results[-1]:
                raise GenealignError(results[-1]["error"])
    finally:
        for future in futures:
            future.cancel()
    return tasks, results, latents


# ------------------------------------------------------------------------------------------------ plan
@dataclass
class _Plan:
    kept_iids: np.ndarray  # (N,) str, sorted
    latent_shape: tuple[int, ...]
    tables: list[_RowTable]  # the latents' table, then one per gene
    positions_file: Path  # (1 + G, N) int32: row of each kept subject in each table
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
    pos = np.searchsorted(haystack, needles)
    clipped = np.minimum(pos, len(haystack) - 1)
    return haystack[clipped] == needles, clipped


def _iid_keys(iids: np.ndarray) -> np.ndarray | None:
    """IIDs (text, (n,)) as uint64 keys that compare and sort exactly like the text: the ASCII bytes,
    zero-padded to 8 and read big-endian (text never ends in NUL, so distinct IIDs get distinct keys).
    None when an IID is longer than 8 characters or not ASCII. numpy compares text 4 bytes a
    character: the plan's ~340 searchsorted calls for 10,000 x 111 took 0.18 s on text."""
    if iids.dtype.kind != "U" or iids.dtype.itemsize > 8 * 4:
        return None
    width = iids.dtype.itemsize // 4
    points = np.ascontiguousarray(iids).view(np.uint32).reshape(len(iids), width)  # (n, width) code points
    if points.size and int(points.max()) > 127:
        return None
    raw = np.zeros((len(iids), 8), dtype=np.uint8)  # (n, 8) ASCII bytes, zero-padded
    raw[:, :width] = points
    return raw.view(">u8").reshape(-1).astype(np.uint64)


def _iid_text(keys: np.ndarray) -> np.ndarray:
    """The IIDs (text) of `_iid_keys`."""
    return keys.astype(">u8").view("S8").astype(str)


def _plan(
    sources: _Sources, tasks: list[_GeneTask], gene_results: list[dict], latents: _Latents, scratch: Path
) -> _Plan:
    n_genes = len(sources.gene_names)
    # IIDs as order-preserving integer keys where they all fit (`_iid_keys`), else as text
    keyed = _iid_keys(sources.latent_iids) is not None and all(r["keyable"] for r in gene_results)
    as_ids = _iid_keys if keyed else (lambda iids: iids)

    def gene_ids(index: int) -> np.ndarray:  # (n_rows,) sorted
        return as_ids(_gene_iids(tasks[index], gene_results[index]))

    latent_iids = as_ids(sources.latent_iids)
    usable = [shape for shape, members in latents.shape_members.items() if members]
    # The most common shape wins; ties go to the shape met first (smallest IID).
    latent_shape = max(
        usable, key=lambda s: (len(latents.shape_members[s]), -latents.shape_members[s][0]), default=None
    )

    # Every IID seen anywhere, sorted; gene IID lists are loaded one at a time (memory O(subjects)).
    universe = latent_iids
    for index in range(n_genes):
        gene_iids = gene_ids(index)
        new = ~_sorted_member(universe, gene_iids)[0]
        if new.any():
            universe = np.union1d(universe, gene_iids[new])
    n_universe = len(universe)

    n_present = np.zeros(n_universe, dtype=np.int32)
    first_missing = np.full(n_universe, -1, dtype=np.int32)
    first_nonfinite = np.full(n_universe, -1, dtype=np.int32)
    for index in range(n_genes):
        gene_iids = gene_ids(index)
        present = _sorted_member(gene_iids, universe)[0]
        n_present += present
        first_missing[~present & (first_missing < 0)] = index
        nonfinite = as_ids(np.asarray(gene_results[index]["nonfinite"], dtype=str))
        if nonfinite.size:
            bad = _sorted_member(np.sort(nonfinite), universe)[0]
            first_nonfinite[bad & (first_nonfinite < 0)] = index

    has_latent, latent_index = _sorted_member(latent_iids, universe)
    latent_ok = np.zeros(n_universe, dtype=bool)
    if latent_shape is not None:
        members = np.asarray(latents.shape_members[latent_shape], dtype=np.int64)
        latent_ok = has_latent & _sorted_member(members, latent_index)[0]
    kept = latent_ok & (n_present == n_genes) & (first_nonfinite < 0)
    universe_text = _iid_text(universe) if keyed else universe

    dropped = []
    for u in np.flatnonzero(~kept).tolist():
        iid = str(universe_text[u])
        if has_latent[u] and not latent_ok[u]:
            problem = latents.problem[int(latent_index[u])]
            if problem is None:
                shape = next(s for s, m in latents.shape_members.items() if _contains(m, int(latent_index[u])))
                problem = ("latent of wrong shape", f"{shape} != {latent_shape}")
            reason, detail = problem
        elif not has_latent[u]:
            reason, detail = "no latent", ""
        elif n_present[u] == 0:
            reason, detail = "in no gene CSV", ""
        elif n_present[u] < n_genes:
            reason = f"missing from gene {sources.gene_names[first_missing[u]]}"
            detail = f"missing from {n_genes - n_present[u]} of {n_genes} genes"
        else:
            reason, detail = f"NaN or inf in gene {sources.gene_names[first_nonfinite[u]]}", ""
        dropped.append({"iid": iid, "reason": reason, "detail": detail})

    rows_per_gene = {name: int(r["n_rows"]) for name, r in zip(sources.gene_names, gene_results)}
    gene_side = n_present > 0
    found = {
        "latent files": int(len(latent_iids)),
        "usable latents": int(len(latents.shape_members.get(latent_shape, []))) if latent_shape else 0,
        "IIDs in any gene CSV": int(gene_side.sum()),
        "IIDs in every gene CSV": int((n_present == n_genes).sum()),
    }
    kept_ids = universe[kept]
    if len(kept_ids) == 0:
        raise GenealignError(
            _no_pairs_message(universe_text, has_latent, gene_side, n_present == n_genes, dropped, found)
        )

    latent_table = latents.shape_tables[latent_shape]  # in the store dtype, like the gene tables
    positions_file = scratch / "positions.i32"
    with open(positions_file, "wb") as fh:
        members = np.asarray(latents.shape_members[latent_shape], dtype=np.int64)
        np.searchsorted(members, latent_index[kept]).astype(np.int32).tofile(fh)
        for index in range(n_genes):
            np.searchsorted(gene_ids(index), kept_ids).astype(np.int32).tofile(fh)
    return _Plan(
        kept_iids=universe_text[kept],
        latent_shape=latent_shape,
        tables=[latent_table] + [task.table for task in tasks],
        positions_file=positions_file,
        dropped=dropped,
        found=found,
        rows_per_gene=rows_per_gene,
    )


def _contains(sorted_list: list[int], value: int) -> bool:
    import bisect

    i = bisect.bisect_left(sorted_list, value)
    return i < len(sorted_list) and sorted_list[i] == value


def _no_pairs_message(universe, has_latent, gene_side, in_every, dropped, found) -> str:
    latent_only = universe[has_latent & ~gene_side][:3].tolist()
    gene_only = universe[gene_side & ~has_latent][:3].tolist()
    latent_examples = latent_only or universe[has_latent][:3].tolist()
    gene_examples = gene_only or universe[gene_side][:3].tolist()
    reasons = Counter(entry["reason"] for entry in dropped).most_common(3)
    return (
        f"No paired subjects: none has both a usable latent and a finite row in every selected gene CSV. "
        f"{found['latent files']} latent files (e.g. {', '.join(latent_examples) or '-'}), "
        f"{found['IIDs in any gene CSV']} IIDs in the gene CSVs (e.g. {', '.join(gene_examples) or '-'}), "
        f"{int((has_latent & gene_side).sum())} on both sides, {int(in_every.sum())} in every gene CSV; "
        f"top reasons: {', '.join(f'{r} ({n})' for r, n in reasons)}. IIDs are compared as text (leading "
        "zeros count): check --iid_column and the latent file names."
    )


# ------------------------------------------------------------------------------------------------ copy
@dataclass(frozen=True)
class _CopyTask:
    store: Path
    tables: list[_RowTable]  # latents, then genes
    positions_file: Path
    n_kept: int
    latent_shape: tuple[int, ...]
    chunk_rows: int
    first_chunk: int
    stop_chunk: int
    neuro_files: _ChunkFiles | None  # None: written through zarr
    genes_files: _ChunkFiles | None


def _copy_all(plan: _Plan, store: Path, group, pool, align: int) -> None:
    """Ranges of COPY_TASK_CHUNKS chunks on the pool, last range first; tasks finish in any order.
    Once every task from the end down to one is done, each table is truncated after the last row a
    remaining task reads: no other chunk reads past it (tables and store are both sorted by IID), so
    the scratch shrinks as the store grows, whichever worker wrote which chunk, on any filesystem,
    and its page cache is freed for the store's pages. That is for disk and memory, not speed: with
    memory already backed the copy of 10,000 x 111 took 0.62-0.66 s with the cuts and 0.61-0.71 s
    without (workers=2, three runs each)."""
    chunk_rows = int(group["genes"].chunks[0])
    n_chunks = -(-plan.n_kept // chunk_rows)
    tasks = []
    for lo in reversed(range(0, n_chunks, COPY_TASK_CHUNKS)):
        chunks = range(lo, min(n_chunks, lo + COPY_TASK_CHUNKS))
        tasks.append(_CopyTask(
            store, plan.tables, plan.positions_file, plan.n_kept, plan.latent_shape, chunk_rows, chunks.start,
            chunks.stop, _chunk_files(group["neuro"], chunks, align), _chunk_files(group["genes"], chunks, align),
        ))
    futures = [pool.submit(_copy_chunks, task) for task in tasks]
    sizes = [table.path.stat().st_size for table in plan.tables]
    positions_fd = os.open(plan.positions_file, os.O_RDONLY)
    try:
        for task, future in zip(tasks, futures):
            future.result()
            last_row = task.first_chunk * chunk_rows - 1  # the last subject a remaining task copies
            if last_row < 0:
                continue  # the whole scratch goes with its directory
            for t, table in enumerate(plan.tables):
                last = int(_read_positions(positions_fd, plan.n_kept, t, last_row, last_row + 1)[0])
                sizes[t] = table.truncate_after(last, sizes[t])
    finally:
        os.close(positions_fd)


def _copy_chunks(task: _CopyTask) -> None:
    """Worker entry point: fill chunks [first_chunk, stop_chunk) of the store from the scratch tables."""
    if task.neuro_files is None or task.genes_files is None:
        import zarr

        group = zarr.open_group(str(task.store), mode="r+")
    write_neuro = task.neuro_files.write if task.neuro_files else _zarr_chunk_writer(group["neuro"])
    write_genes = task.genes_files.write if task.genes_files else _zarr_chunk_writer(group["genes"])
    latent_table, gene_tables = task.tables[0], task.tables[1:]
    c = task.chunk_rows
    lo, hi = task.first_chunk * c, min(task.n_kept, task.stop_chunk * c)
    # The task's rows of every table in one or two reads each, then whole chunks out of these buffers.
    neuro = aligned_empty((hi - lo, latent_table.width), latent_table.dtype)  # (T, V)
    genes = aligned_empty((hi - lo, len(gene_tables), gene_tables[0].width), gene_tables[0].dtype)  # (T, G, D)
    # ~a task's rows of one gene table; grown by a read that needs more (rows over 4 MiB, long gaps)
    staging = aligned_empty((staging_bytes(SCRATCH_BLOCK_BYTES, latent_table.align),), np.uint8)
    positions_fd = os.open(task.positions_file, os.O_RDONLY)
    try:
        for t, table in enumerate(task.tables):
            positions = _read_positions(positions_fd, task.n_kept, t, lo, hi)  # (T,)
            staging = _read_table_rows(table, positions, neuro if t == 0 else genes[:, t - 1, :], staging)
    finally:
        os.close(positions_fd)
    for chunk in range(task.first_chunk, task.stop_chunk):
        a, b = chunk * c - lo, min(hi, (chunk + 1) * c) - lo
        write_neuro(chunk, neuro[a:b].reshape(b - a, *task.latent_shape))
        write_genes(chunk, genes[a:b])


def _read_positions(fd: int, n_kept: int, table: int, lo: int, hi: int) -> np.ndarray:
    """Rows in `table` of kept subjects [lo, hi), from the (1 + G, N) int32 positions file -> (hi - lo,)."""
    data = _pread(fd, (hi - lo) * 4, (table * n_kept + lo) * 4)
    return np.frombuffer(data, dtype=np.int32).astype(np.int64)


@dataclass(frozen=True)
class _ChunkFiles:
    """Chunks along axis 0 of a plain array (little-endian C-order bytes, uncompressed, in a local
    directory: the store's layout), each written whole straight to its file: measured ~2x faster than
    zarr's write path (1.0 vs 2.2 GB/s here), and this temp store has no other writer. Made in the main
    process for the chunks of one copy task, so copy workers neither import nor open zarr."""

    paths: dict[int, Path]  # chunk index -> its file
    chunk_shape: tuple[int, ...]
    dtype: str  # little-endian
    fill: float
    align: int  # O_DIRECT alignment; 0 = through the page cache

    def write(self, chunk: int, block: np.ndarray) -> None:
        dtype = np.dtype(self.dtype)
        if len(block) < self.chunk_shape[0]:  # the last chunk is stored full size, padded with the fill value
            padded = np.full(self.chunk_shape, self.fill, dtype=dtype)
            padded[: len(block)] = block
            block = padded
        write_file(self.paths[chunk], np.ascontiguousarray(block, dtype=dtype), self.align)


def _chunk_files(array, chunks: range, align: int) -> _ChunkFiles | None:
    """The `_ChunkFiles` for `chunks` of `array`; None for any other layout (compressed, sharded,
    remote), which `_zarr_chunk_writer` writes instead."""
    from zarr.codecs import BytesCodec
    from zarr.storage import LocalStore

    meta = array.metadata
    chunk_shape = tuple(array.chunks)
    codecs = getattr(meta, "codecs", ())
    plain = (
        getattr(meta, "zarr_format", None) == 3
        and isinstance(array.store_path.store, LocalStore)
        and len(codecs) == 1
        and isinstance(codecs[0], BytesCodec)
        and str(getattr(codecs[0].endian, "value", codecs[0].endian)) in ("little", "None")
        and np.dtype(array.dtype).byteorder in ("<", "=", "|")
        and chunk_shape[1:] == tuple(array.shape[1:])
    )
    if not plain:
        return None
    root = Path(array.store_path.store.root) / array.path
    zeros = (0,) * (len(chunk_shape) - 1)
    paths = {chunk: root / meta.encode_chunk_key((chunk,) + zeros) for chunk in chunks}
    if any(path.parent != root for path in paths.values()):  # nested keys ("c/7/0/0"): left to zarr
        return None
    return _ChunkFiles(
        paths=paths,
        chunk_shape=chunk_shape,
        dtype=np.dtype(array.dtype).newbyteorder("<").str,
        fill=float(meta.fill_value),
        align=align,
    )


def _zarr_chunk_writer(array):
    """`write(chunk, block)` for whole chunks along axis 0, through zarr (any layout)."""
    rows = int(array.chunks[0])

    def write_via_zarr(chunk: int, block: np.ndarray) -> None:
        array[chunk * rows:chunk * rows + len(block)] = block

    return write_via_zarr


def _pread(fd: int, size: int, offset: int) -> bytes:
    data = os.pread(fd, size, offset)
    while len(data) < size:  # short reads only happen on exotic filesystems; keep reading
        more = os.pread(fd, size - len(data), offset + len(data))
        if not more:
            raise GenealignError("A scratch file ended early while ingesting (disk full?); re-run the ingest.")
        data += more
    return data


# ------------------------------------------------------------------------------------------- helpers
def _size_on_disk(root: Path) -> int:
    return sum(
        os.lstat(os.path.join(dirpath, name)).st_size for dirpath, _, names in os.walk(root) for name in names
    )


def _human_bytes(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{size} B"
        size /= 1024
    return f"{size} B"


__all__ = [
    "IngestConfig",
    "IngestResult",
    "ingest",
    "get_all_gene_names",
    "parse_gene_list",
    "store_summary",
]
