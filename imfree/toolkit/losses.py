"""The training losses of method.md section 3."""

from __future__ import annotations

import torch


def ranking_loss(scores: torch.Tensor, targets: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """Pairwise hinge over every (positive, negative) pair of a sample, batch-averaged.

    scores [B, C]; targets [B, C] bool. A sample's loss is the sum over pairs
    of max(0, margin - s_pos + s_neg).
    """
    pairs = margin - scores[:, :, None] + scores[:, None, :]  # [B, pos, neg]
    valid = targets[:, :, None] & ~targets[:, None, :]
    return (pairs.clamp(min=0) * valid).sum(dim=(1, 2)).mean()


def relation_loss(
    classifier: torch.Tensor, anchor: torch.Tensor, scale: float = 100.0
) -> torch.Tensor:
    """KL(target || learned) over the softmax of scale * cos for every class pair i < j.

    classifier and anchor are normalised [C, E]; the anchor (hand-written
    prompts) sets which classes should stay related.
    """
    if classifier.shape[0] < 2:
        return classifier.sum() * 0.0  # no pairs, nothing to keep related
    rows, cols = torch.triu_indices(classifier.shape[0], classifier.shape[0], offset=1)
    learned = (scale * (classifier @ classifier.t())[rows, cols]).log_softmax(dim=0)
    target = (scale * (anchor @ anchor.t())[rows, cols]).log_softmax(dim=0)
    target = target.detach()
    return torch.sum(target.exp() * (target - learned))
