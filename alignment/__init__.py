"""genealign's model side: the alignment model, its losses and training step, training, evaluation.

Importing the package loads only the model, the losses and the step (torch); train, evaluate and the
CLI are imported from their modules (`alignment.train`, `alignment.evaluate`, `alignment.cli`).
"""

from alignment.loss import clip_loss, siglip_loss
from alignment.model import ModelConfig, MultiGeneAlignmentModel
from alignment.step import contrastive_step

__all__ = ["ModelConfig", "MultiGeneAlignmentModel", "clip_loss", "contrastive_step", "siglip_loss"]
