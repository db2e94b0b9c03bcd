"""Decision thresholds: one for every class, or one per class read from a file."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from pathlib import Path

import numpy as np

from imfree.errors import ConfigError

logger = logging.getLogger(__name__)


def class_thresholds(
    classes: list[str],
    default: float,
    path: str | os.PathLike[str] | None = None,
) -> np.ndarray:
    """float32 [C]: the threshold of each class; classes the file leaves out take `default`.

    The file is a JSON object {"class": threshold}, or CSV lines `class,threshold`
    (a first line `class,threshold` is taken as a header).
    """
    thresholds = np.full(len(classes), default, dtype=np.float32)
    if path is None:
        return thresholds

    path = Path(path)
    given = _read(path)
    unknown = sorted(set(given) - set(classes))
    if unknown:
        raise ConfigError(
            f"{path} names classes this export does not have: {', '.join(unknown[:10])}; "
            f"its classes are: {', '.join(classes)}"
        )
    for name, value in given.items():
        thresholds[classes.index(name)] = value
    logger.info("per-class thresholds for %d of %d classes from %s", len(given), len(classes),
                path)
    return thresholds


def _read(path: Path) -> dict[str, float]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot read the thresholds file {path}: {error}") from error

    if path.suffix.lower() == ".json":
        pairs = _json_pairs(text, path)
    else:
        pairs = _csv_pairs(text, path)

    thresholds: dict[str, float] = {}
    for name, value in pairs:
        number = _number(value, name, path)
        if name in thresholds:
            raise ConfigError(f"{path} gives class {name!r} two thresholds; keep one")
        thresholds[name] = number
    return thresholds


def _json_pairs(text: str, path: Path) -> list[tuple[str, object]]:
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path} is not valid JSON ({error}); write an object "
                          '{"class": threshold}') from error
    if not isinstance(document, dict):
        raise ConfigError(f'{path} must hold one JSON object {{"class": threshold}}')
    return list(document.items())


def _csv_pairs(text: str, path: Path) -> list[tuple[str, object]]:
    rows = [row for row in csv.reader(text.splitlines()) if row and any(c.strip() for c in row)]
    if rows and [c.strip().lower() for c in rows[0]] == ["class", "threshold"]:
        rows = rows[1:]
    bad = next((row for row in rows if len(row) != 2), None)
    if bad is not None:
        raise ConfigError(f"{path}: the line {','.join(bad)!r} is not `class,threshold`")
    return [(name.strip(), value.strip()) for name, value in rows]


def _number(value: object, name: str, path: Path) -> float:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not math.isfinite(number):
        raise ConfigError(f"{path}: the threshold of {name!r} must be a number, not {value!r}")
    return number
