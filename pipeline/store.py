"""The subject-aligned Zarr store: its schema, its split assignment, and its read-only view.

Layout (Zarr format 3), row i of every per-subject array is the same subject, rows sorted by IID:

    iid         (N,)                 str    IIDs exactly as written in the source files
    neuro       (N, *latent_shape)   float32|float16
    genes       (N, G, D)            float32|float16   gene axis in `gene_names` order
    gene_names  (G,)                 str
    split       (N,)                 int8   0 = train, 1 = val, 2 = test (SPLIT_CODES)
    covariates       (N, C)          float32  only with `ingest --covariates`; categoricals one-hot
    covariate_names  (C,)            str      e.g. "age", "site=site_2" (a level of column "site")

plus `ingest_report.json` (every dropped subject with its reason) beside the arrays, and group
attributes: schema/tool version, sources, per-file fingerprints, counts, latent shape, dtype, split
fractions and codes, creation time, `covariate_groups` (source column -> its store columns) and
`relatedness` (whether a kinship file controlled the split, families, pairs across splits). Chunks hold whole subjects so a chunk read is a batch of subjects;
their files sit side by side in each array's directory (`genes/c.7.0.0`: chunk key separator ".").
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # zarr is imported where it is used: the ingest's worker processes never need it
    import zarr

from pipeline.atomic import recover_dir
from pipeline.errors import GenealignError, GeneNotFoundError

SCHEMA_VERSION = 1
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
DEFAULT_SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
# Salt of the split hash: changing it would move subjects between splits, so it is part of the schema.
SPLIT_SALT = "genealign-split-v1"
REPORT_NAME = "ingest_report.json"
FINGERPRINTS_NAME = "fingerprints.json"  # every input file's fingerprint, beside the report
# Bytes of consecutive chunks read per zarr call (zarr reads the chunks of one call concurrently).
READ_SPAN_BYTES = 16 << 20


def split_fractions_valid(fractions) -> tuple[float, float, float]:
    fractions = tuple(float(f) for f in fractions)
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6:
        raise GenealignError(
            f"Split fractions {fractions} must be three non-negative numbers (train, val, test) "
            "summing to 1, e.g. 0.8,0.1,0.1."
        )
    return fractions


def split_unit(iids) -> np.ndarray:
    """A deterministic pseudo-uniform number in [0, 1) per IID, from a salted SHA-256 of its text."""
    out = np.empty(len(iids), dtype=np.float64)
    for i, iid in enumerate(iids):
        digest = hashlib.sha256(f"{SPLIT_SALT}:{iid}".encode()).digest()
        out[i] = int.from_bytes(digest[:8], "big") / 2.0**64
    return out


def assign_split(iids, fractions=DEFAULT_SPLIT_FRACTIONS) -> np.ndarray:
    """Split code per IID (int8). Depends only on the IID's text and the fractions, so adding
    subjects to a cohort never moves an existing subject to another split."""
    train, val, _ = split_fractions_valid(fractions)
    u = split_unit(iids)
    codes = np.full(len(u), SPLIT_CODES["test"], dtype=np.int8)
    codes[u < train + val] = SPLIT_CODES["val"]
    codes[u < train] = SPLIT_CODES["train"]
    return codes


def chunk_rows_for(row_bytes: int, target_bytes: int = 8 << 20, max_rows: int = 256) -> int:
    """Subjects per chunk: about `target_bytes` per chunk, so sequential reads are large."""
    return int(max(1, min(max_rows, target_bytes // max(1, row_bytes))))


@dataclass(frozen=True)
class StoreView:
    """Read-only view of an ingested store (see module docstring for the layout)."""

    path: Path
    iid: np.ndarray  # (N,) str
    gene_names: tuple[str, ...]  # (G,)
    split: np.ndarray  # (N,) int8
    neuro: zarr.Array  # (N, *latent_shape)
    genes: zarr.Array  # (N, G, D)
    latent_shape: tuple[int, ...]
    embedding_dim: int
    dtype: str
    attrs: dict
    covariates: np.ndarray | None = None  # (N, C) float32, None when the store has none
    covariate_names: tuple[str, ...] = ()  # (C,)
    gene_subset: tuple[int, ...] | None = None  # store gene positions of a `with_genes` view

    def with_genes(self, indices) -> "StoreView":
        """A view holding only the genes at store positions `indices` (in that order): every read
        returns (n, len(indices), D) and gene positions count within the view."""
        indices = tuple(int(i) for i in indices)
        base = self.gene_subset or tuple(range(len(self.gene_names)))
        return replace(self, gene_names=tuple(self.gene_names[i] for i in indices),
                       gene_subset=tuple(base[i] for i in indices))

    @property
    def covariate_groups(self) -> dict[str, list[str]]:
        """Source covariate column -> its store columns (one, or the one-hot levels of a categorical)."""
        return {k: list(v) for k, v in self.attrs.get("covariate_groups", {}).items()}

    @property
    def relatedness(self) -> dict:
        """How relatives were handled: {"controlled": False} unless ingested with --kinship."""
        return dict(self.attrs.get("relatedness", {"controlled": False}))

    @property
    def n_subjects(self) -> int:
        return int(self.iid.shape[0])

    @property
    def n_genes(self) -> int:
        return len(self.gene_names)

    @property
    def neuro_dim(self) -> int:
        return int(np.prod(self.latent_shape))

    @property
    def chunk_rows(self) -> int:
        return int(self.neuro.chunks[0])

    def indices(self, split: str) -> np.ndarray:
        """Sorted row indices of one split ('train', 'val', 'test' or 'all')."""
        if split == "all":
            return np.arange(self.n_subjects)
        if split not in SPLIT_CODES:
            raise GenealignError(f"Unknown split '{split}': use one of train, val, test, all.")
        return np.flatnonzero(self.split == SPLIT_CODES[split])

    def gene_index(self, name: str, where: str | None = None) -> int:
        """Position of gene `name` on the gene axis; the seed's "Gene 'X' not found" error otherwise,
        naming `where` (what the user pointed at, e.g. a gene embedding directory; default the store)."""
        if name in self.gene_names:
            return self.gene_names.index(name)
        raise gene_not_found(name, self.gene_names, where or f"store {self.path}",
                             f"`genealign info --store {self.path} --list-genes`")

    def read_rows(self, rows, gene_index: int | None = None, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
        """Rows in the given order: neuro (n, V) flattened, genes (n, G, D), or (n, D) with
        `gene_index`; each chunk read once (see `row_blocks`)."""
        rows = np.asarray(rows, dtype=np.int64)
        neuro = np.empty((len(rows), self.neuro_dim), dtype=dtype)
        genes = np.empty((len(rows), *gene_shape(self, gene_index)), dtype=dtype)
        for positions, neuro_block, genes_block in row_blocks(self, rows, gene_index):
            neuro[positions] = neuro_block
            genes[positions] = genes_block
        return neuro, genes

    def read_split(self, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(rows, neuro (n, V) float32, genes (n, G, D) float32) of one split."""
        rows = self.indices(split)
        neuro, genes = self.read_rows(rows)
        return rows, neuro, genes

    def report(self) -> dict:
        """The ingest report: kept/dropped counts and every dropped subject with its reason."""
        path = self.path / REPORT_NAME
        return json.loads(path.read_text()) if path.exists() else {}

    def cohort_truth_path(self) -> Path | None:
        """`truth.json` of a `genealign synth` cohort, found beside the store's source directories."""
        sources = self.attrs.get("sources", {})
        for key in ("gene_embedding_dir", "brain_latent_dir"):
            if key in sources:
                candidate = Path(sources[key]).parent / "truth.json"
                if candidate.exists():
                    return candidate
        return None


