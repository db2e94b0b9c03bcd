"""Result rows, written as CSV, JSON Lines or Parquet, and read back to resume.

Rows go to a hidden partial file beside the output, one write and flush per
batch, and the partial file becomes the output only when the run completes:
an output file that exists is always whole. A stopped or killed run leaves
its rows in the partial file, where `--resume` finds them: a last line cut
short by a kill is dropped and its image tagged again.

CSV and JSON Lines collect in their own format. Parquet cannot be appended
to, so its partial file is a JSON Lines journal, converted when the run ends.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Literal

import numpy as np

from imfree.errors import ConfigError
from imfree.fileio import make_folder, unwritable, write_atomically

logger = logging.getLogger(__name__)

OutputFormat = Literal["csv", "jsonl", "parquet"]
OUTPUT_SUFFIXES: dict[str, OutputFormat] = {
    ".csv": "csv",
    ".jsonl": "jsonl",
    ".parquet": "parquet",
}

_PATH_ERRORS = "surrogateescape"


def parquet_text(text: str) -> str:
    """`text` as a Parquet string holds it: a file name's bytes that are not UTF-8 as \\xNN.

    CSV and JSON Lines write such a name back as its own bytes (surrogateescape);
    Arrow strings must be UTF-8, so Parquet spells those bytes out instead, as
    Python's backslashreplace does. A valid UTF-8 name is kept as it is.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", errors=_PATH_ERRORS).decode("utf-8", "backslashreplace")
    return text

# Rows per Parquet row group when the journal is converted.
PARQUET_GROUP_ROWS = 65_536


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
    if OUTPUT_SUFFIXES[suffix] == "parquet":
        _pyarrow()  # a missing pyarrow fails now, not after hours of tagging
    return OUTPUT_SUFFIXES[suffix]


def partial_path(path: str | os.PathLike[str]) -> Path:
    """Where rows collect until the run completes: a hidden file beside the output."""
    path = Path(path)
    return path.with_name(f".{path.name}.partial")


def run_key_path(path: str | os.PathLike[str]) -> Path:
    """Where an unfinished run records what its rows depend on: beside its partial file."""
    path = Path(path)
    return path.with_name(f".{path.name}.partial.run.json")


