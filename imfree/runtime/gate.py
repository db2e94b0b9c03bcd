"""The parity gate's arithmetic, and the reference it checks engines against.

At export time the reference is PyTorch FP32, run live. The export also saves
that reference (the gate's images and PyTorch's outputs on them) as
`parity_reference.npz`, so the runtime can gate an engine the export could not
run (TensorRT, CUDA, FP16) without importing torch. Each check gives one line
with a tick or a cross; a failure names the limit it broke.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from imfree.errors import BundleError

logger = logging.getLogger(__name__)

Precision = Literal["fp32", "fp16", "int8"]
PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "int8")
DEFAULT_BATCHES = (1, 7, 32)
REFERENCE_FILE = "parity_reference.npz"


@dataclass(frozen=True)
class Tolerances:
    """How far an engine may stray from PyTorch FP32 on the gate's photos."""

    score_abs: float = 1e-4  # largest per-class score difference (scores are probabilities)
    embedding_cosine: float = 0.9999  # smallest cosine between pooled embeddings
    flips: int = 0  # thresholded decisions that may change, whatever the batch
    flip_rate: float = 0.0  # or this fraction of a batch's decisions, if larger

    def allowed_flips(self, decisions: int) -> int:
        return max(self.flips, math.floor(self.flip_rate * decisions))


# FP32 differs from PyTorch only by kernel order. FP16 keeps a 10-bit mantissa, so
# cosines stay near 0.999; INT8 rounds every activation to 256 steps, which moves
# embeddings by about a degree (cosine ~0.99) and a score near the threshold can
# cross it: a few flips in a hundred decisions are tolerated, never more.
TOLERANCES: dict[str, Tolerances] = {
    "fp32": Tolerances(),
    "fp16": Tolerances(score_abs=5e-3, embedding_cosine=0.999, flip_rate=0.01),
    "int8": Tolerances(score_abs=2e-2, embedding_cosine=0.98, flip_rate=0.02),
}


@dataclass
class ParityReport:
    engine: str
    images: str
    precision: str = "fp32"
    lines: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    max_score_diff: float = 0.0
    min_embedding_cosine: float | None = None
    flips: int = 0
    decisions: int = 0

    @property
    def passed(self) -> bool:
        return not self.failures

    def summary(self) -> dict:
        """The figures the manifest keeps for a variant."""
        return {
            "images": self.images,
            "max_score_diff": self.max_score_diff,
            "min_embedding_cosine": self.min_embedding_cosine,
            "flips": self.flips,
            "decisions": self.decisions,
        }


@dataclass
class Reference:
    """The gate's images [N, H, W, 3] uint8 and PyTorch FP32's outputs on them."""

    images: np.ndarray
    scores: np.ndarray
    embeddings: np.ndarray | None
    threshold: float
    source: str


def save_reference(folder: str | os.PathLike[str], reference: Reference) -> Path:
    path = Path(folder) / REFERENCE_FILE
    arrays = {"images": reference.images, "scores": reference.scores,
              "threshold": np.float64(reference.threshold), "source": np.str_(reference.source)}
    if reference.embeddings is not None:
        arrays["embeddings"] = reference.embeddings
    np.savez_compressed(path, **arrays)
    return path


def load_reference(folder: str | os.PathLike[str]) -> Reference | None:
    """The saved reference, or None for an export written before it existed."""
    path = Path(folder) / REFERENCE_FILE
    if not path.is_file():
        return None
    try:
        with np.load(path) as data:
            return Reference(
                images=data["images"], scores=data["scores"],
                embeddings=data["embeddings"] if "embeddings" in data else None,
                threshold=float(data["threshold"]), source=str(data["source"]),
            )
    except (OSError, KeyError, ValueError) as error:
        raise BundleError(f"{path} is unreadable ({error}); re-export the folder") from error


def gate(
    run: Callable[[np.ndarray], dict[str, np.ndarray]],
    reference: Reference,
    engine_name: str,
    precision: str,
    batches: tuple[int, ...] = DEFAULT_BATCHES,
    tolerances: Tolerances | None = None,
    scores_output: str = "scores",
    embeddings_output: str | None = "embeddings",
) -> ParityReport:
    """Run `run` on the reference images at each batch size and compare."""
    tolerances = tolerances or TOLERANCES[precision]
    report = ParityReport(engine=engine_name, images=reference.source, precision=precision)
    for batch in batches:
        batch = min(batch, len(reference.images))
        outputs = run(reference.images[:batch])
        got = {"scores": outputs.get(scores_output)}
        if embeddings_output and embeddings_output in outputs:
            got["embeddings"] = outputs[embeddings_output]
        expected = {"scores": reference.scores[:batch]}
        if reference.embeddings is not None:
            expected["embeddings"] = reference.embeddings[:batch]
        compare(report, batch, expected, got, reference.threshold, tolerances)

    verdict = "kept" if report.passed else "refused"
    logger.info("parity of %s (%s) against PyTorch FP32 on %s: %s",
                engine_name, precision, reference.source, verdict)
    return report


def compare(
    report: ParityReport,
    batch: int,
    expected: dict[str, np.ndarray],
    got: dict[str, np.ndarray],
    threshold: float,
    tolerances: Tolerances,
) -> None:
    """Add one line, and any failures, for one batch to `report`."""
    scores, reference = got.get("scores"), expected["scores"]
    problems = []
    if scores is None or scores.shape != reference.shape:
        shape = None if scores is None else scores.shape
        problems.append(f"scores shape {shape}, expected {reference.shape}")
        diff, flips = float("inf"), 0
    else:
        problems += _degenerate(scores.astype(np.float32))
        diff = float(np.abs(scores.astype(np.float64) - reference).max())
        if not diff <= tolerances.score_abs:
            problems.append(
                f"score difference {diff:.2e} over the limit {tolerances.score_abs:.0e}"
            )
        flips = int(((scores >= threshold) != (reference >= threshold)).sum())
        allowed = tolerances.allowed_flips(reference.size)
        if flips > allowed:
            problems.append(f"{flips} of {reference.size} decisions flip at threshold "
                            f"{threshold:.3g}, over the limit {allowed}")
        report.flips += flips
        report.decisions += reference.size
    report.max_score_diff = max(report.max_score_diff, diff)

    detail = f"max score diff {diff:.2e}, {flips} flips"
    if "embeddings" in expected and "embeddings" in got:
        cosine = _min_cosine(got["embeddings"], expected["embeddings"])
        previous = report.min_embedding_cosine
        report.min_embedding_cosine = cosine if previous is None else min(previous, cosine)
        detail += f", min embedding cosine {cosine:.6f}"
        if not cosine >= tolerances.embedding_cosine:
            problems.append(f"embedding cosine {cosine:.6f} under the limit "
                            f"{tolerances.embedding_cosine}")

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
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    cosine = float((a * b).sum(axis=-1).min())
    return cosine if math.isfinite(cosine) else float("-inf")
