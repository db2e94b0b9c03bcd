"""The lab world's knowledge corpus, written the way an LLM answers method.md's questions.

Text only: appearance answers describe a category's look, context answers
place it in its usual scenes beside the categories met there, co-occurrence
answers describe a photo of a plausible combination of 1 to 5 categories. The
phrasing is deliberately not the captions' (no "a photo of ..." lists): the
words that carry meaning (names, colours, textures, sizes, shape words, place
names) are shared, as they would be between an LLM's prose and web captions.
The folder written here is a label set `imfree train --labels` takes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from imfree.fileio import write_atomically
from imfree.lab.world import Category, World
from imfree.toolkit.corpus import build_corpus, clip_token_count, corpus_stats, write_corpus
from imfree.toolkit.hierarchy import Hierarchy, save_hierarchy
from imfree.toolkit.labels import ClassInfo, LabelMatcher
from imfree.toolkit.labelsets import write_classes

# The lab's tree: fine groups of look-alikes or companions, coarse groups by scene.
TREE = {
    "fine": {
        "tableware": ["plate", "cup", "napkin"],
        "red round food": ["apple", "tomato"],
        "small garden creatures": ["ladybug", "bee"],
        "garden plants": ["flower", "leaf", "hedge"],
        "vehicles": ["car", "bus"],
        "road furniture": ["sign", "cone", "crossing"],
        "beach gear and sky": ["umbrella", "towel", "sun"],
        "sea finds": ["fish", "shell"],
    },
    "coarse": {
        "kitchen": ["tableware", "red round food"],
        "garden": ["small garden creatures", "garden plants"],
        "street": ["vehicles", "road furniture"],
        "beach": ["beach gear and sky", "sea finds"],
    },
}

APPEARANCE = (
    "A {name} is a {size}, {shape} thing, {colour} all over and {texture}.",
    "Most {plural} are {colour} and {shape}, with a {texture} surface.",
    "You can tell a {name} by its {texture} {colour} body and its {shape} outline.",
    "From above, a {name} shows up as a {size} {colour} {shape} patch.",
    "{Plural} tend to be {size}; look for something {colour}, {shape} and {texture}.",
    "The typical {name} is {texture} and {colour}, and fairly {size} in a picture.",
    "A {colour} {texture} {shape} shape, {size} in the frame, is most likely a {name}.",
    "If you notice a {size} {shape} object that is {colour} and {texture}, it is a {name}.",
    "Think of a {name} as {shape}, {colour}, {texture} and {size}.",
    "{Plural} look {colour} and {texture}, and their outline is {shape}.",
    "Its {colour} colour and {texture} finish make the {name} easy to pick out.",
    "Even when partly hidden, a {name} keeps its {texture} {colour} look.",
)
CONTEXT = (
    "{Plural} are usually found in a {place}.",
    "You will most often come across a {name} in a {place}, near a {other}.",
    "In a typical {place} a {name} sits close to a {other} or a {second}.",
    "A {name} belongs in a {place}, where {others} are common too.",
    "Look for {plural} around a {place}; {others} and {seconds} are often nearby.",
    "A {place} is the natural home of the {name}.",
    "When a picture shows a {name}, it is often a {place} scene with a {other} in it.",
    "{Plural} turn up in a {place} more than anywhere else, often beside a {other}.",
    "Where there is a {name}, a {other} is rarely far away in a {place}.",
    "A {name} and a {other} are a familiar pair in any {place}.",
)
COOCCURRENCE = (
    "A {place} picture with {list}.",
    "{List} together in a {place}.",
    "A snapshot of a {place} showing {list}.",
    "Seen from above: {list}, scattered across a {place}.",
    "{List} share the frame in this {place} scene.",
    "Someone photographed {list} in a {place}.",
    "In the middle of a busy {place} lie {list}.",
    "This {place} view holds {list}.",
)


def write_lab_labelset(world: World, folder: Path, seed: int = 0,
                       combinations: int = 1500) -> Path:
    """Write classes.json, hierarchy.json, sentences.jsonl, corpus.jsonl; returns `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    answers = _appearance(world, rng) + _context(world, rng) + _cooccurrence(world, rng,
                                                                            combinations)

    classes = [ClassInfo(name=c.name, prompt_name=c.name, synonyms=(c.plural,))
               for c in world.categories]
    samples, dropped = build_corpus(answers, LabelMatcher(classes), clip_token_count)
    write_classes(folder / "classes.json", classes)
    save_hierarchy(folder / "hierarchy.json", Hierarchy.from_dict(world.names, TREE))
    lines = "".join(json.dumps(a) + "\n" for a in answers)
    write_atomically(folder / "sentences.jsonl", lines)
    write_corpus(folder / "corpus.jsonl", samples)
    summary = {"generator": "imfree.lab.corpus", "seed": seed, "world": world.fingerprint(),
               "stats": corpus_stats(samples, world.names), "dropped": dict(dropped)}
    write_atomically(folder / "knowledge.json", json.dumps(summary, indent=1))
    return folder


def _fill(template: str, category: Category, rng: np.random.Generator, **extra: str) -> str:
    words = {
        "name": category.name,
        "plural": category.plural,
        "Plural": category.plural.capitalize(),
        "size": category.size,
        "colour": category.colour,
        "texture": category.texture,
        "shape": category.shape_word,
    }
    return _article(template.format(**words, **extra))


def _article(sentence: str) -> str:
    """'a' before a vowel becomes 'an', as a writer would have it."""
    words = sentence.split(" ")
    for i in range(len(words) - 1):
        if words[i].lower() == "a" and words[i + 1][:1].lower() in "aeiou":
            words[i] = "An" if words[i] == "A" else "an"
    return " ".join(words)


def _appearance(world: World, rng: np.random.Generator) -> list[dict]:
    return [{"sentence": _fill(t, c, rng), "requested": [c.name], "kind": "appearance"}
            for c in world.categories for t in APPEARANCE]


def _context(world: World, rng: np.random.Generator, per_class: int = 24) -> list[dict]:
    answers = []
    for category in world.categories:
        for i in range(per_class):
            place = category.scenes[i % len(category.scenes)]
            company = [c for c in world.in_kind(place) if c.name != category.name]
            other, second = (company[k] for k in rng.choice(len(company), 2, replace=False))
            sentence = _fill(CONTEXT[i % len(CONTEXT)], category, rng, place=place,
                             other=other.name, second=second.name, others=other.plural,
                             seconds=second.plural)
            answers.append({"sentence": sentence, "requested": [category.name],
                            "kind": "context"})
    return answers


def _cooccurrence(world: World, rng: np.random.Generator, count: int) -> list[dict]:
    """Plausible combinations: mostly one scene's categories, now and then a stray one."""
    answers = []
    for _ in range(count):
        kind = world.scenes[rng.integers(len(world.scenes))]
        own = world.in_kind(kind.name)
        size = int(rng.integers(1, 6))
        picked: list[Category] = []
        while len(picked) < size:
            pool = own if rng.random() < 0.85 else list(world.categories)
            category = pool[rng.integers(len(pool))]
            if category not in picked:
                picked.append(category)
        mentions = [_mention(c, rng) for c in picked]
        listed = mentions[0] if len(mentions) == 1 else (
            ", ".join(mentions[:-1]) + " and " + mentions[-1])
        template = COOCCURRENCE[rng.integers(len(COOCCURRENCE))]
        sentence = _article(template.format(place=kind.place, list=listed,
                                            List=listed[0].upper() + listed[1:]))
        answers.append({"sentence": sentence, "requested": [c.name for c in picked],
                        "kind": "cooccurrence"})
    return answers


def _mention(category: Category, rng: np.random.Generator) -> str:
    """'a bee', or with a detail or two an LLM might add: 'a striped yellow bee'."""
    details = [category.colour, category.texture, category.size, category.shape_word]
    keep = int(rng.choice([0, 0, 1, 2]))
    chosen = [details[k] for k in sorted(rng.choice(4, keep, replace=False))]
    return " ".join(["a", *chosen, category.name])
