"""The lab: renderer, captions, corpus, the lab CLIP's cache, mean-of-sentences, the pipeline."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from typer.testing import CliRunner

from imfree.cli import app
from imfree.lab.ablation import LabConfig, run_lab
from imfree.lab.captions import caption
from imfree.lab.clip_train import ClipConfig, train_clip
from imfree.lab.corpus import write_lab_labelset
from imfree.lab.render import render, render_many, write_set
from imfree.lab.world import default_world
from imfree.models import encode_text_tokens, load_backbone
from imfree.toolkit.artifact import load_artifact
from imfree.toolkit.corpus import read_corpus
from imfree.toolkit.knowledge.validation import validate_corpus
from imfree.toolkit.labelsets import load_labelset
from imfree.toolkit.scoring import normalize

WORLD = default_world()
# A CLIP trained for seconds: enough to run every step, not to mean anything.
TINY_CLIP = {"steps": 3, "batch_size": 16, "train_scenes": 48, "probe_scenes": 20, "warmup": 1}


def test_a_scene_depends_only_on_its_seed_and_index():
    first, scene = render(WORLD, seed=5, index=3)
    again, same = render(WORLD, seed=5, index=3)
    other, _ = render(WORLD, seed=6, index=3)

    assert first.shape == (64, 64, 3) and first.dtype == np.uint8
    assert np.array_equal(first, again) and scene.labels == same.labels
    assert not np.array_equal(first, other)


def test_scenes_hold_one_to_four_visible_objects_of_known_categories():
    _, scenes = render_many(WORLD, seed=1, count=200)
    counts = [len(s.objects) for s in scenes]

    assert max(counts) <= 4 and np.mean(counts) > 1.5
    assert all(o.visible >= 0.25 for s in scenes for o in s.objects)
    assert {label for s in scenes for label in s.labels} <= set(WORLD.names)
    # Some objects are partly hidden or cut by the border.
    assert any(o.visible < 0.9 for s in scenes for o in s.objects)


def test_write_set_writes_images_and_a_labels_csv(tmp_path):
    path = write_set(WORLD, tmp_path / "set", seed=2, count=6)
    rows = list(csv.DictReader(path.open()))

    assert [r["path"] for r in rows] == [f"images/{i:05d}.png" for i in range(6)]
    assert all((path.parent / r["path"]).is_file() for r in rows)
    _, scene = render(WORLD, seed=2, index=4)
    assert rows[4]["labels"] == ";".join(scene.labels)


def test_captions_name_all_objects_or_a_subset_and_nothing_absent():
    _, scenes = render_many(WORLD, seed=3, count=300)
    busy = [s for s in scenes if len(s.labels) >= 3]
    rng = np.random.default_rng(0)
    tokenizer = open_clip.get_tokenizer("imfree-lab-rn")

    named_all = subset = 0
    for scene in busy:
        text = caption(WORLD, scene, rng)
        words = set(text.replace(",", " ").replace(".", " ").split())
        forms = {c.name: {c.name, c.plural} for c in WORLD.categories}
        named = {name for name, f in forms.items() if words & f}
        assert named and named <= set(scene.labels), text
        named_all += named == set(scene.labels)
        subset += named < set(scene.labels)
        assert len(tokenizer.encode(text)) + 2 <= 48  # the lab CLIP's context
    assert named_all > 0.3 * len(busy) and subset > 0.3 * len(busy)


def test_corpus_is_a_valid_label_set_with_its_tree(tmp_path):
    folder = write_lab_labelset(WORLD, tmp_path / "labels")
    report = validate_corpus(folder)
    labelset = load_labelset(folder)
    samples = read_corpus(labelset.corpus_path, labelset.names)

    assert report.passed, report.lines()
    assert labelset.names == WORLD.names
    assert len(labelset.hierarchy.fine_names) == 8
    assert len(labelset.hierarchy.coarse_names) == 4
    assert {s.kind for s in samples} == {"appearance", "context", "cooccurrence"}
    # Phrased unlike the captions: none starts the way a caption does.
    assert not any(s.sentence.lower().startswith(("a photo of", "a picture of")) for s in samples)


def test_mean_sentences_classifier_is_each_class_mean_sentence_feature(tmp_path, tiny_labels):
    runner = CliRunner()
    out = tmp_path / "mean"
    result = runner.invoke(app, ["train", "--labels", str(tiny_labels), "--model",
                                 "imfree-tiny-rn", "--pretrained", "none", "--hand-prompt",
                                 "single", "--classifier", "mean-sentences", "--device", "cpu",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    artifact = load_artifact(out)

    labelset = load_labelset(tiny_labels)
    samples = read_corpus(labelset.corpus_path, labelset.names)
    backbone = load_backbone("imfree-tiny-rn", "none")
    with torch.no_grad():
        features = normalize(encode_text_tokens(
            backbone.model, backbone.tokenizer([s.sentence for s in samples])).global_)
    for c, name in enumerate(labelset.names):
        rows = [i for i, s in enumerate(samples) if name in s.labels]
        expected = normalize(features[rows].mean(dim=0))
        assert torch.allclose(artifact.global_classifier[c], expected, atol=1e-5), name
    assert torch.equal(artifact.global_classifier, artifact.local_classifier)
    assert artifact.kind == "mean-sentences"


def test_lab_clip_is_cached_by_configuration_and_loads_as_a_checkpoint(tmp_path):
    config = ClipConfig(**TINY_CLIP)
    first = train_clip(config, WORLD, tmp_path)
    again = train_clip(config, WORLD, tmp_path)
    other = train_clip(ClipConfig(**TINY_CLIP | {"seed": 1}), WORLD, tmp_path)

    assert not first.cached and again.cached and not other.cached
    assert again.checkpoint == first.checkpoint != other.checkpoint
    assert 0.0 <= first.zero_shot_top1 <= 1.0
    backbone = load_backbone("imfree-lab-rn", str(first.checkpoint))
    assert backbone.kind == "resnet" and backbone.preprocess.image_size == (64, 64)


def _finite_table(result) -> None:
    assert result.report.is_file()
    for row in result.rows:
        assert all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in row["maps"]), row
        assert math.isfinite(row["cf1_top3"]) and math.isfinite(row["of1_top3"])


def test_lab_baselines_end_to_end(tmp_path):
    config = LabConfig(out=tmp_path / "lab", seeds=[0], heldout=24, clip=TINY_CLIP,
                       rows=["zero-shot", "mean of sentences"], combinations=300)
    result = run_lab(config)

    _finite_table(result)
    assert [r["row"] for r in result.rows] == ["zero-shot", "mean of sentences"]
    assert "| zero-shot |" in result.table
    saved = json.loads((tmp_path / "lab" / "lab.json").read_text())
    assert saved["rows"][0]["maps"] == result.rows[0]["maps"]


@pytest.mark.slow
def test_lab_method_through_the_cli_agrees_with_its_artifact(tmp_path):
    config = LabConfig(out=tmp_path / "lab", seeds=[0], heldout=24, clip=TINY_CLIP,
                       rows=["zero-shot", "hierarchical (the method)",
                             "+ per-image normalisation"],
                       training={"epochs": 2}, combinations=300)
    result = run_lab(config)

    _finite_table(result)
    assert [r["row"].strip() for r in result.rows] == [
        "zero-shot", "hierarchical (the method)", "+ per-image normalisation"]
    assert result.cli_check["difference"] <= 1e-3
    assert (Path(config.out) / "cli" / "export" / "imfree_export.json").is_file()
