"""The files `genealign synth` writes, and how it knows them again.

- `write_gene_csv`: a gene CSV (`IID,emb_0..`) with a fixed number of decimals, vectorised.
- The marker `MARKER_NAME` in the cohort folder lists every file synth wrote there (paths relative to
  the folder) and the settings it used. `claim_folder` lets synth write only into an empty or missing
  folder or one holding nothing but its own earlier output; a file synth did not write is never
  replaced or deleted, with or without `overwrite`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np

from pipeline import synth_confounds as confounds
from pipeline.atomic import atomic_write_json
from pipeline.errors import GenealignError
from pipeline.sources import DEFAULT_IID_COLUMN

TRUTH_NAME = "truth.json"
GENERATOR = "genealign-synth"
GENERATOR_VERSION = 1
MARKER_NAME = ".genealign-synth.json"
WRITER = "genealign synth"
# Debris of an interrupted run: temp dirs / files (pipeline.atomic) beside synth's own names.
_DEBRIS = re.compile(r"^\.\.?(gene_embeddings|brain_latent|truth\.json|covariates\.csv|kinship\.dat|genealign-synth\.json)"
                     r"(\..*)?(\.partial|\.previous|\.tmp)$")


# ------------------------------------------------------------------------------------ ownership
def read_marker(out: Path) -> dict | None:
    """The marker of an earlier synth run in `out`, or None when there is none."""
    path = out / MARKER_NAME
    if not path.exists():
        return None
    try:
        marker = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        marker = None
    if not isinstance(marker, dict) or marker.get("written_by") != WRITER or not isinstance(marker.get("files"), list):
        raise GenealignError(f"{path} is not a genealign synth marker; move it away or choose another output folder.")
    return marker


def _walk_files(out: Path):
    """Every file under `out` as (relative posix path, absolute path), in sorted order; synth's own
    debris at the top level is skipped."""
    for root, dirs, files in os.walk(out):
        rel_root = Path(root).relative_to(out)
        if rel_root == Path("."):
            dirs[:] = [d for d in dirs if not _DEBRIS.match(d)]
            files = [f for f in files if not _DEBRIS.match(f) and f != MARKER_NAME]
        dirs.sort()
        for name in sorted(files):
            yield (rel_root / name).as_posix(), Path(root) / name


def claim_folder(out: Path, settings: dict, overwrite: bool) -> list:
    """Check that synth may write into `out`; return the files (relative paths) of its earlier output
    there. Raises a GenealignError naming the first file synth did not write, or, without
    `overwrite`, when the earlier output was made with other settings."""
    out = Path(out)
    if not out.exists():
        return []
    if not out.is_dir():
        raise GenealignError(f"{out} is a file, not a folder; choose another output folder for genealign synth.")
    marker = read_marker(out)
    own = set(marker["files"]) if marker else set()
    for rel, path in _walk_files(out):
        if rel in own:
            continue
        if marker is None and rel == "truth.json":
            raise GenealignError(
                f"{path} was written by an older genealign synth that left no marker ({MARKER_NAME}); delete "
                "that cohort yourself or choose another output folder."
            )
        raise GenealignError(
            f"{path} was not written by genealign synth: move it out of {out} or choose another output folder "
            "(synth replaces only its own files, even with --overwrite)."
        )
    if marker and marker.get("settings") != settings and not overwrite:
        old = marker.get("settings") or {}
        keys = [*settings, *(k for k in old if k not in settings)]
        changed = [f"{k} {old.get(k)!r} -> {settings.get(k)!r}" for k in keys if old.get(k) != settings.get(k)]
        raise GenealignError(
            f"{out} holds a cohort genealign synth made with other settings ({'; '.join(changed[:3]) or 'unknown'}); "
            "pass --overwrite to replace it, or choose another output folder."
        )
    return sorted(own)


def write_marker(out: Path, settings: dict, files, complete: bool) -> None:
    """Record what synth wrote (or is about to write) in `out`."""
    atomic_write_json(out / MARKER_NAME, {"written_by": WRITER, "settings": settings, "complete": complete,
                                          "files": sorted(set(files))})


def remove_own(out: Path, files, keep) -> None:
    """Delete synth's earlier top-level files not in `keep`, and its debris (both listed by synth itself)."""
    keep = set(keep)
    for rel in files:
        if "/" not in rel and rel not in keep:
            (out / rel).unlink(missing_ok=True)
    for entry in out.iterdir():
        if _DEBRIS.match(entry.name):
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------- truth
def settings_record(config) -> dict:
    """The config as truth.json and the marker record it (JSON types, no output folder; the confound
    options only when used by the `SynthConfig`, so a cohort without them reads as before they existed)."""
    values = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items() if k != "out_dir"}
    for name, unused in (("confounds", False), ("families", 0.0)):
        if values[name] == unused:
            del values[name]
    return values


