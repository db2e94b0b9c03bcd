"""`imfree eval` end to end on the real photos: artifacts side by side, infer outputs, errors."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score
from typer.testing import CliRunner

from imfree.cli import app
from imfree.evaluation import EvalConfig, EvalSet, run_eval
from imfree.runtime import pipeline
from imfree.runtime.images import decode_image
from imfree.runtime.writers import Row, open_writer

REPO = Path(__file__).resolve().parents[1]
PHOTOS = REPO / "examples" / "images"
LABELS = PHOTOS / "labels.csv"
# The tiny label set's classes that examples/images/labels.csv's voc_labels use.
SHARED = ["dog", "car", "person"]


@pytest.fixture(scope="module")
def artifacts(trained_artifacts, tiny_labels, make_train_config, tmp_path_factory):
    """A trained and a zero-shot artifact on the same tiny ResNet (same weights, same size)."""
    from imfree.toolkit.train import train

    out = tmp_path_factory.mktemp("eval") / "zero-shot"
    zero_shot = train(make_train_config(tiny_labels, "imfree-tiny-rn", out, zero_shot=True))
    return trained_artifacts("imfree-tiny-rn"), zero_shot


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def reference_scores(artifact_dir: Path, paths: list[Path]) -> np.ndarray:
    """The artifact's scores computed here directly: decode_image, then ScoringGraph."""
    from imfree.export.graph import ScoringGraph
    from imfree.models import load_backbone
    from imfree.toolkit.artifact import load_artifact

    artifact = load_artifact(artifact_dir)
    height, width = artifact.preprocess.image_size
    images = np.stack([decode_image(p, height, width, draft=True) for p in paths])
    graph = ScoringGraph(load_backbone(artifact.model_name, "none"), artifact).eval()
    with torch.inference_mode():
        scores = graph(torch.from_numpy(images)).numpy()
    columns = [artifact.classes.index(name) for name in SHARED]
    return scores[:, columns]


def test_two_artifacts_side_by_side_decode_the_images_once(artifacts, tmp_path, monkeypatch):
    decoded = []
    real_iter_batches = pipeline.iter_batches

    def counting(paths, *args, **kwargs):
        decoded.append(len(paths))
        return real_iter_batches(paths, *args, **kwargs)

    monkeypatch.setattr(pipeline, "iter_batches", counting)
    report_md, report_json = tmp_path / "report.md", tmp_path / "report.json"

    result = cli("eval", *artifacts, "--dataset", f"csv:{LABELS}", "--label-column",
                 "voc_labels", "--out", report_md, "--json", report_json, "--device", "cpu")

    assert result.exit_code == 0, result.output
    assert decoded == [7]  # one decode pass for both graphs
    figures = json.loads(report_json.read_text())
    assert figures["classes"] == SHARED and figures["classes_without_positive"] == []
    left_out = figures["classes_left_out"][artifacts[0].name]
    assert left_out == ["bicycle", "bird", "horse"]
    trained, zero_shot = figures["sources"]
    assert (trained["name"], zero_shot["name"]) == (artifacts[0].name, artifacts[1].name)
    assert trained["images"] == zero_shot["images"] == 7
    assert trained["map"] != zero_shot["map"]  # two classifiers, two results
    assert report_md.read_text() in result.output
    assert "| class |" in result.output and "| dog |" in result.output

    # The figures agree with scores computed here and scikit-learn's AP.
    photos = [PHOTOS / row["file"] for row in csv.DictReader(LABELS.open())]
    targets = np.array([[name in row["voc_labels"].split(";") for name in SHARED]
                        for row in csv.DictReader(LABELS.open())])
    scores = reference_scores(artifacts[0], photos)
    expected = [average_precision_score(targets[:, c], scores[:, c]) for c in range(3)]
    assert trained["per_class_ap"] == pytest.approx(dict(zip(SHARED, expected, strict=True)),
                                                    abs=1e-6)
    assert trained["map"] == pytest.approx(np.mean(expected), abs=1e-6)
    for key in ("cf1_top3", "of1_top3", "cf1_threshold", "of1_threshold"):
        assert 0.0 <= trained[key] <= 1.0
    assert trained["threshold"] == pytest.approx(2 / 6) and trained["normalised"] is False


def test_an_infer_output_scores_like_its_artifact(artifacts, tmp_path):
    trained = artifacts[0]
    exported = cli("export", trained, "--out", tmp_path / "export", "--parity-images", PHOTOS)
    assert exported.exit_code == 0, exported.output
    tagged = cli("infer", PHOTOS, "--model", tmp_path / "export", "--out",
                 tmp_path / "tags.csv", "--all-scores", "--engine", "ort-cpu")
    assert tagged.exit_code == 0, tagged.output

    report = run_eval(EvalConfig(sources=[trained, tmp_path / "tags.csv"],
                                 dataset=f"csv:{LABELS}", label_column="voc_labels",
                                 device="cpu"))

    from_artifact, from_file = report.results
    assert from_file.name == "tags.csv" and from_file.images == 7
    assert from_file.map == pytest.approx(from_artifact.map, abs=1e-4)
    for name in SHARED:
        assert from_file.per_class_ap[name] == pytest.approx(from_artifact.per_class_ap[name],
                                                             abs=1e-4)


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet", ".csv"])
def test_infer_outputs_are_read_in_every_format_with_error_rows_left_out(tmp_path, suffix):
    classes = ["person", "dog", "horse", "bird"]
    rng = np.random.default_rng(0)
    photos = sorted(PHOTOS.glob("*.jpg"))
    scores = rng.random((len(photos), len(classes))).astype(np.float32)
    out = tmp_path / f"tags{suffix}"
    with open_writer(out, classes, all_scores=True) as writer:
        writer.write_rows([Row(str(p), "ok", scores=s) for p, s in zip(photos[1:], scores[1:],
                                                                        strict=True)])
        writer.write_rows([Row(str(photos[0]), "error", error="truncated image")])

    report = run_eval(EvalConfig(sources=[out], dataset=f"csv:{LABELS}",
                                 label_column="voc_labels", normalise="per-image"))

    raw, normalised = report.results
    assert (raw.images, raw.failed) == (len(photos) - 1, 1)
    assert report.classes == ["dog", "bird", "horse", "person"]
    assert normalised.normalised and normalised.cf1_threshold is None
    assert "(per-image)" in report.markdown


