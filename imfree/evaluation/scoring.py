"""Scores for every image of an EvalSet, from classifier artifacts or `imfree infer` outputs.

An artifact is scored in PyTorch through `ScoringGraph`, the module that is
exported, on images decoded by the runtime's own decoder and worker pool, so
the scores are the deployed ones. Artifacts are grouped by how their images
are decoded (size and filter): each group decodes each batch once and runs
every graph of the group on it; graphs on the same backbone (model and
weights) share one loaded copy and one encoder pass (see graphs.py). An image
that fails to decode is left out and counted, for every artifact of its group.

A predictions file is an output of `imfree infer --all-scores` (CSV, JSON
Lines or Parquet, or the shard folder of a `--ray` run), read with the
runtime's own reader; its rows are matched
to the dataset's images by path.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from imfree.errors import ConfigError
from imfree.evaluation.datasets import EvalSet
from imfree.runtime.ray_shards import SHARDS_MANIFEST
from imfree.runtime.writers import OUTPUT_SUFFIXES, parquet_text, read_scores

logger = logging.getLogger(__name__)

Device = Literal["auto", "cpu", "cuda"]
ARTIFACT_METADATA = "classifier.json"
EXPORT_MANIFEST = "imfree_export.json"


@dataclass
class SourceScores:
    """One source's scores for the images it could score."""

    name: str
    path: Path
    classes: list[str]  # the source's own classes, in its order
    rows: np.ndarray  # int [n]: indices into the EvalSet's images
    scores: np.ndarray  # float32 [n, len(classes)]
    failed: dict[str, str] = field(default_factory=dict)  # path -> why it has no score
    default_threshold: float = 0.0  # the export's default: twice the uniform score
    seconds: float = 0.0  # reading, or scoring the group of artifacts it was scored with


def score_sources(
    evalset: EvalSet,
    sources: list[Path],
    batch_size: int = 64,
    device: Device = "auto",
    draft: bool = True,
) -> list[SourceScores]:
    """Scores of each source, in the order given; names made unique."""
    names = source_names(sources)
    results: dict[int, SourceScores] = {}
    artifacts = []
    for index, path in enumerate(sources):
        if _is_artifact(path):
            artifacts.append(index)
        else:
            results[index] = score_predictions(evalset, path, names[index])

    if artifacts:
        scored = _score_artifacts(evalset, [sources[i] for i in artifacts],
                                  [names[i] for i in artifacts], batch_size, device, draft)
        results.update(zip(artifacts, scored, strict=True))
    return [results[i] for i in range(len(sources))]


def source_classes(path: Path) -> list[str]:
    """The class names a source scores, read without scoring anything."""
    if _is_artifact(path):
        from imfree.toolkit.artifact import load_artifact

        return list(load_artifact(path).classes)
    return read_scores(path).classes


def _is_artifact(path: Path) -> bool:
    if path.is_dir() and (path / ARTIFACT_METADATA).is_file():
        return True
    if path.is_dir() and (path / EXPORT_MANIFEST).is_file():
        raise ConfigError(f"{path} is an export folder; evaluate the artifact it was exported "
                          f"from, or tag the images with `imfree infer --all-scores` and pass "
                          f"that output")
    if not path.is_dir() and path.suffix.lower() in OUTPUT_SUFFIXES:
        return False  # read_scores says what is wrong with it, if anything
    if path.is_dir() and (path / SHARDS_MANIFEST).is_file():
        return False  # the shard folder of `imfree infer --ray`
    raise ConfigError(f"{path} is neither a classifier artifact (a folder from `imfree train`) "
                      f"nor an output of `imfree infer --all-scores` (.csv, .jsonl, .parquet, "
                      f"or the folder of a --ray run)")


# Predictions files --------------------------------------------------------------------

def score_predictions(evalset: EvalSet, path: Path, name: str | None = None) -> SourceScores:
    """The rows of an `imfree infer --all-scores` output that are images of `evalset`."""
    started = time.perf_counter()
    table = read_scores(path)
    reasons = list(table.failed.values())
    row_of = _row_lookup(table.paths + list(table.failed), evalset.paths)

    rows, picked, failed = [], [], {}
    for i, image in enumerate(evalset.paths):
        found = row_of(image)
        if found is None:
            failed[str(image)] = f"not in {path.name}"
        elif found < len(table.paths):
            rows.append(i)
            picked.append(found)
        else:
            failed[str(image)] = reasons[found - len(table.paths)]
    if not rows:
        raise ConfigError(f"none of the {len(evalset.paths)} images of {evalset.name} has a "
                          f"score in {path}; tag the dataset's images with `imfree infer "
                          f"--all-scores` and pass that output")
    if failed:
        logger.warning("%s: %d images of %s have no score (first: %s: %s)", path,
                       len(failed), evalset.name, *next(iter(failed.items())))

    return SourceScores(
        name=name or path.name, path=path, classes=table.classes,
        rows=np.array(rows, dtype=np.int64),
        scores=table.scores[picked], failed=failed,
        default_threshold=2.0 / len(table.classes), seconds=time.perf_counter() - started,
    )


def _row_lookup(paths: list[str], images: list[Path]) -> Callable[[Path], int | None]:
    """A function from an image of the dataset to its row in `paths`, or None.

    Paths match when they resolve to the same file (infer writes them as it was
    given them, relative to where it ran); failing that, by file name when the
    name is unique both among `paths` and among the dataset's `images`.
    """
    by_path = {Path(p).resolve(): i for i, p in enumerate(paths)}
    rows_named = Counter(Path(p).name for p in paths)
    images_named = Counter(image.name for image in images)
    by_name = {Path(p).name: i for i, p in enumerate(paths)}

    def row(image: Path) -> int | None:
        found = by_path.get(image.resolve())
        if found is None:  # Parquet spells a name that is not UTF-8 with \xNN escapes
            found = by_path.get(Path(parquet_text(str(image.resolve()))))
        if found is None and rows_named[image.name] == 1 and images_named[image.name] == 1:
            found = by_name[image.name]
        return found

    return row


