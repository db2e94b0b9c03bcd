"""The deployed model as one module: uint8 images in, class scores out.

Everything between the decoded pixels and the scores lives here so that it
lives inside the exported graph: the runtime only decodes and resizes.
"""

from __future__ import annotations

import torch
from torch import nn

from imfree.models import Backbone, encode_image_dense
from imfree.toolkit.artifact import ClassifierArtifact
from imfree.toolkit.scoring import global_logits, local_logits, mixed_scores, normalize


class ScoringGraph(nn.Module):
    """images uint8 [B, H, W, 3] RGB -> scores [B, C] (and pooled embeddings [B, E])."""

    def __init__(self, backbone: Backbone, artifact: ClassifierArtifact, embeddings: bool = False):
        super().__init__()
        self.visual = backbone.model.visual
        self.kind = backbone.kind
        self.embeddings = embeddings
        self.scales = artifact.scales

        # Normalisation folded into two constants on the 0..255 scale.
        mean = torch.tensor(artifact.preprocess.mean).view(1, 3, 1, 1) * 255.0
        std = torch.tensor(artifact.preprocess.std).view(1, 3, 1, 1) * 255.0
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.register_buffer("global_classifier", artifact.global_classifier.float().clone())
        self.register_buffer("local_classifier", artifact.local_classifier.float().clone())

    def forward(self, images: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        x = images.permute(0, 3, 1, 2).float()  # [B, 3, H, W]
        x = (x - self.mean) / self.std

        pooled, dense = encode_image_dense(self.visual, self.kind, x)
        pooled, dense = normalize(pooled), normalize(dense)

        scales = self.scales
        global_ = global_logits(pooled, self.global_classifier, scales.global_)
        local = local_logits(dense, self.local_classifier, scales.local, scales.spatial)
        scores = mixed_scores(global_, local, scales.mix_global)
        if self.embeddings:
            return scores, pooled
        return scores
