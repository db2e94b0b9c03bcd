"""Decoding one image file into the uint8 RGB array an export graph takes.

Every way a file can fail becomes a `DecodeError` with a short reason, because
a bad file is an error row in the output, never the end of a run.
"""

from __future__ import annotations

import errno
import logging
import os
import warnings
from pathlib import Path
from typing import Literal, get_args

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from imfree.errors import ConfigError

logger = logging.getLogger(__name__)

Interpolation = Literal["nearest", "bilinear", "bicubic", "lanczos", "box", "hamming"]
INTERPOLATIONS: tuple[str, ...] = get_args(Interpolation)

_RESAMPLING = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}

# 100 megapixels (e.g. 12000 x 8000) is far beyond any camera photo a tagger meets,
# and decodes to 300 MB of RGB: the size where a crafted file becomes a memory attack.
DEFAULT_MAX_PIXELS = 100_000_000

# decode_image enforces its own pixel limit and turns a file over it into an error row,
# so Pillow's own warning for large images only adds noise on stderr (and breaks the
# progress bar). Its hard error still fires for images above twice Pillow's limit.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

# Modes whose samples are wider than 8 bits; they are rescaled, not clipped.
_WIDE_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")

_TRANSPARENT_MODES = ("RGBA", "LA", "PA", "RGBa", "La")

_ORIENTATION = 0x0112  # the EXIF tag

Colour = tuple[int, int, int]
WHITE: Colour = (255, 255, 255)

# Reduced-scale JPEG decoding keeps at least this many times the model's input
# size, so the final resize still filters over more than one decoded pixel:
# libjpeg's scaled decoding is a box average, blurrier than the bicubic filter
# it stands in for. On 200 photos of 0.3 to 12 MP at 224 x 224, the pixels moved
# 1.9 grey levels on average (12 on the worst image) at a margin of 1, 1.2 (6.8)
# at 1.25 and 0.5 (5.3) at 2, for 6.0, 6.8 and 9.4 ms of decoding a photo: 1.25
# gives most of the speed for a change smaller than bicubic against bilinear
# resizing (1.5). The entropy decoding, which no scale saves, is the rest.
DRAFT_MARGIN = 1.25


class DecodeError(Exception):
    """A file that could not be turned into an image; the message is a short reason."""


def decode_image(
    path: str | os.PathLike[str],
    height: int,
    width: int,
    interpolation: Interpolation = "bicubic",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    *,
    draft: bool = False,
    background: Colour = WHITE,
) -> np.ndarray:
    """Decode `path` into a uint8 RGB array [height, width, 3], stretched without crop.

    The first frame of an animated file is used, the EXIF orientation is applied,
    and transparent pixels are composited onto `background`. With `draft`, a JPEG
    is decoded at the smallest of its 1/2, 1/4, 1/8 scales that still holds
    DRAFT_MARGIN times the target size, which is several times faster for photos.
    """
    resample = _resampling(interpolation)
    path = Path(path)

    try:
        with Image.open(path) as image:
            _check_pixels(image, max_pixels)
            if draft:
                _reduce_while_decoding(image, height, width)
            image = _load_first_frame(image)
            image = _upright(image, path)
            image = _to_rgb(image, background)
            image = image.resize((width, height), resample=resample)
            return np.asarray(image, dtype=np.uint8)  # [H, W, 3]
    except DecodeError:
        raise
    except Image.DecompressionBombError as error:
        limit = 2 * (Image.MAX_IMAGE_PIXELS or 0)
        raise DecodeError(f"too many pixels (over Pillow's limit of {limit})") from error
    except UnidentifiedImageError as error:
        raise DecodeError(_empty_or_not_image(path)) from error
    except OSError as error:
        raise DecodeError(_os_error_reason(path, error)) from error
    except (ValueError, SyntaxError, EOFError, MemoryError) as error:
        # Damaged headers and streams surface as these from the various plugins.
        raise DecodeError(_corrupt_reason(error)) from error


def _resampling(interpolation: str) -> Image.Resampling:
    try:
        return _RESAMPLING[interpolation]
    except KeyError:
        choices = ", ".join(INTERPOLATIONS)
        raise ConfigError(
            f"unknown interpolation {interpolation!r}; choose one of: {choices}"
        ) from None


