"""Decoding images into batches in worker processes, ahead of the engine.

While the engine runs batch k, the workers already decode batches k+1 ..
k+prefetch, so at most (prefetch + 1) batches of decoded images exist at once:
memory does not grow with the number of images.

Processes rather than threads, because a decoder is C code fed with files
from anywhere: a worker that crashes (a segfault in a codec) or hangs (a
pathological file) is killed and replaced by the pool (pebble), and only the
file it was decoding becomes an error row. Threads could neither be killed nor
survive a crash.

Workers write each decoded image straight into shared memory, into the place
its batch will take it from, and send back only the outcome. Sending the
pixels through the pool's pipe instead cost about 0.6 ms of a core per image
(pickling, copying and unpickling 150 KB), a few percent of a 2-core budget.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, wait
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import numpy as np
from pebble import ProcessExpired, ProcessPool
from PIL import Image

from imfree.errors import ImfreeError
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
# Not SCHED_IDLE, though it was 1.5% faster on an idle machine: beside any other
# busy process an idle-class worker gets no CPU at all, and good files ran into
# the decode timeout.
WORKER_NICENESS = 10

# Broken pools in a row, with no file decoded between them, before the run gives up.
MAX_POOL_RESTARTS = 3
# How often a wait for a decoded file checks that the pool it was sent to still runs.
POOL_CHECK_SECONDS = 0.5


class DecodeWorkersFailed(ImfreeError):
    """The decode worker processes cannot start."""


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


# What decoding one file gives: the image or the reason it failed, and its seconds.
Outcome = tuple[np.ndarray | None, str | None, float]
Decoder = Callable[[Path, "DecodeSettings"], Outcome]

# What a decode task sends back (its image is in shared memory): the reason it
# failed, None for success, and its seconds.
Report = tuple[str | None, float]

# prctl's request for a signal when the parent dies (Linux).
_PR_SET_PDEATHSIG = 1

# In each worker: the shared batches it decodes into, [slot, index, H, W, 3].
_worker_slots: np.ndarray | None = None


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
    chunks = [list(paths[i : i + batch_size]) for i in range(0, len(paths), batch_size)]
    longest = max(1, min(batch_size, len(paths)))  # the slot size: a huge batch_size costs nothing
    return decode_batches(chunks, decode, longest, decode_workers, prefetch, times, timeout,
                          decoder)


def decode_batches(
    chunks: Iterable[list[Path]],
    decode: DecodeSettings,
    max_chunk: int,
    decode_workers: int | None = None,
    prefetch: int = 2,
    times: StageTimes | None = None,
    timeout: float = DEFAULT_DECODE_TIMEOUT,
    decoder: Decoder | None = None,
) -> Iterator[Batch]:
    """One Batch per chunk of paths (each at most `max_chunk` long), in order, decoded
    up to `prefetch` chunks ahead.

    The workers start, and the first `prefetch` chunks are queued, before this
    returns: they decode while the caller does whatever comes before its first
    batch (opening the engine, say). `decoder` replaces the decoding of one file
    (a module-level function, since it travels to the worker processes by name).
    """
    if prefetch < 1:
        raise ValueError(f"prefetch must be at least 1, not {prefetch}")
    batches = _decoded_batches(chunks, decode, max_chunk, decode_workers, prefetch, times,
                               timeout, decoder)
    # Runs the generator up to its first (empty) yield: workers started, chunks queued.
    # Once started, closing it, or dropping it unread, stops the workers.
    next(batches)
    return cast(Iterator[Batch], batches)


def _decoded_batches(
    chunks: Iterable[list[Path]],
    decode: DecodeSettings,
    max_chunk: int,
    decode_workers: int | None,
    prefetch: int,
    times: StageTimes | None,
    timeout: float,
    decoder: Decoder | None,
) -> Iterator[Batch | None]:
    workers = decode_workers or default_decode_workers()
    times = times if times is not None else StageTimes()
    decode_one = decoder or decode_file

    # One slot of shared memory per chunk in flight. A chunk is submitted only once
    # the batch before it was copied out of its slot, and every task that wrote
    # there has ended (a hung worker is killed before its task counts as timed
    # out), so `prefetch` slots suffice.
    slot_count = prefetch
    if isinstance(chunks, Sequence):
        slot_count = max(1, min(slot_count, len(chunks)))
    shape = (slot_count, max_chunk, decode.height, decode.width, 3)
    shared = multiprocessing.RawArray(ctypes.c_uint8, int(np.prod(shape)))
    slots = np.frombuffer(shared, np.uint8).reshape(shape)

    chunks = iter(chunks)
    pending: deque[tuple[list[Path], int, list[Future[Report]]]] = deque()
    pool = _Workers(workers, shared, shape)
    submitted = 0
    finished = False

    def schedule(path: Path, slot: int, index: int) -> Future[Report]:
        return pool.schedule(_decode_into_slot, (decode_one, path, decode, slot, index), timeout)

    def submit_next_chunk() -> None:
        nonlocal submitted
        chunk = next(chunks, None)
        if chunk is None:
            return
        if len(chunk) > max_chunk:
            raise ValueError(f"a chunk of {len(chunk)} paths is longer than max_chunk "
                             f"({max_chunk})")
        slot = submitted % slot_count
        futures = [schedule(path, slot, index) for index, path in enumerate(chunk)]
        pending.append((chunk, slot, futures))
        submitted += 1

    def reports_of(chunk: list[Path], slot: int, futures: list[Future[Report]]) -> list[Report]:
        # A file whose task was lost with its pool (not its own fault) is decoded again,
        # into the same place, on the pool that replaced it.
        reports: list[Report | None] = [None] * len(chunk)
        while True:
            for index, future in enumerate(futures):
                if reports[index] is None:
                    reports[index] = _report(future, chunk[index], timeout, times, pool)
            lost = [index for index, report in enumerate(reports) if report is None]
            if not lost:
                return reports  # type: ignore[return-value]
            pool.replace_if_broken()
            futures = list(futures)
            for index in lost:
                futures[index] = schedule(chunk[index], slot, index)

    try:
        # Each turn hands out one batch and queues the one `prefetch` places after it.
        for _ in range(prefetch):
            submit_next_chunk()
        yield None

        while pending:
            chunk, slot, futures = pending.popleft()

            started = time.perf_counter()
            reports = reports_of(chunk, slot, futures)
            times.decode_wait_seconds += time.perf_counter() - started
            times.decode_seconds += sum(seconds for _, seconds in reports)
            times.images_decoded += len(reports)

            batch = _assemble(chunk, reports, slots[slot])
            # Only now may the chunk after the prefetched ones reuse a slot.
            submit_next_chunk()
            yield batch
        finished = True
    finally:
        pool.stop(pending, finished)


class _Workers:
    """The pebble pool of decode workers, replaced whenever it breaks.

    Pebble replaces a worker that dies on a task (that task fails, the run goes
    on), but one that dies while no task runs (killed from outside while idle, or
    at its start) breaks the whole pool: its tasks fail or are never run, and it
    takes no more. The pool is then stopped, so no worker of it can still write
    into a slot, and a new one takes over. Pools that break again and again
    before any file is decoded mean workers cannot start at all: an error then.
    """

    def __init__(self, workers: int, shared: ctypes.Array, shape: tuple[int, ...]):
        self._args = (workers, shared, shape)
        self._pool = _start_pool(*self._args)
        self._scheduled: set[Future] = set()  # on the current pool, not yet waited for
        self._broken_in_a_row = 0

    def schedule(self, function: Callable, args: tuple, timeout: float) -> Future:
        try:
            future = self._pool.schedule(function, args, timeout=timeout)
        except RuntimeError:  # pebble: the pool broke and refuses tasks
            self.replace_if_broken()
            future = self._pool.schedule(function, args, timeout=timeout)
        self._scheduled.add(future)
        return future

    def wait(self, future: Future) -> bool:
        """Wait for `future`; False if it was lost with a broken pool (never to finish)."""
        while not future.done():
            wait([future], timeout=POOL_CHECK_SECONDS)
            if not future.done() and (future not in self._scheduled or not self._pool.active):
                future.cancel()
                return False
        self._scheduled.discard(future)
        return True

    def took_a_result(self) -> None:
        self._broken_in_a_row = 0

    def replace_if_broken(self) -> None:
        if self._pool.active:
            return  # a later pool than the one the lost tasks were on
        self._pool.stop()
        self._pool.join()
        self._scheduled.clear()
        self._broken_in_a_row += 1
        if self._broken_in_a_row > MAX_POOL_RESTARTS:
            raise DecodeWorkersFailed(
                f"the decode worker processes exited {self._broken_in_a_row} times in a row "
                "before decoding a file. If you call imfree from your own Python script, "
                "put that call under `if __name__ == \"__main__\":` (each worker starts by "
                "importing the main module); otherwise check the memory limits of this "
                "machine or container"
            )
        logger.warning("the decode worker pool broke (a worker died while idle); "
                       "starting a new one")
        self._pool = _start_pool(*self._args)

    def stop(self, pending: deque, finished: bool) -> None:
        """End the pool: after the queued decodes if `finished`, else at once."""
        if finished:
            self._pool.close()
        else:
            # The consumer stopped early (an error, a signal, a closed generator): the
            # queued decodes are of no use, so the workers are stopped, not waited for.
            for _, _, futures in pending:
                for future in futures:
                    future.cancel()
            self._pool.stop()
        self._pool.join()


def _start_pool(workers: int, shared: ctypes.Array, shape: tuple[int, ...]) -> ProcessPool:
    # forkserver, not fork: the parent holds onnxruntime's threads, and forking a
    # process with running threads can copy a held lock into the child. The shared
    # memory reaches each worker, a replaced one too, as it starts.
    context = multiprocessing.get_context("forkserver")
    return ProcessPool(
        max_workers=workers,
        initializer=_worker_start,
        initargs=(shared, shape),
        context=context,
    )


def _worker_start(shared: ctypes.Array, shape: tuple[int, ...]) -> None:
    global _worker_slots
    _die_with_parent()
    _worker_slots = np.frombuffer(shared, np.uint8).reshape(shape)

    # Ctrl-C reaches the whole process group: the parent decides how to stop,
    # and the workers must not die mid-file with a traceback each.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _lower_priority()
    # decode_image applies the run's own pixel limit (--max-pixels) from the header,
    # with a clear reason; Pillow's separate limit would refuse some images first.
    Image.MAX_IMAGE_PIXELS = None


def _lower_priority() -> None:
    """In a worker: give way to the engine's threads (an optimisation only)."""
    # SCHED_BATCH is the fair scheduler without wakeup preemption: a worker handed
    # its next file waits for the engine thread's time slice to end, instead of
    # interrupting it and evicting its caches. RN50 INT8 on 2,000 camera photos:
    # 0.2 to 0.4 s less of about 35 s, in each of three pairs of runs (measured here).
    # Unlike SCHED_IDLE, it still gets a fair share beside other busy processes.
    # Only from the normal policy: a run started under SCHED_IDLE (chrt --idle, a
    # systemd service's CPUSchedulingPolicy) must not have its workers raised.
    try:
        if os.sched_getscheduler(0) == os.SCHED_OTHER:
            os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except (AttributeError, OSError):  # not Linux, or not permitted here
        pass
    try:
        os.nice(WORKER_NICENESS)
    except OSError:
        pass


