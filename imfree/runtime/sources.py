"""Finding the image files to tag under a folder."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from imfree.errors import ConfigError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})


def is_image_name(name: str) -> bool:
    """Whether a file name carries one of the image suffixes (any case)."""
    return os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


def list_images(root: str | os.PathLike[str], recursive: bool = True) -> list[Path]:
    """Every entry named like an image under `root`, sorted; `root` may be one file.

    Entries named like images that cannot be decoded (directories, broken
    symlinks, symlink loops) are listed too, so that each becomes an error row
    instead of vanishing. Symlinked folders are not followed, which rules out
    walking in circles.
    """
    root = Path(root)
    if not os.path.lexists(root):
        raise ConfigError(f"input path {root} does not exist; pass an image file or a folder")

    if not root.is_dir():
        # A file named explicitly is tagged whatever its suffix.
        return [root]

    found = _walk(root) if recursive else _scan(root)
    logger.debug("%s: %d image files", root, len(found))
    return sorted(found)


def _walk(root: Path) -> list[Path]:
    found: list[Path] = []
    for folder, dirnames, filenames in os.walk(root, onerror=_warn_unreadable):
        # A directory named like an image is listed (it becomes an error row) and,
        # being a real directory, still walked into.
        names = filenames + [name for name in dirnames if is_image_name(name)]
        found.extend(Path(folder, name) for name in names if is_image_name(name))
    return found


def _scan(root: Path) -> list[Path]:
    try:
        with os.scandir(root) as entries:
            return [Path(entry.path) for entry in entries if is_image_name(entry.name)]
    except OSError as error:
        raise ConfigError(f"cannot read input folder {root}: {error.strerror}") from error


def _warn_unreadable(error: OSError) -> None:
    # os.walk would otherwise skip an unreadable subfolder without a word.
    logger.warning("skipping unreadable folder %s: %s", error.filename, error.strerror)