def row_blocks(store: StoreView, rows: np.ndarray, gene_index: int | None = None, span_bytes=READ_SPAN_BYTES):
    """Yield (positions, neuro (m, V), genes (m, G, D) or (m, D)) in the store's dtype, covering `rows`.

    `positions` index into `rows`. Reads whole chunks, consecutive chunks together up to `span_bytes`
    per call (zarr reads the chunks of one call concurrently), each chunk once."""
    rows = np.asarray(rows, dtype=np.int64)
    if len(rows) == 0:
        return
    if rows.min() < 0 or rows.max() >= store.n_subjects:
        raise GenealignError(
            f"Row indices must lie in [0, {store.n_subjects}) for store {store.path}; got "
            f"{rows.min()}..{rows.max()}."
        )
    c = store.chunk_rows
    row_bytes = (store.neuro_dim + store.n_genes * store.embedding_dim) * np.dtype(store.dtype).itemsize
    chunks_per_span = max(1, span_bytes // max(1, row_bytes * c))
    order = np.argsort(rows, kind="stable")
    sorted_rows = rows[order]
    chunk_of = sorted_rows // c
    chunks = np.unique(chunk_of)
    # Runs of consecutive chunks, cut every `chunks_per_span` chunks.
    breaks = np.flatnonzero((np.diff(chunks) != 1) | (np.arange(1, len(chunks)) % chunks_per_span == 0)) + 1
    # Span buffers reused from span to span: the blocks yielded are copies taken from them.
    span_rows = min(int(chunks_per_span) * c, store.n_subjects)
    buffer_neuro = np.empty((span_rows, *store.latent_shape), dtype=store.dtype)
    buffer_genes = np.empty((span_rows, *gene_shape(store, gene_index)), dtype=store.dtype)
    for span in np.split(chunks, breaks):
        lo, hi = int(span[0]) * c, min(int(span[-1] + 1) * c, store.n_subjects)
        a, b = np.searchsorted(sorted_rows, [lo, hi])
        local = sorted_rows[a:b] - lo
        read_into(store.neuro, slice(lo, hi), buffer_neuro[: hi - lo])
        read_genes(store, slice(lo, hi), gene_index, buffer_genes[: hi - lo])
        neuro = np.take(buffer_neuro.reshape(span_rows, -1), local, axis=0)  # (m, V)
        genes = np.take(buffer_genes, local, axis=0)  # (m, G, D) | (m, D)
        yield order[a:b], neuro, genes


def read_genes(store: StoreView, rows: slice, gene_index: int | None, out: np.ndarray) -> None:
    """Gene rows `rows` into `out` ((m, G, D), or (m, D) for one gene), the view's genes only."""
    if store.gene_subset is None:
        read_into(store.genes, rows if gene_index is None else (rows, gene_index), out)
    elif gene_index is not None:
        read_into(store.genes, (rows, store.gene_subset[gene_index]), out)
    else:
        from zarr.buffer.cpu import NDBuffer

        store.genes.get_orthogonal_selection((rows, list(store.gene_subset)), out=NDBuffer.from_numpy_array(out))


def read_into(array, selection, out: np.ndarray) -> None:
    """array[selection] written into `out` (same shape and dtype) without a temporary array."""
    from zarr.buffer.cpu import NDBuffer

    array.get_basic_selection(selection, out=NDBuffer.from_numpy_array(out))


def read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def store_attrs(path: Path) -> dict | None:
    """The group attributes of a genealign store at `path`; None for anything else."""
    meta = read_json(Path(path) / "zarr.json")
    attrs = meta.get("attributes", {}) if isinstance(meta, dict) else {}
    return attrs if attrs.get("kind") == "genealign-store" else None


def stale_reasons(path: Path, attrs: dict, options: dict, fingerprints: dict) -> list[str]:
    """Why the store at `path` (its `attrs`) is not what an ingest with `options` of inputs with
    `fingerprints` (`pipeline.sources.fingerprints`) would write; empty when it is."""
    previous, changes = attrs.get("ingest", {}), []
    if attrs.get("schema_version") != SCHEMA_VERSION:
        changes.append(f"schema version {attrs.get('schema_version')} -> {SCHEMA_VERSION}")
    old_options = previous.get("options", {})
    changes += [f"{key} {_shown(old_options.get(key))} -> {_shown(value)}"
                for key, value in options.items() if previous and old_options.get(key) != value]
    if not previous:
        changes.append("it was not written by `genealign ingest`")
    elif previous.get("digest") != fingerprints["digest"]:
        changes.append(_describe_input_changes(path, attrs, fingerprints))
    return changes


def _shown(value) -> str:
    if not isinstance(value, list):
        return str(value)
    return ",".join(str(v) for v in value[:4]) + (f",... ({len(value)})" if len(value) > 4 else "")


def _describe_input_changes(path: Path, attrs: dict, fingerprints: dict) -> str:
    previous, parts = attrs.get("fingerprints", {}), []
    old_genes, new_genes = previous.get("gene_files", {}), fingerprints["gene_files"]
    for label, names in (("gene files added", sorted(set(new_genes) - set(old_genes))),
                         ("removed", sorted(set(old_genes) - set(new_genes))),
                         ("changed", sorted(n for n in set(old_genes) & set(new_genes) if old_genes[n] != new_genes[n]))):
        if names:
            parts.append(f"{label}: " + ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else ""))
    old_latents = (read_json(Path(path) / FINGERPRINTS_NAME) or {}).get("latent_files")
    new_latents = fingerprints["latent_files"]
    if old_latents is not None:
        n_added, n_removed = len(set(new_latents) - set(old_latents)), len(set(old_latents) - set(new_latents))
        n_changed = sum(1 for n in set(old_latents) & set(new_latents) if old_latents[n] != new_latents[n])
        if n_added or n_removed or n_changed:
            parts.append(f"latent files: {n_added} added, {n_removed} removed, {n_changed} changed")
    elif previous.get("latent_files", {}).get("sha256") != fingerprints["latent_digest"]:
        parts.append("latent files changed")
    if not parts:
        old = attrs.get("sources", {})
        parts.append(f"source directories were {old.get('gene_embedding_dir')} and {old.get('brain_latent_dir')}")
    return "inputs changed: " + "; ".join(parts)


