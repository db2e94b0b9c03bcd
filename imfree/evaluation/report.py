"""`run_eval`: score a dataset with several sources and report every figure.

One Markdown report (a table with a row per source, then AP per class) and,
optionally, the same figures as JSON. Decisions (top-k and threshold) are
taken over the evaluated classes only: the classes of the dataset that every
source has, so that every row of the table measures the same task.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from imfree.errors import ConfigError
from imfree.evaluation.classnames import match_classes
from imfree.evaluation.datasets import DatasetError, EvalSet, read_dataset
from imfree.evaluation.metrics import (
    f1_scores,
    mean_average_precision,
    normalise_per_image,
    threshold_decisions,
    top_k_decisions,
)
from imfree.evaluation.scoring import (
    Device,
    SourceScores,
    score_sources,
    source_classes,
    source_names,
)
from imfree.fileio import make_folder, write_atomically

logger = logging.getLogger(__name__)

Normalise = Literal["none", "per-image"]
DifficultRule = Literal["ignore", "negative", "both"]


@dataclass
class EvalConfig:
    """One evaluation: sources (artifact folders, infer outputs) against one dataset."""

    sources: list[Path]
    dataset: str | EvalSet  # a spec such as "voc2007:DIR", or a set already read
    label_column: str = "labels"  # csv: the column of ';'-separated class names
    out: Path | None = None  # the Markdown report
    json_out: Path | None = None
    threshold: float | None = None  # None: each source's default, 2 / its classes
    top_k: int = 3
    normalise: Normalise = "none"  # "per-image" adds a normalised row per source
    limit: int | None = None  # the dataset's first N images only
    batch_size: int = 64
    device: Device = "auto"
    difficult: DifficultRule = "both"  # VOC only
    draft: bool = True  # reduced-scale JPEG decoding, as `imfree infer` does by default


@dataclass
class SourceResult:
    """Every figure of one row: a source, under one difficult rule, raw or normalised."""

    name: str
    path: str
    images: int  # images scored
    failed: int  # images of the dataset without a score (decode failures, missing rows)
    map: float
    per_class_ap: dict[str, float]
    cf1_top3: float  # at the run's top_k (3 by default)
    of1_top3: float
    cf1_threshold: float | None  # None for normalised scores: not on the threshold's scale
    of1_threshold: float | None
    threshold: float | None
    normalised: bool = False
    difficult: str | None = None  # "ignore" or "negative" on VOC
    cp_top3: float = math.nan
    cr_top3: float = math.nan
    op_top3: float = math.nan
    or_top3: float = math.nan


@dataclass
class EvalReport:
    dataset: str
    images_listed: int
    images_found: int
    classes: list[str]  # evaluated: the dataset's classes every source has
    classes_left_out: dict[str, list[str]]  # source name -> dataset classes it lacks
    top_k: int
    classes_without_positive: list[str] = field(default_factory=list)  # no AP, out of mAP
    results: list[SourceResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    markdown: str = ""

    def to_json(self) -> dict[str, Any]:
        return _no_nan({
            "dataset": self.dataset,
            "images_listed": self.images_listed,
            "images_found": self.images_found,
            "classes": self.classes,
            "classes_left_out": self.classes_left_out,
            "top_k": self.top_k,
            "classes_without_positive": self.classes_without_positive,
            "notes": self.notes,
            "sources": [asdict(result) for result in self.results],
        })


def run_eval(config: EvalConfig) -> EvalReport:
    """Read the dataset, score it with every source, compute the figures, write the reports."""
    config = replace(config, sources=[Path(source) for source in config.sources])
    _check_config(config)
    evalset = config.dataset if isinstance(config.dataset, EvalSet) else read_dataset(
        config.dataset, config.label_column)
    if config.limit is not None:
        evalset = evalset.first(config.limit)

    # Classes first: a dataset the sources cannot score fails before any image is decoded.
    classes, left_out = _common_classes(evalset, config.sources)
    started = time.perf_counter()
    scored = score_sources(evalset, config.sources, config.batch_size, config.device,
                           config.draft)
    logger.info("scored %d images with %d sources in %.1f s", len(evalset.paths), len(scored),
                time.perf_counter() - started)

    report = EvalReport(
        dataset=evalset.name, images_listed=evalset.listed, images_found=len(evalset.paths),
        classes=classes, classes_left_out=left_out, top_k=config.top_k,
        classes_without_positive=_without_positive(evalset, classes),
        notes=list(evalset.notes),
    )
    for source in scored:
        report.results += _source_results(evalset, source, classes, config)
    report.markdown = render_markdown(report, config)

    if config.out:
        write_atomically(config.out, report.markdown)
    if config.json_out:
        write_atomically(config.json_out, json.dumps(report.to_json(), indent=2) + "\n")
    return report


def _without_positive(evalset: EvalSet, classes: list[str]) -> list[str]:
    present = evalset.with_classes(classes).targets.any(axis=0)  # [C]
    return [name for name, hit in zip(classes, present, strict=True) if not hit]


def _check_config(config: EvalConfig) -> None:
    if not config.sources:
        raise ConfigError("no source to evaluate: pass artifact folders or infer outputs")
    if config.top_k < 1:
        raise ConfigError(f"--top-k must be at least 1, not {config.top_k}")
    if config.batch_size < 1:
        raise ConfigError(f"--batch must be at least 1, not {config.batch_size}")
    if config.limit is not None and config.limit < 1:
        raise ConfigError(f"--limit must be at least 1, not {config.limit}")
    if config.threshold is not None and not 0.0 <= config.threshold <= 1.0:
        raise ConfigError(f"--threshold must lie in [0, 1] (scores are probabilities), "
                          f"not {config.threshold}")
    for path in (config.out, config.json_out):
        if path is not None:
            _check_writable(Path(path))
    _check_outputs_spare_inputs(config)


def _check_writable(path: Path) -> None:
    # Before any image is scored: a report that cannot be written must not cost the run.
    make_folder(path.parent, "the folder of the report")
    if path.is_dir() or not os.access(path.parent, os.W_OK):
        raise ConfigError(f"cannot write {path}: it is a folder or its folder is not "
                          f"writable; pass another --out or --json")


def _check_outputs_spare_inputs(config: EvalConfig) -> None:
    """No report may replace a source, a dataset file, a file inside either, or the other report."""
    outputs = [Path(p) for p in (config.out, config.json_out) if p is not None]
    if len(outputs) == 2 and outputs[0].resolve() == outputs[1].resolve():
        raise ConfigError(f"--out and --json both name {outputs[0]}: the JSON would replace "
                          "the Markdown report; pass two different files")
    inputs = list(config.sources) + _dataset_paths(config.dataset)
    for out in outputs:
        target = out.resolve()
        for source in inputs:
            held = source.resolve()
            inside = held.is_dir() and target.is_relative_to(held) and target.exists()
            if target == held or inside:
                raise ConfigError(f"{out} would overwrite {'a file in ' if inside else ''}"
                                  f"{source}, an input of this evaluation; pass another "
                                  "--out or --json")


def _dataset_paths(dataset: str | EvalSet) -> list[Path]:
    """The files and folders a dataset spec reads (a spec's parts between commas)."""
    if not isinstance(dataset, str):
        return []
    _, _, rest = dataset.partition(":")
    return [Path(part) for part in rest.split(",") if part and Path(part).exists()]


def _common_classes(
    evalset: EvalSet, sources: list[Path]
) -> tuple[list[str], dict[str, list[str]]]:
    common = list(evalset.classes)
    left_out = {}
    for path, name in zip(sources, source_names(sources), strict=True):
        matched = match_classes(evalset.classes, source_classes(path))
        if not matched:
            raise DatasetError(
                f"no class of {evalset.name} ({_listing(evalset.classes)}) is among the "
                f"classes of {path}; evaluate it on a dataset of its own classes")
        left_out[name] = [c for c in evalset.classes if c not in matched]
        common = [c for c in common if c in matched]
    if not common:
        raise DatasetError(f"the sources share no class of {evalset.name}; evaluate them "
                           f"separately")
    for name, missing in left_out.items():
        if missing:
            logger.warning("%s lacks %d classes of %s, left out for every source: %s", name,
                           len(missing), evalset.name, _listing(missing))
    return common, left_out


def _source_results(
    evalset: EvalSet, source: SourceScores, classes: list[str], config: EvalConfig
) -> list[SourceResult]:
    subset = evalset.with_classes(classes)
    matched = match_classes(classes, source.classes)
    columns = [source.classes.index(matched[c]) for c in classes]
    scores = source.scores[:, columns].astype(np.float64)  # [n, C_eval]
    targets = subset.targets[source.rows]
    threshold = source.default_threshold if config.threshold is None else config.threshold

    # VOC states its rule on every row, even where no image of the run is difficult.
    rules: list[str | None] = [None]
    if subset.difficult is not None:
        rules = ["ignore", "negative"] if config.difficult == "both" else [config.difficult]

    results = []
    for rule in rules:
        ignore = subset.difficult[source.rows] if rule == "ignore" else None
        results.append(_figures(source, classes, scores, targets, ignore, threshold, rule,
                                config.top_k, normalised=False))
        if config.normalise == "per-image":
            results.append(_figures(source, classes, normalise_per_image(scores), targets,
                                    ignore, None, rule, config.top_k, normalised=True))
    return results


def _figures(
    source: SourceScores, classes: list[str], scores: np.ndarray, targets: np.ndarray,
    ignore: np.ndarray | None, threshold: float | None, rule: str | None, top_k: int,
    normalised: bool,
) -> SourceResult:
    mean, per_class = mean_average_precision(scores, targets, ignore)
    top = f1_scores(top_k_decisions(scores, top_k), targets, ignore)
    at = None if threshold is None else f1_scores(threshold_decisions(scores, threshold),
                                                  targets, ignore)
    return SourceResult(
        name=source.name, path=str(source.path), images=len(source.rows),
        failed=len(source.failed), map=mean,
        per_class_ap={c: float(ap) for c, ap in zip(classes, per_class, strict=True)},
        cf1_top3=top.cf1, of1_top3=top.of1,
        cf1_threshold=None if at is None else at.cf1,
        of1_threshold=None if at is None else at.of1,
        threshold=threshold, normalised=normalised, difficult=rule,
        cp_top3=top.cp, cr_top3=top.cr, op_top3=top.op, or_top3=top.or_,
    )


# Markdown ----------------------------------------------------------------------------

def render_markdown(report: EvalReport, config: EvalConfig) -> str:
    """The report: what was evaluated, the table of sources, AP per class."""
    lines = [f"# imfree eval: {report.dataset}", ""]
    lines += [f"- images: {report.images_found} of {report.images_listed} listed found on "
              f"disk; the images column counts those each source scored"]
    lines += [f"- classes: {len(report.classes)} evaluated (the dataset's classes every "
              f"source has); top-{report.top_k} and threshold decisions among them"]
    if report.classes_without_positive:
        lines += [f"- mAP averages the classes with a positive image; without one: "
                  f"{_listing(report.classes_without_positive)}"]
    lines += [f"- left out for {name}: {_listing(missing)}"
              for name, missing in report.classes_left_out.items() if missing]
    lines += [f"- {note}" for note in report.notes]
    if any(r.difficult for r in report.results):
        lines += ["- difficult: `ignore` leaves an image out of a class's ranking when the "
                  "class is there only as objects marked difficult; `negative` counts it "
                  "as a negative"]
    if config.normalise == "per-image":
        lines += ["- per-image: scores z-scored across classes in each image, then across "
                  "images in each class (over the evaluated images); no threshold applies"]
    lines += ["", *_summary_table(report), "", "## AP per class (%)", "",
              *_class_table(report), ""]
    return "\n".join(lines)


def _summary_table(report: EvalReport) -> list[str]:
    k = report.top_k
    header = ["source", "images", "mAP", f"CF1 top-{k}", f"OF1 top-{k}", "threshold",
              "CF1 @t", "OF1 @t"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in report.results:
        failed = f" ({r.failed} failed)" if r.failed else ""
        threshold = "–" if r.threshold is None else f"{r.threshold:.3g}"
        cells = [_row_name(r), f"{r.images}{failed}", _pct(r.map), _pct(r.cf1_top3),
                 _pct(r.of1_top3), threshold, _pct(r.cf1_threshold), _pct(r.of1_threshold)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _class_table(report: EvalReport) -> list[str]:
    header = ["class", *(_row_name(r) for r in report.results)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in report.classes:
        cells = [name, *(_pct(r.per_class_ap[name], "no positive") for r in report.results)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _row_name(result: SourceResult) -> str:
    parts = [result.name]
    if result.difficult:
        parts.append(f"difficult {result.difficult}")
    if result.normalised:
        parts.append("per-image")
    return parts[0] + (f" ({', '.join(parts[1:])})" if parts[1:] else "")


def _pct(value: float | None, missing: str = "–") -> str:
    if value is None or math.isnan(value):
        return missing
    return f"{100 * value:.2f}"


def _listing(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _no_nan(value: Any) -> Any:
    """JSON has no NaN: an undefined figure (a class without positives) becomes null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_no_nan(v) for v in value]
    return value
