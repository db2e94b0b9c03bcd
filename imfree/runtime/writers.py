"""Result rows, written as CSV or JSON Lines.

Rows go to a hidden partial file beside the output, flushed after every batch,
and the partial file is renamed onto the output only when the run completes:
an output file that exists is always whole, and a crashed run leaves its
rows behind under a name that says they are partial.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Literal

import numpy as np

from imfree.errors import ConfigError

logger = logging.getLogger(__name__)

OutputFormat = Literal["csv", "jsonl"]
OUTPUT_SUFFIXES: dict[str, OutputFormat] = {".csv": "csv", ".jsonl": "jsonl"}


@dataclass
class Row:
    """The result for one input file."""

    path: str
    status: Literal["ok", "error"]
    labels: list[str] = field(default_factory=list)  # at or above threshold, best first
    top_k: list[tuple[str, float]] = field(default_factory=list)  # (label, score), best first
    scores: np.ndarray | None = None  # float32 [C], only when all scores are asked for
    error: str = ""


def output_format(path: str | os.PathLike[str]) -> OutputFormat:
    """The format an output path's suffix asks for; ConfigError for any other suffix."""
    suffix = Path(path).suffix.lower()
    if suffix not in OUTPUT_SUFFIXES:
        choices = ", ".join(OUTPUT_SUFFIXES)
        raise ConfigError(
            f"cannot tell the output format of {path}: name it with one of the suffixes {choices}"
        )
    return OUTPUT_SUFFIXES[suffix]


def partial_path(path: str | os.PathLike[str]) -> Path:
    """Where rows collect until the run completes: a hidden file beside the output."""
    path = Path(path)
    return path.with_name(f".{path.name}.partial")


class RowWriter:
    """Writes rows to the partial file; `close` publishes it, `abort` keeps it aside."""

    def __init__(self, path: str | os.PathLike[str], classes: list[str], all_scores: bool):
        self.path = Path(path)
        self.partial = partial_path(self.path)
        self.classes = list(classes)
        self.all_scores = all_scores
        self.rows_written = 0

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handle: IO[str] | None = open(self.partial, "w", encoding="utf-8", newline="")
        self._start()

    def write_rows(self, rows: list[Row]) -> None:
        """Append rows and flush, so a crash loses at most the batch in flight."""
        for row in rows:
            self._write(row)
        self.rows_written += len(rows)
        self._file().flush()

    def close(self) -> None:
        """Finish the file and rename it onto the output path."""
        handle = self._file()
        handle.flush()
        os.fsync(handle.fileno())
        handle.close()
        self._handle = None
        os.replace(self.partial, self.path)
        logger.debug("wrote %d rows to %s", self.rows_written, self.path)

    def abort(self) -> None:
        """Stop writing, keeping the rows so far in the partial file."""
        if self._handle is None:
            return
        self._handle.close()
        self._handle = None
        logger.warning(
            "run stopped: the %d rows written so far are kept in %s",
            self.rows_written,
            self.partial,
        )

    def __enter__(self) -> RowWriter:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()

    def _file(self) -> IO[str]:
        if self._handle is None:
            raise ValueError(f"the writer for {self.path} is closed")
        return self._handle

    def _start(self) -> None:
        """Write whatever precedes the rows."""

    def _write(self, row: Row) -> None:
        raise NotImplementedError


class CsvRowWriter(RowWriter):
    """One line per file: labels ';'-joined, top-k as 'label:score' pairs."""

    def _start(self) -> None:
        self._csv = csv.writer(self._file())
        header = ["path", "status", "labels", "top_k", "error"]
        if self.all_scores:
            header += [f"score:{name}" for name in self.classes]
        self._csv.writerow(header)

    def _write(self, row: Row) -> None:
        top_k = ";".join(f"{label}:{_fmt(score)}" for label, score in row.top_k)
        cells = [row.path, row.status, ";".join(row.labels), top_k, row.error]
        if self.all_scores and row.scores is None:
            cells += [""] * len(self.classes)
        elif self.all_scores:
            cells += [_fmt(score) for score in row.scores]
        self._csv.writerow(cells)


class JsonlRowWriter(RowWriter):
    """One JSON object per line; `scores` maps every class to its score when asked for."""

    def _write(self, row: Row) -> None:
        record: dict[str, object] = {
            "path": row.path,
            "status": row.status,
            "labels": row.labels,
            "top_k": [{"label": label, "score": _round(score)} for label, score in row.top_k],
            "error": row.error or None,
        }
        if self.all_scores:
            record["scores"] = (
                None
                if row.scores is None
                else {name: _round(s) for name, s in zip(self.classes, row.scores, strict=True)}
            )
        self._file().write(json.dumps(record, ensure_ascii=False) + "\n")


_WRITERS: dict[OutputFormat, type[RowWriter]] = {"csv": CsvRowWriter, "jsonl": JsonlRowWriter}


def open_writer(path: str | os.PathLike[str], classes: list[str], all_scores: bool) -> RowWriter:
    """A CSV or JSON Lines writer, chosen by the suffix of `path`."""
    writer_class = _WRITERS[output_format(path)]
    return writer_class(path, classes, all_scores)


def _fmt(score: float) -> str:
    # Six significant digits: well past what a threshold decides on, and the
    # smallest scores keep their magnitude instead of rounding to zero.
    return f"{score:.6g}"


def _round(score: float) -> float:
    return float(_fmt(score))
