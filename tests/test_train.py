"""Training on the tiny label set, the configuration layers, and the classifier artifact."""

from __future__ import annotations

import json
import shutil
import stat

import pytest
import torch
from safetensors.torch import load_file

from imfree.errors import ArtifactError, ConfigError
from imfree.toolkit.artifact import FORMAT_VERSION, METADATA, TENSORS, load_artifact
from imfree.toolkit.labelsets import load_labelset
from imfree.toolkit.learner import hand_features
from imfree.toolkit.scoring import normalize
from imfree.toolkit.train import TrainConfig, config_from_layers, train

PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt", ".npy", ".npz")


@pytest.fixture
def artifact_dir(trained_artifacts, tiny_model_name):
    return trained_artifacts(tiny_model_name)


@pytest.fixture
def artifact_copy(trained_artifacts, tmp_path):
    """A writable copy of a trained artifact, to damage."""
    return shutil.copytree(trained_artifacts("imfree-tiny-rn"), tmp_path / "artifact")


def classifiers(folder):
    tensors = load_file(str(folder / TENSORS))
    return tensors["global_classifier"], tensors["local_classifier"]


# --- the artifact training writes -----------------------------------------------------------


def test_training_writes_both_artifact_files(artifact_dir):
    assert sorted(p.name for p in artifact_dir.iterdir()) == sorted([TENSORS, METADATA])


def test_classifiers_are_unit_rows_of_class_by_embedding(artifact_dir, tiny_backbone):
    for matrix in classifiers(artifact_dir):
        assert matrix.shape == (6, tiny_backbone.embed_dim)
        assert matrix.dtype == torch.float32
        torch.testing.assert_close(matrix.norm(dim=-1), torch.ones(6))


def test_global_and_local_classifiers_differ(artifact_dir):
    global_, local = classifiers(artifact_dir)
    assert not torch.allclose(global_, local)


def test_artifact_metadata(artifact_dir, tiny_model_name, tiny_backbone):
    data = json.loads((artifact_dir / METADATA).read_text())
    assert data["format"] == "imfree-classifier" and data["format_version"] == FORMAT_VERSION
    assert data["kind"] == "trained"
    assert data["classes"] == ["cat", "dog", "person", "car", "bus", "diningtable"]
    assert data["prompt_names"][-1] == "dining table"
    assert data["scales"] == {"global": 4.0, "local": 4.0, "spatial": 50.0, "mix_global": 0.65}
    assert data["model"] == {"name": tiny_model_name, "pretrained": "none"}
    assert data["preprocess"] == tiny_backbone.preprocess.to_dict()
    assert data["preprocess"]["image_size"] == [96, 96]
    assert data["hierarchy"]["fine"]["pets"] == ["cat", "dog"]

    training = data["training"]
    assert training["model"] == tiny_model_name and training["epochs"] == 2
    assert training["batch_size"] == 32 and training["seed"] == 0
    assert training["sentences"] == 72
    assert len(training["loss_per_epoch"]) == 2
    assert set(data["versions"]) >= {"imfree", "torch", "open_clip"}


def test_load_artifact_round_trip(artifact_dir):
    artifact = load_artifact(artifact_dir)
    global_, local = classifiers(artifact_dir)
    assert torch.equal(artifact.global_classifier, global_)
    assert torch.equal(artifact.local_classifier, local)
    assert artifact.classes[0] == "cat" and artifact.scales.spatial == 50.0
    assert artifact.preprocess.image_size == (96, 96)
    assert any(k.startswith("prompt.global_prompt.") for k in artifact.extra_tensors)


def test_no_pickle_or_temporary_files_are_written(trained_artifacts, tmp_path):
    folder = trained_artifacts("imfree-tiny-rn")
    names = [p.name for p in folder.rglob("*")]
    assert not [n for n in names if n.endswith(PICKLE_SUFFIXES) or n.startswith(".")]
    header = (folder / TENSORS).read_bytes()[:9]
    assert header[8:9] == b"{"  # safetensors: 8-byte length, then a JSON header
    assert not (folder / TENSORS).read_bytes().startswith(b"PK")  # torch.save's zip
    assert not (folder / TENSORS).read_bytes().startswith(b"\x80")  # raw pickle


