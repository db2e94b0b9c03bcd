import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imfree.errors import ConfigError
from imfree.runtime.images import DecodeError, decode_image

H, W = 8, 12
RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def _decode(path: Path, **options) -> np.ndarray:
    return decode_image(path, H, W, **options)


def _assert_colour(image: np.ndarray, colour, tolerance=2):
    assert image.shape == (H, W, 3) and image.dtype == np.uint8
    worst = int(np.abs(image.astype(int) - colour).max())
    assert worst <= tolerance, f"pixel {image[0, 0].tolist()}, expected {colour}"


def _save(tmp_path: Path, image: Image.Image, name: str, **options) -> Path:
    path = tmp_path / name
    image.save(path, **options)
    return path


@pytest.mark.parametrize(
    ("mode", "value", "name", "expected"),
    [
        ("RGB", RED, "rgb.png", RED),
        ("RGBA", (255, 0, 0, 0), "rgba-clear.png", WHITE),  # transparent: the white background
        ("RGBA", (0, 0, 255, 255), "rgba-opaque.png", BLUE),
        ("LA", (0, 0), "la.png", WHITE),
        ("LA", (0, 255), "la-opaque.png", (0, 0, 0)),
        ("L", 128, "l.png", (128, 128, 128)),
        ("1", 1, "bilevel.png", WHITE),
        ("CMYK", (0, 255, 255, 0), "cmyk.jpg", RED),
    ],
)
def test_modes_become_rgb(tmp_path, mode, value, name, expected):
    path = _save(tmp_path, Image.new(mode, (30, 20), value), name)
    _assert_colour(_decode(path), expected, tolerance=3)


def test_palette_and_palette_transparency(tmp_path):
    palette = Image.new("RGB", (30, 20), BLUE).convert("P")
    _assert_colour(_decode(_save(tmp_path, palette, "p.png")), BLUE)

    clear = Image.new("RGB", (30, 20), BLUE).convert("P")
    index = clear.getpixel((0, 0))
    _assert_colour(_decode(_save(tmp_path, clear, "p-clear.png", transparency=index)), WHITE)


@pytest.mark.parametrize("name", ["grey16.png", "grey16.tif"])
def test_16_bit_grey_is_scaled_not_clipped(tmp_path, name):
    samples = np.full((20, 30), 257 * 100, dtype=np.uint16)
    samples[:, 15:] = 65535
    path = _save(tmp_path, Image.fromarray(samples), name)

    image = decode_image(path, 20, 30, interpolation="nearest")

    assert Image.open(path).mode.startswith("I")
    assert image[0, 0].tolist() == [100, 100, 100]
    assert image[0, -1].tolist() == [255, 255, 255]


def test_32_bit_integer_grey_is_scaled_like_16_bit(tmp_path):
    samples = np.full((20, 30), 257 * 40, dtype=np.int32)
    path = _save(tmp_path, Image.fromarray(samples), "grey32.tif")

    assert Image.open(path).mode == "I"
    _assert_colour(_decode(path), (40, 40, 40), tolerance=0)


