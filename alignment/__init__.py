"""genealign's model side: the alignment model, its losses and training step, training, evaluation.

`from alignment import MultiGeneAlignmentModel` (and the losses, the config and the step) loads them
on first use: `import alignment` alone does not import torch. The `genealign` console script is
`alignment.cli:main`, and every process the ingest spawns re-imports the script, so an eager torch
import cost each ingest worker ~1.3 s of CPU before it parsed a CSV. Train, evaluate and the CLI
are imported from their modules (`alignment.train`, `alignment.evaluate`, `alignment.cli`).
"""

__all__ = ["ModelConfig", "MultiGeneAlignmentModel", "clip_loss", "contrastive_step", "siglip_loss"]

_HOMES = {
    "ModelConfig": "alignment.model",
    "MultiGeneAlignmentModel": "alignment.model",
    "clip_loss": "alignment.loss",
    "siglip_loss": "alignment.loss",
    "contrastive_step": "alignment.step",
}


def __getattr__(name: str):
    if name in _HOMES:
        import importlib

        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'alignment' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
