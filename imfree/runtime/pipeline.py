"""Decoding images into batches in worker processes, ahead of the engine.

While the engine runs batch k, the workers already decode batches k+1 ..
k+prefetch, so at most (prefetch + 1) batches of decoded images exist at once:
memory does not grow with the number of images.

Processes rather than threads, because a decoder is C code fed with files
from anywhere: a worker that crashes (a segfault in a codec) or hangs (a
pathological file) is killed and replaced by the pool (pebble), and only the
file it was decoding becomes an error row. Threads could neither be killed nor
survive a crash. Passing a decoded 224 x 224 image back costs well under a
millisecond, against tens of milliseconds to decode a photo.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pebble import ProcessExpired, ProcessPool
from PIL import Image

from imfree.runtime.images import (
    DEFAULT_MAX_PIXELS,
    WHITE,
    Colour,
    DecodeError,
    Interpolation,
    decode_image,
)

logger = logging.getLogger(__name__)

# A decode that takes longer than this is a hung worker: it is killed and replaced.
DEFAULT_DECODE_TIMEOUT = 60.0

# Decode workers run at this lower priority, so that where they share cores with
# the engine's threads the engine, the stage everything waits for, gets them first.
WORKER_NICENESS = 10


@dataclass
class DecodeSettings:
    """How every image of a run is decoded; the export's manifest fixes size and filter."""

    height: int
    width: int
    interpolation: Interpolation = "bicubic"
    max_pixels: int = DEFAULT_MAX_PIXELS
    draft: bool = True  # reduced-scale JPEG decoding (see images.decode_image)
    background: Colour = WHITE  # under transparent pixels


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
    images_decoded: int = 0  # files a worker finished, decoded or refused
    workers_replaced: int = 0  # killed for hanging, or crashed


# What one decode task returns: the image or the reason it failed, and its seconds.
Outcome = tuple[np.ndarray | None, str | None, float]
Decoder = Callable[[Path, "DecodeSettings"], Outcome]


def available_cores() -> int:
    """The cores this process may run on (its affinity), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_decode_workers() -> int:
    """One per core.

    The workers run niced, so while the engine computes they take only what it
    leaves; whenever it waits for a batch, every core decodes. With one core
    left out, that core idled through each wait: RN50 INT8 on 2 cores tagged
    about 29% more images per second with 2 workers than with 1 (measured here).
    """
    return max(1, available_cores())


def iter_batches(
    paths: Sequence[Path],
    decode: DecodeSettings,
    batch_size: int,
    decode_workers: int | None = None,
    prefetch: int = 2,
    times: StageTimes | None = None,
    timeout: float = DEFAULT_DECODE_TIMEOUT,
    decoder: Decoder | None = None,
) -> Iterator[Batch]:
    """Batches of `paths` in input order, decoded up to `prefetch` (>= 1) batches ahead."""
    chunks = (list(paths[i : i + batch_size]) for i in range(0, len(paths), batch_size))
    return decode_batches(chunks, decode, decode_workers, prefetch, times, timeout, decoder)


def decode_batches(
    chunks: Iterable[list[Path]],
    decode: DecodeSettings,
    decode_workers: int | None = None,
    prefetch: int = 2,
    times: StageTimes | None = None,
    timeout: float = DEFAULT_DECODE_TIMEOUT,
    decoder: Decoder | None = None,
) -> Iterator[Batch]:
    """One Batch per chunk of paths, in order, decoded up to `prefetch` chunks ahead.

    `decoder` replaces the decoding of one file (a module-level function, since it
    travels to the worker processes by name).
    """
    if prefetch < 1:
        raise ValueError(f"prefetch must be at least 1, not {prefetch}")
    workers = decode_workers or default_decode_workers()
    times = times if times is not None else StageTimes()
    decode_one = decoder or decode_file
    chunks = iter(chunks)
    pending: deque[tuple[list[Path], list[Future[Outcome]]]] = deque()
    pool = _start_pool(workers)
    finished = False

    def submit_next_chunk() -> None:
        chunk = next(chunks, None)
        if chunk is not None:
            futures = [pool.schedule(decode_one, (p, decode), timeout=timeout) for p in chunk]
            pending.append((chunk, futures))

    try:
        # Each turn hands out one batch and queues the one `prefetch` places after it.
        for _ in range(prefetch):
            submit_next_chunk()

        while pending:
            chunk, futures = pending.popleft()
            submit_next_chunk()

            started = time.perf_counter()
            outcomes = [_outcome(future, path, timeout, times) for path, future in zip(
                chunk, futures, strict=True)]
            times.decode_wait_seconds += time.perf_counter() - started
            times.decode_seconds += sum(seconds for _, _, seconds in outcomes)
            times.images_decoded += len(outcomes)

            yield _assemble(chunk, outcomes, decode)
        finished = True
    finally:
        _stop_pool(pool, pending, finished)


def _start_pool(workers: int) -> ProcessPool:
    # forkserver, not fork: the parent holds onnxruntime's threads, and forking a
    # process with running threads can copy a held lock into the child.
    context = multiprocessing.get_context("forkserver")
    return ProcessPool(
        max_workers=workers,
        initializer=_worker_start,
        context=context,
    )


def _stop_pool(pool: ProcessPool, pending: deque, finished: bool) -> None:
    if finished:
        pool.close()
    else:
        # The consumer stopped early (an error, a signal, a closed generator): the
        # queued decodes are of no use, so the workers are stopped, not waited for.
        for _, futures in pending:
            for future in futures:
                future.cancel()
        pool.stop()
    pool.join()


def _worker_start() -> None:
    # Ctrl-C reaches the whole process group: the parent decides how to stop,
    # and the workers must not die mid-file with a traceback each.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        os.nice(WORKER_NICENESS)
    except OSError:  # not permitted here; priority is an optimisation only
        pass
    # decode_image applies the run's own pixel limit (--max-pixels) from the header,
    # with a clear reason; Pillow's separate limit would refuse some images first.
    Image.MAX_IMAGE_PIXELS = None


def decode_file(path: Path, decode: DecodeSettings) -> Outcome:
    """Decode one file in a worker: the image or the reason it failed, and its seconds."""
    started = time.perf_counter()
    try:
        image = decode_image(
            path,
            decode.height,
            decode.width,
            decode.interpolation,
            decode.max_pixels,
            draft=decode.draft,
            background=decode.background,
        )
    except DecodeError as error:
        return None, str(error), time.perf_counter() - started
    return image, None, time.perf_counter() - started


def _outcome(future: Future, path: Path, timeout: float, times: StageTimes) -> Outcome:
    """The result of one decode task, with a dead or hung worker turned into a reason."""
    try:
        return future.result()
    except FutureTimeout:
        reason = f"decoding took over {timeout:g} s (worker stopped and replaced)"
    except ProcessExpired as error:
        reason = f"decoder crashed ({_exit_reason(error.exitcode)}; worker replaced)"
    except Exception as error:  # noqa: BLE001 - any decoder bug is one file's problem
        reason = f"decoder failed: {type(error).__name__}: {error}"[:200]

    times.workers_replaced += "replaced" in reason
    logger.warning("%s: %s", path, reason)
    return None, reason, 0.0


def _exit_reason(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit status {exitcode}"


def _assemble(chunk: Sequence[Path], outcomes: list[Outcome], decode: DecodeSettings) -> Batch:
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
