"""Labelled image sets to evaluate on: VOC2007, COCO 2014, NUS-WIDE and a plain CSV.

Every reader returns an `EvalSet`: image paths, class names, a boolean target
matrix and, for VOC, the pairs marked "difficult". Images a dataset lists but
that are not on disk are left out and counted, never a failure: a partial
download still evaluates, and the report says how many images were used.

The CLI names a dataset with a spec: `voc2007:DIR[,SPLIT]`,
`coco2014:INSTANCES_JSON[,IMAGES_DIR]`, `nuswide:DIR` or `csv:FILE`.
"""

from __future__ import annotations

import csv
import logging
import xml.etree.ElementTree as ElementTree
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from imfree.errors import ImfreeError
from imfree.fileio import read_json

logger = logging.getLogger(__name__)

DATASET_KINDS = ("voc2007", "coco2014", "nuswide", "csv")
SPEC_HELP = ("voc2007:DIR[,SPLIT], coco2014:INSTANCES_JSON[,IMAGES_DIR], nuswide:DIR or "
             "csv:FILE")

# The 20 VOC classes in the devkit's order; every image is labelled for all of them.
VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)
VOC_SPLITS = ("train", "val", "trainval", "test")

# Column names taken as the image path of a CSV, in this order.
CSV_PATH_COLUMNS = ("path", "file", "filename", "image")


class DatasetError(ImfreeError):
    """A dataset is missing, laid out differently, or damaged."""


@dataclass
class EvalSet:
    """Images with their labels; targets[i, c] says image i shows class c."""

    name: str
    paths: list[Path]
    classes: list[str]
    targets: np.ndarray  # bool [N, C]
    difficult: np.ndarray | None = None  # bool [N, C]: only "difficult" objects of the class
    listed: int = 0  # images the dataset lists, found on disk or not
    notes: list[str] = field(default_factory=list)  # what the reader left out, for the report

    missing_example: str = ""  # where a listed image was looked for and not found

    @property
    def missing(self) -> int:
        return self.listed - len(self.paths)

    def first(self, count: int) -> EvalSet:
        """The first `count` images (for --limit)."""
        return self._rows(slice(0, count))

    def _rows(self, rows: slice | np.ndarray) -> EvalSet:
        paths = np.array(self.paths, dtype=object)[rows].tolist()
        difficult = None if self.difficult is None else self.difficult[rows]
        return replace(self, paths=paths, targets=self.targets[rows], difficult=difficult,
                       notes=list(self.notes))

    def with_classes(self, classes: Sequence[str]) -> EvalSet:
        """The same images with only `classes` (a subset of this set's, in any order)."""
        columns = [self.classes.index(name) for name in classes]
        difficult = None if self.difficult is None else self.difficult[:, columns]
        return replace(self, classes=list(classes), targets=self.targets[:, columns],
                       difficult=difficult)


def read_dataset(spec: str, label_column: str = "labels") -> EvalSet:
    """The EvalSet a CLI spec names, e.g. `voc2007:data/VOCdevkit` or `csv:labels.csv`."""
    kind, _, rest = spec.partition(":")
    if kind not in DATASET_KINDS or not rest:
        raise DatasetError(f"cannot read dataset spec {spec!r}: write it as {SPEC_HELP}")

    if kind == "voc2007":
        folder, split = _split_suffix(rest, VOC_SPLITS, "test")
        head, comma, tail = folder.rpartition(",")
        if comma and not Path(folder).exists() and Path(head).exists():
            raise DatasetError(f"{tail!r} is not a VOC2007 split: name one of "
                               f"{', '.join(VOC_SPLITS)} (voc2007:DIR,test)")
        evalset = read_voc2007(Path(folder), split)
    elif kind == "coco2014":
        instances, _, images = rest.partition(",")
        evalset = read_coco(Path(instances), Path(images) if images else None)
    elif kind == "nuswide":
        evalset = read_nuswide(Path(rest))
    else:
        evalset = read_csv(Path(rest), label_column)

    if not evalset.listed:
        raise DatasetError(f"{evalset.name} lists no images; pass a dataset with at least one "
                           f"image ({SPEC_HELP})")
    if not evalset.paths:
        where = evalset.missing_example
        raise DatasetError(f"{evalset.name}: none of its {evalset.listed} images is on disk "
                           f"(looked for {where}, for one); check the dataset folder "
                           f"({SPEC_HELP})")
    return evalset


