"""Deterministic scenes of the lab's world: sampled from a seed, drawn with PIL and numpy.

Scene `index` of a set with seed `seed` depends on nothing else, so a held-out
set can be rebuilt image for image and any scene can be drawn on its own.
"""

from __future__ import annotations

import csv
import io
import logging
import math
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw

from imfree.fileio import write_atomically
from imfree.lab.world import COLOURS, Category, Scene, SceneObject, World

logger = logging.getLogger(__name__)

# An object hidden below this share of its pixels is no longer in the labels.
MIN_VISIBLE = 0.25
DARK = (25, 25, 25)
LIGHT = (250, 250, 250)


def scene_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, index])


def sample_scene(world: World, rng: np.random.Generator, count: int | None = None) -> Scene:
    """A scene kind, then 1 to 4 objects, mostly of that kind's categories."""
    kind = world.scenes[rng.integers(len(world.scenes))]
    if count is None:
        count = int(rng.integers(world.objects[0], world.objects[1] + 1))
    own = world.in_kind(kind.name)
    scene = Scene(kind.name)
    for _ in range(count):
        pool = own if rng.random() < world.in_scene else list(world.categories)
        category = pool[rng.integers(len(pool))]
        scene.objects.append(_place(world, category, rng))
    return scene


def _place(world: World, category: Category, rng: np.random.Generator) -> SceneObject:
    low, high = world.small_px if category.size == "small" else world.large_px
    size = float(rng.uniform(low, high))
    margin = size * 0.2  # centres may sit near the border: objects get cut off
    x, y = rng.uniform(margin, world.image_size - margin, size=2)
    return SceneObject(category.name, float(x), float(y), size, float(rng.uniform(0, 360)))


def draw(world: World, scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """The scene as uint8 [H, W, 3]; sets each object's visible share and drops hidden ones."""
    n = world.image_size
    kind = next(k for k in world.scenes if k.name == scene.kind)
    image = np.empty((n, n, 3), np.float32)
    image[:] = _jitter(kind.background, rng, world.colour_jitter)
    _clutter(world, image, rng)

    owners = np.full((n, n), -1, np.int16)
    areas = []
    for i, obj in enumerate(scene.objects):
        mask = _mask(world, obj)
        category = world.category(obj.category)
        image[mask] = _texture(category, rng, world.colour_jitter, n)[mask]
        owners[mask] = i
        areas.append(max(int(mask.sum()), 1))

    for i, obj in enumerate(scene.objects):
        obj.visible = float((owners == i).sum()) / areas[i]
    scene.objects = [o for o in scene.objects if o.visible >= MIN_VISIBLE]

    image += rng.normal(0.0, world.noise, image.shape).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.uint8)


def _jitter(colour: tuple[int, int, int], rng: np.random.Generator, amount: int) -> np.ndarray:
    return np.asarray(colour, np.float32) + rng.uniform(-amount, amount, 3).astype(np.float32)


def _clutter(world: World, image: np.ndarray, rng: np.random.Generator) -> None:
    """Thin strokes and specks in any of the world's colours: distractors, not objects."""
    canvas = Image.fromarray(image.astype(np.uint8))
    pen = ImageDraw.Draw(canvas)
    palette = list(COLOURS.values()) + [DARK]
    n = world.image_size
    for _ in range(int(rng.integers(world.clutter[0], world.clutter[1] + 1))):
        colour = tuple(int(v) for v in palette[rng.integers(len(palette))])
        x, y = rng.uniform(0, n, 2)
        if rng.random() < 0.5:
            length, angle = rng.uniform(4, 14), rng.uniform(0, math.pi)
            end = (x + length * math.cos(angle), y + length * math.sin(angle))
            pen.line([(x, y), end], fill=colour, width=1)
        else:
            r = rng.uniform(0.8, 2.0)
            pen.ellipse([x - r, y - r, x + r, y + r], fill=colour)
    image[:] = np.asarray(canvas, np.float32)


def _mask(world: World, obj: SceneObject) -> np.ndarray:
    shape = world.category(obj.category).shape
    canvas = Image.new("L", (world.image_size, world.image_size), 0)
    pen = ImageDraw.Draw(canvas)
    r = obj.size / 2
    if shape == "circle":
        pen.ellipse([obj.x - r, obj.y - r, obj.x + r, obj.y + r], fill=255)
    else:
        pen.polygon(_outline(shape, obj.x, obj.y, r, obj.angle), fill=255)
    return np.asarray(canvas) > 127


