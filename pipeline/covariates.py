"""Covariates and relatives for `genealign ingest --covariates FILE / --kinship FILE`.

- Covariates: a CSV or TSV (tab-separated when the header has a tab) keyed by the cohort's IID
  column. Numeric columns are stored as they are; non-numeric columns, and those named by
  --categorical, are one-hot encoded against their first level (sorted), as columns "NAME=LEVEL".
  A kept subject with an empty/NA cell is dropped with the reason `missing covariate NAME` (the
  first such column in file order), one with no row with `no row in covariates file`.
- Kinship: UK Biobank's relatedness file (ukb_rel.dat: whitespace-separated `ID1 ID2 HetHet IBS0
  Kinship`). Pairs of kept subjects at or above the threshold (default 0.0442, KING's lower bound
  for third-degree relatives) join families (connected components); a whole family goes to the
  split of its smallest IID's hash, so a family's split stays put as the cohort grows and a subject
  without relatives keeps the plain IID-hash split.

IIDs in either file that are not in the cohort are counted in the report, never fatal.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import GenealignError
from pipeline.store import SPLIT_CODES, assign_split

DEFAULT_KINSHIP_THRESHOLD = 0.0442
MAX_LEVELS = 100  # a text column with more distinct values is an ID or free text, not a covariate
KINSHIP_COLUMNS = ("ID1", "ID2", "Kinship")


def file_digest(path: Path) -> str:
    """sha256 of a small side file (covariates, kinship): part of the store's reuse fingerprint."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _existing_file(path, option: str) -> Path:
    path = Path(path).expanduser().absolute()
    if not path.is_file():
        raise GenealignError(f"{option} {path}: no such file; give the path of the CSV/TSV file.")
    return path


# ----------------------------------------------------------------------------------------- covariates
@dataclass
class CovariateTable:
    """The covariates file as read: one row per IID, categoricals one-hot."""

    path: Path
    iids: np.ndarray  # (n,) str, as written
    values: np.ndarray  # (n, C) float32, NaN where the source cell was missing
    names: list[str]  # (C,) store columns
    groups: dict[str, list[str]]  # source column -> its store columns
    first_missing: np.ndarray  # (n,) int32: source column index of the first missing cell, -1 none
    sources: list[str]  # source columns in file order (the IID column excluded)


def _read_table(path: Path, what: str, **kwargs):
    import pandas as pd

    try:
        return pd.read_csv(path, **kwargs)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise GenealignError(f"{path}: cannot parse the {what} ({' '.join(str(exc).split())}).") from exc


def read_covariates(path, iid_column: str, categorical=()) -> CovariateTable:
    """The covariates file -> a `CovariateTable`; errors name the file, the column and the line."""
    path = _existing_file(path, "--covariates")
    with open(path, encoding="utf-8", errors="replace") as fh:
        sep = "\t" if "\t" in fh.readline() else ","
    frame = _read_table(path, "covariates", sep=sep, dtype={iid_column: str})
    columns = [str(c) for c in frame.columns]
    if iid_column not in columns:
        raise GenealignError(f"{path}: no '{iid_column}' column (columns: {', '.join(columns[:8])}); the covariates "
                             "file needs the same subject ID column as the gene CSVs (--iid_column).")
    for name in categorical:
        if name not in columns or name == iid_column:
            raise GenealignError(f"--categorical {name}: no such covariate column in {path} "
                                 f"(columns: {', '.join(c for c in columns if c != iid_column)}).")
    iids = frame[iid_column].fillna("").astype(str).str.strip().to_numpy(dtype=str)
    _check_iids(path, iids, iid_column)
    sources = [c for c in columns if c != iid_column]
    if not sources:
        raise GenealignError(f"{path}: no covariate columns besides '{iid_column}'.")
    blocks, names, groups = [], [], {}
    missing = np.zeros((len(frame), len(sources)), dtype=bool)
    for j, name in enumerate(sources):
        block, block_names, missing[:, j] = _encode_column(path, frame[name], name, name in categorical)
        blocks.append(block)
        names += block_names
        groups[name] = block_names
    first = np.where(missing.any(axis=1), missing.argmax(axis=1), -1).astype(np.int32)
    values = np.concatenate(blocks, axis=1) if blocks else np.zeros((len(frame), 0), np.float32)
    return CovariateTable(path, iids, values.astype(np.float32), names, groups, first, sources)


def _check_iids(path: Path, iids: np.ndarray, iid_column: str) -> None:
    empty = np.flatnonzero(iids == "")
    if empty.size:
        raise GenealignError(f"{path} line {empty[0] + 2}: empty {iid_column}; every row needs a subject ID.")
    order = np.argsort(iids, kind="stable")
    repeated = np.flatnonzero(iids[order][1:] == iids[order][:-1])
    if repeated.size:
        iid = iids[order][repeated[0]]
        first, second = (np.flatnonzero(iids == iid)[:2] + 2).tolist()
        raise GenealignError(f"{path}: {iid_column} '{iid}' appears twice, on lines {first} and {second}; "
                             "each subject needs exactly one row of covariates.")


