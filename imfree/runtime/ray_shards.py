"""The output of a Ray run: a folder of Parquet shards and the manifest that plans them.

The input list, in the order a local run takes it, is cut into shards of whole
batches, so each batch the engine sees is the one a local run would see, and
its scores are the same to the last bit. A shard is written atomically once all
its rows are in: a shard file that exists is whole, and `--resume` tags only the
shards that are missing. A run stopped by a signal keeps every row it has: a
shard it was filling is cut, at batch boundaries, into pieces (the batches that
came back, and those that did not), each its own file in the plan, so the
resumed run fills in the missing pieces and ends with the rows, in the order,
of a run never stopped.

The manifest `_imfree_shards.json` records the plan and what the rows depend on
(the input list, the export, the options), so a resumed run cannot mix rows of
two different runs. Parquet dataset readers (pyarrow, pandas, Ray, Spark) skip
names starting with "_" or ".", so the folder reads as one table:
`pandas.read_parquet(OUT_DIR)`, in shard order.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from imfree.errors import ConfigError
from imfree.fileio import make_folder, read_json, unwritable, write_atomically
from imfree.runtime.bundle import ExportManifest
from imfree.runtime.writers import OUTPUT_SUFFIXES, parquet_text, write_parquet

logger = logging.getLogger(__name__)

SHARDS_MANIFEST = "_imfree_shards.json"
FORMAT = "imfree-ray-shards"
FORMAT_VERSION = 1
DEFAULT_SHARD_ROWS = 8192


@dataclass(frozen=True)
class Shard:
    """A run of consecutive input paths, written to one Parquet file."""

    index: int
    first: int  # position of its first path in the input list
    rows: int
    piece: bool = False  # a part of shard `index`, cut by a stopped run

    @property
    def file(self) -> str:
        # Pieces sort between their shard's neighbours, so the folder reads in order.
        if self.piece:
            return f"shard-{self.index:05d}-{self.first:010d}.parquet"
        return f"shard-{self.index:05d}.parquet"

    @property
    def stop(self) -> int:
        return self.first + self.rows


def plan_shards(n_paths: int, batch_size: int, shard_rows: int) -> list[Shard]:
    """Shards of `shard_rows` paths, rounded up to whole batches; the last one may be short.

    No paths still make one empty shard, so the folder always reads as a table.
    """
    if shard_rows < 1:
        raise ConfigError(f"shard size must be at least 1 row, not {shard_rows}")
    if n_paths == 0:
        return [Shard(0, 0, 0)]
    rows = math.ceil(shard_rows / batch_size) * batch_size
    return [
        Shard(index, first, min(rows, n_paths - first))
        for index, first in enumerate(range(0, n_paths, rows))
    ]


def run_signature(
    paths: list[Path],
    manifest: ExportManifest,
    thresholds: np.ndarray,
    batch_size: int,
    shard_rows: int,
    top_k: int,
    all_scores: bool,
    engine: str = "auto",
) -> dict[str, Any]:
    """Everything a shard's rows depend on; a resumed run must match it exactly.

    The engine choice is part of it: another engine (an fp16 or int8 variant, say)
    gives other scores, which must not mix with the earlier shards'.
    """
    listing = "\n".join(str(path) for path in paths).encode("utf-8", errors="surrogateescape")
    return {
        "inputs": {"count": len(paths), "sha256": hashlib.sha256(listing).hexdigest()},
        "export": {"onnx_sha256": manifest.onnx_sha256, "classes": list(manifest.classes)},
        "batch_size": batch_size,
        "shard_rows": shard_rows,
        "top_k": top_k,
        "all_scores": all_scores,
        "thresholds": [float(t) for t in thresholds],
        "engine": engine,
    }


def prepare_folder(
    out: Path,
    signature: dict[str, Any],
    shards: list[Shard],
    paths: list[Path],
    resume: bool,
) -> tuple[list[Shard], set[str]]:
    """Make `out` ready for the run: its shard plan, and the files of those already whole.

    A resumed run takes the plan from the manifest, with the pieces a stop cut.
    """
    _check_out(out)
    manifest_path = out / SHARDS_MANIFEST

    if manifest_path.exists():
        _remove_staging_files(out)
    # A run that failed before its first shard (an engine that would not open) left
    # only the manifest: nothing to keep, so the folder is simply taken over.
    if manifest_path.exists() and any(out.glob("shard-*.parquet")):
        if not resume:
            raise ConfigError(
                f"{out} holds the shards of an earlier run: add --resume to continue it, or "
                "delete the folder (or pass another --out) to start over"
            )
        _check_same_run(manifest_path, signature)
        shards = _planned_shards(manifest_path, len(paths), signature["batch_size"])
        _refuse_foreign_files(out, shards)
        done = {shard.file for shard in shards if shard_is_whole(out, shard, paths)}
        logger.info("resuming: %d of %d shards already in %s", len(done), len(shards), out)
        return shards, done

    if out.is_dir() and any(p.name != SHARDS_MANIFEST for p in out.iterdir()):
        raise ConfigError(
            f"{out} is a non-empty folder without {SHARDS_MANIFEST}: with --ray, --out names "
            "a folder for the shards; pass a new or empty one"
        )
    make_folder(out, "the shard folder")
    try:
        write_manifest(out, signature, shards, complete=False)
    except PermissionError as err:
        raise unwritable(out, err, "the shard folder") from None
    return shards, set()


def cut_at_batches(shard: Shard, done: set[int], batch_size: int) -> list[Shard]:
    """`shard` as pieces of consecutive batches, each all in `done` (their starts) or all not."""
    starts = list(range(shard.first, shard.stop, batch_size))
    pieces: list[Shard] = []
    for start in starts:
        rows = min(batch_size, shard.stop - start)
        if pieces and (start in done) == (pieces[-1].first in done):
            last = pieces[-1]
            pieces[-1] = Shard(shard.index, last.first, last.rows + rows, piece=True)
        else:
            pieces.append(Shard(shard.index, start, rows, piece=True))
    return pieces


def shard_is_whole(out: Path, shard: Shard, paths: list[Path]) -> bool:
    """Whether the shard's file exists and holds exactly its paths, in order."""
    path = out / shard.file
    if not path.is_file():
        return False
    _, parquet = _pyarrow()
    try:
        written = parquet.read_table(path, columns=["path"]).column("path").to_pylist()
    except Exception as error:  # noqa: BLE001 - any unreadable shard is simply redone
        logger.warning("%s is unreadable (%s); tagging its images again", path, error)
        return False
    if written != [parquet_text(str(p)) for p in paths[shard.first : shard.stop]]:
        logger.warning("%s holds other paths than its shard; tagging its images again", path)
        return False
    return True


