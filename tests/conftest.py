"""Shared fixtures: a tiny label set, the tiny backbones, trained tiny artifacts, real photos.

The runtime tests keep their own fixtures in tests/runtime/conftest.py; the
names here are chosen not to clash with those.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from imfree.models import TINY_MODELS, load_backbone

REPO = Path(__file__).resolve().parents[1]

# The tiny models' tensors are too small to gain from threads, and on a busy
# 2-core machine torch's spinning worker threads made the training tests ~9x slower.
torch.set_num_threads(1)

TINY_CLASSES = [
    {"name": "cat", "synonyms": ["kitten"]},
    {"name": "dog", "synonyms": ["puppy"]},
    {"name": "person", "synonyms": ["people", "man", "woman", "child", "children"]},
    {"name": "car", "synonyms": []},
    {"name": "bus", "synonyms": []},
    {"name": "diningtable", "prompt_name": "dining table", "synonyms": ["table"]},
]
TINY_NAMES = [c["name"] for c in TINY_CLASSES]

# Two fine groups of two classes, two singletons; two coarse groups.
TINY_HIERARCHY = {
    "fine": {
        "pets": ["cat", "dog"],
        "people": ["person"],
        "vehicles": ["car", "bus"],
        "furniture": ["diningtable"],
    },
    "coarse": {
        "home": ["pets", "people", "furniture"],
        "street": ["vehicles"],
    },
}

# Made-up phrases, combined below into ~60 labelled sentences.
_MENTIONS = {
    "cat": ["a grey cat", "a sleepy kitten", "two striped cats"],
    "dog": ["a brown dog", "a small puppy", "three dogs"],
    "person": ["a man", "a woman in a coat", "some people"],
    "car": ["a red car", "a parked car", "two old cars"],
    "bus": ["a yellow bus", "a double-decker bus", "two city buses"],
    "diningtable": ["a wooden dining table", "a long table", "a round dining table"],
}
_SCENES = [
    "A photo of {a}.",
    "A close-up picture of {a} in the afternoon light.",
    "{A} seen from above.",
    "A blurry snapshot showing {a} near {b}.",
    "In this picture {a} is next to {b}.",
]


def tiny_corpus() -> list[dict]:
    """Sentences with their labels: every class alone and with a partner class."""
    records = []
    names = list(_MENTIONS)
    for index, name in enumerate(names):
        partner = names[(index + 1) % len(names)]
        for variant, mention in enumerate(_MENTIONS[name]):
            for template in _SCENES[:3]:
                sentence = template.format(a=mention, A=mention[0].upper() + mention[1:])
                records.append({"sentence": sentence, "labels": [name], "kind": "appearance"})
            other = _MENTIONS[partner][variant]
            template = _SCENES[3 + variant % 2]
            records.append({
                "sentence": template.format(a=mention, b=other),
                "labels": sorted([name, partner], key=TINY_NAMES.index),
                "kind": "cooccurrence",
            })
    return records


def write_labelset(folder: Path, corpus: list[dict] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "classes.json").write_text(json.dumps(TINY_CLASSES))
    (folder / "hierarchy.json").write_text(json.dumps(TINY_HIERARCHY))
    lines = [json.dumps(r) for r in (tiny_corpus() if corpus is None else corpus)]
    (folder / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="session")
def tiny_labels(tmp_path_factory) -> Path:
    """A label-set folder: 6 classes, a 4-fine/2-coarse tree, ~70 sentences. Read only."""
    return write_labelset(tmp_path_factory.mktemp("labels") / "tinyset")


@pytest.fixture(scope="session")
def backbone_cache():
    """Tiny backbones with random weights, built once per session. Do not modify them."""
    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = load_backbone(name, "none")
        return cache[name]

    return get


@pytest.fixture(params=TINY_MODELS)
def tiny_model_name(request) -> str:
    return request.param


@pytest.fixture
def tiny_backbone(backbone_cache, tiny_model_name):
    return backbone_cache(tiny_model_name)


def tiny_train_config(labels: Path, model: str, out: Path, **overrides):
    """A training config small enough for a unit test."""
    from imfree.toolkit.train import TrainConfig

    values = dict(
        labels=str(labels), model=model, pretrained="none", out=str(out), epochs=2,
        batch_size=32, hand_prompt="single", device="cpu", progress=False,
        root_tokens=4, fine_tokens=2, coarse_tokens=2, class_tokens=2, local_tokens=4,
        milestones=[100],
    )
    values.update(overrides)
    return TrainConfig(**values)


@pytest.fixture(scope="session")
def make_train_config():
    """tiny_train_config(labels, model, out, **overrides) -> TrainConfig."""
    return tiny_train_config


@pytest.fixture(scope="session")
def trained_artifacts(tmp_path_factory, tiny_labels):
    """A trained tiny artifact folder per model, built once per session. Read only."""
    from imfree.toolkit.train import train

    cache = {}

    def get(name: str) -> Path:
        if name not in cache:
            out = tmp_path_factory.mktemp("artifacts") / name
            cache[name] = train(tiny_train_config(tiny_labels, name, out))
        return cache[name]

    return get


@pytest.fixture(scope="session")
def real_photos() -> Path:
    """The repository's real photos (examples/images)."""
    folder = REPO / "examples" / "images"
    if not any(folder.glob("*.jpg")):
        pytest.fail(f"no photos in {folder}; the repository should ship them")
    return folder


@pytest.fixture
def fake_llm():
    """A fake Gemini and OpenAI-compatible server on 127.0.0.1 (test_knowledge_providers)."""
    from test_knowledge_providers import FakeLLM

    with FakeLLM() as server:
        yield server


@pytest.fixture
def gemini_key(monkeypatch):
    """A made-up Gemini key in the environment, and no Google key beside it."""
    monkeypatch.delenv("GOOGLE_API_KEY", raising=False)
    monkeypatch.setenv("GEMINI_API_KEY", "fake-key-not-secret-0123")
    return "fake-key-not-secret-0123"