def _split_suffix(text: str, choices: Sequence[str], default: str) -> tuple[str, str]:
    head, _, tail = text.rpartition(",")
    return (head, tail) if head and tail in choices else (text, default)


# VOC2007 -----------------------------------------------------------------------------

def read_voc2007(folder: Path, split: str = "test") -> EvalSet:
    """A VOC devkit split: the image list, one XML per image, JPEGImages.

    An image shows a class if it holds a non-difficult object of it; a class
    seen only in objects marked difficult is flagged in `difficult` instead,
    so the evaluation can ignore that pair or count it negative.
    """
    root = _voc_root(folder)
    ids = _read_lines(root / "ImageSets" / "Main" / f"{split}.txt", "the VOC image list")
    objects = [_voc_objects(root / "Annotations" / f"{image_id}.xml") for image_id in ids]

    others = sorted({name for found in objects for name, _ in found} - set(VOC_CLASSES))
    classes = list(VOC_CLASSES) + others
    column = {name: c for c, name in enumerate(classes)}
    targets = np.zeros((len(ids), len(classes)), dtype=bool)
    difficult_only = np.zeros_like(targets)
    for row, found in enumerate(objects):
        for name, difficult in found:
            (difficult_only if difficult else targets)[row, column[name]] = True
    difficult_only &= ~targets

    paths = [root / "JPEGImages" / f"{image_id}.jpg" for image_id in ids]
    evalset = EvalSet(f"voc2007 {split}", paths, classes, targets, difficult_only, len(ids))
    return _keep_found(evalset)


def _voc_root(folder: Path) -> Path:
    # Accept the VOC2007 folder itself, VOCdevkit, or the folder holding VOCdevkit.
    for candidate in (folder, folder / "VOC2007", folder / "VOCdevkit" / "VOC2007"):
        if (candidate / "Annotations").is_dir() and (candidate / "ImageSets").is_dir():
            return candidate
    raise DatasetError(f"{folder} holds no VOC2007 devkit: pass the folder with "
                       f"Annotations/, ImageSets/Main/ and JPEGImages/ (VOCdevkit/VOC2007)")


def _voc_objects(path: Path) -> list[tuple[str, bool]]:
    """(class name, difficult) of every object in one annotation file."""
    try:
        tree = ElementTree.parse(path)
    except FileNotFoundError as err:
        raise DatasetError(f"{path} is missing: the image list names an image without "
                           f"annotation; restore the devkit's Annotations folder") from err
    except (OSError, ElementTree.ParseError) as err:
        raise DatasetError(f"cannot read VOC annotation {path}: {err}") from err

    found = []
    for item in tree.getroot().iter("object"):
        # VOC's class names are lower case: "Dog " is the class dog, not a new one.
        name = (item.findtext("name") or "").strip().lower()
        difficult = (item.findtext("difficult") or "0").strip().lower()
        if difficult not in ("0", "1", "true", "false", "yes", "no"):
            raise DatasetError(f"{path}: <difficult> of a {name or 'nameless'} object is "
                               f"{difficult!r}; write 0 or 1")
        if name:
            found.append((name, difficult in ("1", "true", "yes")))
    return found


# COCO 2014 ---------------------------------------------------------------------------