def write_shard(
    out: Path, shard: Shard, records: list[dict[str, Any]], classes: list[str], all_scores: bool
) -> Path:
    """Write the records of a whole shard to its Parquet file, atomically."""
    if len(records) != shard.rows:
        raise ValueError(f"shard {shard.index} needs {shard.rows} rows, got {len(records)}")
    path = out / shard.file
    write_parquet(path, records, classes, all_scores)
    return path


def mark_complete(out: Path, signature: dict[str, Any], shards: list[Shard]) -> None:
    """Record in the manifest that every shard is written."""
    write_manifest(out, signature, shards, complete=True)


def read_shards(out: str | os.PathLike[str]) -> Any:
    """Every shard of a Ray run's folder as one pyarrow Table, in the input order.

    ConfigError if the folder is not such a folder, or a shard is missing.
    """
    out = Path(out)
    manifest = _read_manifest(out / SHARDS_MANIFEST)
    files = [record["file"] for record in manifest["shards"]]
    missing = [name for name in files if not (out / name).is_file()]
    if missing:
        raise ConfigError(
            f"{out} lacks {len(missing)} of its {len(files)} shards ({', '.join(missing[:3])}"
            f"{', ...' if len(missing) > 3 else ''}): the run was stopped; continue it with "
            "--resume"
        )
    pyarrow, parquet = _pyarrow()
    return pyarrow.concat_tables([parquet.read_table(out / name) for name in files])


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} is a file: with --ray, --out names a folder for the Parquet "
                          "shards; pass a folder path")
    if out.suffix.lower() in OUTPUT_SUFFIXES and out.suffix.lower() != ".parquet":
        raise ConfigError(f"--ray writes Parquet shards into a folder, not {out.suffix} rows: "
                          "pass --out with a folder name, e.g. tags/")