def test_artifact_files_are_as_readable_as_ordinary_files(trained_artifacts, tmp_path):
    """Written through temporary files, they must still get the usual (umask) permissions."""
    reference = tmp_path / "ordinary.txt"
    reference.write_text("x")
    expected = stat.S_IMODE(reference.stat().st_mode)
    folder = trained_artifacts("imfree-tiny-rn")
    for name in (TENSORS, METADATA):
        assert stat.S_IMODE((folder / name).stat().st_mode) == expected, name


# --- determinism and learning -------------------------------------------------------------


def test_same_seed_gives_identical_classifiers(tiny_labels, tmp_path, make_train_config):
    first = train(make_train_config(tiny_labels, "imfree-tiny-rn", tmp_path / "a", seed=3))
    second = train(make_train_config(tiny_labels, "imfree-tiny-rn", tmp_path / "b", seed=3))
    for a, b in zip(classifiers(first), classifiers(second), strict=True):
        assert torch.equal(a, b)


def test_different_seed_gives_different_classifiers(tiny_labels, tmp_path, make_train_config):
    first = train(make_train_config(tiny_labels, "imfree-tiny-rn", tmp_path / "a", seed=3))
    second = train(make_train_config(tiny_labels, "imfree-tiny-rn", tmp_path / "b", seed=4))
    assert not torch.allclose(classifiers(first)[0], classifiers(second)[0])


def test_loss_decreases_over_epochs(tiny_labels, tmp_path, make_train_config, tiny_model_name):
    config = make_train_config(tiny_labels, tiny_model_name, tmp_path / "out", epochs=6,
                               lr=0.01, batch_size=16, noise_std=0.0)
    history = json.loads((train(config) / METADATA).read_text())["training"]["loss_per_epoch"]
    assert len(history) == 6
    assert history[-1] < 0.95 * history[0], history


def test_zero_epochs_keeps_the_initial_prompts(tiny_labels, tmp_path, make_train_config):
    config = make_train_config(tiny_labels, "imfree-tiny-rn", tmp_path / "out", epochs=0)
    data = json.loads((train(config) / METADATA).read_text())
    assert data["training"]["loss_per_epoch"] == []