def _encode_column(path: Path, column, name: str, categorical: bool):
    """One source column -> (values (n, k), store names (k,), missing (n,) bool)."""
    import pandas as pd

    missing = column.isna().to_numpy().copy()
    if not categorical and not pd.api.types.is_numeric_dtype(column):
        numbers = pd.to_numeric(column, errors="coerce")
        bad = numbers.isna().to_numpy() & ~missing
        if bad.mean() < 0.5:  # mostly numbers: a typo, not a categorical column
            row = int(np.flatnonzero(bad)[0])
            raise GenealignError(f"{path} line {row + 2}, column '{name}': '{column.iloc[row]}' is not a number; fix "
                                 f"the cell or declare the column with --categorical {name}.")
        categorical = True
    if not categorical:
        values = column.to_numpy(dtype=np.float64)
        missing |= ~np.isfinite(values)
        return values[:, None], [name], missing
    shown = column.map(lambda v: f"{v:g}") if pd.api.types.is_numeric_dtype(column) else column.astype(str)
    text = shown.str.strip().where(~column.isna())
    levels = sorted(set(text.dropna().tolist()))
    if len(levels) > MAX_LEVELS:
        raise GenealignError(f"{path}, column '{name}': {len(levels)} distinct values, too many for a categorical "
                             "covariate (an ID or free text?); drop the column or code it as a number.")
    codes = text.to_numpy(dtype=object)
    values = np.stack([(codes == level).astype(np.float64) for level in levels[1:]], axis=1) if len(levels) > 1 \
        else np.zeros((len(codes), 0))
    values[missing] = np.nan
    return values, [f"{name}={level}" for level in levels[1:]], missing


def align_covariates(table: CovariateTable, universe: np.ndarray) -> tuple[np.ndarray, list[str | None]]:
    """Per IID of the sorted `universe`: its row in `table` (-1: none) and why it cannot be kept
    for its covariates (None: it can)."""
    order = np.argsort(table.iids, kind="stable")
    sorted_iids = table.iids[order]
    pos = np.minimum(np.searchsorted(sorted_iids, universe), max(len(sorted_iids) - 1, 0))
    found = (sorted_iids[pos] == universe) if len(sorted_iids) else np.zeros(len(universe), bool)
    rows = np.where(found, order[pos] if len(order) else 0, -1)
    reasons: list[str | None] = []
    for row in rows.tolist():
        if row < 0:
            reasons.append("no row in covariates file")
        elif table.first_missing[row] >= 0:
            reasons.append(f"missing covariate {table.sources[table.first_missing[row]]}")
        else:
            reasons.append(None)
    return rows, reasons


# -------------------------------------------------------------------------------------------- kinship
@dataclass
class KinshipPairs:
    path: Path
    id1: np.ndarray  # (m,) str
    id2: np.ndarray  # (m,) str
    kinship: np.ndarray  # (m,) float64