class RowWriter:
    """Writes rows to the partial file; `close` publishes it, `abort` keeps it aside.

    With `resume`, the rows of an earlier run (its partial file, else its
    finished output) are kept, and `done` holds their paths. `run_key` (the
    export, engine and options the rows depend on) is kept beside the partial
    file, and a resume of that partial file must bring the same.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        classes: list[str],
        all_scores: bool,
        resume: bool = False,
        run_key: dict[str, Any] | None = None,
    ):
        self.path = Path(path)
        self.partial = partial_path(self.path)
        self.run_key = run_key
        self.classes = list(classes)
        self.all_scores = all_scores
        self.rows_written = 0
        self.done: set[str] = set()
        self._aborted = False
        make_folder(self.path.parent)

        try:
            if resume and self._has_earlier_rows():
                self._check_run_key()
                self._take_over_earlier_rows()
                self._handle: IO[str] | None = _open_text(self.partial, "a")
            else:
                self._refuse_to_overwrite_partial(resume)
                self._handle = _open_text(self.partial, "w")
                self._handle.write(self._header())
                self._handle.flush()
            self._write_run_key()
        except PermissionError as err:  # a read-only folder: before any image is tagged
            raise unwritable(self.path, err) from None

    @property
    def rows_resumed(self) -> int:
        """Rows kept from an earlier run."""
        return len(self.done)

    def write_rows(self, rows: list[Row]) -> None:
        """Append rows with one write and flush, so a crash cuts at most one batch."""
        text = "".join(self._line(row) for row in rows)
        handle = self._file()
        handle.write(text)
        handle.flush()
        self.rows_written += len(rows)

    def close(self) -> None:
        """Finish the file and publish it at the output path (not after `abort`)."""
        if self._handle is None and self._aborted:
            return
        handle = self._file()
        handle.flush()
        os.fsync(handle.fileno())
        handle.close()
        self._handle = None
        self._publish()
        run_key_path(self.path).unlink(missing_ok=True)
        logger.debug("wrote %d rows to %s", self.rows_written + self.rows_resumed, self.path)

    def abort(self) -> None:
        """Stop writing, keeping the rows so far in the partial file."""
        if self._handle is None:
            return
        self._handle.flush()
        self._handle.close()
        self._handle = None
        self._aborted = True
        logger.warning(
            "run stopped: its %d rows are kept in %s",
            self.rows_written + self.rows_resumed,
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
        elif self.rows_written or self.rows_resumed:
            self.abort()
        else:
            self._discard()

    def _discard(self) -> None:
        # A run that failed before its first row leaves nothing to resume; a partial
        # file left behind would only make the next run ask for --resume.
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        self.partial.unlink(missing_ok=True)
        run_key_path(self.path).unlink(missing_ok=True)

    # The parts each format fills in.

    def _header(self) -> str:
        """What precedes the rows."""
        return ""

    def _line(self, row: Row) -> str:
        raise NotImplementedError

    def _parse(self, text: str) -> Iterator[tuple[int, str]]:
        """(end offset, path) of each complete row of a partial file's text."""
        raise NotImplementedError

    def _publish(self) -> None:
        os.replace(self.partial, self.path)

    def _output_as_partial(self) -> None:
        """Turn a finished output back into a partial file to append to."""
        shutil.copyfile(self.path, self.partial)

    # Resuming.

    def _has_earlier_rows(self) -> bool:
        return self.partial.exists() or self.path.exists()

    def _take_over_earlier_rows(self) -> None:
        if not self.partial.exists():
            self._output_as_partial()

        text = self.partial.read_bytes().decode("utf-8", errors=_PATH_ERRORS)
        self._check_header(text)
        end_char = len(self._header())
        for end_char, path in self._parse(text):  # noqa: B007 - the last end is kept
            self.done.add(path)
        end = len(text[:end_char].encode("utf-8", errors=_PATH_ERRORS))

        # Whatever follows the last complete row was cut short by a kill: drop it.
        size = self.partial.stat().st_size
        if size > end:
            logger.info("%s: dropping %d bytes of a row cut short", self.partial, size - end)
            os.truncate(self.partial, end)
        logger.info("resuming: %d rows already in %s", len(self.done), self.partial)

    def _check_run_key(self) -> None:
        # Only an unfinished run's key is kept; a finished output is resumed as it is.
        key_file = run_key_path(self.path)
        if self.run_key is None or not self.partial.exists() or not key_file.is_file():
            return
        try:
            earlier = json.loads(key_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return  # a key cut short by a kill: the header checks still hold
        changed = sorted(k for k in self.run_key if earlier.get(k) != self.run_key[k])
        if changed:
            raise ConfigError(
                f"{self.partial} holds the rows of a run with another {', '.join(changed)}: "
                "resume with the same export, --engine and options, or choose another --out"
            )

    def _write_run_key(self) -> None:
        if self.run_key is not None:
            write_atomically(run_key_path(self.path), json.dumps(self.run_key) + "\n")

    def _check_header(self, text: str) -> None:
        header = self._header()
        if header and not text.startswith(header):
            raise ConfigError(
                f"{self.partial} has other columns than this run would write (another "
                "export, or --all-scores changed): resume with the same options, or "
                "choose another --out"
            )

    def _refuse_to_overwrite_partial(self, resume: bool) -> None:
        if self.partial.exists() and not resume:
            raise ConfigError(
                f"{self.partial} holds the rows of an interrupted run: add --resume to "
                "continue it, or delete that file to start over"
            )

    def _file(self) -> IO[str]:
        if self._handle is None:
            raise ValueError(f"the writer for {self.path} is closed")
        return self._handle


class CsvRowWriter(RowWriter):
    """One line per file: labels ';'-joined, top-k as 'label:score' pairs."""

    def _columns(self) -> list[str]:
        columns = ["path", "status", "labels", "top_k", "error"]
        if self.all_scores:
            columns += [f"score:{name}" for name in self.classes]
        return columns

    def _header(self) -> str:
        return _csv_line(self._columns())

    def _line(self, row: Row) -> str:
        top_k = ";".join(f"{label}:{_fmt(score)}" for label, score in row.top_k)
        cells = [row.path, row.status, ";".join(row.labels), top_k, row.error]
        if self.all_scores and row.scores is None:
            cells += [""] * len(self.classes)
        elif self.all_scores:
            cells += [_fmt(score) for score in row.scores]
        return _csv_line(cells)

    def _parse(self, text: str) -> Iterator[tuple[int, str]]:
        # Rows are read record by record, since a quoted path may hold a newline;
        # a record is complete only when its line break was written too.
        lines = _lines(text)
        ends = np.cumsum([len(line) for line in lines]).tolist()
        reader = csv.reader(lines, strict=True)
        width = len(self._columns())
        try:
            next(reader)  # the header, checked already
            for cells in reader:
                last_line = lines[reader.line_num - 1]
                if len(cells) != width or not last_line.endswith("\n"):
                    return
                yield ends[reader.line_num - 1], cells[0]
        except csv.Error:  # a quoted field cut short
            return


class JsonlRowWriter(RowWriter):
    """One JSON object per line; `scores` maps every class to its score when asked for."""

    def _line(self, row: Row) -> str:
        record = row_record(row, self.classes, self.all_scores)
        return json.dumps(record, ensure_ascii=False) + "\n"

    def _parse(self, text: str) -> Iterator[tuple[int, str]]:
        end = 0
        for line in _lines(text):
            if not line.endswith("\n"):
                return
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                return
            if not isinstance(record, dict) or not self._fits(record):
                raise ConfigError(
                    f"{self.partial} holds rows of another shape than this run writes "
                    "(another export, or --all-scores changed): resume with the same "
                    "options, or choose another --out"
                )
            end += len(line)
            yield end, record["path"]

    def _fits(self, record: dict[str, Any]) -> bool:
        scores = record.get("scores")
        if self.all_scores != ("scores" in record) or "path" not in record:
            return False
        return scores is None or list(scores) == self.classes


class _ParquetPaths(set):
    """The finished paths of a Parquet run, compared as its path column spells them.

    A journal keeps a name's own bytes, a finished Parquet file its escaped form
    (`parquet_text`): both meet here, so a resume skips exactly the finished files.
    """

    def add(self, path: str) -> None:
        super().add(parquet_text(path))

    def __contains__(self, path: object) -> bool:
        return isinstance(path, str) and super().__contains__(parquet_text(path))


class ParquetRowWriter(JsonlRowWriter):
    """Parquet: one column per field, top_k as a list of (label, score), scores as columns."""

    def _take_over_earlier_rows(self) -> None:
        self.done = _ParquetPaths()
        super()._take_over_earlier_rows()

    def _publish(self) -> None:
        write_parquet(self.path, self._journal(), self.classes, self.all_scores)
        self.partial.unlink()

    def _output_as_partial(self) -> None:
        _, parquet = _pyarrow()
        table = parquet.read_table(self.path)
        with _open_text(self.partial, "w") as handle:
            for record in table.to_pylist():
                handle.write(json.dumps(self._record_from_columns(record)) + "\n")

    def _journal(self) -> Iterator[dict[str, Any]]:
        with _open_text(self.partial, "r") as handle:
            for line in handle:
                yield json.loads(line)

    def _record_from_columns(self, record: dict[str, Any]) -> dict[str, Any]:
        names = [n for n in record if n.startswith("score:")]
        journal = {k: v for k, v in record.items() if k not in names}
        if self.all_scores:
            scores = {n.removeprefix("score:"): record[n] for n in names}
            journal["scores"] = None if journal["status"] == "error" else scores
        return journal


_WRITERS: dict[OutputFormat, type[RowWriter]] = {
    "csv": CsvRowWriter,
    "jsonl": JsonlRowWriter,
    "parquet": ParquetRowWriter,
}


def write_parquet(
    path: str | os.PathLike[str],
    records: Iterable[dict[str, Any]],
    classes: list[str],
    all_scores: bool,
) -> None:
    """Write row records (as `row_record` makes them) to one Parquet file, atomically.

    The same columns whoever writes them: a Parquet output of a local run, or one
    shard of a Ray run.
    """
    pyarrow, parquet = _pyarrow()
    path = Path(path)
    schema = _parquet_schema(pyarrow, classes, all_scores)
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with parquet.ParquetWriter(staging, schema) as writer:
            for chunk in _chunks(records, PARQUET_GROUP_ROWS):
                columns = _parquet_columns(chunk, classes, all_scores)
                writer.write_table(pyarrow.Table.from_pydict(columns, schema=schema))
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)


