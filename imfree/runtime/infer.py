"""Tagging a folder of images with an export: one output row per input file."""

from __future__ import annotations

import logging
import math
import sys
import time
from collections import Counter
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from imfree.errors import BundleError, ConfigError
from imfree.runtime.bundle import REEXPORT_HINT, ExportManifest, read_manifest
from imfree.runtime.engines import Engine, EngineChoice, check_engine_choice, open_engine
from imfree.runtime.pipeline import Batch, DecodeSettings, StageTimes, iter_batches
from imfree.runtime.sources import list_images
from imfree.runtime.writers import Row, open_writer, output_format

logger = logging.getLogger(__name__)


@dataclass
class InferConfig:
    """One tagging run."""

    inputs: Path  # an image file or a folder, walked recursively
    export_dir: Path
    out: Path  # .csv or .jsonl
    batch_size: int = 256
    engine: EngineChoice = "auto"
    threshold: float | None = None  # None: the export's own threshold
    top_k: int = 5
    all_scores: bool = False
    decode_workers: int | None = None  # None: all cores but one
    progress: bool = True


@dataclass
class InferSummary:
    """What a run did and where its time went."""

    engine_name: str
    images_ok: int
    images_failed: int
    seconds: float
    images_per_second: float  # input files per second of wall time, failures included
    decode_seconds: float  # summed over decode workers
    engine_seconds: float
    out_path: Path
    decode_wait_seconds: float = 0.0  # time the engine sat waiting for decoded images
    write_seconds: float = 0.0
    failure_reasons: dict[str, int] = field(default_factory=dict)


def run_inference(config: InferConfig) -> InferSummary:
    """Tag every image under `config.inputs` and write one row per file to `config.out`."""
    _check_config(config)
    manifest = read_manifest(config.export_dir)
    output_format(config.out)  # a bad suffix fails now, not after the engine has loaded

    paths = list_images(config.inputs)
    if not paths:
        logger.warning("no image files under %s", config.inputs)

    engine = open_engine(config.export_dir, manifest, config.engine)
    try:
        summary = _tag(paths, manifest, engine, config)
    finally:
        engine.close()

    _log_summary(summary, len(paths))
    return summary


def _check_config(config: InferConfig) -> None:
    if config.batch_size < 1:
        raise ConfigError(f"batch size must be at least 1, not {config.batch_size}")
    if config.top_k < 0:
        raise ConfigError(f"top-k must be 0 or more, not {config.top_k}")
    if config.decode_workers is not None and config.decode_workers < 1:
        raise ConfigError(f"decode workers must be at least 1, not {config.decode_workers}")
    if config.threshold is not None and not math.isfinite(config.threshold):
        raise ConfigError(f"threshold must be a finite number, not {config.threshold}")
    check_engine_choice(config.engine)


def _tag(
    paths: list[Path], manifest: ExportManifest, engine: Engine, config: InferConfig
) -> InferSummary:
    threshold = manifest.threshold if config.threshold is None else config.threshold
    decode = DecodeSettings(manifest.image_height, manifest.image_width, manifest.interpolation)
    times = StageTimes()
    failures: Counter[str] = Counter()
    started = time.perf_counter()

    bar = tqdm(
        total=len(paths),
        unit="img",
        file=sys.stderr,
        disable=not config.progress,
        dynamic_ncols=True,
    )
    batches = iter_batches(paths, decode, config.batch_size, config.decode_workers, times=times)
    # closing(): on an error, stop the decode pool now rather than whenever the
    # traceback that holds the generator is freed.
    with (
        bar,
        open_writer(config.out, manifest.classes, config.all_scores) as writer,
        closing(batches),
    ):
        for batch in batches:
            scores = _score(engine, batch, manifest, times)
            rows = _rows(batch, scores, manifest.classes, threshold, config)

            write_started = time.perf_counter()
            writer.write_rows(rows)
            times.write_seconds += time.perf_counter() - write_started

            failures.update(reason for _, reason in batch.failures)
            bar.update(len(batch.paths))
            if failures:
                bar.set_postfix(failed=sum(failures.values()), refresh=False)

    seconds = time.perf_counter() - started
    failed = sum(failures.values())
    return InferSummary(
        engine_name=engine.name,
        images_ok=len(paths) - failed,
        images_failed=failed,
        seconds=seconds,
        images_per_second=len(paths) / seconds if seconds > 0 else 0.0,
        decode_seconds=times.decode_seconds,
        engine_seconds=times.engine_seconds,
        out_path=config.out,
        decode_wait_seconds=times.decode_wait_seconds,
        write_seconds=times.write_seconds,
        failure_reasons=dict(failures.most_common()),
    )


def _score(engine: Engine, batch: Batch, manifest: ExportManifest, times: StageTimes) -> np.ndarray:
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


def _rows(
    batch: Batch, scores: np.ndarray, classes: list[str], threshold: float, config: InferConfig
) -> list[Row]:
    """One row per path of the batch, in input order."""
    order = np.argsort(-scores, axis=1, kind="stable")  # [n_good, C], best first
    # Sorted best first, the classes at or above the threshold form a prefix of each row.
    above = (np.take_along_axis(scores, order, axis=1) >= threshold).sum(axis=1)  # [n_good]

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
                labels=[classes[c] for c in ranked[: above[i]]],
                top_k=[(classes[c], float(scores[i, c])) for c in ranked[: config.top_k]],
                scores=scores[i] if config.all_scores else None,
            )
        )
    return rows


def _log_summary(summary: InferSummary, files: int) -> None:
    logger.info(
        "%d files in %.1f s (%.1f/s) on %s: %d ok, %d failed | decode %.1f s over workers, "
        "engine waited %.1f s | engine %.1f s | write %.1f s -> %s",
        files,
        summary.seconds,
        summary.images_per_second,
        summary.engine_name,
        summary.images_ok,
        summary.images_failed,
        summary.decode_seconds,
        summary.decode_wait_seconds,
        summary.engine_seconds,
        summary.write_seconds,
        summary.out_path,
    )
    for reason, count in summary.failure_reasons.items():
        logger.info("  %d failed: %s", count, reason)
