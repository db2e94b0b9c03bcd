"""Multi-label metrics: average precision, CF1/OF1, and per-image score normalisation.

Numpy only, so a metric can be checked or reused without torch. Conventions,
chosen once and used everywhere:

- AP is non-interpolated: the mean, over a class's positives, of the precision
  at each positive's rank (method.md section 5, not VOC's 11-point AP).
- Tied scores form one group: every positive in the group gets the precision
  measured after the whole group, so the result never depends on the order of
  the images (this is also scikit-learn's `average_precision_score`).
- A class with no positive has no AP (NaN); the mean leaves it out.
- F1: per-class precision and recall averaged over classes (CP, CR; CF1 is
  their harmonic mean), and over all decisions at once (OP, OR, OF1). A class
  with positives but no prediction has precision 0; a class with no positive
  is left out of the per-class means, as for AP.
- `ignore` marks (image, class) pairs that count neither way (VOC "difficult").
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class F1Scores(NamedTuple):
    """Per-class (C) and overall (O) precision, recall and F1, as fractions."""

    cp: float
    cr: float
    cf1: float
    op: float
    or_: float
    of1: float


def average_precision(
    scores: np.ndarray, targets: np.ndarray, ignore: np.ndarray | None = None
) -> float:
    """Non-interpolated AP of one class: scores [N], targets bool [N]; NaN without positives."""
    scores, targets = _check_pair(scores, targets, ndim=1)
    if ignore is not None:
        keep = ~np.asarray(ignore, dtype=bool)
        scores, targets = scores[keep], targets[keep]

    positives = int(targets.sum())
    if positives == 0:
        return float("nan")

    order = np.argsort(-scores, kind="stable")
    ranked_scores, ranked_hits = scores[order], targets[order]
    hits_so_far = np.cumsum(ranked_hits)  # [N]

    # The last rank of each group of tied scores: precision is read only there.
    group_ends = np.flatnonzero(np.diff(ranked_scores, append=-np.inf) != 0)
    hits_at_end = hits_so_far[group_ends]
    hits_in_group = np.diff(hits_at_end, prepend=0)
    precision_at_end = hits_at_end / (group_ends + 1)
    return float((hits_in_group * precision_at_end).sum() / positives)


def mean_average_precision(
    scores: np.ndarray, targets: np.ndarray, ignore: np.ndarray | None = None
) -> tuple[float, np.ndarray]:
    """(mAP over the classes that have positives, AP per class [C] with NaN for the rest)."""
    scores, targets = _check_pair(scores, targets, ndim=2)
    ignore = np.zeros_like(targets) if ignore is None else np.asarray(ignore, dtype=bool)
    per_class = np.array([
        average_precision(scores[:, c], targets[:, c], ignore[:, c])
        for c in range(scores.shape[1])
    ])
    defined = per_class[~np.isnan(per_class)]
    return (float(defined.mean()) if defined.size else float("nan")), per_class


def f1_scores(
    predicted: np.ndarray, targets: np.ndarray, ignore: np.ndarray | None = None
) -> F1Scores:
    """CP, CR, CF1, OP, OR, OF1 of boolean decisions [N, C] against targets [N, C]."""
    predicted = np.asarray(predicted, dtype=bool)
    targets = np.asarray(targets, dtype=bool)
    if predicted.shape != targets.shape or predicted.ndim != 2:
        raise ValueError(f"predicted {predicted.shape} and targets {targets.shape} must be "
                         f"the same [images, classes] shape")
    counted = np.ones_like(targets) if ignore is None else ~np.asarray(ignore, dtype=bool)

    hits = (predicted & targets & counted).sum(axis=0)  # [C]
    guesses = (predicted & counted).sum(axis=0)
    truths = (targets & counted).sum(axis=0)

    with_truth = truths > 0
    class_precision = np.divide(hits, guesses, out=np.zeros(len(hits)), where=guesses > 0)
    class_recall = np.divide(hits, truths, out=np.zeros(len(hits)), where=with_truth)
    cp = float(class_precision[with_truth].mean()) if with_truth.any() else float("nan")
    cr = float(class_recall[with_truth].mean()) if with_truth.any() else float("nan")

    op = _ratio(hits.sum(), guesses.sum())
    or_ = _ratio(hits.sum(), truths.sum())
    return F1Scores(cp, cr, _harmonic(cp, cr), op, or_, _harmonic(op, or_))


def top_k_decisions(scores: np.ndarray, k: int) -> np.ndarray:
    """bool [N, C]: each image's k best classes; ties go to the lower class index."""
    scores = np.asarray(scores, dtype=np.float64)
    k = min(k, scores.shape[1])
    decisions = np.zeros(scores.shape, dtype=bool)
    if k <= 0:
        return decisions
    best = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # [N, k]
    np.put_along_axis(decisions, best, True, axis=1)
    return decisions


def threshold_decisions(scores: np.ndarray, threshold: float | np.ndarray) -> np.ndarray:
    """bool [N, C]: scores at or above the threshold (one value, or one per class [C])."""
    return np.asarray(scores) >= np.asarray(threshold)


def normalise_per_image(scores: np.ndarray) -> np.ndarray:
    """z-score across classes within each image, then across images within each class.

    The first step removes what an image adds to every class (a photo that is
    "like" every prompt); the second puts the classes on one scale, so that a
    class CLIP always scores low still ranks its images. A row or column with
    no spread becomes zeros instead of dividing by zero.
    """
    scores = np.asarray(scores, dtype=np.float64)
    return _zscore(_zscore(scores, axis=1), axis=0)


def _zscore(x: np.ndarray, axis: int) -> np.ndarray:
    centred = x - x.mean(axis=axis, keepdims=True)
    spread = x.std(axis=axis, keepdims=True)
    # Relative to the values' size: float rounding leaves a tiny spread in a constant row.
    flat = spread <= 1e-12 * np.maximum(1.0, np.abs(x).max(axis=axis, keepdims=True))
    return np.where(flat, 0.0, centred / np.where(flat, 1.0, spread))


def _check_pair(scores: np.ndarray, targets: np.ndarray, ndim: int) -> tuple[np.ndarray, ...]:
    scores = np.asarray(scores, dtype=np.float64)
    targets = np.asarray(targets, dtype=bool)
    if scores.shape != targets.shape or scores.ndim != ndim:
        raise ValueError(f"scores {scores.shape} and targets {targets.shape} must be the same "
                         f"{ndim}-dimensional shape")
    if np.isnan(scores).any():
        raise ValueError("scores hold NaN; a score must be a number to be ranked")
    return scores, targets


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator / denominator) if denominator > 0 else 0.0


def _harmonic(precision: float, recall: float) -> float:
    if np.isnan(precision) or np.isnan(recall):
        return float("nan")
    total = precision + recall
    return 2.0 * precision * recall / total if total > 0 else 0.0
