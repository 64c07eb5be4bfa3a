"""genealign's data side: cohort generator, ingest into a Zarr store, the store's view, the loader.

Nothing here imports `alignment` (the model side); `alignment` reads what this package publishes.
"""

__version__ = "0.1.0"

from pipeline.errors import GenealignError, GeneNotFoundError  # noqa: E402
from pipeline.store import SPLIT_CODES, StoreView, open_store, write_store  # noqa: E402

__all__ = [
    "GenealignError",
    "GeneNotFoundError",
    "SPLIT_CODES",
    "StoreView",
    "open_store",
    "write_store",
]


def __getattr__(name: str):
    # `from pipeline import MultiGeneNeuroDataset` (the seed's import) without importing torch for
    # every `import pipeline`.
    if name == "MultiGeneNeuroDataset":
        from pipeline.dataset import MultiGeneNeuroDataset

        return MultiGeneNeuroDataset
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