def test_images_that_fail_to_decode_are_counted_not_fatal(artifacts, tmp_path):
    folder = tmp_path / "photos"
    shutil.copytree(PHOTOS, folder)
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    with open(folder / "labels.csv", "a") as handle:
        handle.write("broken.jpg,dog,dog,\n")

    report = run_eval(EvalConfig(sources=[artifacts[0]], dataset=f"csv:{folder / 'labels.csv'}",
                                 label_column="voc_labels", device="cpu", batch_size=3))

    (result,) = report.results
    assert (result.images, result.failed) == (7, 1)
    assert "| 7 (1 failed) |" in report.markdown


def test_voc_difficult_pairs_are_reported_both_ways(artifacts):
    photos = sorted(PHOTOS.glob("*.jpg"))
    targets = np.zeros((len(photos), 2), bool)
    targets[[0, 3], 0] = True  # "dog" in two images
    targets[[1, 2], 1] = True  # "person" in two images
    difficult = np.zeros_like(targets)
    difficult[4:, 0] = True  # "dog" only as difficult objects in the rest
    evalset = EvalSet("voc2007 test", photos, ["dog", "person"], targets, difficult,
                      len(photos))

    report = run_eval(EvalConfig(sources=[artifacts[0]], dataset=evalset, device="cpu",
                                 normalise="per-image"))

    rules = [(r.difficult, r.normalised) for r in report.results]
    assert rules == [("ignore", False), ("ignore", True), ("negative", False),
                     ("negative", True)]
    ignored, negative = report.results[0], report.results[2]
    assert ignored.per_class_ap["person"] == negative.per_class_ap["person"]
    assert ignored.per_class_ap["dog"] >= negative.per_class_ap["dog"]
    assert "difficult ignore" in report.markdown and "difficult negative" in report.markdown
    only = run_eval(EvalConfig(sources=[artifacts[0]], dataset=evalset, device="cpu",
                               difficult="negative", limit=5))
    assert [r.difficult for r in only.results] == ["negative"]
    assert only.results[0].images == 5


def test_a_dataset_without_a_shared_class_is_an_error(artifacts, tmp_path):
    from imfree.evaluation.datasets import DatasetError

    labels = tmp_path / "labels.csv"
    labels.write_text(f"path,labels\n{PHOTOS / 'giraffe.jpg'},giraffe;zebra\n")
    with pytest.raises(DatasetError, match="no class of .* is among the classes of"):
        run_eval(EvalConfig(sources=[artifacts[0]], dataset=f"csv:{labels}"))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--dataset", "voc2007:no/such/folder"], "no/such/folder holds no VOC2007 devkit"),
        (["--dataset", "csv:missing.csv"], "cannot read the dataset CSV missing.csv"),
    ],
)
def test_bad_datasets_are_one_line_errors(tmp_path, args, message):
    process = subprocess.run(
        [sys.executable, "-m", "imfree.cli", "eval", str(tmp_path), *args],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )
    assert process.returncode == 1, process.stderr
    lines = [line for line in process.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]


def test_sources_that_cannot_be_scored_are_named(tmp_path):
    from imfree.errors import ConfigError

    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "imfree_export.json").write_text("{}")
    (tmp_path / "plain.csv").write_text("path,status\nx.jpg,ok\n")
    dataset = f"csv:{LABELS}"
    cases = [(tmp_path / "export", "is an export folder"),
             (tmp_path / "nothing", "neither a classifier artifact"),
             (tmp_path / "plain.csv", "holds no per-class scores"),
             (tmp_path / "tags.jsonl", "not a finished output")]
    for source, message in cases:
        with pytest.raises(ConfigError, match=message):
            run_eval(EvalConfig(sources=[source], dataset=dataset, label_column="voc_labels"))


def test_a_report_that_cannot_be_written_fails_before_scoring(artifacts, tmp_path, monkeypatch):
    from imfree.errors import ConfigError
    from imfree.evaluation import report

    def no_scoring(*args, **kwargs):
        raise AssertionError("images were scored before the outputs were checked")

    monkeypatch.setattr(report, "score_sources", no_scoring)
    with pytest.raises(ConfigError, match="it is a folder"):
        run_eval(EvalConfig(sources=[str(artifacts[0])], dataset=f"csv:{LABELS}",
                            label_column="voc_labels", json_out=tmp_path))