def _die_with_parent() -> None:
    """In a worker: be killed by the kernel the moment the forkserver it came from dies.

    Otherwise it lives on as an orphan that pebble counts as dead (exit status
    255) but cannot stop: it would finish its file and write it into a slot that
    a later batch has taken over, and go on taking tasks that then never finish.
    """
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
            return
    except (OSError, AttributeError):  # not Linux: no such call
        return
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def _decode_into_slot(decoder: Decoder, path: Path, decode: DecodeSettings, slot: int,
                      index: int) -> Report:
    """In a worker: decode one file into its place in the shared batch."""
    image, reason, seconds = decoder(path, decode)
    if image is None:
        return reason or "unknown decode failure", seconds

    place = _worker_slots[slot, index]
    if image.shape != place.shape or image.dtype != np.uint8:
        return f"decoder returned {image.dtype} {image.shape}, not uint8 {place.shape}", seconds
    place[...] = image
    return None, seconds


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


def _report(future: Future, path: Path, timeout: float, times: StageTimes,
            pool: _Workers) -> Report | None:
    """The result of one decode task, with a dead or hung worker turned into a reason;
    None for a task lost because its whole pool broke, to be decoded again."""
    if not pool.wait(future):
        return None
    try:
        report = future.result()
    except FutureTimeout:
        reason = f"decoding took over {timeout:g} s (worker stopped and replaced)"
    except ProcessExpired as error:
        reason = f"decoder crashed ({_exit_reason(error.exitcode)}; worker replaced)"
    except BrokenProcessPool:
        return None
    except Exception as error:  # noqa: BLE001 - any decoder bug is one file's problem
        reason = f"decoder failed: {type(error).__name__}: {error}"[:200]
    else:
        pool.took_a_result()
        return report

    times.workers_replaced += "replaced" in reason
    logger.warning("%s: %s", path, reason)
    return reason, 0.0


def _exit_reason(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit status {exitcode}"


def _assemble(chunk: Sequence[Path], reports: list[Report], slot: np.ndarray) -> Batch:
    good, good_paths, failures = [], [], []
    for index, (path, (reason, _)) in enumerate(zip(chunk, reports, strict=True)):
        if reason is None:
            good.append(index)
            good_paths.append(path)
        else:
            failures.append((path, reason))

    # A copy, not a view: the slot is decoded into again a few batches later.
    images = slot[good]  # [n_good, H, W, 3]
    return Batch(paths=list(chunk), images=images, good_paths=good_paths, failures=failures)
