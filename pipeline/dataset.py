"""`MultiGeneNeuroDataset`: the seed's per-subject Dataset API, served from an ingested store.

Code written against the seed keeps working (`dataset[0]['neuro_embedding']`, `dataset.gene_names`,
`MultiGeneNeuroDataset.get_all_gene_names(dir)`), but the source CSVs and npz files are read once:
the first construction ingests them into a cached Zarr store and later ones reuse it. `ingest` is a
quick no-op when the sources are unchanged (same file sizes and mtimes); when they changed it refuses
to replace the store, and the dataset runs it again with overwrite, since the cached store is ours.

This API is for inference and compatibility: `__getitem__` reads one subject from the store. Training
does not go through it; it uses `pipeline.loader.BatchLoader`, which gathers whole batches at once.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from pipeline.errors import GenealignError
from pipeline.store import StoreView, open_store

MODES = ("sequence", "single")


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/genealign, else ~/.cache/genealign."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "genealign"


def cached_store_path(gene_embedding_dir, brain_latent_dir, iid_column="IID", cache_dir=None) -> Path:
    """Where the store ingested from these sources is cached: one store per (absolute source
    directories, IID column). Whether its contents are still current is `ingest`'s check."""
    key = "\0".join([str(Path(gene_embedding_dir).resolve()), str(Path(brain_latent_dir).resolve()), iid_column])
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    return Path(cache_dir or default_cache_dir()) / f"{digest}.zarr"


class MultiGeneNeuroDataset(Dataset):
    """One subject per item, as the seed's Dataset gave it.

    Sequence mode: {'neuro_embedding': (V,) float32, 'gene_sequence': (G, D) float32, 'iid': str,
    'gene_names': list[str]}. Single mode: {'neuro_embedding', 'gene_embedding': (D,) float32, 'iid',
    'gene_name': str}. V = prod(latent_shape) = 12150 and D = 256 in UK Biobank.

    Construction ingests the sources into a cached store (under `cache_dir`, default
    $XDG_CACHE_HOME/genealign or ~/.cache/genealign) the first time and reuses it afterwards;
    `MultiGeneNeuroDataset.from_store(path)` serves an existing store instead. `split` ('all', the
    seed's behaviour, or 'train' / 'val' / 'test') restricts the items to one split of the store.
    """

    def __init__(
        self,
        brain_latent_dir,
        gene_embedding_dir,
        iid_column: str = "IID",
        gene_embedding_dim: int = 256,
        mode: str = "sequence",
        single_gene_name: str | None = None,
        *,
        cache_dir=None,
        split: str = "all",
    ):
        from pipeline.ingest import IngestConfig, ingest

        store_path = cached_store_path(gene_embedding_dir, brain_latent_dir, iid_column, cache_dir)
        store_path.parent.mkdir(parents=True, exist_ok=True)
        # ingest's default workers=1 on purpose: its workers are spawned processes, and spawning from a
        # script without an `if __name__ == "__main__"` guard (like the seed's example) re-runs the script.
        config = IngestConfig(
            gene_embedding_dir=Path(gene_embedding_dir),
            brain_latent_dir=Path(brain_latent_dir),
            store=store_path,
            iid_column=iid_column,
        )
        try:
            self.ingest_result = ingest(config)
        except GenealignError:
            # ingest refuses to replace a store whose sources changed unless told to. This store is our
            # cache of those sources, so rebuild it; any other mistake is raised again by this call.
            if not store_path.exists():
                raise
            self.ingest_result = ingest(replace(config, overwrite=True))
        self._setup(open_store(store_path), mode, single_gene_name, gene_embedding_dim, split,
                    source=f"gene embedding directory {gene_embedding_dir}")

    @classmethod
    def from_store(
        cls,
        path,
        mode: str = "sequence",
        single_gene_name: str | None = None,
        *,
        gene_embedding_dim: int | None = None,
        split: str = "all",
    ) -> "MultiGeneNeuroDataset":
        """The dataset of an existing store (e.g. one made by `genealign ingest`)."""
        dataset = cls.__new__(cls)
        dataset.ingest_result = None
        dataset._setup(open_store(path), mode, single_gene_name, gene_embedding_dim, split, source=f"store {path}")
        return dataset

    @staticmethod
    def get_all_gene_names(gene_embedding_dir) -> list[str]:
        """Sorted names of the genes with a `{GENE}_brain_gene_embeddingUKB.csv` file in the directory."""
        from pipeline.ingest import get_all_gene_names

        return get_all_gene_names(gene_embedding_dir)

    def _setup(self, store: StoreView, mode, single_gene_name, gene_embedding_dim, split, source: str) -> None:
        if mode not in MODES:
            raise GenealignError(f"mode={mode!r} is not a mode: use 'sequence' or 'single'.")
        if gene_embedding_dim is not None and int(gene_embedding_dim) != store.embedding_dim:
            raise GenealignError(
                f"gene_embedding_dim={gene_embedding_dim}, but the gene embeddings of {source} have "
                f"{store.embedding_dim} dimensions; pass gene_embedding_dim={store.embedding_dim}."
            )
        self.store = store
        self.mode = mode
        self.split = split
        self._rows = store.indices(split)  # (n,) store rows of the items
        self._gene_index = None
        if mode == "single":
            if not single_gene_name:
                raise GenealignError("mode='single' needs single_gene_name, e.g. single_gene_name='APOE'.")
            self._gene_index = store.gene_index(single_gene_name, where=source)
            self.gene_names = [single_gene_name]
        else:
            self.gene_names = list(store.gene_names)
        self.iids = [str(iid) for iid in store.iid[self._rows]]

    @property
    def store_path(self) -> Path:
        return self.store.path

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, idx: int) -> dict:
        if not -len(self) <= idx < len(self):
            raise IndexError(f"index {idx} is out of range for a dataset of {len(self)} subjects")
        row = int(self._rows[idx])
        neuro = np.asarray(self.store.neuro[row], dtype=np.float32).reshape(-1)  # (V,)
        item = {"neuro_embedding": torch.from_numpy(neuro), "iid": self.iids[idx]}
        if self._gene_index is None:
            genes = np.asarray(self.store.genes[row], dtype=np.float32)  # (G, D)
            item["gene_sequence"] = torch.from_numpy(genes)
            item["gene_names"] = list(self.gene_names)
        else:
            gene = np.asarray(self.store.genes[row, self._gene_index], dtype=np.float32)  # (D,)
            item["gene_embedding"] = torch.from_numpy(gene)
            item["gene_name"] = self.gene_names[0]
        return item

    # DataLoader workers started with 'spawn' get the dataset pickled: send the store's path, not
    # its open arrays.
    def __getstate__(self):
        state = dict(self.__dict__)
        state["store"] = str(self.store.path)
        return state

    def __setstate__(self, state):
        state["store"] = open_store(state["store"])
        self.__dict__.update(state)