def gene_not_found(name: str, available, where: str, listing: str) -> GeneNotFoundError:
    """The one "gene not found" error: close matches, a few of the genes and their count, and the
    command that lists them all (`listing`)."""
    import difflib

    available = list(available)
    same_case = [a for a in available if a.lower() == name.lower()]
    close = list(dict.fromkeys(same_case + difflib.get_close_matches(name, available, n=5, cutoff=0.6)))
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    shown = ", ".join(available[:8]) + (f", ... ({len(available):,} in all)" if len(available) > 8 else "")
    return GeneNotFoundError(f"Gene '{name}' not found in {where}.{hint} Available genes: {shown}; list them "
                             f"with {listing}.")


def drop_kind(reason: str) -> str:
    """A drop reason with its gene folded: "missing from gene X" -> "missing from a gene CSV"."""
    for prefix in ("missing from gene ", "NaN or inf in gene "):
        if reason.startswith(prefix):
            return prefix.replace("gene ", "a gene CSV")
    return reason


def drops_in_words(dropped_by_reason: dict[str, int]) -> dict[str, str]:
    """Drops per kind, e.g. {"missing from a gene CSV": "200 subjects across 63 genes"}."""
    subjects: dict[str, int] = {}
    genes: dict[str, int] = {}
    for reason, count in dropped_by_reason.items():
        kind = drop_kind(reason)
        subjects[kind] = subjects.get(kind, 0) + count
        genes[kind] = genes.get(kind, 0) + (kind != reason)
    words = {}
    for kind, n in sorted(subjects.items(), key=lambda item: -item[1]):
        words[kind] = f"{n:,} subject{'s' * (n != 1)}"
        if genes[kind]:
            words[kind] += f" across {genes[kind]:,} gene{'s' * (genes[kind] != 1)}"
    return words