def _parquet_schema(pyarrow: Any, classes: list[str], all_scores: bool) -> Any:
    top = pyarrow.struct([("label", pyarrow.string()), ("score", pyarrow.float32())])
    fields = [
        ("path", pyarrow.string()),
        ("status", pyarrow.string()),
        ("labels", pyarrow.list_(pyarrow.string())),
        ("top_k", pyarrow.list_(top)),
        ("error", pyarrow.string()),
    ]
    if all_scores:
        fields += [(f"score:{name}", pyarrow.float32()) for name in classes]
    return pyarrow.schema(fields)


def _parquet_columns(
    records: list[dict[str, Any]], classes: list[str], all_scores: bool
) -> dict[str, list]:
    names = ["path", "status", "labels", "top_k", "error"]
    columns = {name: [r[name] for r in records] for name in names}
    # A file name that is not UTF-8 (in its path, or quoted by its error) is escaped.
    columns["path"] = [parquet_text(path) for path in columns["path"]]
    columns["error"] = [None if e is None else parquet_text(e) for e in columns["error"]]
    if all_scores:
        for name in classes:
            columns[f"score:{name}"] = [
                None if r["scores"] is None else r["scores"][name] for r in records
            ]
    return columns


def open_writer(
    path: str | os.PathLike[str],
    classes: list[str],
    all_scores: bool,
    resume: bool = False,
    run_key: dict[str, Any] | None = None,
) -> RowWriter:
    """A CSV, JSON Lines or Parquet writer, chosen by the suffix of `path`."""
    writer_class = _WRITERS[output_format(path)]
    return writer_class(path, classes, all_scores, resume, run_key)


