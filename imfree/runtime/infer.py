"""Tagging images with an export: one output row per input file.

The loop: decode workers fill a bounded queue of batches, the engine scores
one batch at a time, the writer appends its rows. A bad file is an error row;
a signal stops the run after the batch in flight; `resume` skips every path
already in the output, so a stopped or killed run continues where it ended.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from imfree.errors import BundleError, ConfigError
from imfree.runtime.bundle import REEXPORT_HINT, ExportManifest, read_manifest
from imfree.runtime.decoder_server import start_decoder_server
from imfree.runtime.engines import Engine, EngineChoice, check_engine_choice, open_engine
from imfree.runtime.images import DEFAULT_MAX_PIXELS, WHITE, Colour
from imfree.runtime.pipeline import (
    DEFAULT_DECODE_TIMEOUT,
    Batch,
    DecodeSettings,
    StageTimes,
    available_cores,
    decode_batches,
    default_decode_workers,
)
from imfree.runtime.signals import StopRequest, stop_on_signals
from imfree.runtime.sources import InputSpec, collect_inputs
from imfree.runtime.thresholds import class_thresholds
from imfree.runtime.writers import Row, RowWriter, open_writer, output_format

logger = logging.getLogger(__name__)


@dataclass
class InferConfig:
    """One tagging run."""

    inputs: Path | list[Path]  # image files and folders (walked recursively)
    export_dir: Path
    out: Path  # .csv, .jsonl or .parquet
    batch_size: int = 256
    engine: EngineChoice = "auto"
    threshold: float | None = None  # None: the export's own threshold
    thresholds_file: Path | None = None  # per-class thresholds; others take `threshold`
    top_k: int = 5
    all_scores: bool = False
    decode_workers: int | None = None  # None: one per core (niced below the engine)
    engine_threads: int | None = None  # None: all cores (CPU engines only)
    progress: bool = True
    resume: bool = False  # skip paths already in the output or its partial file
    paths_from: str | None = None  # a file of paths, one per line; "-" reads stdin
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    follow_symlinks: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS
    draft: bool = True  # reduced-scale JPEG decoding
    background: Colour = WHITE
    decode_timeout: float = DEFAULT_DECODE_TIMEOUT
    prefetch: int = 2  # decoded batches queued ahead of the engine


@dataclass
class InferSummary:
    """What a run did and where its time went."""

    engine_name: str
    images_ok: int
    images_failed: int
    seconds: float
    images_per_second: float  # files handled per second of wall time, failures included
    decode_seconds: float  # summed over decode workers
    engine_seconds: float
    out_path: Path
    decode_wait_seconds: float = 0.0  # time the engine sat waiting for decoded images
    write_seconds: float = 0.0
    failure_reasons: dict[str, int] = field(default_factory=dict)
    images_skipped: int = 0  # already in the output (resume)
    images_left: int = 0  # not reached because the run was stopped
    stopped_by: str | None = None  # the signal that stopped the run, if one did
    decode_workers: int = 1
    engine_threads: int | None = None
    workers_replaced: int = 0

    @property
    def decode_rate(self) -> float:
        """Images per second the decode workers sustain together."""
        per_worker = self.decode_seconds / max(1, self.decode_workers)
        handled = self.images_ok + self.images_failed
        return handled / per_worker if per_worker > 0 else 0.0

    @property
    def engine_rate(self) -> float:
        """Images per second of the engine alone."""
        return self.images_ok / self.engine_seconds if self.engine_seconds > 0 else 0.0


def run_inference(config: InferConfig) -> InferSummary:
    """Tag every input of `config` and write one row per file to `config.out`."""
    check_config(config)
    start_decoder_server()  # in the background, while the export and inputs load
    manifest = read_manifest(config.export_dir)
    output_format(config.out)  # a bad suffix fails now, not after the engine has loaded
    thresholds = class_thresholds(manifest.classes, default_threshold(config, manifest),
                                  config.thresholds_file)

    paths = collect_inputs(input_spec(config))
    if not paths:
        logger.warning("no image files in %s", _describe_inputs(config))

    summary = _tag(paths, manifest, thresholds, config)
    log_summary(summary)
    return summary


def _open_engine(config: InferConfig, manifest: ExportManifest) -> Engine:
    # The decode workers share the cores: idle engine threads sleep rather than spin.
    # Short batches are padded to the batch size, so onnxruntime plans memory once.
    # On the CPU a batch runs as one single-threaded slice per thread, unless batches
    # are too small to give every thread a slice (--batch 1 would use one core).
    threads = _engine_threads(config)
    return open_engine(config.export_dir, manifest, config.engine, intra_threads=threads,
                       spinning=False, pad_to=config.batch_size,
                       split=config.batch_size >= threads)


def check_config(config: InferConfig) -> None:
    """ConfigError for an option out of its range, before anything loads."""
    if config.batch_size < 1:
        raise ConfigError(f"batch size must be at least 1, not {config.batch_size}")
    if config.top_k < 0:
        raise ConfigError(f"top-k must be 0 or more, not {config.top_k}")
    for name in ("decode_workers", "engine_threads"):
        value = getattr(config, name)
        if value is not None and value < 1:
            raise ConfigError(f"{name.replace('_', ' ')} must be at least 1, not {value}")
    if config.threshold is not None and not 0.0 <= config.threshold <= 1.0:
        raise ConfigError(f"threshold must lie in [0, 1] (scores are probabilities), "
                          f"not {config.threshold}")
    if config.max_pixels < 1:
        raise ConfigError(f"max pixels must be at least 1, not {config.max_pixels}")
    if not config.decode_timeout > 0:
        raise ConfigError(f"decode timeout must be above 0 seconds, not {config.decode_timeout}")
    check_engine_choice(config.engine)


def default_threshold(config: InferConfig, manifest: ExportManifest) -> float:
    """The threshold of classes without their own: the run's, else the export's."""
    return manifest.threshold if config.threshold is None else config.threshold


def input_spec(config: InferConfig) -> InputSpec:
    """Which files the run tags, as the input walk takes them."""
    roots = config.inputs if isinstance(config.inputs, list) else [config.inputs]
    return InputSpec(
        roots=[Path(root) for root in roots],
        paths_file=config.paths_from,
        include=list(config.include),
        exclude=list(config.exclude),
        follow_symlinks=config.follow_symlinks,
    )


def _describe_inputs(config: InferConfig) -> str:
    roots = config.inputs if isinstance(config.inputs, list) else [config.inputs]
    named = [str(root) for root in roots] + ([config.paths_from] if config.paths_from else [])
    return ", ".join(named)


def _engine_threads(config: InferConfig) -> int:
    return config.engine_threads or available_cores()


def _tag(
    paths: list[Path],
    manifest: ExportManifest,
    thresholds: np.ndarray,
    config: InferConfig,
) -> InferSummary:
    decode = DecodeSettings(
        manifest.image_height,
        manifest.image_width,
        manifest.interpolation,
        config.max_pixels,
        config.draft,
        config.background,
    )
    workers = config.decode_workers or default_decode_workers()
    times = StageTimes()
    failures: Counter[str] = Counter()
    handled = 0
    started = time.perf_counter()

    with (
        open_writer(config.out, manifest.classes, config.all_scores, config.resume,
                    _run_key(config, manifest, thresholds)) as writer,
        stop_on_signals() as stop,
    ):
        todo = len(paths) - sum(str(path) in writer.done for path in paths)
        chunks = _chunks_to_do(paths, writer, config.batch_size)
        # The decode slots take a batch each: no bigger than the work, whatever --batch.
        longest = max(1, min(config.batch_size, todo))
        # The workers start on the first batches now, so that the cores the engine's
        # load leaves idle decode (and a slow load, TensorRT's, costs no decoding time).
        batches = decode_batches(chunks, decode, longest, workers, config.prefetch, times,
                                 config.decode_timeout)
        # closing(): on an error or a stop, end the decode workers now rather than
        # whenever the traceback that holds the generator is freed.
        with (
            closing(batches),
            closing(_open_engine(config, manifest)) as engine,
            tqdm(total=todo, unit="img", file=sys.stderr, disable=not config.progress,
                 dynamic_ncols=True) as bar,
        ):
            for batch in _until_stopped(batches, stop):
                scores = score_batch(engine, batch, manifest, times)
                rows = batch_rows(batch, scores, manifest.classes, thresholds, config)
                _write(writer, rows, times)

                handled += len(batch.paths)
                failures.update(reason for _, reason in batch.failures)
                bar.update(len(batch.paths))
                if failures:
                    bar.set_postfix(failed=sum(failures.values()), refresh=False)

        stopped = stop.requested and handled < todo
        if stopped:
            # Keep the rows for --resume instead of publishing a partial output.
            writer.abort()
        elif stop.requested:
            # The batch in flight was the last: the output is complete, so it is published.
            logger.info("%s came during the last batch: the run is complete", stop.signal.name)

    seconds = time.perf_counter() - started
    failed = sum(failures.values())
    return InferSummary(
        engine_name=engine.name,
        images_ok=handled - failed,
        images_failed=failed,
        seconds=seconds,
        images_per_second=handled / seconds if seconds > 0 else 0.0,
        decode_seconds=times.decode_seconds,
        engine_seconds=times.engine_seconds,
        out_path=config.out,
        decode_wait_seconds=times.decode_wait_seconds,
        write_seconds=times.write_seconds,
        failure_reasons=dict(failures.most_common()),
        images_skipped=len(paths) - todo,
        images_left=todo - handled,
        stopped_by=stop.signal.name if stopped else None,
        decode_workers=workers,
        workers_replaced=times.workers_replaced,
        engine_threads=_engine_threads(config) if engine.name.startswith("ort-cpu") else None,
    )


def _run_key(config: InferConfig, manifest: ExportManifest,
             thresholds: np.ndarray) -> dict[str, object]:
    """What a row depends on beyond its columns: a resumed run must bring the same.

    The engine choice is in it: another precision gives other scores.
    """
    return {"onnx_sha256": manifest.onnx_sha256, "engine": config.engine,
            "top_k": config.top_k, "thresholds": [float(t) for t in thresholds]}


def _chunks_to_do(paths: list[Path], writer: RowWriter, batch_size: int) -> Iterator[list[Path]]:
    # Batches are cut from the whole list, then thinned of finished paths: a resumed
    # run scores the rest in the same batches as an uninterrupted run would.
    for start in range(0, len(paths), batch_size):
        chunk = [p for p in paths[start : start + batch_size] if str(p) not in writer.done]
        if chunk:
            yield chunk


def _until_stopped(batches: Iterator[Batch], stop: StopRequest) -> Iterator[Batch]:
    # The batch being scored when a stop comes is finished; one that was still
    # decoding is dropped and left to --resume, since a SIGTERM sent to the whole
    # process group (as systemd stops a service) also killed its decode workers,
    # and its files would otherwise stay error rows for good.
    for batch in batches:
        if stop.requested:
            return
        yield batch
        if stop.requested:
            return


def _write(writer: RowWriter, rows: list[Row], times: StageTimes) -> None:
    started = time.perf_counter()
    writer.write_rows(rows)
    times.write_seconds += time.perf_counter() - started


def score_batch(
    engine: Engine, batch: Batch, manifest: ExportManifest, times: StageTimes
) -> np.ndarray:
    """Scores [n_good, C] for the decoded images of a batch."""
    if len(batch.good_paths) == 0:
        return np.zeros((0, len(manifest.classes)), np.float32)

    started = time.perf_counter()
    outputs = engine.run(batch.images)
    times.engine_seconds += time.perf_counter() - started

    scores = outputs.get(manifest.scores_output)
    expected = (len(batch.good_paths), len(manifest.classes))
    if scores is None or scores.shape != expected:
        found = None if scores is None else scores.shape
        raise BundleError(
            f"the {engine.name} engine returned {manifest.scores_output!r} of shape {found}, "
            f"expected {expected} for {len(manifest.classes)} classes: the export folder's "
            f"graph and manifest disagree; {REEXPORT_HINT}"
        )
    return scores


def batch_rows(
    batch: Batch,
    scores: np.ndarray,
    classes: list[str],
    thresholds: np.ndarray,
    config: InferConfig,
) -> list[Row]:
    """One row per path of the batch, in input order."""
    order = np.argsort(-scores, axis=1, kind="stable")  # [n_good, C], best first
    above = scores >= thresholds  # [n_good, C]

    reasons = dict(batch.failures)
    good = iter(range(len(batch.good_paths)))
    rows = []
    for path in batch.paths:
        if path in reasons:
            rows.append(Row(path=str(path), status="error", error=reasons[path]))
            continue
        i = next(good)
        ranked = order[i]
        rows.append(
            Row(
                path=str(path),
                status="ok",
                labels=[classes[c] for c in ranked if above[i, c]],
                top_k=[(classes[c], float(scores[i, c])) for c in ranked[: config.top_k]],
                scores=scores[i] if config.all_scores else None,
            )
        )
    return rows


def log_summary(summary: InferSummary) -> None:
    """The closing lines of a run: counts, rates, the limiting stage, failures by reason."""
    logger.info(
        "%d done, %d failed, %d skipped (already in the output)%s in %.1f s on %s",
        summary.images_ok,
        summary.images_failed,
        summary.images_skipped,
        f", {summary.images_left} left" if summary.stopped_by else "",
        summary.seconds,
        summary.engine_name,
    )
    if summary.engine_rate > 0:  # else the engine never ran: no image decoded, or none given
        logger.info(
            "rates: decoding %.1f images/s (%d workers), engine %.1f images/s, overall %.1f "
            "images/s; %s limits this run",
            summary.decode_rate,
            summary.decode_workers,
            summary.engine_rate,
            summary.images_per_second,
            "decoding" if summary.decode_rate < summary.engine_rate else "the engine",
        )
    for reason, count in summary.failure_reasons.items():
        logger.info("  %d failed: %s", count, reason)
    if summary.workers_replaced:
        logger.info("  %d decode workers crashed or hung and were replaced",
                    summary.workers_replaced)