def store_summary(view: StoreView) -> dict:
    """What `genealign info` prints about an opened store; drops folded by kind (every dropped
    subject with its reason is in ingest_report.json)."""
    import os

    attrs, report = view.attrs, view.report()
    counts = attrs.get("counts", {})
    compressors = getattr(view.genes, "compressors", ()) or ()
    size = float(sum(os.lstat(os.path.join(d, n)).st_size for d, _, names in os.walk(view.path) for n in names))
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            break
        size /= 1024
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
        "size_on_disk": f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}",
        "sources": attrs.get("sources", {}),
        "found": counts.get("found", report.get("found", {})),
        "dropped": len(report.get("dropped", [])),
        "dropped_by_kind": drops_in_words(report.get("dropped_by_reason", counts.get("dropped_by_reason", {}))),
        "covariates": ", ".join(view.covariate_names) or "none (ingest with --covariates FILE)",
        "relatedness": relatedness_in_words(view.relatedness),
        "report": str(view.path / REPORT_NAME),
        "created": attrs.get("created"),
        "tool_version": attrs.get("tool_version"),
        "schema_version": attrs.get("schema_version"),
    }


def relatedness_in_words(record: dict) -> str:
    """One line on how relatives were handled, for `info` and every report."""
    if not record.get("controlled"):
        return "not controlled: split by IID hash, relatives may sit across splits (ingest with --kinship)"
    return (f"controlled ({record.get('file')}, kinship >= {record.get('threshold')}): {record.get('families', 0):,} "
            f"families, {record.get('related_pairs', 0):,} related pairs, "
            f"{record.get('cross_split_pairs', 0):,} pairs across splits")