def test_exif_orientation_is_applied(tmp_path):
    # Stored landscape, red on the left; orientation 6 says "turn 90 degrees clockwise
    # to view", which brings the left half to the top.
    stored = Image.new("RGB", (40, 20), BLUE)
    stored.paste(RED, (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = _save(tmp_path, stored, "rotated.jpg", exif=exif, quality=95)

    image = decode_image(path, 40, 20, interpolation="nearest")  # portrait once upright

    assert np.abs(image[2, 10].astype(int) - RED).max() < 30
    assert np.abs(image[-3, 10].astype(int) - BLUE).max() < 30


def test_animated_gif_uses_the_first_frame(tmp_path):
    frames = [Image.new("RGB", (30, 20), colour) for colour in (RED, (0, 255, 0), BLUE)]
    path = tmp_path / "animated.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)

    assert Image.open(path).n_frames == 3
    _assert_colour(_decode(path), RED)


def test_resize_stretches_to_exactly_the_target(photos):
    image = decode_image(photos[0], 32, 48)
    assert image.shape == (32, 48, 3) and image.dtype == np.uint8


def test_unknown_interpolation_is_a_config_error(photos):
    with pytest.raises(ConfigError, match="choose one of: nearest, bilinear, bicubic"):
        decode_image(photos[0], H, W, interpolation="sinc")


def _reason(path: Path, **options) -> str:
    with pytest.raises(DecodeError) as caught:
        _decode(path, **options)
    return str(caught.value)


def test_empty_file(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    assert _reason(tmp_path / "empty.jpg") == "empty file"


def test_text_named_jpg(tmp_path):
    (tmp_path / "notes.jpg").write_text("this is not a picture\n")
    assert _reason(tmp_path / "notes.jpg") == "not an image"


def test_truncated_jpeg(tmp_path, photos):
    data = photos[0].read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    assert _reason(tmp_path / "cut.jpg") == "truncated image"


def test_directory_named_jpg(tmp_path):
    (tmp_path / "folder.jpg").mkdir()
    assert _reason(tmp_path / "folder.jpg") == "is a directory"


def test_broken_symlink(tmp_path):
    os.symlink(tmp_path / "gone.jpg", tmp_path / "link.jpg")
    assert _reason(tmp_path / "link.jpg") == "broken symlink"


def test_symlink_loop(tmp_path):
    os.symlink("loop.jpg", tmp_path / "loop.jpg")
    assert _reason(tmp_path / "loop.jpg") == "symlink loop"


def test_missing_file(tmp_path):
    assert _reason(tmp_path / "never.jpg") == "file not found"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_permission_denied(tmp_path, photos):
    path = tmp_path / "secret.jpg"
    path.write_bytes(photos[0].read_bytes())
    path.chmod(0)
    assert _reason(path) == "unreadable: permission denied"


def test_pixel_limit_refuses_before_decoding(photos):
    with Image.open(photos[0]) as image:
        pixels = image.width * image.height
    assert _reason(photos[0], max_pixels=1000) == f"too many pixels ({pixels} > 1000)"


# How each EXIF orientation says the stored pixels must be turned to stand upright;
# a file is stored as the inverse of that turn applied to the upright picture.
_STORED_AS = {
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


@pytest.mark.parametrize("draft", [False, True])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_each_exif_orientation_stands_upright(tmp_path, orientation, draft):
    # Upright: 320 x 160, red in the top-left quarter, blue elsewhere.
    upright = Image.new("RGB", (320, 160), BLUE)
    upright.paste(RED, (0, 0, 160, 80))
    turn = _STORED_AS[orientation]
    stored = upright if turn is None else upright.transpose(turn)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = _save(tmp_path, stored, f"o{orientation}.jpg", exif=exif, quality=95)

    image = decode_image(path, 16, 32, interpolation="bilinear", draft=draft)

    assert np.abs(image[3, 3].astype(int) - RED).max() < 40
    assert np.abs(image[12, 28].astype(int) - BLUE).max() < 40
    assert np.abs(image[3, 28].astype(int) - BLUE).max() < 40


def test_16_bit_rgb_is_scaled_not_clipped(tmp_path):
    from test_runtime_odd_files import png_16_bit_rgb

    samples = np.zeros((20, 30, 3), np.uint16)
    samples[..., 0], samples[..., 1], samples[..., 2] = 65535, 257 * 100, 257 * 7
    (tmp_path / "rgb16.png").write_bytes(png_16_bit_rgb(samples))

    image = decode_image(tmp_path / "rgb16.png", 20, 30, interpolation="nearest")

    assert np.abs(image.astype(int) - [255, 100, 7]).max() <= 1


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_a_huge_header_is_refused_before_any_pixel_is_read(tmp_path):
    from test_runtime_odd_files import png_huge_header

    # In-process Pillow's own limit answers first; the decode workers of a run lift it,
    # so there the run's --max-pixels decides (see test_runtime_odd_files).
    (tmp_path / "bomb.png").write_bytes(png_huge_header(30_000, 20_000))
    assert _reason(tmp_path / "bomb.png").startswith("too many pixels")
    (tmp_path / "big.png").write_bytes(png_huge_header(10_000, 10_001))
    assert _reason(tmp_path / "big.png") == "too many pixels (100010000 > 100000000)"


def test_transparency_goes_onto_the_stated_background(tmp_path):
    path = _save(tmp_path, Image.new("RGBA", (30, 20), (255, 0, 0, 0)), "clear.png")
    _assert_colour(_decode(path, background=(0, 0, 255)), BLUE, tolerance=0)


def test_draft_decoding_keeps_the_size_and_nearly_the_pixels(tmp_path, photos):
    big = Image.open(photos[0]).convert("RGB").resize((2400, 1800), Image.Resampling.BICUBIC)
    path = _save(tmp_path, big, "big.jpg", quality=92)

    exact = decode_image(path, 224, 224)
    reduced = decode_image(path, 224, 224, draft=True)

    assert reduced.shape == exact.shape == (224, 224, 3)
    difference = np.abs(reduced.astype(int) - exact.astype(int))
    assert difference.mean() < 2.0 and 0 < difference.max() < 64


def test_draft_leaves_small_jpegs_and_other_formats_alone(tmp_path, photos):
    png = _save(tmp_path, Image.open(photos[0]), "photo.png")
    np.testing.assert_array_equal(decode_image(png, 64, 64, draft=True), decode_image(png, 64, 64))
    # The model's input is larger than half the photo: no reduced scale fits.
    with Image.open(photos[0]) as image:
        size = (image.height // 2 + 10, image.width // 2 + 10)
    np.testing.assert_array_equal(
        decode_image(photos[0], *size, draft=True), decode_image(photos[0], *size)
    )
