"""The `imfree` command: in-process through CliRunner, and as a real process for exit codes."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from imfree.cli import app
from imfree.errors import ArtifactError, ModelLoadError

REPO = Path(__file__).resolve().parents[1]
IMFREE = REPO / ".venv" / "bin" / "imfree"


@pytest.fixture
def cli():
    runner = CliRunner()

    def invoke(*args):
        return runner.invoke(app, [str(a) for a in args])

    return invoke


def run_imfree(*args, cwd):
    if not IMFREE.exists():
        pytest.fail(f"{IMFREE} is missing; install the package into .venv (pip install -e .)")
    return subprocess.run([str(IMFREE), *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def assert_one_error_line(process):
    assert process.returncode == 1, process.stderr
    lines = [line for line in process.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, process.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in process.stderr + process.stdout


# --- in process -----------------------------------------------------------------------------


def test_help_lists_the_commands(cli):
    result = cli("--help")
    assert result.exit_code == 0
    for command in ("train", "export", "infer", "labels"):
        assert command in result.output


def test_labels_lists_the_bundled_sets(cli):
    result = cli("labels")
    assert result.exit_code == 0
    assert "voc2007" in result.output.split()


def test_labels_shows_a_bundled_tree(cli):
    result = cli("labels", "voc2007")
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert lines[0] == "voc2007: 20 classes"
    assert lines[1] == "root"
    assert any(line.endswith(": cow, sheep") for line in lines)  # class order


def test_labels_shows_a_label_set_folder(cli, tiny_labels):
    result = cli("labels", tiny_labels)
    assert result.exit_code == 0
    assert "tinyset: 6 classes" in result.output
    assert "    pets: cat, dog" in result.output


def test_train_zero_shot_through_the_cli(cli, tiny_labels, tmp_path):
    out = tmp_path / "zs"
    result = cli("train", "--labels", tiny_labels, "--model", "imfree-tiny-rn",
                 "--pretrained", "none", "--zero-shot", "--hand-prompt", "single", "--out", out)
    assert result.exit_code == 0, result.output
    assert f"zero-shot classifier for {tiny_labels}" in result.output
    assert json.loads((out / "classifier.json").read_text())["kind"] == "zero-shot"


def test_train_flags_override_the_config_file(cli, tiny_labels, tmp_path):
    config = tmp_path / "train.toml"
    config.write_text(
        f'[train]\nlabels = "{tiny_labels}"\nmodel = "imfree-tiny-vit"\npretrained = "none"\n'
        f'epochs = 5\nbatch_size = 64\nhand_prompt = "single"\ndevice = "cpu"\n'
        f"root_tokens = 2\nfine_tokens = 2\ncoarse_tokens = 1\nclass_tokens = 1\n"
        f"local_tokens = 2\n"
    )
    out = tmp_path / "clf"
    result = cli("train", "--config", config, "--epochs", "1", "--seed", "5", "--out", out)
    assert result.exit_code == 0, result.output
    training = json.loads((out / "classifier.json").read_text())["training"]
    assert training["epochs"] == 1 and training["seed"] == 5  # flags
    assert training["batch_size"] == 64 and training["model"] == "imfree-tiny-vit"  # file
    assert len(training["loss_per_epoch"]) == 1


def test_train_unknown_model_raises_a_model_load_error(cli):
    result = cli("train", "--model", "NOPE", "--pretrained", "none")
    assert result.exit_code == 1
    assert isinstance(result.exception, ModelLoadError)


def test_export_missing_artifact_raises_an_artifact_error(cli, tmp_path):
    result = cli("export", tmp_path / "missing_dir", "--out", tmp_path / "x")
    assert result.exit_code == 1
    assert isinstance(result.exception, ArtifactError)
    assert not (tmp_path / "x").exists()


def test_export_prints_the_parity_report(cli, trained_artifacts, real_photos, tmp_path):
    out = tmp_path / "export"
    result = cli("export", trained_artifacts("imfree-tiny-rn"), "--out", out,
                 "--parity-images", real_photos)
    assert result.exit_code == 0, result.output
    for batch in (1, 7, 32):
        assert f"✓ batch {batch:>3}" in result.output
    assert f"export written to {out}" in result.output
    assert (out / "model.onnx").exists()


@pytest.mark.parametrize(
    "args",
    [("train", "--no-such-option"), ("export", "a", "--out", "b", "--bogus"), ("nonsense",),
     ("train", "--epochs", "-1"), ("export", "a")],
)
def test_usage_errors_exit_2(cli, args):
    assert cli(*args).exit_code == 2


# --- as a real process: exit codes and one-line errors ----------------------------------------


def test_process_train_unknown_model(tmp_path):
    process = run_imfree("train", "--model", "NOPE", "--pretrained", "none", cwd=tmp_path)
    assert_one_error_line(process)
    assert "unknown model 'NOPE'" in process.stderr


def test_process_export_missing_artifact(tmp_path):
    process = run_imfree("export", "missing_dir", "--out", "x", cwd=tmp_path)
    assert_one_error_line(process)
    assert "missing_dir" in process.stderr
    assert not (tmp_path / "x").exists()


def test_process_infer_missing_export(tmp_path, real_photos):
    process = run_imfree("infer", real_photos, "--model", tmp_path / "no_export",
                         "--out", tmp_path / "tags.csv", cwd=tmp_path)
    assert_one_error_line(process)
    assert "no_export" in process.stderr
    assert not (tmp_path / "tags.csv").exists()


def test_process_unknown_option_exits_2(tmp_path):
    process = run_imfree("train", "--no-such-option", cwd=tmp_path)
    assert process.returncode == 2
    assert "No such option" in process.stderr
    assert "Traceback" not in process.stderr


def test_process_labels_lists_voc2007(tmp_path):
    process = run_imfree("labels", cwd=tmp_path)
    assert process.returncode == 0, process.stderr
    assert "voc2007" in process.stdout.split()
