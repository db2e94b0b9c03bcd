"""Finding the image files to tag: folders, single files, lists of paths.

The order is deterministic: inputs in the order given, each folder's files
sorted by path. Resuming an interrupted run relies on it.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from imfree.errors import ConfigError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})

STDIN = "-"  # as a paths file: read the paths from standard input


@dataclass
class InputSpec:
    """Which files a run tags.

    Patterns are shell globs (fnmatch: `*` also crosses `/`) matched against a
    file's path relative to the folder given, and against its bare name.
    `include` replaces the image-suffix filter; `exclude` then removes files.
    """

    roots: list[Path] = field(default_factory=list)  # files and folders
    paths_file: str | None = None  # one path per line; "-" for standard input
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    follow_symlinks: bool = False  # into symlinked folders (loops are detected)
    recursive: bool = True


def is_image_name(name: str) -> bool:
    """Whether a file name carries one of the image suffixes (any case)."""
    return os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


def collect_inputs(spec: InputSpec, stdin: TextIO | None = None) -> list[Path]:
    """Every path the run tags, in a deterministic order, each once."""
    if not spec.roots and spec.paths_file is None:
        raise ConfigError("no inputs: pass image files or folders, or --paths-from FILE (- reads "
                          "standard input)")

    found: list[Path] = []
    for root in spec.roots:
        found.extend(list_images(root, spec.recursive, spec.include, spec.exclude,
                                 spec.follow_symlinks))
    if spec.paths_file is not None:
        found.extend(read_paths_file(spec.paths_file, stdin))
    return _first_of_each(found)


def list_images(
    root: str | os.PathLike[str],
    recursive: bool = True,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    follow_symlinks: bool = False,
) -> list[Path]:
    """Every entry named like an image under `root`, sorted; `root` may be one file.

    Entries named like images that cannot be decoded (directories, broken
    symlinks, symlink loops) are listed too, so that each becomes an error row
    instead of vanishing. Symlinked folders are followed only when asked, and
    then each real folder is walked once, which rules out walking in circles.
    """
    root = Path(root)
    if not os.path.lexists(root):
        raise ConfigError(f"input path {root} does not exist; pass an image file or a folder")

    if not root.is_dir():
        # A file named explicitly is tagged whatever its suffix.
        return [root]

    if recursive:
        found = _walk(root, follow_symlinks)
    else:
        found = _scan(root)
    chosen = [path for path in found if _chosen(path, root, include, exclude)]
    logger.debug("%s: %d image files", root, len(chosen))
    return sorted(chosen)


def read_paths_file(source: str, stdin: TextIO | None = None) -> list[Path]:
    """The paths listed one per line in the file `source`, or on standard input for "-".

    Blank lines are skipped; nothing is checked here, so a missing file becomes
    an error row like any other unreadable path.
    """
    if source == STDIN:
        return _lines_to_paths(stdin or sys.stdin)
    try:
        with open(source, encoding="utf-8") as handle:
            return _lines_to_paths(handle)
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot read the list of paths {source}: {error}") from error


def _lines_to_paths(lines: Iterable[str]) -> list[Path]:
    return [Path(line.rstrip("\r\n")) for line in lines if line.strip()]


def _walk(root: Path, follow_symlinks: bool) -> list[Path]:
    found: list[Path] = []
    seen: set[tuple[int, int]] = set()
    for folder, dirnames, filenames in os.walk(
        root, onerror=_warn_unreadable, followlinks=follow_symlinks
    ):
        if follow_symlinks:
            # A link back to a folder above would otherwise be walked forever.
            identity = _identity(folder)
            if identity in seen:
                logger.warning("not walking %s again: a symlink led back into it", folder)
                dirnames[:] = []
                continue
            seen.add(identity)
        # A directory named like an image is listed (it becomes an error row) and,
        # being a real directory, still walked into.
        names = filenames + [name for name in dirnames if is_image_name(name)]
        found.extend(Path(folder, name) for name in names)
    return found


def _identity(folder: str) -> tuple[int, int]:
    status = os.stat(folder)
    return status.st_dev, status.st_ino


def _scan(root: Path) -> list[Path]:
    try:
        with os.scandir(root) as entries:
            return [Path(entry.path) for entry in entries]
    except OSError as error:
        raise ConfigError(f"cannot read input folder {root}: {error.strerror}") from error


def _chosen(path: Path, root: Path, include: Sequence[str], exclude: Sequence[str]) -> bool:
    relative = path.relative_to(root).as_posix()
    if include:
        if not _matches(relative, path.name, include):
            return False
    elif not is_image_name(path.name):
        return False
    return not _matches(relative, path.name, exclude)


def _matches(relative: str, name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(relative, p) or fnmatch.fnmatchcase(name, p) for p in patterns)


def _first_of_each(paths: list[Path]) -> list[Path]:
    # One row per path: a file reached twice (two inputs overlap) is tagged once.
    seen: set[Path] = set()
    unique = []
    for path in paths:
        if path not in seen:
            seen.add(path)
            unique.append(path)
    if len(unique) < len(paths):
        logger.info("%d paths listed more than once are tagged once", len(paths) - len(unique))
    return unique


def _warn_unreadable(error: OSError) -> None:
    # os.walk would otherwise skip an unreadable subfolder without a word.
    logger.warning("skipping unreadable folder %s: %s", error.filename, error.strerror)
