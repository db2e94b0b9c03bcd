import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from imfree.errors import ConfigError
from imfree.runtime import pipeline
from imfree.runtime.images import decode_image
from imfree.runtime.pipeline import DecodeSettings, StageTimes, iter_batches
from imfree.runtime.sources import list_images


def _touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_list_images_walks_sorted_and_keeps_undecodable_entries(tmp_path):
    _touch(tmp_path / "b.JPG")
    _touch(tmp_path / "a.png")
    _touch(tmp_path / "notes.txt")
    _touch(tmp_path / "sub" / "deep" / "c.webp")
    _touch(tmp_path / "folder.jpg" / "inside.tiff")
    os.symlink(tmp_path / "gone.jpg", tmp_path / "broken.jpg")
    os.symlink("loop.gif", tmp_path / "loop.gif")

    found = [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)]

    assert found == [
        "a.png",
        "b.JPG",
        "broken.jpg",
        "folder.jpg",
        "folder.jpg/inside.tiff",
        "loop.gif",
        "sub/deep/c.webp",
    ]


def test_list_images_without_recursion(tmp_path):
    _touch(tmp_path / "top.jpeg")
    _touch(tmp_path / "sub" / "below.jpg")
    assert list_images(tmp_path, recursive=False) == [tmp_path / "top.jpeg"]


def test_list_images_takes_a_single_file_whatever_its_suffix(tmp_path):
    path = _touch(tmp_path / "photo.heic")
    assert list_images(path) == [path]


def test_list_images_does_not_follow_symlinked_folders(tmp_path):
    _touch(tmp_path / "real" / "a.jpg")
    os.symlink(tmp_path, tmp_path / "real" / "back")  # a cycle if followed
    assert list_images(tmp_path) == [tmp_path / "real" / "a.jpg"]


def test_list_images_missing_root(tmp_path):
    with pytest.raises(ConfigError, match=f"input path {tmp_path / 'nope'} does not exist"):
        list_images(tmp_path / "nope")


@pytest.fixture
def mixed_paths(tmp_path, photos) -> list[Path]:
    """Real photos with bad files between them, in a fixed order."""
    bad = {
        "empty.jpg": b"",
        "text.jpg": b"hello",
        "cut.jpg": photos[1].read_bytes()[:2000],
    }
    paths = []
    for index, photo in enumerate(photos):
        paths.append(Path(shutil.copy(photo, tmp_path / f"{index:02d}-{photo.name}")))
        if index < len(bad):
            name, data = list(bad.items())[index]
            paths.append(_touch(tmp_path / f"{index:02d}-{name}", data))
    return paths


@pytest.mark.parametrize(("batch_size", "workers"), [(1, 1), (3, 2), (64, 4)])
def test_batches_keep_input_order_and_count_failures(mixed_paths, batch_size, workers):
    settings = DecodeSettings(height=24, width=20)
    times = StageTimes()

    batches = list(iter_batches(mixed_paths, settings, batch_size, workers, times=times))

    assert [p for b in batches for p in b.paths] == mixed_paths
    assert all(len(b.paths) <= batch_size for b in batches)
    failures = [(p.name.split("-", 1)[1], reason) for b in batches for p, reason in b.failures]
    assert failures == [
        ("empty.jpg", "empty file"),
        ("text.jpg", "not an image"),
        ("cut.jpg", "truncated image"),
    ]
    for batch in batches:
        assert batch.images.shape == (len(batch.good_paths), 24, 20, 3)
        assert batch.good_paths == [p for p in batch.paths if p not in dict(batch.failures)]
    first_good = next(b for b in batches if b.good_paths)
    expected = decode_image(first_good.good_paths[0], 24, 20)
    np.testing.assert_array_equal(first_good.images[0], expected)
    assert times.decode_seconds > 0


def test_a_batch_of_only_failures_has_an_empty_image_array(tmp_path):
    paths = [_touch(tmp_path / f"{i}.jpg", b"") for i in range(3)]

    (batch,) = iter_batches(paths, DecodeSettings(8, 8), batch_size=8, decode_workers=2)

    assert batch.images.shape == (0, 8, 8, 3) and batch.images.dtype == np.uint8
    assert len(batch.failures) == 3


def test_stopping_early_leaves_no_work_behind(mixed_paths):
    batches = iter_batches(mixed_paths * 20, DecodeSettings(16, 16), batch_size=2)
    next(batches)
    batches.close()  # must return promptly: queued decodes are cancelled


def test_decoding_runs_at_most_prefetch_batches_ahead(tmp_path, monkeypatch):
    decoded = []

    def fake_decode(path, height, width, interpolation, max_pixels):
        decoded.append(path)
        return np.zeros((height, width, 3), np.uint8)

    monkeypatch.setattr(pipeline, "decode_image", fake_decode)
    paths = [tmp_path / f"{i:02d}.jpg" for i in range(20)]
    batches = iter_batches(paths, DecodeSettings(4, 4), batch_size=2, decode_workers=2, prefetch=2)

    first = next(batches)
    time.sleep(0.2)  # time enough for the pool to run ahead as far as it may

    assert first.paths == paths[:2]
    assert len(decoded) == 6  # the batch handed out, and two more
    assert [p for b in batches for p in b.paths] == paths[2:]
