"""`genealign embed`: every subject's learned features as a table, for phenotype studies or a GWAS.

    export_embeddings(EmbedConfig(checkpoint=..., store=..., split="all", out="emb.parquet")) -> EmbedResult

One row per subject of the split, in store order: `IID` (text, leading zeros kept), then
`neuro_0..neuro_{P-1}` and `gene_0..gene_{P-1}` (float32: exactly `encode_neuro` / `encode_gene` of the
store's raw rows, computed by `alignment.embed.embed_model`, the features every figure is computed
from; bf16 autocast on CUDA), then `split`. The format follows the extension: `.parquet` (pyarrow;
IID a string column) or `.csv` (read it back with `dtype={"IID": str}`). The write is atomic, and an
existing file is replaced only with `overwrite`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from alignment.embed import embed_model, resolve_device
from alignment.evaluate import _checkpoint_meta, checkpoint_file, match_checkpoint, store_of
from alignment.model import MultiGeneAlignmentModel
from pipeline import GenealignError, open_store
from pipeline.atomic import atomic_write
from pipeline.store import SPLIT_CODES

FORMATS = (".parquet", ".csv")
SPLITS = ("all", "train", "val", "test")


@dataclass
class EmbedConfig:
    checkpoint: Path | str  # a checkpoint file, or a run folder (its best_model.pt)
    out: Path | str  # FILE.parquet or FILE.csv
    store: Path | str | None = None  # default: the store the checkpoint was trained on
    split: str = "all"  # all | train | val | test
    device: str = "auto"
    batch_size: int = 1024
    overwrite: bool = False  # replace an existing FILE


@dataclass
class EmbedResult:
    out: Path
    n_subjects: int
    width: int  # P, features per side
    mode: str
    split_counts: dict  # split name -> subjects written
    seconds: float


def embedding_table(model, store, rows, gene_indices, device, batch_size: int = 1024) -> pd.DataFrame:
    """IID, neuro_0..neuro_{P-1}, gene_0..gene_{P-1}, split for store `rows` (in that order)."""
    neuro_f, gene_f = embed_model(model.to(device), store, rows, gene_indices, device, batch_size)  # (n, P) each
    width = neuro_f.shape[1]
    columns = {"IID": pd.array(store.iid[rows].astype(str), dtype="string")}
    neuro_np, gene_np = neuro_f.cpu().numpy(), gene_f.cpu().numpy()
    columns.update({f"neuro_{k}": neuro_np[:, k] for k in range(width)})
    columns.update({f"gene_{k}": gene_np[:, k] for k in range(width)})
    names = np.array(sorted(SPLIT_CODES, key=SPLIT_CODES.get))  # code -> name
    columns["split"] = pd.array(names[store.split[rows].astype(np.int64)], dtype="string")
    return pd.DataFrame(columns)


def output_format(out: Path) -> str:
    """'.parquet' | '.csv' from the file name; a one-line error for anything else."""
    suffix = out.suffix.lower()
    if suffix not in FORMATS:
        raise GenealignError(f"--out {out}: write a .parquet or .csv file (the format follows the extension); got "
                             f"{suffix or 'no extension'}.")
    return suffix


def export_embeddings(config: EmbedConfig) -> EmbedResult:
    """Write the table of `embedding_table` for the split to config.out (atomic)."""
    started = time.perf_counter()
    out = Path(config.out)
    suffix = output_format(out)
    if config.split not in SPLITS:
        raise GenealignError(f"--split {config.split!r}: use one of {', '.join(SPLITS)}.")
    if out.is_dir():
        raise GenealignError(f"--out {out} is a folder; give a file name ending in .parquet or .csv.")
    if out.exists() and not config.overwrite:
        raise GenealignError(f"--out {out} exists; replace it with --overwrite or choose another file.")
    checkpoint = checkpoint_file(config.checkpoint)
    meta = _checkpoint_meta(checkpoint)
    model = MultiGeneAlignmentModel.from_checkpoint(checkpoint, map_location="cpu")
    store = open_store(store_of(config, meta))
    mode, _, gene_indices, _ = match_checkpoint(model.config, meta["config"], store, checkpoint)
    rows = store.indices(config.split)
    if len(rows) == 0:
        raise GenealignError(f"The {config.split} split of {store.path} has no subjects; choose another --split.")
    table = embedding_table(model, store, rows, gene_indices, resolve_device(config.device), config.batch_size)
    if suffix == ".parquet":
        atomic_write(out, lambda tmp: table.to_parquet(tmp, engine="pyarrow", index=False))
    else:
        # float32 values print as their shortest repr, so reading them back as float32 is exact.
        atomic_write(out, lambda tmp: table.to_csv(tmp, index=False))
    counts = {str(k): int(v) for k, v in table["split"].value_counts().items()}
    return EmbedResult(out=out, n_subjects=len(table), width=int(model.config.projection_dim), mode=mode,
                       split_counts=counts, seconds=time.perf_counter() - started)
