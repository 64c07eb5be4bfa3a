"""Contrastive losses: pure functions of the two modalities' features and the learnable temperature.

Both take `logit_scale`, the *log* of the inverse temperature (the model's learnable parameter), and
turn it into the multiplier with `exp_logit_scale` = exp(logit_scale) clamped at MAX_LOGIT_SCALE (100,
as in CLIP). The clamp lives here and only here: the model's forward, the training step and the
validation loss all go through these functions, so the temperature means the same thing everywhere.
(Because the clamp is on the exponentiated value, the parameter gets no gradient while exp(logit_scale)
is above 100; it is never clamped in place.)

Row i of `neuro_features` and row i of `gene_features` are the same subject; every other row of the
other modality is a negative. Features are expected to be L2-normalised, shape (N, P).

`group_soft_threshold` is the proximal operator of the group lasso that training can apply to the
per-gene input projections (TrainConfig.gene_group_lasso): a regulariser, so a pure function here too.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

MAX_LOGIT_SCALE = 100.0
# SigLIP paper (Zhai et al. 2023): t' = log 10, b = -10 at initialisation.
SIGLIP_LOGIT_SCALE_INIT = math.log(10.0)
SIGLIP_LOGIT_BIAS_INIT = -10.0


def exp_logit_scale(logit_scale: torch.Tensor) -> torch.Tensor:
    """The multiplier of the cosine similarities: exp(logit_scale), clamped at 100."""
    return logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)


def clip_loss(neuro_features: torch.Tensor, gene_features: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP): the mean of the neuro->gene and gene->neuro cross-entropies.

    neuro_features, gene_features: (N, P); logit_scale: scalar log inverse temperature."""
    logits = exp_logit_scale(logit_scale) * neuro_features @ gene_features.T  # (N, N), rows = neuro
    target = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def siglip_loss(
    neuro_features: torch.Tensor,
    gene_features: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
) -> torch.Tensor:
    """Sigmoid loss (SigLIP): -sum_ij log sigmoid(z_ij (t x_i.y_j + b)) / N, z_ij = +1 on the diagonal
    and -1 elsewhere; normalised by the batch size N as in the paper (not by the N^2 pairs).

    neuro_features, gene_features: (N, P); logit_scale: scalar log t; logit_bias: scalar b."""
    logits = exp_logit_scale(logit_scale) * neuro_features @ gene_features.T + logit_bias  # (N, N)
    n = logits.shape[0]
    signs = 2.0 * torch.eye(n, device=logits.device, dtype=logits.dtype) - 1.0  # (N, N) +1 / -1
    return -F.logsigmoid(signs * logits).sum() / n


def group_soft_threshold(weight: torch.Tensor, threshold: float) -> torch.Tensor:
    """Proximal operator of threshold * sum_g ||W_g||_F (the group lasso), groups along axis 0:
    argmin_X 0.5 ||X - W||^2 + threshold * sum_g ||X_g||_F, i.e. each group W_g scaled by
    max(0, 1 - threshold / ||W_g||_F), so a group whose norm is at most `threshold` becomes exactly 0.

    weight: (G, ...) -> a new tensor of the same shape; threshold >= 0."""
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    norms = weight.detach().flatten(1).norm(dim=1)  # (G,)
    scale = (1.0 - threshold / norms.clamp_min(torch.finfo(norms.dtype).tiny)).clamp_min(0.0)  # (G,)
    return weight * scale.view(-1, *([1] * (weight.dim() - 1))).to(weight.dtype)
