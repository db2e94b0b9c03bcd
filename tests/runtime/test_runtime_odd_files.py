"""A folder of every kind of odd file, tagged end to end: one checked row per file."""

import csv
import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import CLASSES, WEIGHTS
from PIL import Image

from imfree.runtime.infer import InferConfig, run_inference

RED, BLUE, WHITE, GREY = (255, 0, 0), (0, 0, 255), (255, 255, 255), (100, 100, 100)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_16_bit_rgb(samples: np.ndarray) -> bytes:
    """A 16-bit RGB PNG (Pillow cannot write one): samples uint16 [H, W, 3]."""
    height, width, _ = samples.shape
    rows = b"".join(b"\x00" + samples[y].astype(">u2").tobytes() for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
            + _png_chunk(b"IDAT", zlib.compress(rows)) + _png_chunk(b"IEND", b""))


def png_huge_header(width: int, height: int) -> bytes:
    """A small PNG whose header claims width x height pixels."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
            + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + _png_chunk(b"IEND", b""))


def _saved(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, **options)
    return buffer.getvalue()


def _animated() -> bytes:
    frames = [Image.new("RGB", (30, 20), colour) for colour in (RED, (0, 255, 0), BLUE)]
    return _saved(frames[0], format="GIF", save_all=True, append_images=frames[1:], loop=0)


def _with_orientation(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _saved(Image.new("RGB", (60, 40), RED), format="JPEG", exif=exif, quality=95)


def _palette_with_clear_index() -> bytes:
    image = Image.new("RGB", (30, 20), BLUE).convert("P")
    return _saved(image, format="PNG", transparency=image.getpixel((0, 0)))


# name -> (file bytes, the colour it decodes to). Every image is one flat colour, so
# the tiny export's scores (a softmax of the mean colour) pin down each row.
GOOD_FILES = {
    "rgb.png": (_saved(Image.new("RGB", (30, 20), RED), format="PNG"), RED),
    "rgba-clear.png": (_saved(Image.new("RGBA", (30, 20), (255, 0, 0, 0)), format="PNG"), WHITE),
    "la.png": (_saved(Image.new("LA", (30, 20), (100, 255)), format="PNG"), GREY),
    "grey.png": (_saved(Image.new("L", (30, 20), 100), format="PNG"), GREY),
    "bilevel.png": (_saved(Image.new("1", (30, 20), 1), format="PNG"), WHITE),
    "palette.png": (_saved(Image.new("RGB", (30, 20), BLUE).convert("P"), format="PNG"), BLUE),
    "palette-clear.png": (_palette_with_clear_index(), WHITE),
    "cmyk.jpg": (_saved(Image.new("CMYK", (30, 20), (0, 255, 255, 0)), format="JPEG"), RED),
    "grey16.png": (_saved(Image.fromarray(np.full((20, 30), 257 * 100, np.uint16)),
                          format="PNG"), GREY),
    "rgb16.png": (png_16_bit_rgb(np.full((20, 30, 3), [65535, 0, 0], np.uint16)), RED),
    "grey32.tif": (_saved(Image.fromarray(np.full((20, 30), 257 * 100, np.int32)),
                          format="TIFF"), GREY),
    "animated.gif": (_animated(), RED),
    "webp.webp": (_saved(Image.new("RGB", (30, 20), BLUE), format="WEBP", lossless=True), BLUE),
    **{f"exif-{o}.jpg": (_with_orientation(o), RED) for o in range(1, 9)},
}

BAD_FILES = {
    "empty.jpg": "empty file",
    "text.png": "not an image",
    "truncated.jpg": "truncated image",
    "folder.jpg": "is a directory",
    "broken.jpg": "broken symlink",
    "loop.jpg": "symlink loop",
    "huge.png": "too many pixels (10000000000 > 100000000)",
    "fifo.jpg": "decoding took over 2 s (worker stopped and replaced)",
}


@pytest.fixture
def odd_folder(tmp_path, photos) -> Path:
    folder = tmp_path / "odd"
    folder.mkdir()
    for name, (data, _) in GOOD_FILES.items():
        (folder / name).write_bytes(data)

    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.png").write_text("not a picture, whatever the suffix says\n")
    photo = photos[0].read_bytes()
    (folder / "truncated.jpg").write_bytes(photo[: len(photo) // 3])
    (folder / "folder.jpg").mkdir()
    os.symlink(folder / "gone.jpg", folder / "broken.jpg")
    os.symlink("loop.jpg", folder / "loop.jpg")
    (folder / "huge.png").write_bytes(png_huge_header(100_000, 100_000))
    os.mkfifo(folder / "fifo.jpg")  # opening it blocks forever: a hung decoder
    return folder


def _expected_scores(colour) -> np.ndarray:
    logits = np.array(colour, np.float32) / 255 @ WEIGHTS
    return np.exp(logits) / np.exp(logits).sum()


def test_every_odd_file_gets_its_row(odd_folder, export_dir, tmp_path):
    out = tmp_path / "tags.csv"
    config = InferConfig(odd_folder, export_dir, out, batch_size=8, all_scores=True,
                         decode_workers=2, decode_timeout=2, progress=False)

    summary = run_inference(config)

    with open(out, newline="") as handle:
        rows = {Path(row["path"]).name: row for row in csv.DictReader(handle)}
    assert sorted(rows) == sorted([*GOOD_FILES, *BAD_FILES])  # one row per file, no more
    for name, reason in BAD_FILES.items():
        assert (rows[name]["status"], rows[name]["error"]) == ("error", reason), name
    for name, (_, colour) in GOOD_FILES.items():
        row = rows[name]
        assert row["status"] == "ok" and row["error"] == "", name
        scores = [float(row[f"score:{c}"]) for c in CLASSES]
        np.testing.assert_allclose(scores, _expected_scores(colour), atol=0.02, err_msg=name)

    assert (summary.images_ok, summary.images_failed) == (len(GOOD_FILES), len(BAD_FILES))
    assert summary.workers_replaced == 1  # the one stuck on the FIFO


def test_max_pixels_is_a_per_run_setting(odd_folder, export_dir, tmp_path):
    out = tmp_path / "tags.jsonl"
    run_inference(InferConfig([odd_folder / "rgb.png", odd_folder / "grey.png"], export_dir,
                              out, max_pixels=599, progress=False))

    assert out.read_text().count("too many pixels (600 > 599)") == 2
