"""Label sets: class names with synonyms, their hierarchy and their corpus.

A label set is a folder holding `classes.json`, `hierarchy.json` and
`corpus.jsonl`. The bundled ones live in `imfree/toolkit/data/`. `--labels`
takes a bundled name, the path of such a folder, the path of a corpus inside one
(that corpus is used instead of the folder's own), or a label text file: one
class a line, optionally followed by a colon and comma-separated synonyms
("dining table: table, kitchen table"); `#` starts a comment.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from imfree.errors import ConfigError
from imfree.fileio import read_json, write_atomically
from imfree.toolkit.hierarchy import Hierarchy, load_hierarchy
from imfree.toolkit.labels import ClassInfo

DATA_DIR = Path(__file__).parent / "data"


@dataclass
class LabelSet:
    name: str
    folder: Path
    classes: list[ClassInfo]
    hierarchy: Hierarchy
    corpus: Path | None = None  # None: the folder's corpus.jsonl
    source: Path | None = None  # the label text file, for label sets read from one

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.classes]

    @property
    def prompt_names(self) -> list[str]:
        return [c.prompt_name for c in self.classes]

    @property
    def corpus_path(self) -> Path:
        if self.corpus is not None:
            return self.corpus
        if self.source is not None:
            raise ConfigError(
                f"label file {self.source} lists classes but holds no sentences: pass --corpus, "
                f"or write a label set with `imfree knowledge {self.source} --out DIR` and "
                f"train with --labels DIR"
            )
        return self.folder / "corpus.jsonl"


def bundled_labelsets() -> list[str]:
    return sorted(p.parent.name for p in DATA_DIR.glob("*/classes.json"))


def load_labelset(spec: str | Path) -> LabelSet:
    """A bundled label set by name, a label-set folder, a corpus in one, or a label file."""
    path = Path(spec).expanduser()
    if not (DATA_DIR / str(spec) / "classes.json").exists() and path.is_file():
        if path.suffix == ".jsonl":
            if not (path.parent / "classes.json").exists():
                raise ConfigError(f"corpus {path} has no classes.json beside it; pass the "
                                  f"label set with --labels and the corpus with --corpus")
            labelset = load_labelset(path.parent)
            labelset.corpus = path
            return labelset
        classes = read_label_text(path)
        return LabelSet(name=path.stem, folder=path.parent, classes=classes,
                        hierarchy=Hierarchy.flat([c.name for c in classes]), source=path)

    folder = _resolve(spec)
    classes = read_classes(folder / "classes.json")
    names = [c.name for c in classes]
    hierarchy_path = folder / "hierarchy.json"
    if hierarchy_path.exists():
        hierarchy = load_hierarchy(hierarchy_path, names)
    else:
        hierarchy = Hierarchy.flat(names)
    return LabelSet(name=folder.name, folder=folder, classes=classes, hierarchy=hierarchy)


def read_label_text(path: Path) -> list[ClassInfo]:
    """Classes from a text file: `name` or `name: synonym, synonym` a line."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read label file {path}: {err}") from err

    classes = []
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, _, rest = line.partition(":")
        name = " ".join(name.split())
        synonyms = tuple(" ".join(s.split()) for s in rest.split(",") if s.strip())
        if not name:
            raise ConfigError(f"{path}: the line {line!r} has synonyms but no class name; "
                              f"write 'name: synonym, synonym'")
        classes.append(ClassInfo(name=name, prompt_name=name, synonyms=synonyms))
    if not classes:
        raise ConfigError(f"label file {path} names no class; write one class a line")
    _refuse_duplicates(classes, path)
    return classes


def read_classes(path: Path) -> list[ClassInfo]:
    entries = read_json(path, "class list")
    if not isinstance(entries, list):
        raise ConfigError(f"{path} must be a JSON list of classes, not {type(entries).__name__}")
    if not entries:
        raise ConfigError(f"{path} lists no classes; add at least one")

    classes = [_class_info(entry, path) for entry in entries]
    _refuse_duplicates(classes, path)
    return classes


def _class_info(entry: object, path: Path) -> ClassInfo:
    if isinstance(entry, str):
        entry = {"name": entry}
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"]:
        raise ConfigError(f"{path}: every class needs a 'name' string (got {entry!r})")
    synonyms = entry.get("synonyms", [])
    if not isinstance(synonyms, list) or not all(isinstance(s, str) for s in synonyms):
        raise ConfigError(f"{path}: 'synonyms' of {entry['name']!r} must be a list of strings")
    prompt_name = entry.get("prompt_name") or entry["name"]
    if not isinstance(prompt_name, str):
        raise ConfigError(f"{path}: 'prompt_name' of {entry['name']!r} must be a string")
    return ClassInfo(name=entry["name"], prompt_name=prompt_name, synonyms=tuple(synonyms))


def write_classes(path: Path, classes: list[ClassInfo]) -> None:
    """classes.json in the bundled format, one class a line."""
    rows = [json.dumps({"name": c.name, "prompt_name": c.prompt_name,
                        "synonyms": list(c.synonyms)}, ensure_ascii=False) for c in classes]
    write_atomically(path, "[\n  " + ",\n  ".join(rows) + "\n]\n")


def _refuse_duplicates(classes: list[ClassInfo], path: Path) -> None:
    names = [c.name.lower() for c in classes]
    duplicates = {c.name for c in classes if names.count(c.name.lower()) > 1}
    if duplicates:
        raise ConfigError(f"{path}: classes listed twice: {', '.join(sorted(duplicates))}")


def _resolve(spec: str | Path) -> Path:
    bundled = DATA_DIR / str(spec)
    if (bundled / "classes.json").exists():
        return bundled
    folder = Path(spec).expanduser()
    if (folder / "classes.json").exists():
        return folder
    raise ConfigError(
        f"unknown label set '{spec}': use a bundled one ({', '.join(bundled_labelsets())}), "
        f"a folder holding classes.json, hierarchy.json and corpus.jsonl, or a label "
        f"text file (one class a line)"
    )
