"""The two input formats, as the seed defines them, and their readers.

- Gene embeddings: one CSV per gene, `{GENE}_brain_gene_embeddingUKB.csv`, an `IID` column then one
  float column per embedding dimension (256 in UK Biobank).
- Brain latents: one `{IID}_latent.npz` per subject holding one array (key `latent`), shape
  (3, 15, 18, 15) in UK Biobank.

The writer (`synth`) and the reader (`ingest`) both name files through these functions. The readers
raise `GenealignError` naming the file, the line (as an editor shows it) and the column at fault.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from pipeline.errors import GenealignError

GENE_FILE_SUFFIX = "_brain_gene_embeddingUKB.csv"
LATENT_FILE_SUFFIX = "_latent.npz"
DEFAULT_IID_COLUMN = "IID"
DEFAULT_LATENT_KEY = "latent"
FLOAT16_MAX = float(np.finfo(np.float16).max)
# The strings pandas reads as NaN by default: such a cell drops the subject ("NaN or inf in gene X").
_NA_STRINGS = frozenset(
    ["", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
     "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"]
)


def gene_file_name(gene: str) -> str:
    return f"{gene}{GENE_FILE_SUFFIX}"


def latent_file_name(iid: str) -> str:
    return f"{iid}{LATENT_FILE_SUFFIX}"


def existing_dir(path, option: str, what: str) -> Path:
    """`path` resolved, or an error naming the option to check."""
    path = Path(path).expanduser()
    if not path.exists():
        raise GenealignError(f"{what} directory {path} does not exist (check {option}).")
    if not path.is_dir():
        raise GenealignError(f"{what} directory {path} is not a directory (check {option}).")
    return path.resolve()


def gene_names_in(directory: Path) -> list[str]:
    """Sorted names of the genes with a `{GENE}_brain_gene_embeddingUKB.csv` in `directory`."""
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


def latent_files_in(directory: Path) -> list[tuple[str, int, int]]:
    """(IID, size, mtime_ns) of every `{IID}_latent.npz` in `directory`, sorted by IID text."""
    found = []
    for entry in os.scandir(directory):
        if entry.name.endswith(LATENT_FILE_SUFFIX) and entry.is_file():
            stat = entry.stat()
            found.append((entry.name[: -len(LATENT_FILE_SUFFIX)], stat.st_size, stat.st_mtime_ns))
    if not found:
        raise GenealignError(
            f"No brain latent files found in {directory}: expected files named {{IID}}{LATENT_FILE_SUFFIX}; "
            "check --brain_latent_dir."
        )
    return sorted(found)


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
    names = [name.strip() for line in text.splitlines() for name in line.split("#", 1)[0].split(",")]
    names = tuple(dict.fromkeys(name for name in names if name))
    if not names:
        raise GenealignError(f"No gene names in {where}: give names like APOE,BDNF.")
    return names


def fingerprints(gene_dir: Path, latent_dir: Path, gene_paths: list[Path], latents: list[tuple[str, int, int]],
                 head_bytes: int = 64 << 10) -> dict:
    """What identifies the inputs: size + mtime_ns of every file and a SHA-256 of each gene CSV's
    first `head_bytes` (its header), with digests of the latents' part and of the whole."""
    gene_files = {}
    for path in gene_paths:
        stat = path.stat()
        with open(path, "rb") as fh:
            gene_files[path.name] = [stat.st_size, stat.st_mtime_ns, hashlib.sha256(fh.read(head_bytes)).hexdigest()]
    latent_files = {latent_file_name(iid): [size, mtime] for iid, size, mtime in latents}
    latent_digest = hashlib.sha256(json.dumps(latent_files).encode()).hexdigest()
    digest = hashlib.sha256(json.dumps({"sources": [str(gene_dir), str(latent_dir)], "genes": gene_files,
                                        "latents": latent_digest}).encode()).hexdigest()
    return {"gene_files": gene_files, "latent_files": latent_files, "latent_digest": latent_digest, "digest": digest}


def read_header(path: Path) -> list[str]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            header = next(csv.reader(fh), None)
    except (OSError, UnicodeDecodeError) as exc:
        raise GenealignError(f"{path}: cannot read the header ({exc}).") from exc
    if not header:
        raise GenealignError(f"{path} is empty; expected a header line: IID then one column per dimension.")
    return header


def embedding_width(paths: list[Path], headers: list[list[str]], iid_column: str) -> int:
    """D, the number of value columns every gene CSV shares; an error naming the first that differs."""
    width = width_path = None
    for path, columns in zip(paths, headers):
        if iid_column not in columns:
            shown = ", ".join(columns[:6]) + (f", ... ({len(columns)} columns)" if len(columns) > 6 else "")
            raise GenealignError(
                f"{path}: no IID column '{iid_column}'; columns found: {shown}. "
                "Pass --iid_column with the name of the subject ID column."
            )
        if len(columns) < 2:
            raise GenealignError(
                f"{path}: only the IID column, no embedding columns; expected IID then one column per dimension."
            )
        if width is None:
            width, width_path = len(columns) - 1, path
        elif len(columns) - 1 != width:
            raise GenealignError(
                f"Gene embedding widths differ: {width_path.name} has {width} value columns, {path.name} has "
                f"{len(columns) - 1}; every gene CSV must have the same number of embedding columns."
            )
    return int(width)