def read_coco(instances: Path, images: Path | None = None) -> EvalSet:
    """COCO instances JSON: an image shows every category it has an annotation of.

    Crowd annotations count as well: they mark the category as present. Images
    without any annotation stay in, negative for every class.
    """
    data = read_json(instances, "the COCO instances file")
    fix = "pass annotations/instances_val2014.json, or repair the file"
    try:
        categories = sorted(_coco_list(data, "categories"), key=lambda c: int(c["id"]))
        classes = [str(c["name"]) for c in categories]
        column = {c["id"]: i for i, c in enumerate(categories)}
        files = [(image["id"], image["file_name"]) for image in _coco_list(data, "images")]
        annotations = _coco_list(data, "annotations", required=False)
    except (KeyError, TypeError, ValueError) as err:  # not an object where one belongs
        raise DatasetError(f"{instances} is not a COCO instances file ({_coco_problem(err)}); "
                           f"{fix}") from err
    bad_names = [image_id for image_id, name in files if not isinstance(name, str) or not name]
    if bad_names:
        raise DatasetError(f"{instances}: image {bad_names[0]!r} has no file_name; {fix}")
    if not files:
        raise DatasetError(f"{instances} lists no images; {fix}")

    row = {image_id: i for i, (image_id, _) in enumerate(files)}
    targets = np.zeros((len(files), len(classes)), dtype=bool)
    for number, annotation in enumerate(annotations):
        try:
            image_id, category_id = annotation["image_id"], annotation["category_id"]
        except (KeyError, TypeError) as err:
            raise DatasetError(f"{instances}: annotation {number} is not an object with "
                               f"image_id and category_id ({_coco_problem(err)}); {fix}") from err
        if image_id not in row:
            raise DatasetError(f"{instances}: annotation {number} (id "
                               f"{annotation.get('id')!r}) names image_id {image_id!r}, which "
                               f"no image has; {fix}")
        if category_id not in column:
            raise DatasetError(f"{instances}: annotation {number} (id "
                               f"{annotation.get('id')!r}) names category_id {category_id!r}, "
                               f"which no category has; {fix}")
        targets[row[image_id], column[category_id]] = True

    folder = images or _coco_images_folder(instances)
    paths = [folder / name for _, name in files]
    split = instances.stem.removeprefix("instances_")
    return _keep_found(EvalSet(f"coco {split}", paths, classes, targets, None, len(files)))


def _coco_list(data: Any, key: str, required: bool = True) -> list:
    """`data[key]`, a list; TypeError or KeyError saying which key is wrong."""
    if not isinstance(data, dict):
        raise TypeError(f"the file holds a JSON {type(data).__name__}, not an object")
    if key not in data and not required:
        return []
    value = data[key]
    if not isinstance(value, list):
        raise TypeError(f'"{key}" is {type(value).__name__}, not a list')
    return value


def _coco_problem(err: Exception) -> str:
    if isinstance(err, KeyError):
        return f"key {err} is missing"
    if isinstance(err, ValueError):
        return f"an id is not a number: {err}"
    return str(err)


def _coco_images_folder(instances: Path) -> Path:
    # The usual layout: annotations/instances_val2014.json beside val2014/.
    split = instances.stem.removeprefix("instances_")
    for candidate in (instances.parent.parent / split, instances.parent / split):
        if candidate.is_dir():
            return candidate
    raise DatasetError(f"no image folder {split}/ next to {instances.parent}; name it: "
                       f"coco2014:{instances},IMAGES_DIR")


# NUS-WIDE ----------------------------------------------------------------------------

def read_nuswide(folder: Path) -> EvalSet:
    """NUS-WIDE's test split: ImageList/TestImagelist.txt and TrainTestLabels/Labels_*_Test.txt.

    The image list holds Windows paths (`actor\\0001_2124494179.jpg`); images are
    looked for under Flickr/, images/ or the folder itself, by that path or by
    file name. Many of NUS-WIDE's Flickr images are no longer downloadable:
    the report gives the count actually found.
    """
    listed = _read_lines(folder / "ImageList" / "TestImagelist.txt", "the NUS-WIDE image list")
    concepts = _nuswide_concepts(folder)
    targets = np.zeros((len(listed), len(concepts)), dtype=bool)
    for c, concept in enumerate(concepts):
        label_file = folder / "TrainTestLabels" / f"Labels_{concept}_Test.txt"
        values = _read_lines(label_file, f"the labels of {concept!r}")
        if len(values) != len(listed):
            raise DatasetError(f"{label_file} has {len(values)} lines for {len(listed)} "
                               f"images in ImageList/TestImagelist.txt; restore both files")
        bad = next((i for i, value in enumerate(values) if value not in ("0", "1")), None)
        if bad is not None:
            raise DatasetError(f"{label_file}, line {bad + 1}: label {values[bad]!r} is neither "
                               f"0 nor 1; restore the file")
        targets[:, c] = np.array(values) == "1"

    paths = [_nuswide_image(folder, line.replace("\\", "/")) for line in listed]
    evalset = EvalSet("nus-wide test", paths, concepts, targets, None, len(listed))
    evalset = _keep_found(evalset)
    logger.info("NUS-WIDE: %d of %d test images found", len(evalset.paths), len(listed))
    return evalset


