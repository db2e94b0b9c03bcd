"""Bad input found by trying the product as a new user: each is one clear error, no traceback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from imfree.errors import ArtifactError, ConfigError
from imfree.toolkit import train as training
from imfree.toolkit.artifact import TENSORS, load_artifact
from imfree.toolkit.corpus import read_corpus
from imfree.toolkit.labelsets import read_classes
from imfree.toolkit.train import config_from_layers


def write_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "train.toml"
    path.write_text(text)
    return path


def test_toml_top_level_keys_and_train_table_both_count(tmp_path):
    path = write_toml(tmp_path, 'epochs = 3\nseed = 5\n[train]\nmodel = "imfree-tiny-rn"\n'
                                'seed = 7\n')
    config = config_from_layers(path, {})
    assert (config.epochs, config.seed, config.model) == (3, 7, "imfree-tiny-rn")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[export]\nthreshold = 0.2\n', r"unknown table\(s\) \[export\]"),
        ('epochs = "two"\n', "epochs must be int"),
        ('lr = "fast"\n', "lr must be int or float"),
        ("lr = -1.0\n", "lr must be >= 0"),
        ("milestones = 5\n", "milestones must be list"),
        ('milestones = ["5"]\n', "list of integers"),
        ('device = "foo"\n', "unknown device 'foo'"),
        ("train = 3\n", "must be a table"),
    ],
)
def test_toml_values_of_the_wrong_kind_are_config_errors(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        config_from_layers(write_toml(tmp_path, text), {})


def test_toml_that_is_not_utf8_is_a_config_error(tmp_path):
    path = tmp_path / "train.toml"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match="not UTF-8"):
        config_from_layers(path, {})


def test_label_set_problems_surface_before_the_model_loads(monkeypatch, tmp_path):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the label set was checked")

    monkeypatch.setattr(training, "load_backbone", no_model)
    config = config_from_layers(None, {"labels": str(tmp_path / "nope"), "out": str(tmp_path)})
    with pytest.raises(ConfigError, match="unknown label set"):
        training.train(config)


def test_an_existing_file_as_out_is_refused_before_training(monkeypatch, tmp_path, tiny_labels):
    monkeypatch.setattr(training, "load_backbone", lambda *a, **k: pytest.fail("loaded"))
    target = tmp_path / "afile"
    target.write_text("mine")
    config = config_from_layers(None, {"labels": str(tiny_labels), "out": str(target)})
    with pytest.raises(ArtifactError, match="not a folder"):
        training.train(config)
    assert target.read_text() == "mine"


def test_tensors_from_another_artifact_are_refused(tmp_path, trained_artifacts):
    mixed = shutil.copytree(trained_artifacts("imfree-tiny-rn"), tmp_path / "mixed")
    shutil.copy(trained_artifacts("imfree-tiny-vit") / TENSORS, mixed / TENSORS)
    with pytest.raises(ArtifactError, match="hash differs"):
        load_artifact(mixed)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ({"sentence": "a car", "labels": [1]}, "unknown class 1"),
        ({"sentence": "a car", "labels": [["car"]]}, r"unknown class \['car'\]"),
        ({"sentence": "  ", "labels": ["car"]}, "non-empty 'sentence'"),
    ],
)
def test_corpus_lines_with_odd_values_are_config_errors(tmp_path, line, message):
    path = tmp_path / "corpus.jsonl"
    path.write_text(json.dumps(line) + "\n")
    with pytest.raises(ConfigError, match=message):
        read_corpus(path, ["car", "dog"])


def test_corpus_that_is_not_utf8_is_a_config_error(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_bytes(b'{"sentence": "\xff"}\n')
    with pytest.raises(ConfigError, match="not UTF-8"):
        read_corpus(path, ["car"])


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([], "lists no classes"),
        ({"name": "car"}, "must be a JSON list"),
        ([{"name": 5}], "'name' string"),
        ([{"name": "car", "synonyms": "auto"}], "list of strings"),
    ],
)
def test_class_lists_with_odd_values_are_config_errors(tmp_path, entries, message):
    path = tmp_path / "classes.json"
    path.write_text(json.dumps(entries))
    with pytest.raises(ConfigError, match=message):
        read_classes(path)


@pytest.mark.parametrize("threshold", [-0.1, 1.5, float("nan")])
def test_export_threshold_outside_zero_to_one_is_refused(tmp_path, trained_artifacts, threshold):
    from imfree.export.exporter import ExportConfig, export_artifact

    config = ExportConfig(artifact=trained_artifacts("imfree-tiny-rn"), out=tmp_path / "e",
                          threshold=threshold)
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        export_artifact(config)
    assert not (tmp_path / "e").exists()


def test_an_empty_parity_folder_is_refused_not_replaced_by_noise(tmp_path, trained_artifacts):
    from imfree.export.exporter import ExportConfig, export_artifact

    empty = tmp_path / "empty"
    empty.mkdir()
    config = ExportConfig(artifact=trained_artifacts("imfree-tiny-rn"), out=tmp_path / "e",
                          parity_images=empty)
    with pytest.raises(ConfigError, match="holds no image files"):
        export_artifact(config)