def read_gene_csv(path: Path, columns: list[str], iid_column: str, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """One gene CSV -> (IIDs (n,) str as written, values (n, D) float32; NaN where a cell is empty or
    NA). Errors name the line and column: malformed rows, non-numeric cells, empty IIDs, values
    beyond float16 when `dtype` is float16."""
    import pandas as pd

    try:
        frame = _read_gene_frame(path, iid_column)
        values = frame.to_numpy(dtype=np.float32)  # (n, D)
    except ValueError as exc:
        if isinstance(exc, pd.errors.ParserError):
            raise GenealignError(
                f"{path}: malformed CSV ({' '.join(str(exc).split())}); every row needs the header's "
                f"{len(columns)} columns."
            ) from exc
        if isinstance(exc, UnicodeDecodeError):
            raise GenealignError(f"{path}: not UTF-8 text ({exc}).") from exc
        raise GenealignError(_describe_non_numeric(path, columns, iid_column, exc)) from exc
    except OSError as exc:
        raise GenealignError(f"{path}: cannot read ({exc}).") from exc
    iid_index = frame.index
    del frame
    if iid_index.isna().any():  # the NA-aware parse read "NA", "null", "" as missing: re-read them verbatim
        iid_index = pd.read_csv(path, usecols=[iid_column], dtype=str, keep_default_na=False)[iid_column]
    iids = iid_index.to_numpy(dtype=str)  # (n,)
    empty = np.flatnonzero(iids == "")
    if empty.size:
        raise GenealignError(f"{path} line {editor_lines(path, empty[:1])[0]}: empty {iid_column}; every row "
                             "needs a subject ID.")
    if values.shape[1] != len(columns) - 1:
        raise GenealignError(
            f"{path}: {values.shape[1]} value columns where the header has {len(columns) - 1}; check for stray "
            "separators."
        )
    if dtype == "float16":
        too_big = np.abs(np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)) > FLOAT16_MAX
        if too_big.any():
            row, col = np.argwhere(too_big)[0]
            value_columns = [c for c in columns if c != iid_column]
            raise GenealignError(
                f"{path} line {editor_lines(path, [row])[0]}, column '{value_columns[col]}': {values[row, col]:g} "
                "exceeds the float16 range; use --dtype float32."
            )
    return iids, values


def _read_gene_frame(path: Path, iid_column: str):
    """The CSV as a frame: index = IID text, float32 columns (n, D). Parsed first without NA detection
    (cheaper); an NA string or a non-numeric cell then fails that parse, and the file is read again
    with pandas' NA strings as NaN, where a non-numeric cell fails for good. Typed columns mean a cell
    only Python's float() reads ("1_0") is an error, not 10.0 via an object column."""
    import pandas as pd

    dtype = defaultdict(lambda: np.float32, {iid_column: str})
    try:
        return pd.read_csv(path, dtype=dtype, index_col=iid_column, na_filter=False)
    except ValueError as exc:
        if isinstance(exc, (pd.errors.ParserError, UnicodeDecodeError)):
            raise
    return pd.read_csv(path, dtype=dtype, index_col=iid_column)


def editor_lines(path: Path, rows) -> list[int]:
    """Line numbers (as a text editor shows them) of data rows (0-based, as pandas counts them:
    blank lines skipped). Only called to explain an error, so a slow scan is fine."""
    wanted = {int(r): None for r in rows}
    for row, line, _ in _records(path):
        if row in wanted:
            wanted[row] = line
            if all(v is not None for v in wanted.values()):
                break
    return [wanted[int(r)] for r in rows]


def _records(path: Path):
    """(row, first line, cells) of every non-blank data record of a CSV."""
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        next(reader, None)
        row, previous_end = -1, reader.line_num
        for record in reader:
            start, previous_end = previous_end + 1, reader.line_num
            if record:
                row += 1
                yield row, start, record


def _describe_non_numeric(path: Path, columns: list[str], iid_column: str, exc: Exception) -> str:
    iid_at = columns.index(iid_column)
    for _, line, record in _records(path):
        for j, cell in enumerate(record):
            if j == iid_at or cell in _NA_STRINGS:
                continue
            try:
                float(cell)
                ok = "_" not in cell
            except ValueError:
                ok = False
            if not ok:
                column = columns[j] if j < len(columns) else f"#{j + 1}"
                return (
                    f"{path} line {line}, column '{column}': '{cell}' is not a number; gene embedding values "
                    "must be numeric (an empty or NaN cell drops the subject instead)."
                )
    return f"{path}: a value is not a number ({exc}); gene embedding values must be numeric."


def load_latent(path: Path, key: str | None, dtype: str) -> tuple[np.ndarray | None, tuple[str, str] | None]:
    """(array, None), or (None, (reason, detail)) for a file that drops its subject. A wrong or
    ambiguous --latent_key and a value beyond float16 raise instead: they are the user's settings."""
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):  # a bare .npy under an .npz name
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


def no_pairs_message(universe, has_latent, n_present, n_genes: int, dropped, found) -> str:
    """The ingest's error when no subject is on both sides: counts, examples of each side's IIDs."""
    gene_side = n_present > 0
    latent_examples = (universe[has_latent & ~gene_side][:3].tolist() or universe[has_latent][:3].tolist())
    gene_examples = (universe[gene_side & ~has_latent][:3].tolist() or universe[gene_side][:3].tolist())
    reasons = Counter(entry["reason"] for entry in dropped).most_common(3)
    return (
        f"No paired subjects: none has both a usable latent and a finite row in every selected gene CSV. "
        f"{found['latent files']} latent files (e.g. {', '.join(latent_examples) or '-'}), "
        f"{found['IIDs in any gene CSV']} IIDs in the gene CSVs (e.g. {', '.join(gene_examples) or '-'}), "
        f"{int((has_latent & gene_side).sum())} on both sides, {int((n_present == n_genes).sum())} in every gene "
        f"CSV; top reasons: {', '.join(f'{r} ({n})' for r, n in reasons)}. IIDs are compared as text (leading "
        "zeros count): check --iid_column and the latent file names."
    )