def gene_shape(store: StoreView, gene_index: int | None) -> tuple[int, ...]:
    return (store.n_genes, store.embedding_dim) if gene_index is None else (store.embedding_dim,)


def open_store(path: str | Path) -> StoreView:
    """Open an ingested store read-only; a clear error if it is missing or not ours."""
    path = Path(path)
    recover_dir(path)
    if not path.exists():
        raise GenealignError(
            f"Store {path} does not exist: create it with `genealign ingest --store {path} ...`."
        )
    try:
        import zarr

        group = zarr.open_group(str(path), mode="r")
    except Exception as exc:  # zarr raises several types for "not a group"
        raise GenealignError(f"{path} is not a Zarr store ({exc}); re-run `genealign ingest`.") from exc
    attrs = dict(group.attrs)
    if attrs.get("kind") != "genealign-store":
        raise GenealignError(f"{path} is a Zarr store but not a genealign store; re-run `genealign ingest`.")
    if attrs.get("schema_version") != SCHEMA_VERSION:
        raise GenealignError(
            f"Store {path} has schema version {attrs.get('schema_version')}, this genealign reads "
            f"{SCHEMA_VERSION}; re-run `genealign ingest --overwrite`."
        )
    for name in ("iid", "neuro", "genes", "gene_names", "split"):
        if name not in group:
            raise GenealignError(f"Store {path} lacks array '{name}'; re-run `genealign ingest --overwrite`.")
    genes = group["genes"]
    has_covariates = "covariates" in group and "covariate_names" in group
    return StoreView(
        path=path,
        iid=_as_unicode(group["iid"][:]),
        gene_names=tuple(str(g) for g in group["gene_names"][:].tolist()),
        split=np.asarray(group["split"][:], dtype=np.int8),
        neuro=group["neuro"],
        genes=genes,
        latent_shape=tuple(int(s) for s in attrs["latent_shape"]),
        embedding_dim=int(genes.shape[2]),
        dtype=str(genes.dtype),
        attrs=attrs,
        covariates=np.asarray(group["covariates"][:], dtype=np.float32) if has_covariates else None,
        covariate_names=tuple(str(c) for c in group["covariate_names"][:].tolist()) if has_covariates else (),
    )


def _as_unicode(values) -> np.ndarray:
    """Zarr 3 returns variable-width StringDType arrays; downstream code wants plain numpy '<U'."""
    return np.array([str(v) for v in np.asarray(values).tolist()])


def write_store(
    path: str | Path,
    iid,
    neuro: np.ndarray,
    genes: np.ndarray,
    gene_names,
    *,
    dtype: str = "float32",
    split_fractions=DEFAULT_SPLIT_FRACTIONS,
    attrs: dict | None = None,
    chunk_rows: int | None = None,
    covariates: np.ndarray | None = None,
    covariate_names=None,
    split: np.ndarray | None = None,
) -> StoreView:
    """Write a complete store from in-memory arrays (tests, small cohorts). `ingest` streams instead.

    Rows are sorted by IID here, so callers may pass them in any order (with `covariates` (N, C) and
    `split` (N,) codes, default `assign_split`, in the same order). Atomic (temp dir + rename)."""
    from pipeline.atomic import replace_dir, temp_dir_for

    iid = np.asarray(iid).astype(str)
    order = np.argsort(iid, kind="stable")
    iid, neuro, genes = iid[order], np.asarray(neuro)[order], np.asarray(genes)[order]
    n = len(iid)
    split = assign_split(iid, split_fractions) if split is None else np.asarray(split, dtype=np.int8)[order]
    latent_shape = tuple(neuro.shape[1:])
    tmp = temp_dir_for(path)
    group = create_store_arrays(
        tmp, n, latent_shape, genes.shape[1], genes.shape[2], dtype=dtype, chunk_rows=chunk_rows
    )
    group["iid"][:] = iid
    group["gene_names"][:] = np.asarray(list(gene_names)).astype(str)
    group["split"][:] = split
    if covariates is not None:
        write_covariates(group, np.asarray(covariates, dtype=np.float32)[order], list(covariate_names))
    group["neuro"][:] = neuro.astype(dtype)
    group["genes"][:] = genes.astype(dtype)
    meta = base_attrs(n, latent_shape, len(list(gene_names)), genes.shape[2], dtype, split_fractions)
    if covariates is not None:
        meta["covariate_groups"] = covariate_groups_of(list(covariate_names))
    meta.update(attrs or {})
    group.attrs.update(meta)
    (tmp / REPORT_NAME).write_text(json.dumps({"kept": n, "dropped": []}))
    replace_dir(tmp, path)
    return open_store(path)


