"""The lab's world as data: categories, their looks, and the scenes they meet in.

Twenty categories drawn as flat shapes. Several share a look and differ only in
texture (apple and ladybug), size (cup and car, ladybug and tomato) or colour
(hedge and bus), so recognising them takes more than a colour histogram. Four
scene kinds, each with a background and a set of categories that tend to appear
in it, give the co-occurrence that context knowledge can use.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Literal

Shape = Literal["circle", "square", "triangle", "star", "diamond", "hexagon", "bar"]
Texture = Literal["plain", "striped", "spotted", "checked"]
Size = Literal["small", "large"]

# How captions and the corpus name a shape.
SHAPE_WORDS: dict[str, str] = {
    "circle": "round",
    "square": "square",
    "triangle": "triangular",
    "star": "star-shaped",
    "diamond": "diamond-shaped",
    "hexagon": "six-sided",
    "bar": "long",
}

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (205, 35, 35),
    "orange": (240, 130, 20),
    "yellow": (235, 215, 40),
    "green": (40, 150, 50),
    "blue": (40, 70, 200),
    "purple": (130, 50, 160),
    "pink": (240, 120, 180),
    "white": (245, 245, 240),
}


@dataclass(frozen=True)
class Category:
    name: str
    shape: Shape
    colour: str
    texture: Texture
    size: Size
    scenes: tuple[str, ...]  # the scene kinds it usually appears in
    plural: str = ""

    @property
    def shape_word(self) -> str:
        return SHAPE_WORDS[self.shape]


@dataclass(frozen=True)
class SceneKind:
    name: str
    background: tuple[int, int, int]
    place: str  # how captions and the corpus name the place


@dataclass(frozen=True)
class World:
    categories: tuple[Category, ...]
    scenes: tuple[SceneKind, ...]
    image_size: int = 64
    # Pixel sizes of the two size classes, before a random scale.
    small_px: tuple[int, int] = (9, 14)
    large_px: tuple[int, int] = (17, 26)
    in_scene: float = 0.75  # chance an object comes from the scene's own categories
    clutter: tuple[int, int] = (3, 9)  # distractor strokes per image
    noise: float = 10.0  # pixel noise standard deviation
    colour_jitter: int = 25
    objects: tuple[int, int] = (1, 4)

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.categories]

    def category(self, name: str) -> Category:
        return next(c for c in self.categories if c.name == name)

    def in_kind(self, scene: str) -> list[Category]:
        return [c for c in self.categories if scene in c.scenes]

    def fingerprint(self) -> str:
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _c(name: str, shape: Shape, colour: str, texture: Texture, size: Size,
       *scenes: str, plural: str = "") -> Category:
    return Category(name, shape, colour, texture, size, scenes, plural or name + "s")


CATEGORIES: tuple[Category, ...] = (
    _c("plate", "circle", "white", "plain", "large", "kitchen"),
    _c("cup", "square", "blue", "plain", "small", "kitchen"),
    _c("apple", "circle", "red", "plain", "small", "kitchen", "garden"),
    _c("tomato", "circle", "red", "spotted", "large", "kitchen", plural="tomatoes"),
    _c("napkin", "square", "red", "checked", "large", "kitchen"),
    _c("flower", "star", "yellow", "plain", "small", "garden"),
    _c("leaf", "diamond", "green", "plain", "small", "garden", plural="leaves"),
    _c("ladybug", "circle", "red", "spotted", "small", "garden"),
    _c("bee", "circle", "yellow", "striped", "small", "garden"),
    _c("hedge", "bar", "green", "plain", "large", "garden", "street"),
    _c("car", "square", "blue", "plain", "large", "street"),
    _c("bus", "bar", "yellow", "plain", "large", "street", plural="buses"),
    _c("sign", "hexagon", "red", "plain", "small", "street"),
    _c("cone", "triangle", "orange", "striped", "small", "street"),
    _c("crossing", "bar", "white", "striped", "large", "street"),
    _c("umbrella", "triangle", "pink", "striped", "large", "beach"),
    _c("fish", "diamond", "blue", "spotted", "small", "beach", plural="fish"),
    _c("shell", "star", "white", "plain", "small", "beach"),
    _c("towel", "square", "purple", "striped", "large", "beach"),
    _c("sun", "circle", "yellow", "plain", "large", "beach", "garden"),
)

SCENES: tuple[SceneKind, ...] = (
    SceneKind("kitchen", (200, 180, 150), "kitchen"),
    SceneKind("garden", (110, 150, 90), "garden"),
    SceneKind("street", (115, 115, 120), "street"),
    SceneKind("beach", (215, 195, 140), "beach"),
)


def default_world(**overrides: object) -> World:
    """The lab's world; `overrides` change its difficulty settings."""
    return World(categories=CATEGORIES, scenes=SCENES, **overrides)  # type: ignore[arg-type]


@dataclass
class SceneObject:
    category: str
    x: float  # centre, pixels
    y: float
    size: float  # pixels across
    angle: float  # degrees
    visible: float = 1.0  # share of its pixels not covered by later objects


@dataclass
class Scene:
    kind: str
    objects: list[SceneObject] = field(default_factory=list)

    @property
    def labels(self) -> list[str]:
        return sorted({o.category for o in self.objects})
