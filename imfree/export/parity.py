"""The parity gate at export time: an engine must give PyTorch's scores before it is kept.

The comparison itself lives in imfree.runtime.gate, so the runtime can gate an
engine against the reference the export saves; this module supplies the live
PyTorch FP32 reference and the gate's images.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from imfree.errors import ExportError
from imfree.export.graph import ScoringGraph
from imfree.runtime.gate import (
    DEFAULT_BATCHES,
    TOLERANCES,
    ParityReport,
    Reference,
    Tolerances,
    gate,
)
from imfree.runtime.images import DecodeError, decode_image
from imfree.runtime.sources import list_images

__all__ = ["DEFAULT_BATCHES", "TOLERANCES", "ParityReport", "Tolerances", "check_parity",
           "parity_images", "reference_outputs", "require_parity"]

logger = logging.getLogger(__name__)


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


@torch.no_grad()
def reference_outputs(
    graph: ScoringGraph, photos: Path | None, image_size: tuple[int, int], threshold: float,
    count: int = max(DEFAULT_BATCHES),
) -> Reference:
    """PyTorch FP32's outputs on the gate's images: what every engine is held to."""
    images, source = parity_images(photos, image_size, count)
    output = graph(torch.from_numpy(images))
    scores, embeddings = output if isinstance(output, tuple) else (output, None)
    return Reference(
        images=images, scores=scores.numpy(),
        embeddings=None if embeddings is None else embeddings.numpy(),
        threshold=threshold, source=source,
    )


def check_parity(
    reference: Reference,
    run_engine: Callable[[np.ndarray], dict[str, np.ndarray]],
    engine_name: str,
    batches: tuple[int, ...] = DEFAULT_BATCHES,
    tolerances: Tolerances | None = None,
    precision: str = "fp32",
) -> ParityReport:
    """Compare `run_engine` with PyTorch FP32's `reference` at each batch size.

    One reference serves every engine of an export, so PyTorch runs once.
    """
    return gate(run_engine, reference, engine_name, precision, batches, tolerances)


def require_parity(report: ParityReport) -> None:
    if not report.passed:
        raise ExportError(
            f"{report.engine} ({report.precision}) failed its parity gate against PyTorch "
            f"FP32, so the export was not kept: {'; '.join(report.failures)}"
        )