def _check_same_run(manifest_path: Path, signature: dict[str, Any]) -> None:
    earlier = _read_manifest(manifest_path)["signature"]
    changed = [key for key in signature if earlier.get(key) != signature[key]]
    if changed:
        raise ConfigError(
            f"{manifest_path.parent} holds the shards of another run (its "
            f"{', '.join(changed)} differ): resume with the same inputs, export and options, "
            "or pass another --out"
        )


def _read_manifest(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path.parent} holds no {SHARDS_MANIFEST}: it is not the output "
                          "folder of an `imfree infer --ray` run")
    document = read_json(path, "the shard manifest")
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise ConfigError(f"{path} is not an imfree shard manifest; pass the folder a "
                          "`imfree infer --ray` run wrote")
    if document.get("format_version") != FORMAT_VERSION:
        raise ConfigError(f"{path} has format_version {document.get('format_version')!r}, "
                          f"this imfree reads {FORMAT_VERSION}: upgrade imfree")
    return document


def write_manifest(
    out: Path, signature: dict[str, Any], shards: list[Shard], complete: bool
) -> None:
    """Record the plan (with any pieces a stop cut) and whether every shard is written."""
    document = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "complete": complete,
        "signature": signature,
        "shards": [{"file": s.file, "first": s.first, "rows": s.rows, "index": s.index,
                    "piece": s.piece} for s in shards],
    }
    write_atomically(out / SHARDS_MANIFEST, json.dumps(document, indent=1) + "\n")


def _planned_shards(manifest_path: Path, n_paths: int, batch_size: int) -> list[Shard]:
    """The manifest's plan; ConfigError unless it covers the inputs in whole batches."""
    records = _read_manifest(manifest_path)["shards"]
    try:
        shards = [Shard(int(r.get("index", r["file"][6:11])), int(r["first"]), int(r["rows"]),
                        bool(r.get("piece", False))) for r in records]
    except (KeyError, TypeError, ValueError, AttributeError):
        shards = []
    covered = 0
    for shard in shards:
        if shard.first != covered or (shard.first % batch_size and shard.rows):
            break
        covered = shard.stop
    if not shards or covered != n_paths or any(r.get("file") != s.file
                                               for r, s in zip(records, shards, strict=True)):
        raise ConfigError(f"{manifest_path} holds a shard plan that does not cover the "
                          "inputs: it was edited by hand; pass another --out to start over")
    return shards


def _refuse_foreign_files(out: Path, shards: list[Shard]) -> None:
    # Parquet readers take every visible file in the folder as part of the table.
    known = {shard.file for shard in shards} | {SHARDS_MANIFEST}
    foreign = sorted(p.name for p in out.iterdir()
                     if p.name not in known and not p.name.startswith((".", "_")))
    if foreign:
        raise ConfigError(
            f"{out} holds files that are not shards of this run ({', '.join(foreign[:3])}"
            f"{', ...' if len(foreign) > 3 else ''}): Parquet readers would take them for "
            "part of the table; move them out of the folder, then resume"
        )


def _remove_staging_files(out: Path) -> None:
    # A shard being written when the run was killed left its hidden staging file.
    for path in out.glob(".shard-*.tmp"):
        path.unlink(missing_ok=True)


def _pyarrow() -> tuple[Any, Any]:
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise ConfigError("Ray output is Parquet and needs pyarrow: pip install "
                          "'imfree[ray]'") from None
    return pyarrow, pyarrow.parquet