def read_kinship(path) -> KinshipPairs:
    """A ukb_rel.dat-style file -> its pairs; errors name the file, the column and the line."""
    import pandas as pd

    path = _existing_file(path, "--kinship")
    frame = _read_table(path, "kinship file", sep=r"\s+", dtype={"ID1": str, "ID2": str, "Kinship": str})
    absent = [c for c in KINSHIP_COLUMNS if c not in frame.columns]
    if absent:
        raise GenealignError(f"{path}: no column {', '.join(absent)} (header: {' '.join(map(str, frame.columns))}); "
                             "a kinship file needs the UK Biobank header `ID1 ID2 HetHet IBS0 Kinship`.")
    values = pd.to_numeric(frame["Kinship"], errors="coerce").to_numpy(dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        row = int(bad[0])
        raise GenealignError(f"{path} line {row + 2}, column 'Kinship': '{frame['Kinship'].iloc[row]}' is not a "
                             "number; every pair needs a numeric kinship coefficient.")
    id1, id2 = (frame[c].fillna("").astype(str).str.strip().to_numpy(dtype=str) for c in ("ID1", "ID2"))
    empty = np.flatnonzero((id1 == "") | (id2 == ""))
    if empty.size:
        raise GenealignError(f"{path} line {empty[0] + 2}: empty ID1 or ID2; every line names two subjects.")
    return KinshipPairs(path, id1, id2, values)


def family_split(kept_iids: np.ndarray, pairs: KinshipPairs, threshold: float,
                 fractions) -> tuple[np.ndarray, dict]:
    """Split codes (N,) int8 of the sorted `kept_iids` with every family in one split, and the
    relatedness record for the store (families, related pairs, pairs across splits)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(kept_iids)
    a, in_a = _positions(kept_iids, pairs.id1)
    b, in_b = _positions(kept_iids, pairs.id2)
    related = pairs.kinship >= threshold
    use = related & in_a & in_b & (a != b)
    graph = coo_matrix((np.ones(int(use.sum())), (a[use], b[use])), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    # kept_iids is sorted, so the first member of each component is its smallest IID.
    first_member = np.full(labels.max() + 1 if n else 0, n, dtype=np.int64)
    np.minimum.at(first_member, labels, np.arange(n))
    split = assign_split(kept_iids[first_member], fractions)[labels] if n else np.zeros(0, np.int8)
    sizes = np.bincount(labels) if n else np.zeros(0, np.int64)
    hashed = assign_split(kept_iids, fractions)  # what the split would be without --kinship
    record = {
        "controlled": True, "file": str(pairs.path), "threshold": float(threshold),
        "pairs_in_file": int(len(pairs.kinship)), "pairs_below_threshold": int((~related).sum()),
        "pairs_with_iid_not_in_cohort": int((related & ~(in_a & in_b)).sum()),
        "related_pairs": int(use.sum()), "families": int((sizes > 1).sum()),
        "subjects_in_families": int(sizes[sizes > 1].sum()),
        "cross_split_pairs": int((split[a[use]] != split[b[use]]).sum()),
        "cross_split_pairs_with_iid_hash_split": int((hashed[a[use]] != hashed[b[use]]).sum()),
        "subjects_in_families_by_split": {name: int(np.isin(labels[split == code], np.flatnonzero(sizes > 1)).sum())
                         for name, code in SPLIT_CODES.items()},
    }
    return split.astype(np.int8), record


def _positions(sorted_iids: np.ndarray, iids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if len(sorted_iids) == 0:
        return np.zeros(len(iids), np.int64), np.zeros(len(iids), bool)
    pos = np.minimum(np.searchsorted(sorted_iids, iids), len(sorted_iids) - 1)
    return pos, sorted_iids[pos] == iids


# ------------------------------------------------------------------------------- the ingest's side files
@dataclass
class SideFiles:
    """What `ingest` reads besides the gene CSVs and latents (each None when not given)."""

    covariates: CovariateTable | None = None
    kinship: KinshipPairs | None = None
    threshold: float = DEFAULT_KINSHIP_THRESHOLD
    categorical: tuple[str, ...] = ()

    def options(self) -> dict:
        """The store's ingest options for these files: a changed file or setting makes the store stale."""
        cov, kin = self.covariates, self.kinship
        return {
            "covariates": None if cov is None else f"{cov.path} (sha256 {file_digest(cov.path)[:16]})",
            "categorical": sorted(self.categorical),
            "kinship": None if kin is None else f"{kin.path} (sha256 {file_digest(kin.path)[:16]})",
            "kinship_threshold": None if kin is None else self.threshold,
        }

    def reasons(self, universe: np.ndarray) -> tuple[np.ndarray, list[str | None]]:
        """Per IID of the sorted universe: its covariates row (-1: none) and its drop reason, if any."""
        if self.covariates is None:
            return np.full(len(universe), -1), [None] * len(universe)
        return align_covariates(self.covariates, universe)

    def write(self, group, kept_iids: np.ndarray, covariate_rows: np.ndarray, fractions) -> tuple[np.ndarray, dict]:
        """The store's split (families kept together with a kinship file) and covariate arrays;
        returns (split (N,) int8, {"relatedness": ..., "covariates": ...} for the attrs and report)."""
        from pipeline.store import write_covariates

        extra: dict = {"relatedness": uncontrolled_relatedness(), "covariates": None}
        if self.kinship is None:
            split = assign_split(kept_iids, fractions)
        else:
            split, extra["relatedness"] = family_split(kept_iids, self.kinship, self.threshold, fractions)
        if self.covariates is not None:
            table = self.covariates
            write_covariates(group, table.values[covariate_rows], table.names)
            kept = set(kept_iids.tolist())
            extra["covariates"] = {
                "file": str(table.path), "columns": table.names, "groups": table.groups,
                "rows_in_file": int(len(table.iids)),
                "rows_not_in_store": int(sum(1 for iid in table.iids.tolist() if iid not in kept)),
            }
        return split, extra


def read_side_files(covariates, categorical, iid_column: str, kinship, threshold: float) -> SideFiles:
    """Read --covariates and --kinship (when given) before the long parse, so their errors come first."""
    if threshold is None or not (0.0 < float(threshold) <= 0.5):
        raise GenealignError(f"--kinship_threshold {threshold}: give a KING kinship coefficient in (0, 0.5] "
                             f"(default {DEFAULT_KINSHIP_THRESHOLD}, third-degree relatives or closer).")
    if categorical and covariates is None:
        raise GenealignError("--categorical names columns of the covariates file: give --covariates FILE too.")
    return SideFiles(
        covariates=None if covariates is None else read_covariates(covariates, iid_column, tuple(categorical)),
        kinship=None if kinship is None else read_kinship(kinship), threshold=float(threshold),
        categorical=tuple(categorical),
    )


def uncontrolled_relatedness() -> dict:
    """The relatedness record of a store ingested without --kinship."""
    return {"controlled": False, "note": "split by IID hash; relatives may sit across splits (ingest with --kinship)"}