def truth_record(model, subjects, confound_spec) -> dict:
    """truth.json of a cohort: the generator's `_Model` and `_Subjects` (pipeline.synth) as JSON."""
    cfg, spec = model.config, model.spec
    names = model.gene_names
    planted = {names[j]: s for j, s in sorted(model.causal.items(), key=lambda kv: -kv[1])}
    no_signal = cfg.null or cfg.signal == 0
    components = []
    for m, (kind, (v1, v2)) in enumerate(zip(model.kinds, model.vectors)):
        entry = {"index": m, "kind": kind}
        if kind == "interaction":
            entry["genes"] = [names[j] for j in model.interaction]
        else:
            entry["factors"] = sorted({int(k) for k in np.flatnonzero(np.abs(v1) + np.abs(v2) > 1e-12)})
        components.append(entry)
    config = settings_record(cfg)
    truth = {
        "generator": GENERATOR,
        "generator_version": GENERATOR_VERSION,
        "config": config,
        "spec": asdict(spec),
        "gene_names": list(names),
        "null": cfg.null,
        "signal": cfg.signal,
        # Genes with a main effect on the brain, strongest first ({} when nothing reaches the brain).
        "causal_genes": {} if no_signal else planted,
        # The same genes' planted structure, also in a null cohort (their embeddings are identical).
        "planted_genes": planted,
        "gene_factors": {names[j]: model.gene_factors[j] for j in model.causal},
        "interaction": (
            {"genes": [names[j] for j in model.interaction], "factors": ["u", "w"], "component": len(model.kinds) - 1,
             "strength": spec.interaction_amplitude, "active": not no_signal}
            if model.interaction else None
        ),
        "noise_genes": [n for j, n in enumerate(names) if j not in model.causal and j not in model.interaction],
        "brain_components": components,
        "n_subjects": cfg.subjects,
        "n_complete": cfg.subjects - len(subjects.missing_latent) - len(subjects.missing_row),
        "missing_latent": sorted(str(subjects.iid[s]) for s in subjects.missing_latent),
        "missing_gene_row": dict(sorted((str(subjects.iid[s]), names[g]) for s, g in subjects.missing_row.items())),
        "csv_decimals": spec.decimals,
        "notes": {
            "strength": "a causal gene's loading scale; alone it gives ~strength^2 * spec.gene_precision "
                        "of precision on each factor of z it carries (gene_factors)",
            "interaction": "gene a carries only u, gene b only w; the brain component is u * w",
            "oracle": "pipeline.oracle.oracle_embeddings rebuilds every parameter from config + spec",
        },
    }
    if cfg.confounds:
        truth["confounds"] = confounds.confounds_truth(confound_spec, subjects.covariates, names)
    if cfg.families > 0:
        truth["families"] = confounds.families_truth(confound_spec, cfg.families, subjects.families, subjects.iid)
    return truth


# ------------------------------------------------------------------------------------ CSV writer


def _text_tables(decimals: int) -> tuple[np.ndarray, np.ndarray]:
    """uint64 lookup tables whose 8 bytes spell text, zero bytes as padding (dropped at the end).

    prefix[neg * 100 + integer_part] = "-12." ; fraction[f] = "01234," (decimals digits + ',')."""
    prefix = np.zeros((200, 8), np.uint8)
    for neg in (0, 1):
        for ip in range(100):
            text = ("-" if neg else "") + f"{ip}."
            prefix[neg * 100 + ip, : len(text)] = np.frombuffer(text.encode(), np.uint8)
    scale = 10**decimals
    frac = np.zeros((scale, 8), np.uint8)
    digits = np.arange(scale)
    for p in range(decimals):
        frac[:, decimals - 1 - p] = 48 + (digits // 10**p) % 10
    frac[:, decimals] = ord(",")
    return prefix.view(np.uint64).ravel(), frac.view(np.uint64).ravel()


def _iid_tokens(iid: np.ndarray) -> np.ndarray:
    """(n,) uint64 whose bytes spell the 7-digit IID followed by ','."""
    tok = np.zeros((len(iid), 8), np.uint8)
    for p in range(7):
        tok[:, 6 - p] = 48 + (iid // 10**p) % 10
    tok[:, 7] = ord(",")
    return tok.view(np.uint64).ravel()


def write_gene_csv(path: Path, iid: np.ndarray, values: np.ndarray, decimals: int) -> None:
    """Write `IID,emb_0..emb_{D-1}` rows with `decimals` fixed decimals, vectorised: each value is two
    table look-ups (sign + integer part, fraction) into a uint64 buffer whose zero padding bytes are
    then deleted (bytes.translate). |values| must be < 99 (the generator's values are O(1))."""
    values = np.asarray(values, dtype=np.float64)
    n_rows, D = values.shape
    assert 1 <= decimals <= 6 and (n_rows == 0 or np.abs(values).max() < 99.0), "value out of the writer's range"
    prefix_table, frac_table = _text_tables(decimals)
    tokens = _iid_tokens(np.asarray(iid, dtype=np.int64))
    scale = 10**decimals
    header = (DEFAULT_IID_COLUMN + "," + ",".join(f"emb_{d}" for d in range(D)) + "\n").encode()
    chunk = 256  # rows per block: keeps the byte buffer in cache
    buffer = np.empty((chunk, 1 + 2 * D), np.uint64)  # IID token, then (prefix, fraction) per value
    with open(path, "wb") as fh:
        fh.write(header)
        for lo in range(0, n_rows, chunk):
            block = values[lo : lo + chunk]
            m = len(block)
            q = np.rint(block * scale).astype(np.int64)  # (m, D)
            mag = np.abs(q)
            whole = mag // scale
            rows = buffer[:m]
            rows[:, 0] = tokens[lo : lo + m]
            np.take(prefix_table, whole + (q < 0) * 100, out=rows[:, 1::2])
            np.take(frac_table, mag - whole * scale, out=rows[:, 2::2])
            text = rows.view(np.uint8).reshape(m, -1)
            text[:, -8 + decimals] = 10  # the last value ends its line with '\n' instead of ','
            fh.write(rows.tobytes().translate(None, b"\x00"))
