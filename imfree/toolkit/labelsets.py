"""Label sets: class names with synonyms, their hierarchy and their corpus.

A label set is a folder holding `classes.json`, `hierarchy.json` and
`corpus.jsonl`. The bundled ones live in `imfree/toolkit/data/`; `--labels`
takes a bundled name or the path of such a folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from imfree.errors import ConfigError
from imfree.toolkit.hierarchy import Hierarchy, load_hierarchy
from imfree.toolkit.labels import ClassInfo

DATA_DIR = Path(__file__).parent / "data"


@dataclass
class LabelSet:
    name: str
    folder: Path
    classes: list[ClassInfo]
    hierarchy: Hierarchy

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.classes]

    @property
    def prompt_names(self) -> list[str]:
        return [c.prompt_name for c in self.classes]

    @property
    def corpus_path(self) -> Path:
        return self.folder / "corpus.jsonl"


def bundled_labelsets() -> list[str]:
    return sorted(p.parent.name for p in DATA_DIR.glob("*/classes.json"))


def load_labelset(spec: str | Path) -> LabelSet:
    """A bundled label set by name, or a label-set folder by path."""
    folder = _resolve(spec)
    classes = read_classes(folder / "classes.json")
    names = [c.name for c in classes]
    hierarchy_path = folder / "hierarchy.json"
    if hierarchy_path.exists():
        hierarchy = load_hierarchy(hierarchy_path, names)
    else:
        hierarchy = Hierarchy.flat(names)
    return LabelSet(name=folder.name, folder=folder, classes=classes, hierarchy=hierarchy)


def read_classes(path: Path) -> list[ClassInfo]:
    try:
        entries = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"cannot read class list {path}: {err}") from err
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{path} must be a JSON list of classes")

    classes = []
    for entry in entries:
        if isinstance(entry, str):
            entry = {"name": entry}
        if not isinstance(entry, dict) or not entry.get("name"):
            raise ConfigError(f"{path}: every class needs a 'name' (got {entry!r})")
        classes.append(ClassInfo(
            name=entry["name"],
            prompt_name=entry.get("prompt_name") or entry["name"],
            synonyms=tuple(entry.get("synonyms", ())),
        ))
    duplicates = {c.name for c in classes if [d.name for d in classes].count(c.name) > 1}
    if duplicates:
        raise ConfigError(f"{path}: classes listed twice: {', '.join(sorted(duplicates))}")
    return classes


def _resolve(spec: str | Path) -> Path:
    bundled = DATA_DIR / str(spec)
    if (bundled / "classes.json").exists():
        return bundled
    folder = Path(spec).expanduser()
    if (folder / "classes.json").exists():
        return folder
    raise ConfigError(
        f"unknown label set '{spec}': use a bundled one ({', '.join(bundled_labelsets())}) "
        f"or a folder holding classes.json, hierarchy.json and corpus.jsonl"
    )
