"""The class tree: class, fine group, coarse group, root.

Every class sits in exactly one fine group and every fine group in exactly one
coarse group, so each class's prompt is assembled from one token block per
level and classes under one node share that node's block exactly.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imfree.errors import ConfigError
from imfree.fileio import read_json, write_atomically


@dataclass(frozen=True)
class Hierarchy:
    classes: tuple[str, ...]
    fine_names: tuple[str, ...]
    coarse_names: tuple[str, ...]
    fine_of_class: tuple[int, ...]  # index into fine_names, per class
    coarse_of_fine: tuple[int, ...]  # index into coarse_names, per fine group

    @property
    def coarse_of_class(self) -> tuple[int, ...]:
        return tuple(self.coarse_of_fine[f] for f in self.fine_of_class)

    def to_dict(self) -> dict[str, Any]:
        fine = {
            name: [c for c, f in zip(self.classes, self.fine_of_class, strict=False) if f == i]
            for i, name in enumerate(self.fine_names)
        }
        coarse = {
            name: [f for f, c in zip(self.fine_names, self.coarse_of_fine, strict=False) if c == i]
            for i, name in enumerate(self.coarse_names)
        }
        return {"fine": fine, "coarse": coarse}

    @classmethod
    def from_dict(cls, classes: list[str], data: dict[str, Any], source: str = "") -> Hierarchy:
        """Check that `data` ({"fine": {group: [classes]}, "coarse": {...}}) is a strict tree."""
        where = f" in {source}" if source else ""
        fine, coarse = data.get("fine"), data.get("coarse")
        if not isinstance(fine, dict) or not isinstance(coarse, dict):
            raise ConfigError(f"hierarchy{where} needs 'fine' and 'coarse' objects of lists")

        fine_names = tuple(fine)
        fine_of_class = _parent_index(classes, fine, "class", "fine group", where)
        coarse_of_fine = _parent_index(
            list(fine_names), coarse, "fine group", "coarse group", where
        )
        return cls(
            classes=tuple(classes),
            fine_names=fine_names,
            coarse_names=tuple(coarse),
            fine_of_class=fine_of_class,
            coarse_of_fine=coarse_of_fine,
        )

    @classmethod
    def flat(cls, classes: list[str]) -> Hierarchy:
        """One fine and one coarse group holding everything: the TaI-DPT design."""
        return cls(tuple(classes), ("all",), ("all",), (0,) * len(classes), (0,))

    def render(self) -> str:
        """The tree as indented text, for people."""
        lines = ["root"]
        tree = self.to_dict()
        for coarse, fines in tree["coarse"].items():
            lines.append(f"  {coarse}")
            for fine in fines:
                lines.append(f"    {fine}: {', '.join(tree['fine'][fine])}")
        return "\n".join(lines)


def load_hierarchy(path: Path, classes: list[str]) -> Hierarchy:
    data = read_json(Path(path), "hierarchy")
    return Hierarchy.from_dict(classes, data, source=str(path))


def _parent_index(
    children: list[str], groups: dict[str, list[str]], child: str, parent: str, where: str
) -> tuple[int, ...]:
    parent_of: dict[str, int] = {}
    for index, (group, members) in enumerate(groups.items()):
        if not isinstance(members, list):
            raise ConfigError(f"{parent} '{group}'{where} must list its members in [...], "
                              f"not {members!r}")
        for member in members:
            if member not in children:
                raise ConfigError(f"{parent} '{group}'{where} names unknown {child} '{member}'")
            if member in parent_of:
                raise ConfigError(f"{child} '{member}'{where} sits in two {parent}s; a tree "
                                  f"needs exactly one")
            parent_of[member] = index
    missing = [c for c in children if c not in parent_of]
    if missing:
        raise ConfigError(f"{child} {', '.join(missing)}{where}: in no {parent}; "
                          f"add each to one")
    return tuple(parent_of[c] for c in children)


def save_hierarchy(path: Path, hierarchy: Hierarchy) -> None:
    write_atomically(path, json.dumps(hierarchy.to_dict(), indent=2, ensure_ascii=False) + "\n")


def hierarchy_from_grouping(
    classes: list[str],
    answer: dict[str, Any],
    resolve: Callable[[str], str | None],
    max_fine: int = 8,
) -> Hierarchy:
    """The tree an LLM's grouping answer describes, with its class names mapped to keys.

    `resolve` maps a name as the LLM spelled it ("TVs", a synonym) to a class key.
    Raises ConfigError when the answer is not a strict tree of small fine groups.
    """
    source = "the LLM's grouping answer"
    fine: dict[str, list[str]] = {}
    for group, members in answer.get("fine", {}).items():
        keys: list[str] = []
        for member in members:
            key = resolve(member)
            if key is None:
                raise ConfigError(f"fine group '{group}' in {source} names '{member}', "
                                  f"which is no class of the label set")
            if key not in keys:
                keys.append(key)
        if len(keys) > max_fine:
            raise ConfigError(f"fine group '{group}' in {source} holds {len(keys)} classes; "
                              f"at most {max_fine} are allowed")
        fine[group] = keys
    return Hierarchy.from_dict(classes, {"fine": fine, "coarse": answer.get("coarse")}, source)
