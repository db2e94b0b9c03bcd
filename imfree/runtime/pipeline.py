"""Decoding images into batches on a thread pool, ahead of the engine.

While the engine runs batch k, the pool is already decoding batches k+1 ..
k+prefetch. Pillow releases the GIL while it decodes and resizes, so threads
scale across cores without the start-up and copying costs of processes.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from imfree.runtime.images import DEFAULT_MAX_PIXELS, DecodeError, Interpolation, decode_image

logger = logging.getLogger(__name__)


@dataclass
class DecodeSettings:
    """How every image of a run is decoded; the export's manifest fixes size and filter."""

    height: int
    width: int
    interpolation: Interpolation = "bicubic"
    max_pixels: int = DEFAULT_MAX_PIXELS


@dataclass
class Batch:
    """One batch of input paths, in input order, and what decoding made of them."""

    paths: list[Path]
    images: np.ndarray  # uint8 [len(good_paths), H, W, 3]
    good_paths: list[Path]
    failures: list[tuple[Path, str]] = field(default_factory=list)  # (path, reason)


@dataclass
class StageTimes:
    """Seconds spent per stage, so the slowest one shows."""

    decode_seconds: float = 0.0  # summed over decode workers
    decode_wait_seconds: float = 0.0  # the engine's side, waiting for decoded batches
    engine_seconds: float = 0.0
    write_seconds: float = 0.0


# What one decode task returns: the image or the reason it failed, and its seconds.
_Outcome = tuple[np.ndarray | None, str | None, float]


def default_decode_workers() -> int:
    """All cores but one, which is left to the engine and the writer."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores - 1)


def iter_batches(
    paths: Sequence[Path],
    decode: DecodeSettings,
    batch_size: int,
    decode_workers: int | None = None,
    prefetch: int = 2,
    times: StageTimes | None = None,
) -> Iterator[Batch]:
    """Batches of `paths` in input order, decoded up to `prefetch` (>= 1) batches ahead."""
    if prefetch < 1:
        raise ValueError(f"prefetch must be at least 1, not {prefetch}")
    workers = decode_workers or default_decode_workers()
    times = times if times is not None else StageTimes()
    chunks = iter([paths[i : i + batch_size] for i in range(0, len(paths), batch_size)])
    pending: deque[tuple[Sequence[Path], list[Future[_Outcome]]]] = deque()

    with ThreadPoolExecutor(workers, thread_name_prefix="imfree-decode") as pool:

        def submit_next_chunk() -> None:
            chunk = next(chunks, None)
            if chunk is not None:
                pending.append((chunk, [pool.submit(_decode_one, p, decode) for p in chunk]))

        # Each turn hands out one batch and queues the one `prefetch` places after it,
        # so memory stays at (prefetch + 1) * batch_size decoded images.
        for _ in range(prefetch):
            submit_next_chunk()

        try:
            while pending:
                chunk, futures = pending.popleft()
                submit_next_chunk()

                started = time.perf_counter()
                outcomes = [future.result() for future in futures]
                times.decode_wait_seconds += time.perf_counter() - started
                times.decode_seconds += sum(seconds for _, _, seconds in outcomes)

                yield _assemble(chunk, outcomes, decode)
        finally:
            # The consumer stopped early (an error, a closed generator): drop the queue
            # so the pool's shutdown waits only for images already being decoded.
            for _, futures in pending:
                for future in futures:
                    future.cancel()


def _decode_one(path: Path, decode: DecodeSettings) -> _Outcome:
    started = time.perf_counter()
    try:
        image = decode_image(
            path, decode.height, decode.width, decode.interpolation, decode.max_pixels
        )
    except DecodeError as error:
        logger.debug("%s: %s", path, error)
        return None, str(error), time.perf_counter() - started
    return image, None, time.perf_counter() - started


def _assemble(chunk: Sequence[Path], outcomes: list[_Outcome], decode: DecodeSettings) -> Batch:
    good_paths, images, failures = [], [], []
    for path, (image, reason, _) in zip(chunk, outcomes, strict=True):
        if image is None:
            failures.append((path, reason or "unknown decode failure"))
        else:
            good_paths.append(path)
            images.append(image)

    if images:
        stacked = np.stack(images)  # [n_good, H, W, 3]
    else:
        stacked = np.empty((0, decode.height, decode.width, 3), dtype=np.uint8)
    return Batch(paths=list(chunk), images=stacked, good_paths=good_paths, failures=failures)