def row_record(row: Row, classes: list[str], all_scores: bool) -> dict[str, object]:
    """A row as one JSON-ready record: the JSON Lines line, and what Parquet columns hold."""
    record: dict[str, object] = {
        "path": row.path,
        "status": row.status,
        "labels": row.labels,
        "top_k": [{"label": label, "score": _round(score)} for label, score in row.top_k],
        "error": row.error or None,
    }
    if all_scores:
        record["scores"] = (
            None
            if row.scores is None
            else {name: _round(s) for name, s in zip(classes, row.scores, strict=True)}
        )
    return record


def _open_text(path: Path, mode: str) -> IO[str]:
    # Linux file names are bytes; one that is not UTF-8 comes back from the walk with
    # surrogates, and is written back as its own bytes instead of failing the run.
    return open(path, mode, encoding="utf-8", errors=_PATH_ERRORS, newline="")


def _lines(text: str) -> list[str]:
    # Only "\n" ends a row: str.splitlines would also split on characters such as
    # U+2028 that a path may hold and JSON leaves unescaped.
    lines = [line + "\n" for line in text.split("\n")]
    lines[-1] = lines[-1][:-1]
    return lines if lines[-1] else lines[:-1]


def _csv_line(cells: list[str]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer).writerow(cells)
    return buffer.getvalue()