def _outline(shape: str, x: float, y: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "bar":
        unit = [(-1.0, -0.32), (1.0, -0.32), (1.0, 0.32), (-1.0, 0.32)]
    elif shape == "star":
        unit = [(math.cos(a) * (1.0 if k % 2 == 0 else 0.45),
                 math.sin(a) * (1.0 if k % 2 == 0 else 0.45))
                for k, a in enumerate(np.linspace(0, 2 * math.pi, 10, endpoint=False))]
    else:
        corners = {"square": 4, "triangle": 3, "diamond": 4, "hexagon": 6}[shape]
        scale = 0.8 if shape == "square" else 1.0
        # A square stands on a side, a diamond on a corner, before the random turn.
        offset = math.pi / 4 if shape == "square" else math.pi / 2
        unit = [(math.cos(a) * scale * math.sqrt(2) ** (shape == "square"),
                 math.sin(a) * scale * math.sqrt(2) ** (shape == "square"))
                for a in np.linspace(0, 2 * math.pi, corners, endpoint=False) + offset]
        if shape == "diamond":
            unit = [(px * 0.6, py) for px, py in unit]
    turn = math.radians(angle)
    cos, sin = math.cos(turn), math.sin(turn)
    return [(x + r * (px * cos - py * sin), y + r * (px * sin + py * cos)) for px, py in unit]


def _texture(category: Category, rng: np.random.Generator, jitter: int, n: int) -> np.ndarray:
    """The category's fill over the whole canvas; the object's mask cuts it out."""
    base = _jitter(COLOURS[category.colour], rng, jitter)
    fill = np.empty((n, n, 3), np.float32)
    fill[:] = base
    if category.texture == "plain":
        return fill

    ys, xs = np.mgrid[0:n, 0:n].astype(np.float32)
    phase = rng.uniform(0, 6)
    if category.texture == "striped":
        angle = rng.uniform(0, math.pi)
        pattern = ((xs * math.cos(angle) + ys * math.sin(angle) + phase) % 4.0) < 2.0
        second = DARK
    elif category.texture == "spotted":
        period = 4.5
        dx = (xs + phase) % period - period / 2
        dy = (ys + phase) % period - period / 2
        pattern = dx**2 + dy**2 < 1.6
        second = DARK
    else:  # checked
        pattern = ((np.floor((xs + phase) / 3) + np.floor((ys + phase) / 3)) % 2) == 0
        second = LIGHT
    fill[pattern] = second
    return fill


def render(world: World, seed: int, index: int, objects: int | None = None
           ) -> tuple[np.ndarray, Scene]:
    """Scene `index` of the set with `seed`: the image and what is in it."""
    rng = scene_rng(seed, index)
    scene = sample_scene(world, rng, objects)
    return draw(world, scene, rng), scene


def render_many(world: World, seed: int, count: int, objects: int | None = None
                ) -> tuple[np.ndarray, list[Scene]]:
    """`count` scenes as uint8 [count, H, W, 3] and their contents."""
    images = np.empty((count, world.image_size, world.image_size, 3), np.uint8)
    scenes = []
    for i in range(count):
        images[i], scene = render(world, seed, i, objects)
        scenes.append(scene)
    return images, scenes


def write_set(
    world: World,
    folder: Path,
    seed: int,
    count: int,
    objects: int | None = None,
    image_format: Literal["png", "jpg"] = "png",
) -> Path:
    """Render a held-out set into `folder` with `labels.csv` (path,labels); returns the CSV."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        image, scene = render(world, seed, i, objects)
        name = f"images/{i:05d}.{image_format}"
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG" if image_format == "png" else "JPEG",
                                    quality=95)
        write_atomically(folder / name, buffer.getvalue())
        rows.append((name, ";".join(scene.labels)))

    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["path", "labels"])
    writer.writerows(rows)
    csv_path = folder / "labels.csv"
    write_atomically(csv_path, text.getvalue())
    logger.info("rendered %d scenes (seed %d) into %s", count, seed, folder)
    return csv_path
