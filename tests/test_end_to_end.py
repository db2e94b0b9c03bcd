"""The whole job through the CLI's front door: train, export, infer on the real photos."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ROOT / "examples" / "images"


def imfree(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "imfree.cli", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["imfree-tiny-rn", "imfree-tiny-vit"])
def test_train_export_infer_on_the_real_photos(tmp_path: Path, model: str) -> None:
    photos = sorted(p.name for p in PHOTOS.glob("*.jpg"))
    images = tmp_path / "images"
    shutil.copytree(PHOTOS, images)
    (images / "notes").mkdir()
    (images / "notes" / "broken.jpg").write_text("not a jpeg")

    trained = imfree("train", "--labels", "voc2007", "--model", model, "--pretrained", "none",
                     "--epochs", "2", "--out", str(tmp_path / "clf"))
    assert trained.returncode == 0, trained.stderr
    metadata = json.loads((tmp_path / "clf" / "classifier.json").read_text())
    assert metadata["training"]["epochs"] == 2 and len(metadata["classes"]) == 20

    exported = imfree("export", str(tmp_path / "clf"), "--out", str(tmp_path / "export"))
    assert exported.returncode == 0, exported.stderr
    for batch in (1, 7, 32):
        assert f"✓ batch {batch:>3}" in exported.stdout
    assert "largest score difference" in exported.stdout

    tagged = imfree("infer", str(images), "--model", str(tmp_path / "export"),
                    "--out", str(tmp_path / "tags.csv"), "--batch", "4", "--engine", "ort-cpu")
    assert tagged.returncode == 0, tagged.stderr
    assert "engine ort-cpu" in tagged.stdout

    rows = list(csv.DictReader((tmp_path / "tags.csv").open()))
    names = [Path(r["path"]).name for r in rows]
    assert sorted(names) == sorted(photos + ["broken.jpg"])
    by_name = {Path(r["path"]).name: r for r in rows}
    assert by_name["broken.jpg"]["status"] == "error" and by_name["broken.jpg"]["error"]
    for name in photos:
        top = by_name[name]["top_k"].split(";")
        assert by_name[name]["status"] == "ok" and len(top) == 5


@pytest.mark.slow
def test_rn50_with_random_weights_runs_the_whole_job(tmp_path: Path) -> None:
    """The paper's backbone at full size; one epoch keeps it to a minute or two."""
    steps = [
        ("train", "--labels", "voc2007", "--model", "RN50", "--pretrained", "none",
         "--epochs", "1", "--hand-prompt", "single", "--out", str(tmp_path / "clf")),
        ("export", str(tmp_path / "clf"), "--out", str(tmp_path / "export")),
        ("infer", str(PHOTOS), "--model", str(tmp_path / "export"),
         "--out", str(tmp_path / "tags.jsonl")),
    ]
    for step in steps:
        done = imfree(*step)
        assert done.returncode == 0, done.stderr

    rows = [json.loads(line) for line in (tmp_path / "tags.jsonl").read_text().splitlines()]
    assert len(rows) == len(list(PHOTOS.glob("*.jpg")))
    assert all(row["status"] == "ok" for row in rows)


@pytest.mark.slow
def test_zero_shot_artifact_exports_too(tmp_path: Path) -> None:
    trained = imfree("train", "--labels", "voc2007", "--model", "imfree-tiny-rn",
                     "--pretrained", "none", "--zero-shot", "--hand-prompt", "single",
                     "--out", str(tmp_path / "zs"))
    assert trained.returncode == 0, trained.stderr
    assert json.loads((tmp_path / "zs" / "classifier.json").read_text())["kind"] == "zero-shot"

    exported = imfree("export", str(tmp_path / "zs"), "--out", str(tmp_path / "export"))
    assert exported.returncode == 0, exported.stderr