def _chunks(items: Iterable[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    chunk: list[dict[str, Any]] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _pyarrow() -> tuple[Any, Any]:
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise ConfigError(
            "Parquet output needs pyarrow: pip install 'imfree[parquet]', or name the "
            "output .csv or .jsonl"
        ) from None
    return pyarrow, pyarrow.parquet


def _fmt(score: float) -> str:
    # Six significant digits: well past what a threshold decides on, and the
    # smallest scores keep their magnitude instead of rounding to zero.
    return f"{score:.6g}"


def _round(score: float) -> float:
    return float(_fmt(score))


# Reading the scores back, for `imfree eval`.


@dataclass
class ScoreTable:
    """The per-class scores of an `--all-scores` output, read back."""

    classes: list[str]
    paths: list[str]  # the rows tagged ok, in file order
    scores: np.ndarray  # float32 [len(paths), classes]
    failed: dict[str, str] = field(default_factory=dict)  # path -> reason, for error rows


# (path, status, scores in class order or None, error) per row; then the class names.
_ScoreRecords = tuple[list[tuple[str, str, list[float] | None, str]], list[str]]


def read_scores(path: str | os.PathLike[str]) -> ScoreTable:
    """Read a finished output written with --all-scores: a file of any of the three
    formats, or the shard folder of a `--ray` run."""
    path = Path(path)
    if path.is_dir():
        from imfree.runtime.ray_shards import SHARDS_MANIFEST

        if (path / SHARDS_MANIFEST).is_file():
            return _table_scores(path, _shard_scores)
    if not path.is_file():
        unfinished = partial_path(path).exists()
        raise ConfigError(
            f"{path} is not a finished output of `imfree infer`"
            + ("; its run was interrupted: finish it with --resume" if unfinished else
               "; pass the --out file of `imfree infer --all-scores`")
        )
    kind = output_format(path)
    readers = {"csv": _csv_scores, "jsonl": _jsonl_scores, "parquet": _parquet_scores}
    return _table_scores(path, readers[kind])


def _table_scores(path: Path, reader: Any) -> ScoreTable:
    try:
        records, classes = reader(path)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, csv.Error) as err:
        raise ConfigError(f"cannot read the scores in {path} ({type(err).__name__}: {err}); "
                          f"pass an output of `imfree infer --all-scores`") from err
    _check_score_values(path, records, len(classes))
    if not classes:
        raise ConfigError(f"{path} holds no per-class scores: write it with `imfree infer "
                          f"--all-scores`")

    ok = [(p, s) for p, status, s, _ in records if status == "ok"]
    failed = {p: error or "error" for p, status, _, error in records if status != "ok"}
    scores = np.array([s for _, s in ok], dtype=np.float32).reshape(len(ok), len(classes))
    return ScoreTable(classes, [p for p, _ in ok], scores, failed)


def _check_score_values(path: Path, records: list, width: int) -> None:
    """Every ok row holds one finite score per class; else the row is named."""
    for number, (name, status, scores, _) in enumerate(records, start=1):
        if status != "ok":
            continue
        values = np.asarray(scores if scores is not None else [], dtype=np.float64)
        if values.shape != (width,) or not np.isfinite(values).all():
            raise ConfigError(
                f"{path}: row {number} ({name}) holds a missing, NaN or infinite score, or "
                "too few scores; pass an unedited output of `imfree infer --all-scores`")


def _csv_scores(path: Path) -> _ScoreRecords:
    with _open_text(path, "r") as handle:
        reader = csv.DictReader(handle, strict=True)
        names = [c for c in reader.fieldnames or [] if c.startswith("score:")]
        if not names:
            return [], []
        records = [
            (row["path"], row["status"],
             [float(row[n]) for n in names] if row["status"] == "ok" else None, row["error"])
            for row in reader
        ]
    return records, [n.removeprefix("score:") for n in names]


def _jsonl_scores(path: Path) -> _ScoreRecords:
    records: list[tuple[str, str, list[float] | None, str]] = []
    classes: list[str] = []
    with _open_text(path, "r") as handle:
        for number, line in enumerate(handle, start=1):
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError(f"line {number} is not a JSON object")
            scores = record.get("scores")
            if scores and not classes:
                classes = list(scores)
            values = [scores[n] for n in classes] if scores else None
            records.append((record["path"], record["status"], values, record["error"] or ""))
    return records, classes


def _parquet_scores(path: Path) -> _ScoreRecords:
    _, parquet = _pyarrow()
    return _columns_scores(parquet.read_table(path).to_pydict())


def _shard_scores(path: Path) -> _ScoreRecords:
    from imfree.runtime.ray_shards import read_shards

    return _columns_scores(read_shards(path).to_pydict())


def _columns_scores(table: dict[str, list]) -> _ScoreRecords:
    names = [c for c in table if c.startswith("score:")]
    if not names:
        return [], []
    records = [
        (table["path"][i], table["status"][i], [table[n][i] for n in names],
         table["error"][i] or "")
        for i in range(len(table["path"]))
    ]
    return records, [n.removeprefix("score:") for n in names]
