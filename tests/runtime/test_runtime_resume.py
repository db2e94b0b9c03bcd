"""Stopping and resuming through the CLI: signals, SIGKILL, --resume, and no torch."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from imfree.runtime.infer import InferConfig, run_inference
from imfree.runtime.writers import partial_path

REPO = Path(__file__).resolve().parents[2]
BATCH = 4
IMAGES = 48

# The CLI with an engine slowed down per batch, so that a signal lands mid-run.
SLOW_CLI = """
import sys, time
from imfree.runtime import engines
delay = float(sys.argv.pop(1))
original = engines.OrtEngine.run
def slow(self, images):
    time.sleep(delay)
    return original(self, images)
engines.OrtEngine.run = slow
from imfree.cli import main
sys.argv[0] = "imfree"
main()
"""

# The CLI in an environment where the training stack cannot be imported.
NO_TORCH_CLI = """
import sys
from importlib.abc import MetaPathFinder
BLOCKED = {"torch", "torchvision", "open_clip", "onnx", "onnxscript", "safetensors"}
class Block(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, Block())
from imfree.cli import main
sys.argv[0] = "imfree"
try:
    main()
finally:
    loaded = sorted(m for m in BLOCKED if m in sys.modules)
    assert not loaded, loaded
"""


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """48 small images of different colours, a few bad files among them."""
    folder = tmp_path_factory.mktemp("resume") / "images"
    folder.mkdir()
    for i in range(IMAGES):
        colour = (i * 5 % 256, i * 37 % 256, i * 91 % 256)
        Image.new("RGB", (40 + i, 30), colour).save(folder / f"{i:03d}.png")
    for i in (7, 30):
        (folder / f"{i:03d}-bad.jpg").write_bytes(b"not a jpeg")
    return folder


def _run_cli(args, delay=None, **options) -> subprocess.Popen:
    script = NO_TORCH_CLI if delay is None else SLOW_CLI
    extra = [] if delay is None else [str(delay)]
    environment = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-c", script, *extra, *map(str, args)],
        cwd=REPO, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        **options,
    )


def _infer_args(folder: Path, export_dir: Path, out: Path) -> list:
    return ["infer", folder, "--model", export_dir, "--out", out, "--batch", BATCH,
            "--workers", 1, "--all-scores"]


def _wait_for_rows(path: Path, rows: int, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().count("\n") >= rows:
            return
        assert process.poll() is None, process.communicate()
        time.sleep(0.05)
    pytest.fail(f"{path} never reached {rows} rows")


@pytest.fixture(scope="module")
def uninterrupted(folder, tmp_path_factory) -> dict[str, bytes]:
    """The output of a run that was never stopped, per suffix."""
    from conftest import tiny_manifest, tiny_model

    from imfree.runtime.bundle import write_manifest

    export_dir = tmp_path_factory.mktemp("resume-export")
    tiny_model(export_dir / "model.onnx")
    write_manifest(export_dir, tiny_manifest(export_dir / "model.onnx"))
    outputs = {}
    for suffix in (".csv", ".jsonl"):
        out = export_dir / f"whole{suffix}"
        run_inference(InferConfig(folder, export_dir, out, batch_size=BATCH, all_scores=True,
                                  decode_workers=1, progress=False))
        outputs[suffix] = out.read_bytes()
    return outputs


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_a_run_killed_with_sigkill_resumes_to_the_same_rows(
    folder, export_dir, tmp_path, uninterrupted, suffix
):
    out = tmp_path / f"tags{suffix}"
    process = _run_cli(_infer_args(folder, export_dir, out), delay=0.15)
    _wait_for_rows(partial_path(out), 3 * BATCH, process)

    process.kill()  # SIGKILL: no handler runs, nothing is flushed or renamed
    process.communicate(timeout=30)
    assert not out.exists() and partial_path(out).exists()

    resumed = _run_cli([*_infer_args(folder, export_dir, out), "--resume"], delay=0)
    stdout, stderr = resumed.communicate(timeout=120)

    assert resumed.returncode == 0, stderr
    assert out.read_bytes() == uninterrupted[suffix]
    assert not partial_path(out).exists()
    skipped = int(stdout.split(" skipped")[0].rsplit(" ", 1)[1])
    assert 3 * BATCH <= skipped < IMAGES + 2


@pytest.mark.parametrize(("stop", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_finishes_the_batch_and_says_how_to_resume(
    folder, export_dir, tmp_path, uninterrupted, stop, status
):
    out = tmp_path / "tags.csv"
    # A session of its own, so that Ctrl-C can be sent as a terminal does: to the
    # whole process group, decode workers included.
    process = _run_cli(_infer_args(folder, export_dir, out), delay=0.3, start_new_session=True)
    _wait_for_rows(partial_path(out), 1 + BATCH, process)

    os.killpg(process.pid, stop)
    stdout, stderr = process.communicate(timeout=30)

    assert process.returncode == status, stderr
    assert "Traceback" not in stderr
    assert f"stopped by {stop.name}" in stderr and "--resume" in stderr.splitlines()[-1]
    assert not out.exists()
    rows = partial_path(out).read_text().count("\n") - 1  # less the header
    assert rows % BATCH == 0 and BATCH <= rows < IMAGES  # whole batches, written

    command = stderr.splitlines()[-1].split("To continue: ")[1].split()
    assert command[:2] == ["imfree", "infer"] and command[-1] == "--resume"
    resumed = _run_cli(command[1:], delay=0)
    _, stderr = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, stderr
    assert out.read_bytes() == uninterrupted[".csv"]


def test_a_finished_output_is_resumed_without_work(folder, export_dir, tmp_path):
    out = tmp_path / "tags.jsonl"
    config = InferConfig(folder, export_dir, out, batch_size=BATCH, progress=False)
    first = run_inference(config)
    before = out.read_bytes()

    config.resume = True
    again = run_inference(config)

    assert out.read_bytes() == before
    assert (again.images_skipped, again.images_ok, again.images_failed) == (IMAGES + 2, 0, 0)
    assert first.images_skipped == 0


def test_tagging_works_without_torch(folder, export_dir, tmp_path):
    out = tmp_path / "tags.csv"
    process = _run_cli(["infer", folder, "--model", export_dir, "--out", out])
    stdout, stderr = process.communicate(timeout=120)

    assert process.returncode == 0, stderr
    assert f"{IMAGES} images tagged, 2 failed" in stdout
    assert "decoding" in stderr and "engine" in stderr and "overall" in stderr


@pytest.mark.parametrize("command", [["train", "--labels", "voc2007"], ["export", ".", "--out",
                                                                       "x"]])
def test_training_without_torch_says_what_to_install(command):
    process = _run_cli(command)
    _, stderr = process.communicate(timeout=120)

    lines = stderr.strip().splitlines()
    assert process.returncode == 1
    assert len(lines) == 1 and "pip install 'imfree[train]'" in lines[0], stderr
