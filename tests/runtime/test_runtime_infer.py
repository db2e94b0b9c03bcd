import ast
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime
import pytest

from imfree.errors import BundleError, ConfigError, EngineUnavailable
from imfree.runtime.bundle import read_manifest
from imfree.runtime.images import decode_image
from imfree.runtime.infer import InferConfig, run_inference
from imfree.runtime.writers import partial_path

REPO = Path(__file__).resolve().parents[2]

BAD_FILES = {"empty.jpg": "empty file", "notes.png": "not an image", "folder.jpg": "is a directory"}


@pytest.fixture
def inputs(tmp_path, photos) -> Path:
    """The real photos, one in a subfolder, next to files that cannot be decoded."""
    folder = tmp_path / "inputs"
    (folder / "sub").mkdir(parents=True)
    for photo in photos[:-1]:
        shutil.copy(photo, folder / photo.name)
    shutil.copy(photos[-1], folder / "sub" / photos[-1].name)
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.png").write_text("not a picture")
    (folder / "folder.jpg").mkdir()
    os.symlink(folder / "gone.jpg", folder / "broken.jpg")
    (folder / "readme.txt").write_text("not listed")
    return folder


def _reference_scores(export_dir: Path, paths: list[Path]) -> np.ndarray:
    manifest = read_manifest(export_dir)
    session = onnxruntime.InferenceSession(str(export_dir / "model.onnx"))
    size = (manifest.image_height, manifest.image_width)
    images = np.stack([decode_image(p, *size, draft=True) for p in paths])
    return session.run(["scores"], {"images": images})[0]


def test_end_to_end_jsonl(inputs, export_dir, tmp_path, photos):
    out = tmp_path / "tags.jsonl"
    config = InferConfig(
        inputs,
        export_dir,
        out,
        batch_size=3,
        all_scores=True,
        top_k=2,
        decode_workers=2,
        progress=False,
    )

    summary = run_inference(config)
    classes = read_manifest(export_dir).classes

    rows = [json.loads(line) for line in out.read_text().splitlines()]
    paths = [Path(row["path"]) for row in rows]
    assert paths == sorted(paths) and len(rows) == len(photos) + 4  # one row per file
    errors = {Path(r["path"]).name: r["error"] for r in rows if r["status"] == "error"}
    assert errors == {**BAD_FILES, "broken.jpg": "broken symlink"}

    good = [r for r in rows if r["status"] == "ok"]
    expected = _reference_scores(export_dir, [Path(r["path"]) for r in good])
    got = np.array([[r["scores"][c] for c in classes] for r in good])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    for row, scores in zip(good, expected, strict=True):
        best = np.argsort(-scores)[:2]
        assert [t["label"] for t in row["top_k"]] == [classes[i] for i in best]
        assert row["labels"] == [classes[i] for i in np.argsort(-scores) if scores[i] >= 0.5]

    assert summary.engine_name == "ort-cpu"
    assert (summary.images_ok, summary.images_failed) == (len(photos), 4)
    assert summary.failure_reasons["empty file"] == 1
    assert summary.out_path == out
    assert summary.images_per_second > 0 and summary.engine_seconds > 0


