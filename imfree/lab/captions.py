"""Captions of rendered scenes, the text side of the lab CLIP's training pairs.

Half of the captions name every object and half a random subset: a CLIP whose
captions always list every object learns exact object lists, and present
classes in busy scenes then score below absent ones (the issue's first lesson).
Some captions spell out looks ("a small red spotted ladybug") so that the
text tower learns the words the knowledge corpus describes categories with,
and some are long, so that the positions a hierarchical prompt fills (the
class name comes after 32 learned tokens) are trained too.
"""

from __future__ import annotations

import numpy as np

from imfree.lab.world import Scene, World

NUMBERS = {2: "two", 3: "three", 4: "four"}
SHORT_FRAMES = (
    "{objects}.",
    "a photo of {objects}.",
    "a picture of {objects}.",
    "{objects} in a {place}.",
    "a {place} with {objects}.",
    "a photo of {objects} in a {place}.",
)
LONG_FRAMES = (
    "a photo taken in a {place} showing {objects}, seen from above on a plain background.",
    "a picture of a {place} scene with {objects}, and a few thin lines and specks around.",
    "in this {place} there is {objects}, each one drawn flat and seen from above.",
)
SUBSET_SHARE = 0.5
ATTRIBUTE_SHARE = 0.35
LONG_SHARE = 0.25


def caption(world: World, scene: Scene, rng: np.random.Generator) -> str:
    """One caption of `scene`; a scene has many, drawn afresh from `rng` each time."""
    counts: dict[str, int] = {}
    for obj in scene.objects:
        counts[obj.category] = counts.get(obj.category, 0) + 1
    names = sorted(counts)
    if not names:
        return f"an empty {scene.kind}."
    if len(names) > 1 and rng.random() < SUBSET_SHARE:
        keep = int(rng.integers(1, len(names)))
        names = sorted(rng.choice(names, size=keep, replace=False).tolist())
    rng.shuffle(names)

    long = rng.random() < LONG_SHARE
    mentions = [_mention(world, name, counts[name], rng, long) for name in names]
    frames = LONG_FRAMES if long else SHORT_FRAMES
    frame = frames[rng.integers(len(frames))]
    place = next(k.place for k in world.scenes if k.name == scene.kind)
    return frame.format(objects=_join(mentions), place=place)


def class_prompt(name: str) -> str:
    """The zero-shot prompt the lab measures its CLIP with (the product's single template)."""
    return f"a photo of a {name}."


def _mention(world: World, name: str, count: int, rng: np.random.Generator, long: bool) -> str:
    category = world.category(name)
    noun = category.plural if count > 1 else name
    if long or rng.random() < ATTRIBUTE_SHARE:
        words = [category.size, category.shape_word, category.colour, category.texture]
        keep = sorted(rng.choice(4, size=int(rng.integers(1, 5)), replace=False).tolist())
        noun = " ".join([words[k] for k in keep] + [noun])
    if count > 1:
        return f"{NUMBERS.get(count, 'many')} {noun}"
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"


def _join(mentions: list[str]) -> str:
    if len(mentions) == 1:
        return mentions[0]
    return ", ".join(mentions[:-1]) + " and " + mentions[-1]