# Artifacts ---------------------------------------------------------------------------

def _score_artifacts(
    evalset: EvalSet, paths: list[Path], names: list[str], batch_size: int, device: Device,
    draft: bool,
) -> list[SourceScores]:
    import torch

    from imfree.toolkit.artifact import load_artifact

    artifacts = [load_artifact(path) for path in paths]
    target = _torch_device(device, torch)

    groups: dict[tuple, list[int]] = {}
    for i, artifact in enumerate(artifacts):
        pre = artifact.preprocess
        groups.setdefault((tuple(pre.image_size), pre.interpolation), []).append(i)

    results: dict[int, SourceScores] = {}
    backbones: dict[tuple[str, str], object] = {}
    for (size, interpolation), members in groups.items():
        graphs = [_graph(artifacts[i], backbones, target) for i in members]
        scored = _run_group(evalset, graphs, size, interpolation, batch_size, target, draft)
        for i, (scores, rows, failed, seconds) in zip(members, scored, strict=True):
            _check_some_scored(evalset, paths[i], rows, failed)
            results[i] = SourceScores(
                name=names[i], path=paths[i], classes=list(artifacts[i].classes), rows=rows,
                scores=scores, failed=failed, seconds=seconds,
                default_threshold=2.0 / len(artifacts[i].classes),
            )
    return [results[i] for i in range(len(paths))]


def _check_some_scored(evalset: EvalSet, path: Path, rows: np.ndarray,
                       failed: dict[str, str]) -> None:
    """Say why images failed; a source that scored none is an error, not a table of zeros."""
    if not failed:
        return
    first, reason = next(iter(failed.items()))
    if not len(rows):
        raise ConfigError(f"none of the {len(evalset.paths)} images of {evalset.name} could be "
                          f"decoded for {path} (first: {first}: {reason}); check the images")
    logger.warning("%s: %d images of %s failed to decode (first: %s: %s)", path, len(failed),
                   evalset.name, first, reason)


def _torch_device(device: Device, torch) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda, but PyTorch sees no CUDA GPU here; pass --device cpu")
    return device


def _graph(artifact, backbones: dict, device: str):
    """The artifact's ScoringGraph; artifacts on the same weights share one backbone."""
    from imfree.export.graph import ScoringGraph
    from imfree.models import load_backbone

    key = (artifact.model_name, artifact.pretrained)
    if key not in backbones:
        backbones[key] = load_backbone(*key, device=device)
    return ScoringGraph(backbones[key], artifact).to(device).eval()


def _run_group(
    evalset: EvalSet, graphs: list, size: tuple[int, int], interpolation: str, batch_size: int,
    device: str, draft: bool,
) -> list[tuple[np.ndarray, np.ndarray, dict[str, str], float]]:
    """Decode each batch once, then run every graph on it; (scores, rows, failed, s) each."""
    import torch

    from imfree.evaluation.graphs import GraphSet
    from imfree.runtime.pipeline import DecodeSettings, StageTimes, iter_batches

    height, width = size
    settings = DecodeSettings(height, width, interpolation, draft=draft)
    graph_set = GraphSet(graphs)
    outputs: list[list[np.ndarray]] = [[] for _ in graphs]
    seconds = 0.0
    rows: list[int] = []
    failed: dict[str, str] = {}
    times = StageTimes()

    start = 0
    with torch.inference_mode():
        for batch in iter_batches(evalset.paths, settings, batch_size, times=times):
            failed.update((str(path), reason) for path, reason in batch.failures)
            bad = {path for path, _ in batch.failures}
            rows += [start + j for j, path in enumerate(batch.paths) if path not in bad]
            start += len(batch.paths)
            if not batch.good_paths:
                continue
            images = torch.from_numpy(batch.images).to(device)  # uint8 [B, H, W, 3]
            started = time.perf_counter()
            for g, scores in enumerate(graph_set(images)):
                outputs[g].append(scores.float().cpu().numpy())
            seconds += time.perf_counter() - started

    logger.info("decoded %d images at %dx%d once for %d classifier(s), %d failed; %.1f s "
                "waiting for decoding, %.1f s scoring (%d encoder pass(es) a batch)",
                len(rows), width, height, len(graphs), len(failed),
                times.decode_wait_seconds, seconds,
                len(graph_set.teams) if graph_set.shared else len(graphs))
    row_array = np.array(rows, dtype=np.int64)
    empty = [np.zeros((0, graph.global_classifier.shape[0]), np.float32) for graph in graphs]
    return [
        (np.concatenate(out or empty[g:g + 1]), row_array, dict(failed), seconds)
        for g, out in enumerate(outputs)
    ]


def source_names(paths: list[Path]) -> list[str]:
    """Each source's name in the report: its file or folder name, its path where two clash.

    A source given twice gets a number after its second mention, so rows stay apart.
    """
    short = [path.name or str(path) for path in paths]
    names = [str(path) if short.count(name) > 1 else name
             for path, name in zip(paths, short, strict=True)]
    return [name if names[:i].count(name) == 0 else f"{name} #{names[:i].count(name) + 1}"
            for i, name in enumerate(names)]