def _check_pixels(image: Image.Image, max_pixels: int) -> None:
    # The size is known from the header alone: refuse before decoding a single pixel.
    pixels = image.width * image.height
    if pixels > max_pixels:
        raise DecodeError(f"too many pixels ({pixels} > {max_pixels})")


def _reduce_while_decoding(image: Image.Image, height: int, width: int) -> None:
    # libjpeg can decode at 1/2, 1/4 or 1/8 scale for a fraction of the work. draft()
    # never goes below the size asked for, so the image is still shrunk (never
    # enlarged) to the model's input; only the filter chain before that changes.
    if image.format != "JPEG" or image.mode not in ("RGB", "L", "CMYK"):
        return
    # Orientations 5 to 8 turn the picture a quarter: the stored width becomes its height.
    if image.getexif().get(_ORIENTATION, 1) in (5, 6, 7, 8):
        height, width = width, height
    image.draft(image.mode, (round(width * DRAFT_MARGIN), round(height * DRAFT_MARGIN)))


def _load_first_frame(image: Image.Image) -> Image.Image:
    if getattr(image, "is_animated", False):
        image.seek(0)

    # load() is where truncated and corrupt streams fail; doing it here keeps the
    # reasons apart from the conversion steps below.
    image.load()
    return image


def _upright(image: Image.Image, path: Path) -> Image.Image:
    # A damaged EXIF block should not cost the user an otherwise good photo.
    try:
        # getexif() also reads an XMP orientation, as exif_transpose does. Upright
        # images skip exif_transpose, which would copy every pixel to change nothing.
        if image.getexif().get(_ORIENTATION, 1) == 1:
            return image
        return ImageOps.exif_transpose(image)
    except Exception as error:  # noqa: BLE001 - any EXIF parser failure is survivable
        logger.debug("%s: EXIF orientation ignored (%s)", path, _one_line(error))
        return image


def _to_rgb(image: Image.Image, background: Colour) -> Image.Image:
    if image.mode in _WIDE_GREY_MODES:
        image = _wide_grey_to_8_bits(image)

    if image.mode in _TRANSPARENT_MODES or "transparency" in image.info:
        return _over_background(image, background)

    if image.mode != "RGB":
        # Palette, greyscale, bilevel, CMYK and YCbCr all convert directly.
        image = image.convert("RGB")
    return image


def _wide_grey_to_8_bits(image: Image.Image) -> Image.Image:
    # 16-bit samples (PNG and TIFF greyscale, also loaded as 32-bit "I") span 0..65535;
    # dividing by 257 maps that range onto 0..255 exactly, where convert("L") would clip.
    samples = np.asarray(image).astype(np.float32)
    scaled = np.clip(samples, 0, 65535) / 257.0
    return Image.fromarray(np.rint(scaled).astype(np.uint8))  # mode "L"


def _over_background(image: Image.Image, background: Colour) -> Image.Image:
    # White by default, not black: transparent margins of logos and cut-outs read as paper.
    rgba = image.convert("RGBA")
    under = Image.new("RGBA", rgba.size, (*background, 255))
    return Image.alpha_composite(under, rgba).convert("RGB")


def _empty_or_not_image(path: Path) -> str:
    try:
        if path.stat().st_size == 0:
            return "empty file"
    except OSError as error:
        return _os_error_reason(path, error)
    return "not an image"


def _os_error_reason(path: Path, error: OSError) -> str:
    if isinstance(error, IsADirectoryError):
        return "is a directory"
    if isinstance(error, PermissionError):
        return "unreadable: permission denied"
    if error.errno == errno.ELOOP:
        return "symlink loop"
    if isinstance(error, FileNotFoundError):
        return "broken symlink" if path.is_symlink() else "file not found"
    if error.errno is not None:
        return f"unreadable: {error.strerror or os.strerror(error.errno)}"
    return _corrupt_reason(error)


def _corrupt_reason(error: BaseException) -> str:
    # Pillow words a file cut short several ways ("image file is truncated",
    # "Truncated File Read"), depending on where the data ran out.
    if "truncated" in str(error).lower():
        return "truncated image"
    return f"corrupt image: {_one_line(error)}"


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text[:120]