def test_end_to_end_csv_with_threshold_override(inputs, export_dir, tmp_path, photos):
    out = tmp_path / "tags.csv"
    config = InferConfig(inputs, export_dir, out, threshold=0.0, progress=False)

    run_inference(config)

    with open(out, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(photos) + 4
    ok = [r for r in rows if r["status"] == "ok"]
    classes = read_manifest(export_dir).classes
    assert all(len(r["labels"].split(";")) == len(classes) for r in ok)  # every class >= 0


def test_progress_bar_goes_to_stderr(inputs, export_dir, tmp_path, capsys):
    run_inference(InferConfig(inputs, export_dir, tmp_path / "t.csv", batch_size=4))
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "img/s" in captured.err or "s/img" in captured.err


def test_decode_memory_follows_the_work_not_the_batch_option(inputs, export_dir, tmp_path,
                                                             monkeypatch):
    # --batch 40000 on a small folder must not reserve 40000 images of shared memory.
    from imfree.runtime import infer

    longest = []

    def recording(chunks, decode, max_chunk, *args, **kwargs):
        longest.append(max_chunk)
        return real_decode_batches(chunks, decode, max_chunk, *args, **kwargs)

    real_decode_batches = infer.decode_batches
    monkeypatch.setattr(infer, "decode_batches", recording)

    summary = run_inference(InferConfig(inputs, export_dir, tmp_path / "t.csv",
                                        batch_size=40000, progress=False))

    files = summary.images_ok + summary.images_failed
    assert longest == [files] and files == len(list(inputs.rglob("*.*"))) - 1  # not readme


@pytest.mark.parametrize("files", [[], ["empty.jpg", "notes.png"]])
def test_a_run_the_engine_never_saw_names_no_limiting_stage(tmp_path, export_dir, caplog,
                                                            files):
    folder = tmp_path / "in"
    folder.mkdir()
    for name in files:
        (folder / name).write_bytes(b"" if name == "empty.jpg" else b"not a picture")

    with caplog.at_level("INFO", logger="imfree"):
        summary = run_inference(InferConfig(folder, export_dir, tmp_path / "t.csv",
                                            progress=False))

    assert (summary.images_ok, summary.images_failed) == (0, len(files))
    assert "done, " in caplog.text
    assert "limits this run" not in caplog.text


@pytest.mark.parametrize(("batch", "threads", "split"), [(1, 2, False), (2, 2, True),
                                                         (8, 3, True), (8, 1, True)])
def test_batches_are_split_across_threads_only_when_each_gets_a_slice(
        inputs, export_dir, tmp_path, monkeypatch, batch, threads, split):
    # With --batch 1 a split engine would run every image on one core.
    from imfree.runtime import infer

    asked = []

    def recording(*args, **kwargs):
        asked.append(kwargs["split"])
        return real_open_engine(*args, **kwargs)

    real_open_engine = infer.open_engine
    monkeypatch.setattr(infer, "open_engine", recording)
    run_inference(InferConfig(inputs, export_dir, tmp_path / "t.csv", batch_size=batch,
                              engine_threads=threads, progress=False))

    assert asked == [split]


def test_a_stop_during_the_last_batch_publishes_the_complete_output(inputs, export_dir,
                                                                    tmp_path, monkeypatch):
    from imfree.runtime import engines

    original = engines.OrtEngine.run

    def ctrl_c_then_run(self, images):
        os.kill(os.getpid(), signal.SIGINT)  # the run's handler asks it to stop
        return original(self, images)

    monkeypatch.setattr(engines.OrtEngine, "run", ctrl_c_then_run)
    out = tmp_path / "tags.csv"
    summary = run_inference(InferConfig(inputs, export_dir, out, batch_size=1000,
                                        progress=False))

    assert summary.stopped_by is None and summary.images_left == 0
    assert out.exists() and not partial_path(out).exists()


def test_a_batch_decoded_after_a_stop_is_left_for_resume():
    # The batch being scored is finished; one that decoded while the stop came in
    # (its workers may have been killed by the same SIGTERM) is not written.
    import signal

    from imfree.runtime.infer import _until_stopped
    from imfree.runtime.signals import StopRequest

    stop = StopRequest()

    def batches():
        yield "scored when the stop came"
        stop.signal = signal.SIGTERM
        yield "decoded while it came"

    assert list(_until_stopped(batches(), stop)) == ["scored when the stop came"]


def _engine_fails_from_batch(monkeypatch, first_failing: int) -> None:
    """The onnxruntime engine raises "device lost" from its `first_failing`-th batch on,
    counted across every run of the test."""
    from imfree.runtime import engines

    original = engines.OrtEngine.run
    calls = []

    def failing(self, images):
        calls.append(len(images))
        if len(calls) >= first_failing:
            raise RuntimeError("device lost")
        return original(self, images)

    monkeypatch.setattr(engines.OrtEngine, "run", failing)


def test_a_failing_engine_keeps_the_partial_output(inputs, export_dir, tmp_path, monkeypatch):
    _engine_fails_from_batch(monkeypatch, 2)
    out = tmp_path / "tags.csv"

    with pytest.raises(RuntimeError, match="device lost"):
        run_inference(InferConfig(inputs, export_dir, out, batch_size=2, progress=False))

    assert not out.exists()
    assert partial_path(out).read_text().startswith("path,status")


def test_a_run_that_fails_before_its_first_row_leaves_no_partial_file(inputs, export_dir,
                                                                     tmp_path, monkeypatch):
    # Nothing to resume: a partial file would only make the next run ask for --resume.
    _engine_fails_from_batch(monkeypatch, 1)
    out = tmp_path / "tags.csv"

    with pytest.raises(RuntimeError, match="device lost"):
        run_inference(InferConfig(inputs, export_dir, out, batch_size=2, progress=False))

    assert not out.exists() and not partial_path(out).exists()
    assert not list(tmp_path.glob(".tags.csv*"))  # nor the run's key beside it


def test_the_workers_decode_while_the_engine_opens(inputs, export_dir, tmp_path, monkeypatch):
    from imfree.runtime import infer

    calls = []

    def decoding(*args, **kwargs):
        batches = real_decode_batches(*args, **kwargs)
        calls.append("decoding")
        return batches

    def opening(*args, **kwargs):
        calls.append("engine")
        return real_open_engine(*args, **kwargs)

    real_decode_batches, real_open_engine = infer.decode_batches, infer.open_engine
    monkeypatch.setattr(infer, "decode_batches", decoding)
    monkeypatch.setattr(infer, "open_engine", opening)

    summary = run_inference(InferConfig(inputs, export_dir, tmp_path / "t.csv", batch_size=2,
                                        progress=False))

    assert calls == ["decoding", "engine"] and summary.images_ok > 0


def test_an_engine_that_cannot_open_stops_the_decoding_and_leaves_no_output(
        inputs, export_dir, tmp_path, monkeypatch):
    from imfree.runtime import infer

    def unavailable(*args, **kwargs):
        raise EngineUnavailable("no engine here")

    monkeypatch.setattr(infer, "open_engine", unavailable)
    out = tmp_path / "tags.csv"

    with pytest.raises(EngineUnavailable, match="no engine here"):
        run_inference(InferConfig(inputs, export_dir, out, batch_size=2, progress=False))

    assert not out.exists() and not partial_path(out).exists()
    assert not list(tmp_path.glob(".tags.csv*"))


def test_a_resumed_run_that_fails_at_once_keeps_the_earlier_rows(inputs, export_dir, tmp_path,
                                                                 monkeypatch):
    out = tmp_path / "tags.csv"
    _engine_fails_from_batch(monkeypatch, 2)  # the resumed run fails on its first batch
    with pytest.raises(RuntimeError):
        run_inference(InferConfig(inputs, export_dir, out, batch_size=2, progress=False))
    kept = partial_path(out).read_text()

    with pytest.raises(RuntimeError):
        run_inference(InferConfig(inputs, export_dir, out, batch_size=2, progress=False,
                                  resume=True))

    assert partial_path(out).read_text() == kept


def test_scores_of_the_wrong_width_are_a_bundle_error(inputs, export_dir, tmp_path):
    manifest_path = export_dir / "imfree_export.json"
    document = json.loads(manifest_path.read_text())
    document["classes"] = ["only", "three", "classes"]
    manifest_path.write_text(json.dumps(document))

    with pytest.raises(BundleError, match=r"expected \(\d+, 3\) for 3 classes"):
        run_inference(InferConfig(inputs, export_dir, tmp_path / "t.csv", progress=False))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"batch_size": 0}, "batch size must be at least 1"),
        ({"top_k": -1}, "top-k must be 0 or more"),
        ({"engine": "cuda"}, "choose one of: auto, tensorrt"),
        ({"out": Path("tags.xlsx")}, "suffixes .csv, .jsonl"),
    ],
)
def test_bad_options_fail_before_any_work(inputs, export_dir, tmp_path, change, message):
    config = InferConfig(inputs, export_dir, tmp_path / "t.csv", progress=False)
    for name, value in change.items():
        setattr(config, name, value)
    with pytest.raises(ConfigError, match=message):
        run_inference(config)


def test_importing_the_runtime_loads_no_torch():
    modules = sorted(p.stem for p in (REPO / "imfree" / "runtime").glob("[!_]*.py"))
    script = (
        f"import sys, {', '.join(f'imfree.runtime.{m}' for m in modules)}\n"
        "banned = [m for m in sys.modules if m.split('.')[0] in ('torch', 'open_clip')\n"
        "          or m.startswith(('imfree.toolkit', 'imfree.models', 'imfree.export'))]\n"
        "assert not banned, banned\n"
    )
    environment = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-c", script],
        env=environment,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


def test_runtime_sources_import_nothing_across_the_wall():
    banned = ("torch", "open_clip", "imfree.toolkit", "imfree.models", "imfree.export")
    for path in (REPO / "imfree" / "runtime").glob("*.py"):
        # The PyTorch engine may use torch, and is imported only when chosen.
        banned_here = banned[1:] if path.name == "torch_engine.py" else banned
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert not name.startswith(banned_here), f"{path.name} imports {name}"
