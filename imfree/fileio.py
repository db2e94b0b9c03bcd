"""Writing files so that a crash never leaves half of one.

Shared by every part of imfree (the runtime too: nothing here imports torch).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from imfree.errors import ConfigError


def write_atomically(path: str | os.PathLike[str], data: bytes | memoryview | str) -> None:
    """Write `data` to `path` so that a reader sees the old file or the new, never half.

    The bytes go to a hidden file beside `path`, which is then renamed over it. A
    plain open, not tempfile, gives the file the umask's usual permissions.
    """
    path = Path(path)
    if isinstance(data, str):
        data = data.encode("utf-8")
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def make_folder(folder: str | os.PathLike[str], what: str = "the output") -> Path:
    """Make `folder` (and its parents) for `what`; one ConfigError naming it if that fails.

    A read-only folder, or a file where a folder should be, is the user's to fix,
    so it is said in a line before any work starts, not as a traceback after it.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise unwritable(folder, err, what) from None
    return folder


def unwritable(path: str | os.PathLike[str], err: OSError, what: str = "the output") -> ConfigError:
    """The one-line error for a path that cannot be written."""
    reason = err.strerror or type(err).__name__
    where = f" ({err.filename})" if err.filename and str(err.filename) != str(path) else ""
    return ConfigError(f"cannot write {what} {path}: {reason}{where}; pass a path in a "
                       "folder you may write to")


def make_staging_folder(beside: Path, prefix: str) -> Path:
    """A fresh hidden folder next to `beside`, with the umask's usual permissions.

    tempfile makes private (0700) folders; a folder that will be renamed into
    place as a user's output should be as readable as any other they make.
    """
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=beside))
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(folder, 0o777 & ~mask)
    return folder


def read_json(path: Path, what: str) -> Any:
    """A JSON file a user wrote; any failure is one ConfigError naming `what` and `path`."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:  # ValueError: bad JSON or not UTF-8
        raise ConfigError(f"cannot read {what} {path}: {err}") from err
