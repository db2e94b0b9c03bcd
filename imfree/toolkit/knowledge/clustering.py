"""A class tree without an LLM: agglomerative clustering of CLIP text features.

Classes whose prompts CLIP places close together go into one fine group, and
fine groups whose mean features are close into one coarse group. The fine cut
is the coarsest one whose groups all hold at most 8 classes; the coarse level
has about one group per 2.5 fine groups, the proportion of the authors' COCO
tree (20 fine, 9 coarse).
"""

from __future__ import annotations

import math

import numpy as np

from imfree.toolkit.hierarchy import Hierarchy

FINE_PER_COARSE = 2.5


def cluster_hierarchy(classes: list[str], features: np.ndarray, max_fine: int = 8) -> Hierarchy:
    """A strict tree over `classes` from their text features [C, E]."""
    from scipy.cluster.hierarchy import fcluster, linkage

    if len(classes) < 3:
        return _tree(classes, [0] * len(classes), [0])
    unit = _normalise(features)
    links = linkage(unit, method="average", metric="cosine")

    # The fewest groups that could hold everyone, then more until none is too big.
    for count in range(math.ceil(len(classes) / max_fine), len(classes) + 1):
        fine_of_class = _relabel(fcluster(links, count, criterion="maxclust"))
        if np.bincount(fine_of_class).max() <= max_fine:
            break
    fine_count = max(fine_of_class) + 1

    if fine_count < 3:
        return _tree(classes, fine_of_class, [0] * fine_count)
    centroids = _normalise(np.stack([unit[np.array(fine_of_class) == g].mean(axis=0)
                                     for g in range(fine_count)]))
    coarse_target = max(1, math.ceil(fine_count / FINE_PER_COARSE))
    coarse_links = linkage(centroids, method="average", metric="cosine")
    coarse_of_fine = _relabel(fcluster(coarse_links, coarse_target, criterion="maxclust"))
    return _tree(classes, fine_of_class, coarse_of_fine)


def class_text_features(prompt_names: list[str], model: str, pretrained: str) -> np.ndarray:
    """CLIP text features [C, E] of "a photo of a {class}." for each class."""
    import torch

    from imfree.models import load_backbone
    from imfree.toolkit.learner import hand_features

    backbone = load_backbone(model, pretrained)
    with torch.no_grad():
        return hand_features(backbone, prompt_names, "single").float().cpu().numpy()


def _tree(classes: list[str], fine_of_class: list[int], coarse_of_fine: list[int]) -> Hierarchy:
    members = [[c for c, f in zip(classes, fine_of_class, strict=True) if f == g]
               for g in range(max(fine_of_class) + 1)]
    fine_names = [_group_name(m) for m in members]
    coarse_names = [
        "scene of " + _group_name([c for g, f in enumerate(members) if coarse_of_fine[g] == k
                                   for c in f])
        for k in range(max(coarse_of_fine) + 1)
    ]
    return Hierarchy(tuple(classes), tuple(fine_names), tuple(coarse_names),
                     tuple(fine_of_class), tuple(coarse_of_fine))


def _group_name(members: list[str]) -> str:
    return ", ".join(members[:3]) + (" and more" if len(members) > 3 else "")


def _relabel(labels: np.ndarray) -> list[int]:
    """Group numbers in order of first appearance, from 0: stable, readable trees."""
    order: dict[int, int] = {}
    return [order.setdefault(int(label), len(order)) for label in labels]


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