def test_zero_shot_classifiers_are_normalised_hand_features(
    tiny_labels, tmp_path, make_train_config, tiny_model_name, tiny_backbone
):
    config = make_train_config(tiny_labels, tiny_model_name, tmp_path / "zs", zero_shot=True)
    folder = train(config)
    labelset = load_labelset(tiny_labels)
    expected = normalize(hand_features(tiny_backbone, labelset.prompt_names, "single"))
    global_, local = classifiers(folder)
    torch.testing.assert_close(global_, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(local, expected, atol=1e-6, rtol=0)
    assert json.loads((folder / METADATA).read_text())["kind"] == "zero-shot"


def test_zero_shot_needs_no_corpus(tiny_labels, tmp_path, make_train_config):
    labels = shutil.copytree(tiny_labels, tmp_path / "nocorpus")
    (labels / "corpus.jsonl").unlink()
    config = make_train_config(labels, "imfree-tiny-rn", tmp_path / "zs", zero_shot=True)
    assert (train(config) / TENSORS).exists()


def test_ensemble_hand_prompt_differs_from_single(backbone_cache):
    backbone = backbone_cache("imfree-tiny-rn")
    single = hand_features(backbone, ["cat", "dog"], "single")
    ensemble = hand_features(backbone, ["cat", "dog"], "ensemble")
    assert single.shape == ensemble.shape == (2, backbone.embed_dim)
    assert not torch.allclose(single, ensemble)


def test_training_on_a_corpus_with_unknown_labels_is_a_config_error(
    tiny_labels, tmp_path, make_train_config
):
    corpus = tmp_path / "bad.jsonl"
    corpus.write_text(json.dumps({"sentence": "a unicorn", "labels": ["unicorn"]}) + "\n")
    config = make_train_config(tiny_labels, "imfree-tiny-rn", tmp_path / "out",
                               corpus=str(corpus))
    with pytest.raises(ConfigError, match="unicorn"):
        train(config)


# --- configuration layers -----------------------------------------------------------------


def write_toml(tmp_path, text):
    path = tmp_path / "train.toml"
    path.write_text(text)
    return path


def test_defaults_without_file_or_flags():
    assert config_from_layers(None, {}) == TrainConfig()


def test_toml_values_override_defaults(tmp_path):
    path = write_toml(tmp_path, 'model = "imfree-tiny-vit"\nepochs = 3\nlr = 0.01\n')
    config = config_from_layers(path, {})
    assert (config.model, config.epochs, config.lr) == ("imfree-tiny-vit", 3, 0.01)
    assert config.batch_size == TrainConfig().batch_size


def test_toml_train_table_is_read(tmp_path):
    path = write_toml(tmp_path, '[train]\nepochs = 4\nmilestones = [1, 2]\n')
    config = config_from_layers(path, {})
    assert config.epochs == 4 and config.milestones == [1, 2]


def test_flags_override_toml(tmp_path):
    path = write_toml(tmp_path, "epochs = 3\nseed = 7\n")
    config = config_from_layers(path, {"epochs": 9, "seed": None})
    assert config.epochs == 9
    assert config.seed == 7  # an unset flag (None) leaves the file's value


def test_unknown_keys_are_refused_listing_valid_keys(tmp_path):
    path = write_toml(tmp_path, "epochs = 3\nlearning_rate = 0.1\n")
    with pytest.raises(ConfigError) as caught:
        config_from_layers(path, {})
    message = str(caught.value)
    assert "learning_rate" in message
    assert "valid:" in message and "lr" in message and "batch_size" in message


def test_unknown_override_is_refused():
    with pytest.raises(ConfigError, match="bogus"):
        config_from_layers(None, {"bogus": 1})


def test_invalid_toml_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not valid TOML"):
        config_from_layers(write_toml(tmp_path, "epochs = = 3\n"), {})


def test_missing_toml_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        config_from_layers(tmp_path / "absent.toml", {})


@pytest.mark.parametrize(
    "overrides",
    [{"mix_global": 1.5}, {"batch_size": 0}, {"epochs": -1}, {"hand_prompt": "many"}],
)
def test_invalid_values_are_refused(overrides):
    with pytest.raises(ConfigError):
        config_from_layers(None, overrides)


def test_cuda_device_without_a_gpu_is_a_config_error(tiny_labels, tmp_path, make_train_config):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    config = make_train_config(tiny_labels, "imfree-tiny-rn", tmp_path / "out", device="cuda")
    with pytest.raises(ConfigError, match="--device cpu"):
        train(config)


# --- damaged artifacts ----------------------------------------------------------------------


def test_missing_artifact_folder(tmp_path):
    with pytest.raises(ArtifactError, match="--out folder of `imfree train`"):
        load_artifact(tmp_path / "absent")


def test_folder_without_metadata(tmp_path):
    with pytest.raises(ArtifactError, match=f"holds no {METADATA}.*imfree train"):
        load_artifact(tmp_path)


def test_bad_json(artifact_copy):
    (artifact_copy / METADATA).write_text('{"format": "imfree-classifier", ')
    with pytest.raises(ArtifactError, match="not valid JSON.*re-run `imfree train`"):
        load_artifact(artifact_copy)


def test_json_that_is_not_an_object(artifact_copy):
    (artifact_copy / METADATA).write_text("[1, 2]")
    with pytest.raises(ArtifactError, match=r"imfree train"):
        load_artifact(artifact_copy)


def test_wrong_format_version(artifact_copy):
    path = artifact_copy / METADATA
    path.write_text(json.dumps(json.loads(path.read_text()) | {"format_version": 99}))
    with pytest.raises(ArtifactError, match="format version 99.*re-run `imfree train`"):
        load_artifact(artifact_copy)


def test_not_a_classifier_artifact(artifact_copy):
    path = artifact_copy / METADATA
    path.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ArtifactError, match="not an imfree classifier artifact"):
        load_artifact(artifact_copy)


@pytest.mark.parametrize("keep", [0.5, 0.0])
def test_truncated_tensors(artifact_copy, keep):
    path = artifact_copy / TENSORS
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ArtifactError, match="re-run `imfree train`"):
        load_artifact(artifact_copy)


def test_missing_tensors_file(artifact_copy):
    (artifact_copy / TENSORS).unlink()
    with pytest.raises(ArtifactError, match="re-run `imfree train`"):
        load_artifact(artifact_copy)


def test_missing_metadata_key(artifact_copy):
    path = artifact_copy / METADATA
    data = json.loads(path.read_text())
    del data["scales"]
    path.write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="scales.*re-run `imfree train`"):
        load_artifact(artifact_copy)


def test_classifier_of_wrong_class_count(artifact_copy):
    path = artifact_copy / METADATA
    data = json.loads(path.read_text())
    data["classes"] = data["classes"][:-1]
    path.write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="shape"):
        load_artifact(artifact_copy)
