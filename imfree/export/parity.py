"""The parity gate: an engine must give PyTorch's scores before its export is kept.

Each check prints one line with a tick or a cross; a failed gate raises one
error that lists every failure.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from imfree.errors import ExportError
from imfree.export.graph import ScoringGraph
from imfree.runtime.images import DecodeError, decode_image
from imfree.runtime.sources import list_images

logger = logging.getLogger(__name__)

DEFAULT_BATCHES = (1, 7, 32)


@dataclass
class Tolerances:
    score_abs: float = 1e-4  # scores are probabilities: a few ulps of float32 after mixing
    embedding_cosine: float = 0.9999
    flips: int = 0  # thresholded decisions that may change


@dataclass
class ParityReport:
    engine: str
    images: str
    lines: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    max_score_diff: float = 0.0

    @property
    def passed(self) -> bool:
        return not self.failures


def parity_images(
    folder: Path | None, image_size: tuple[int, int], count: int
) -> tuple[np.ndarray, str]:
    """`count` uint8 images [count, H, W, 3]: real photos, cycled and flipped to vary.

    Without a photo folder the gate uses seeded noise images and says so.
    """
    height, width = image_size
    photos = []
    if folder is not None and Path(folder).is_dir():
        for path in list_images(folder):
            try:
                photos.append(decode_image(path, height, width))
            except DecodeError:
                continue
    if photos:
        source = f"{len(photos)} photos from {folder}"
    else:
        rng = np.random.default_rng(0)
        photos = list(rng.integers(0, 256, (4, height, width, 3), dtype=np.uint8))
        source = "4 seeded noise images (no photo folder found)"

    images = []
    for i in range(count):
        image = photos[i % len(photos)]
        # Later rounds are mirrored or flipped so no batch row repeats another.
        variant = (i // len(photos)) % 4
        image = image[:, ::-1] if variant & 1 else image
        image = image[::-1] if variant & 2 else image
        images.append(np.ascontiguousarray(image))
    return np.stack(images), source


def check_parity(
    graph: ScoringGraph,
    run_engine: Callable[[np.ndarray], dict[str, np.ndarray]],
    engine_name: str,
    photos: Path | None,
    image_size: tuple[int, int],
    threshold: float,
    batches: tuple[int, ...] = DEFAULT_BATCHES,
    tolerances: Tolerances | None = None,
) -> ParityReport:
    """Compare `run_engine` with PyTorch FP32 at each batch size."""
    tolerances = tolerances or Tolerances()
    images, source = parity_images(photos, image_size, max(batches))
    report = ParityReport(engine=engine_name, images=source)

    for batch in batches:
        expected = _reference(graph, images[:batch])
        got = run_engine(images[:batch])
        _compare(report, batch, expected, got, threshold, tolerances)

    verdict = "kept" if report.passed else "refused"
    logger.info("parity of %s against PyTorch FP32 on %s: %s", engine_name, source, verdict)
    return report


def require_parity(report: ParityReport) -> None:
    if not report.passed:
        raise ExportError(
            f"{report.engine} failed its parity gate against PyTorch, so the export was not "
            f"kept: {'; '.join(report.failures)}"
        )


@torch.no_grad()
def _reference(graph: ScoringGraph, images: np.ndarray) -> dict[str, np.ndarray]:
    output = graph(torch.from_numpy(images))
    if isinstance(output, tuple):
        return {"scores": output[0].numpy(), "embeddings": output[1].numpy()}
    return {"scores": output.numpy()}


def _compare(
    report: ParityReport,
    batch: int,
    expected: dict[str, np.ndarray],
    got: dict[str, np.ndarray],
    threshold: float,
    tolerances: Tolerances,
) -> None:
    scores, reference = got.get("scores"), expected["scores"]
    problems = []
    if scores is None or scores.shape != reference.shape:
        shape = None if scores is None else scores.shape
        problems.append(f"scores shape {shape}, expected {reference.shape}")
        diff = float("inf")
    else:
        problems += _degenerate(scores)
        diff = float(np.abs(scores.astype(np.float64) - reference).max())
        if not diff <= tolerances.score_abs:
            problems.append(f"score difference {diff:.2e} > {tolerances.score_abs:.0e}")
        flips = int(((scores >= threshold) != (reference >= threshold)).sum())
        if flips > tolerances.flips:
            problems.append(f"{flips} decisions flip at threshold {threshold:.3g}")
    report.max_score_diff = max(report.max_score_diff, diff)

    detail = f"max score diff {diff:.2e}"
    if "embeddings" in expected and "embeddings" in got:
        cosine = _min_cosine(got["embeddings"], expected["embeddings"])
        detail += f", min embedding cosine {cosine:.6f}"
        if not cosine >= tolerances.embedding_cosine:
            problems.append(f"embedding cosine {cosine:.6f} < {tolerances.embedding_cosine}")

    mark = "✓" if not problems else "✗"
    report.lines.append(f"{mark} batch {batch:>3}: {detail}")
    report.failures += [f"batch {batch}: {p}" for p in problems]


def _degenerate(scores: np.ndarray) -> list[str]:
    if not np.isfinite(scores).all():
        return ["scores hold NaN or infinity"]
    if scores.shape[0] > 1 and np.ptp(scores, axis=0).max() == 0.0:
        return ["scores are the same for every image"]
    return []


def _min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return float((a * b).sum(axis=-1).min())