def write_covariates(group, covariates: np.ndarray, names: list[str]) -> None:
    """The `covariates` (N, C) float32 and `covariate_names` (C,) arrays of an open store group."""
    n, c = covariates.shape
    if c != len(names):
        raise ValueError(f"{c} covariate columns but {len(names)} names")
    group.create_array("covariates", shape=(n, c), dtype="float32", chunks=(max(n, 1), max(c, 1)))
    group.create_array("covariate_names", shape=(c,), dtype=str, chunks=(max(c, 1),))
    group["covariates"][:] = covariates
    group["covariate_names"][:] = np.asarray(names, dtype=str)


def covariate_groups_of(names: list[str]) -> dict[str, list[str]]:
    """Store columns by source column: a one-hot level "site=site_2" belongs to "site"."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(name.split("=", 1)[0], []).append(name)
    return groups


def base_attrs(n, latent_shape, n_genes, dim, dtype, split_fractions) -> dict:
    import datetime

    from pipeline import __version__

    return {
        "kind": "genealign-store",
        "schema_version": SCHEMA_VERSION,
        "tool_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "n_subjects": int(n),
        "n_genes": int(n_genes),
        "embedding_dim": int(dim),
        "latent_shape": [int(s) for s in latent_shape],
        "dtype": str(dtype),
        "split_codes": dict(SPLIT_CODES),
        "split_fractions": list(split_fractions_valid(split_fractions)),
        "split_salt": SPLIT_SALT,
    }


def create_store_arrays(
    path: str | Path,
    n: int,
    latent_shape,
    n_genes: int,
    dim: int,
    *,
    dtype: str = "float32",
    chunk_rows: int | None = None,
    compressors=None,
) -> zarr.Group:
    """Create the empty arrays of a store at `path` (a temp dir; the caller renames it into place).

    Uncompressed by default: the latents and embeddings are dense floats that general-purpose
    compressors barely shrink, and decompression would sit on the loader's hot path."""
    itemsize = np.dtype(dtype).itemsize
    row_bytes = (int(np.prod(latent_shape)) + n_genes * dim) * itemsize
    c = chunk_rows or chunk_rows_for(row_bytes)
    c = max(1, min(c, max(n, 1)))
    import zarr

    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    group.create_array("iid", shape=(n,), dtype=str, chunks=(max(n, 1),))
    group.create_array("gene_names", shape=(n_genes,), dtype=str, chunks=(max(n_genes, 1),))
    group.create_array("split", shape=(n,), dtype="int8", chunks=(max(n, 1),), compressors=None)
    # Chunk files side by side ("c.7.0.0"), not zarr's default nested "c/7/0/0": a directory per chunk
    # was half the ingest's file-system time (mkdir ~0.25-1 ms each on ext4, 392 at 10,000 subjects).
    flat = {"name": "default", "separator": "."}
    group.create_array(
        "neuro", shape=(n, *latent_shape), dtype=dtype, chunks=(c, *latent_shape), compressors=compressors,
        chunk_key_encoding=flat,
    )
    group.create_array(
        "genes", shape=(n, n_genes, dim), dtype=dtype, chunks=(c, n_genes, dim), compressors=compressors,
        chunk_key_encoding=flat,
    )
    return group
