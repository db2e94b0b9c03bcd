"""Class scores from features: one set of formulas for training and inference.

Training feeds sentence features (text standing in for images); the exported
graph feeds image features. Both go through these functions, so what is
trained is exactly what is deployed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def global_logits(features: torch.Tensor, classifier: torch.Tensor, scale: float) -> torch.Tensor:
    """scale * cos(feature, class) for normalised [B, E] and [C, E]; returns [B, C]."""
    return scale * features @ classifier.t()


def local_logits(
    tokens: torch.Tensor,
    classifier: torch.Tensor,
    scale: float,
    spatial_scale: float,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Spatially pooled class scores of normalised regions [B, N, E]; returns [B, C].

    Each class looks at the regions most like it: weights are a softmax over
    regions of spatial_scale * cos, and the score is the weighted sum of
    scale * cos. `mask` [B, N] marks real regions (sentence padding is not one).
    """
    similarity = tokens @ classifier.t()  # [B, N, C]
    attention = spatial_scale * similarity
    if mask is not None:
        attention = attention.masked_fill(~mask[:, :, None], float("-inf"))
    weights = attention.softmax(dim=1)
    return (weights * scale * similarity).sum(dim=1)


def mixed_scores(
    global_: torch.Tensor, local: torch.Tensor, mix_global: float
) -> torch.Tensor:
    """The deployed score: a weighted sum of both branches' softmax over classes."""
    return mix_global * global_.softmax(dim=-1) + (1.0 - mix_global) * local.softmax(dim=-1)


def normalize(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)
