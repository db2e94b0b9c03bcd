"""Regressions from the tester's report: odd file names in Parquet, unwritable outputs."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from imfree.errors import ConfigError
from imfree.runtime.infer import InferConfig, run_inference
from imfree.runtime.writers import parquet_text, partial_path

pq = pytest.importorskip("pyarrow.parquet", reason="Parquet output needs pyarrow")

ODD = os.fsdecode(b"caf\xe9.jpg")  # a Latin-1 name: not UTF-8


@pytest.fixture
def odd_names(tmp_path, photos) -> Path:
    folder = tmp_path / "weird"
    folder.mkdir()
    photo = photos[0]
    shutil.copy(photo, folder / ODD)
    shutil.copy(photo, folder / "plain.jpg")
    (folder / os.fsdecode(b"bad\xff.jpg")).write_bytes(b"")
    return folder


def _config(inputs: Path, export_dir: Path, out: Path, **overrides) -> InferConfig:
    values = dict(inputs=[inputs], export_dir=export_dir, out=out, batch_size=2,
                  engine="ort-cpu", progress=False, decode_workers=1, all_scores=True)
    values.update(overrides)
    return InferConfig(**values)


def test_parquet_escapes_a_name_that_is_not_utf8(odd_names, export_dir, tmp_path):
    out = tmp_path / "tags.parquet"
    summary = run_inference(_config(odd_names, export_dir, out))

    rows = pq.read_table(out).to_pylist()
    assert summary.images_ok == 2 and summary.images_failed == 1
    names = sorted(Path(row["path"]).name for row in rows)
    assert names == ["bad\\xff.jpg", "caf\\xe9.jpg", "plain.jpg"]
    assert parquet_text(ODD) == "caf\\xe9.jpg" and parquet_text("plain.jpg") == "plain.jpg"


def test_a_resumed_parquet_run_skips_the_escaped_names(odd_names, export_dir, tmp_path):
    out = tmp_path / "tags.parquet"
    run_inference(_config(odd_names, export_dir, out))
    first = pq.read_table(out).to_pylist()

    summary = run_inference(_config(odd_names, export_dir, out, resume=True))

    assert summary.images_skipped == 3 and summary.images_ok == 0
    assert pq.read_table(out).to_pylist() == first


@pytest.mark.parametrize("name", ["tags.csv", "tags.parquet"])
def test_an_output_in_a_read_only_folder_is_one_error(odd_names, export_dir, tmp_path, name,
                                                      monkeypatch):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    if os.geteuid() == 0:  # root writes anyway: the folder refuses as it would anyone else
        def refuse(path, mode):
            raise PermissionError(13, "Permission denied", str(path))
        monkeypatch.setattr("imfree.runtime.writers._open_text", refuse)
    try:
        with pytest.raises(ConfigError, match="cannot write") as raised:
            run_inference(_config(odd_names, export_dir, folder / name))
    finally:
        folder.chmod(0o755)
    assert str(folder) in str(raised.value)


def test_an_output_under_a_file_is_one_error(odd_names, export_dir, tmp_path):
    (tmp_path / "afile").write_text("a file, not a folder")
    out = tmp_path / "afile" / "tags.csv"

    with pytest.raises(ConfigError, match="cannot write") as raised:
        run_inference(_config(odd_names, export_dir, out))

    assert "afile" in str(raised.value)
    assert not partial_path(out).exists()


def test_resume_refuses_another_engine_choice(odd_names, export_dir, tmp_path, monkeypatch):
    import signal

    from imfree.runtime import infer

    score = infer.score_batch

    def score_then_stop(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C after the first batch
        return score(*args, **kwargs)

    monkeypatch.setattr(infer, "score_batch", score_then_stop)
    out = tmp_path / "tags.csv"
    stopped = run_inference(_config(odd_names, export_dir, out))
    monkeypatch.undo()
    assert stopped.stopped_by == "SIGINT" and partial_path(out).exists()

    with pytest.raises(ConfigError, match="another engine"):
        run_inference(_config(odd_names, export_dir, out, resume=True, engine="auto"))
    resumed = run_inference(_config(odd_names, export_dir, out, resume=True))

    assert resumed.images_skipped == 2 and resumed.images_ok + resumed.images_failed == 1
    assert not list(tmp_path.glob(".tags.csv*"))  # partial and run key gone once published
