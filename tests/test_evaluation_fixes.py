"""Regressions from the tester's report on `imfree eval`: outputs that would replace inputs,
bad predictions files, a `--ray` folder as a source, a source that scored nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from imfree.errors import ConfigError
from imfree.evaluation import EvalConfig, run_eval
from imfree.runtime.writers import Row, open_writer

REPO = Path(__file__).resolve().parents[1]
PHOTOS = REPO / "examples" / "images"
LABELS = PHOTOS / "labels.csv"
CLASSES = ["person", "dog", "horse", "bird"]


@pytest.fixture
def tags(tmp_path) -> Path:
    """An `imfree infer --all-scores` output over the photos, with made-up scores."""
    photos = sorted(PHOTOS.glob("*.jpg"))
    scores = np.random.default_rng(0).random((len(photos), len(CLASSES))).astype(np.float32)
    out = tmp_path / "tags.csv"
    with open_writer(out, CLASSES, all_scores=True) as writer:
        writer.write_rows([Row(str(p), "ok", scores=s) for p, s in zip(photos, scores,
                                                                        strict=True)])
    return out


def _eval(source: Path, **options):
    return run_eval(EvalConfig(sources=[source], dataset=options.pop("dataset", f"csv:{LABELS}"),
                               label_column="voc_labels", **options))


def test_reports_never_replace_an_input_or_each_other(tags, tmp_path):
    dataset = tmp_path / "labels.csv"
    shutil.copy(LABELS, dataset)
    artifact_like = tmp_path / "run"
    artifact_like.mkdir()
    (artifact_like / "classifier.json").write_text("{}")
    before = tags.read_bytes(), dataset.read_bytes()

    cases = [(dict(out=tags), "input of this evaluation"),
             (dict(out=dataset, dataset=f"csv:{dataset}"), "input of this evaluation"),
             (dict(out=tmp_path / "same.md", json_out=tmp_path / "same.md"), "both name")]
    for options, message in cases:
        with pytest.raises(ConfigError, match=message):
            _eval(tags, **options)
    with pytest.raises(ConfigError, match="a file in"):
        run_eval(EvalConfig(sources=[artifact_like], dataset=f"csv:{LABELS}",
                            json_out=artifact_like / "classifier.json"))

    assert (tags.read_bytes(), dataset.read_bytes()) == before
    assert (artifact_like / "classifier.json").read_text() == "{}"


def test_a_jsonl_line_that_is_not_an_object_is_one_error(tags, tmp_path):
    out = tmp_path / "bad.jsonl"
    out.write_text("[1, 2]\n")
    with pytest.raises(ConfigError, match="line 1 is not a JSON object"):
        _eval(out)


def test_a_nan_score_is_named_while_reading(tags, tmp_path, monkeypatch):
    from imfree.evaluation import report

    lines = tags.read_text().splitlines()
    cells = lines[3].split(",")
    cells[-1] = "nan"
    bad = tmp_path / "nan.csv"
    bad.write_text("\n".join([*lines[:3], ",".join(cells), *lines[4:]]) + "\n")
    monkeypatch.setattr(report, "_source_results", _never)

    with pytest.raises(ConfigError, match=r"row 3 \(.*\) holds a missing, NaN"):
        _eval(bad)


def _never(*args, **kwargs):
    raise AssertionError("figures were computed from a NaN score")


def test_a_ray_folder_is_a_source(tmp_path, tags):
    pq = pytest.importorskip("pyarrow.parquet", reason="Ray output is Parquet: needs pyarrow")
    from imfree.runtime.ray_shards import plan_shards, write_manifest, write_shard
    from imfree.runtime.writers import _parquet_scores, read_scores

    # The folder a --ray run writes: the same rows, in two shards and a manifest.
    parquet = tmp_path / "tags.parquet"
    table = read_scores(tags)
    with open_writer(parquet, table.classes, all_scores=True) as writer:
        writer.write_rows([Row(p, "ok", scores=s) for p, s in zip(table.paths, table.scores,
                                                                   strict=True)])
    records = pq.read_table(parquet).to_pylist()
    for record in records:
        record["scores"] = {n: record.pop(f"score:{n}") for n in table.classes}
    folder = tmp_path / "rayout"
    folder.mkdir()
    shards = plan_shards(len(records), 2, 4)
    for shard in shards:
        write_shard(folder, shard, records[shard.first:shard.stop], table.classes, True)
    write_manifest(folder, {}, shards, complete=True)
    assert _parquet_scores(parquet)[0]  # the reference rows read

    from_folder, from_file = _eval(folder), _eval(tags)

    assert from_folder.results[0].map == pytest.approx(from_file.results[0].map, abs=1e-6)
    assert from_folder.results[0].images == len(records)


def test_a_source_that_decodes_no_image_is_an_error(trained_artifacts, tmp_path, caplog):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    (folder / "labels.csv").write_text("path,voc_labels\nbroken.jpg,dog\n")

    with pytest.raises(ConfigError, match="none of the 1 images .* could be decoded.*broken.jpg"):
        run_eval(EvalConfig(sources=[trained_artifacts("imfree-tiny-rn")], device="cpu",
                            dataset=f"csv:{folder / 'labels.csv'}", label_column="voc_labels"))


def test_the_json_report_is_still_written(tags, tmp_path):
    out = tmp_path / "report.json"
    _eval(tags, json_out=out)
    assert json.loads(out.read_text())["sources"]


def _coco(tmp_path: Path, document) -> Path:
    (tmp_path / "val2014").mkdir(exist_ok=True)
    shutil.copy(PHOTOS / "dog.jpg", tmp_path / "val2014" / "a.jpg")
    path = tmp_path / "instances_val2014.json"
    path.write_text(json.dumps(document))
    return path


GOOD_CATEGORIES = [{"id": 18, "name": "dog"}]
GOOD_IMAGES = [{"id": 10, "file_name": "a.jpg"}]


@pytest.mark.parametrize("document, message", [
    ([1, 2], "holds a JSON list, not an object"),
    ({"images": GOOD_IMAGES, "categories": GOOD_CATEGORIES, "annotations": None},
     '"annotations" is NoneType, not a list'),
    ({"images": [{"id": 10, "file_name": None}], "categories": GOOD_CATEGORIES},
     "image 10 has no file_name"),
    ({"images": [], "categories": GOOD_CATEGORIES}, "lists no images"),
    ({"images": GOOD_IMAGES, "categories": [{"id": "x", "name": "dog"}, *GOOD_CATEGORIES]},
     "an id is not a number"),
    ({"images": GOOD_IMAGES, "categories": GOOD_CATEGORIES,
      "annotations": [{"id": 7, "image_id": 99, "category_id": 18}]},
     "annotation 0 \\(id 7\\) names image_id 99, which no image has"),
    ({"images": GOOD_IMAGES, "categories": GOOD_CATEGORIES,
      "annotations": [{"id": 7, "image_id": 10, "category_id": 3}]},
     "names category_id 3, which no category has"),
])
def test_coco_problems_are_named_plainly(tmp_path, document, message):
    from imfree.evaluation.datasets import DatasetError, read_coco

    with pytest.raises(DatasetError, match=message) as raised:
        read_coco(_coco(tmp_path, document), tmp_path / "val2014")
    assert "is missing or unknown" not in str(raised.value)


def test_a_parquet_row_of_a_name_that_is_not_utf8_matches_its_image(tmp_path):
    pytest.importorskip("pyarrow", reason="Parquet output needs pyarrow")
    import os

    from imfree.evaluation import EvalSet

    odd, plain = tmp_path / os.fsdecode(b"caf\xe9.jpg"), tmp_path / "plain.jpg"
    for path in (odd, plain):
        shutil.copy(PHOTOS / "dog.jpg", path)
    out = tmp_path / "tags.parquet"
    with open_writer(out, ["dog", "cat"], all_scores=True) as writer:
        writer.write_rows([Row(str(odd), "ok", scores=np.array([0.9, 0.1], np.float32)),
                           Row(str(plain), "ok", scores=np.array([0.2, 0.8], np.float32))])
    evalset = EvalSet("odd", [odd, plain], ["dog", "cat"], np.array([[1, 0], [0, 1]], bool),
                      listed=2)

    (result,) = run_eval(EvalConfig(sources=[out], dataset=evalset)).results

    assert (result.images, result.failed) == (2, 0) and result.map == pytest.approx(1.0)


def test_ctrl_c_in_eval_says_it_was_interrupted(tags, monkeypatch, capsys):
    import sys

    import imfree.evaluation
    from imfree import cli

    def interrupted(config):
        raise KeyboardInterrupt

    monkeypatch.setattr(imfree.evaluation, "run_eval", interrupted)
    monkeypatch.setattr(sys, "argv", ["imfree", "eval", str(tags), "--dataset", f"csv:{LABELS}"])
    with pytest.raises(SystemExit) as exited:
        cli.main()

    assert exited.value.code == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "interrupted"
