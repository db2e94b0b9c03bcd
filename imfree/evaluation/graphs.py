"""Several ScoringGraphs on the same batches, the image encoder run once per backbone.

Classifiers trained on one backbone (an ablation table, seeds of one method)
differ only in their two class matrices and scales: the encoder, which is
nearly all of the work, gives them identical features. So graphs that share
a backbone and normalisation share one encoder pass, and each applies only its
own head, with the same scoring functions `ScoringGraph` uses.

The shortcut is checked, not trusted: the first images of the first batch
also run through every graph whole, and if any score differs by more than
TOLERANCE the set falls back to whole graphs for the rest of the run, with a
warning.
"""

from __future__ import annotations

import logging

import torch

from imfree.export.graph import ScoringGraph
from imfree.models import encode_image_dense
from imfree.toolkit.scoring import global_logits, local_logits, mixed_scores, normalize

logger = logging.getLogger(__name__)

TOLERANCE = 1e-5
CHECK_IMAGES = 8  # images of the first batch also run through every whole graph


class GraphSet:
    """Call with uint8 images [B, H, W, 3]; returns each graph's scores [B, C_g]."""

    def __init__(self, graphs: list[ScoringGraph]):
        self.graphs = graphs
        self.teams = _teams(graphs)
        self.shared = any(len(team) > 1 for team in self.teams)
        self.checked = False

    def __call__(self, images: torch.Tensor) -> list[torch.Tensor]:
        if not self.shared:
            return [graph(images) for graph in self.graphs]

        scores: list[torch.Tensor] = [torch.empty(0)] * len(self.graphs)
        for team in self.teams:
            pooled, dense = _features(self.graphs[team[0]], images)
            for i in team:
                scores[i] = _head(self.graphs[i], pooled, dense)

        if not self.checked:
            self.checked = True
            return self._checked(images, scores)
        return scores

    def _checked(self, images: torch.Tensor, scores: list[torch.Tensor]) -> list[torch.Tensor]:
        sample = images[:CHECK_IMAGES]
        whole = [graph(sample) for graph in self.graphs]
        worst = max(float((a[:CHECK_IMAGES] - b).abs().max())
                    for a, b in zip(scores, whole, strict=True))
        if worst > TOLERANCE:
            logger.warning("a shared encoder pass differs from the whole graph by %.2e; "
                           "running each classifier's graph whole", worst)
            self.shared = False
            return [graph(images) for graph in self.graphs]
        logger.debug("shared encoder matches the whole graphs (largest difference %.2e)", worst)
        return scores


def _teams(graphs: list[ScoringGraph]) -> list[list[int]]:
    """Indices of graphs grouped by the encoder pass they can share."""
    teams: dict[tuple, list[int]] = {}
    for i, graph in enumerate(graphs):
        key = (id(graph.visual), graph.kind, tuple(graph.mean.flatten().tolist()),
               tuple(graph.std.flatten().tolist()))
        teams.setdefault(key, []).append(i)
    return list(teams.values())


def _features(graph: ScoringGraph, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised pooled [B, E] and dense [B, HW, E] features, as ScoringGraph makes them."""
    x = images.permute(0, 3, 1, 2).float()  # [B, 3, H, W]
    x = (x - graph.mean) / graph.std
    pooled, dense = encode_image_dense(graph.visual, graph.kind, x)
    return normalize(pooled), normalize(dense)


def _head(graph: ScoringGraph, pooled: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """One graph's scores [B, C] from shared features."""
    scales = graph.scales
    global_ = global_logits(pooled, graph.global_classifier, scales.global_)
    local = local_logits(dense, graph.local_classifier, scales.local, scales.spatial)
    return mixed_scores(global_, local, scales.mix_global)