def _nuswide_concepts(folder: Path) -> list[str]:
    listing = folder / "Concepts81.txt"
    if listing.is_file():
        return _read_lines(listing, "the NUS-WIDE concept list")
    found = sorted(p.name[len("Labels_"):-len("_Test.txt")]
                   for p in (folder / "TrainTestLabels").glob("Labels_*_Test.txt"))
    if not found:
        raise DatasetError(f"{folder} holds neither Concepts81.txt nor "
                           f"TrainTestLabels/Labels_*_Test.txt; pass the NUS-WIDE folder")
    return found


def _nuswide_image(folder: Path, relative: str) -> Path:
    name = relative.rsplit("/", 1)[-1]
    candidates = [folder / "Flickr" / relative, folder / "images" / relative, folder / relative,
                  folder / "images" / name, folder / "Flickr" / name]
    return next((p for p in candidates if p.is_file()), candidates[0])


# CSV ---------------------------------------------------------------------------------

def read_csv(path: Path, label_column: str = "labels") -> EvalSet:
    """A CSV with an image path column and a column of ';'-separated class names.

    Paths are relative to the CSV's folder. The classes are every name the
    label column uses; an image with an empty cell shows none of them.
    """
    rows, columns = _csv_rows(path)
    path_column = next((c for c in CSV_PATH_COLUMNS if c in columns), None)
    if path_column is None:
        raise DatasetError(f"{path} has no image column: name one of {', '.join(CSV_PATH_COLUMNS)}"
                           f" (columns: {', '.join(columns)})")
    if label_column not in columns:
        raise DatasetError(f"{path} has no column {label_column!r}; pick one with "
                           f"--label-column (columns: {', '.join(columns)})")
    if rows and not any((row[label_column] or "").strip() for row in rows):
        raise DatasetError(f"the column {label_column!r} of {path} is empty in every row; "
                           f"pick the column with the labels with --label-column (columns: "
                           f"{', '.join(columns)})")

    labels = [[n.strip() for n in (row[label_column] or "").split(";") if n.strip()]
              for row in rows]
    classes = list(dict.fromkeys(name for names in labels for name in names))
    column = {name: c for c, name in enumerate(classes)}
    targets = np.zeros((len(rows), len(classes)), dtype=bool)
    for i, names in enumerate(labels):
        targets[i, [column[n] for n in names]] = True

    paths = [path.parent / (row[path_column] or "") for row in rows]
    evalset = EvalSet(f"{path.name} ({label_column})", paths, classes, targets, None, len(rows))
    return _keep_found(evalset)


def _csv_rows(path: Path) -> tuple[list[dict[str, str]], list[str]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            rows = list(reader)
            return rows, list(reader.fieldnames or [])
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DatasetError(f"cannot read the dataset CSV {path}: {err}") from err


# Shared ------------------------------------------------------------------------------

def _keep_found(evalset: EvalSet) -> EvalSet:
    seen: set[Path] = set()
    for path in evalset.paths:
        if path in seen:
            raise DatasetError(f"{evalset.name} lists {path} twice; list each image once "
                               f"(with all its labels)")
        seen.add(path)
    found = np.array([p.is_file() for p in evalset.paths], dtype=bool)
    if found.all():
        return evalset
    evalset.missing_example = str(evalset.paths[int(np.argmin(found))])
    missing = int((~found).sum())
    logger.warning("%s: %d of %d listed images are not on disk and are left out",
                   evalset.name, missing, evalset.listed)
    kept = evalset._rows(found)
    kept.notes.append(f"{missing} of {evalset.listed} listed images not found on disk")
    return kept


def _read_lines(path: Path, what: str) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as err:
        raise DatasetError(f"{path} is missing ({what}); check the dataset folder") from err
    except (OSError, UnicodeDecodeError) as err:
        raise DatasetError(f"cannot read {what} {path}: {err}") from err
    return [line.strip() for line in text.splitlines() if line.strip()]
