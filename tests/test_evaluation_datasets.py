"""The dataset readers on tiny copies of each benchmark layout, built from the real photos."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from imfree.errors import ImfreeError
from imfree.evaluation.classnames import match_classes
from imfree.evaluation.datasets import (
    VOC_CLASSES,
    DatasetError,
    read_coco,
    read_csv,
    read_dataset,
    read_nuswide,
    read_voc2007,
)
from imfree.toolkit.labelsets import load_labelset

REPO = Path(__file__).resolve().parents[1]
PHOTOS = REPO / "examples" / "images"


def voc_annotation(objects: list[tuple[str, int]]) -> str:
    items = "".join(f"<object><name>{name}</name><pose>Unspecified</pose><truncated>0"
                    f"</truncated><difficult>{hard}</difficult></object>"
                    for name, hard in objects)
    return f"<annotation><folder>VOC2007</folder>{items}</annotation>"


@pytest.fixture
def voc(tmp_path: Path) -> Path:
    """A devkit with three test images (one not on disk) and one trainval image."""
    root = tmp_path / "VOCdevkit" / "VOC2007"
    for sub in ("Annotations", "ImageSets/Main", "JPEGImages"):
        (root / sub).mkdir(parents=True)
    annotations = {
        "000001": [("dog", 0), ("person", 1), ("bicycle", 0)],  # person only difficult
        "000002": [("horse", 0), ("person", 0), ("person", 1)],  # person also non-difficult
        "000003": [("bird", 0)],  # listed, but its JPEG is missing
        "000004": [("cat", 0)],  # trainval only
    }
    for image_id, objects in annotations.items():
        (root / "Annotations" / f"{image_id}.xml").write_text(voc_annotation(objects))
    shutil.copy(PHOTOS / "dog.jpg", root / "JPEGImages" / "000001.jpg")
    shutil.copy(PHOTOS / "horses.jpg", root / "JPEGImages" / "000002.jpg")
    shutil.copy(PHOTOS / "eagle.jpg", root / "JPEGImages" / "000004.jpg")
    (root / "ImageSets/Main/test.txt").write_text("000001\n000002\n000003\n")
    (root / "ImageSets/Main/trainval.txt").write_text("000004\n")
    return tmp_path / "VOCdevkit"


def test_voc_reads_targets_difficult_pairs_and_counts_missing_images(voc: Path) -> None:
    evalset = read_voc2007(voc)

    assert evalset.classes == list(VOC_CLASSES)
    assert [p.name for p in evalset.paths] == ["000001.jpg", "000002.jpg"]
    assert (evalset.listed, evalset.missing) == (3, 1)
    assert any("1 of 3" in note for note in evalset.notes)
    person, dog = VOC_CLASSES.index("person"), VOC_CLASSES.index("dog")
    assert evalset.targets[0, dog] and not evalset.targets[0, person]
    assert evalset.difficult[0, person]  # only a difficult person in image 1
    assert evalset.targets[1, person] and not evalset.difficult[1, person]
    assert evalset.targets.sum() == 4 and evalset.difficult.sum() == 1


def test_voc_specs_take_any_of_the_devkit_folders_and_a_split(voc: Path) -> None:
    for folder in (voc.parent, voc, voc / "VOC2007"):
        assert len(read_dataset(f"voc2007:{folder}").paths) == 2
    trainval = read_dataset(f"voc2007:{voc},trainval")
    assert trainval.name == "voc2007 trainval"
    assert trainval.targets[0, VOC_CLASSES.index("cat")]


def test_voc_problems_are_one_line_errors(voc: Path, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="holds no VOC2007 devkit"):
        read_dataset(f"voc2007:{tmp_path / 'nowhere'}")
    (voc / "VOC2007/Annotations/000002.xml").write_text("<annotation><object>")
    with pytest.raises(DatasetError, match="cannot read VOC annotation .*000002.xml"):
        read_voc2007(voc)


def write_coco(folder: Path) -> Path:
    (folder / "annotations").mkdir(parents=True)
    (folder / "val2014").mkdir()
    for name, photo in (("a.jpg", "dog.jpg"), ("b.jpg", "scream.jpg")):
        shutil.copy(PHOTOS / photo, folder / "val2014" / name)
    instances = {
        "images": [{"id": 10, "file_name": "a.jpg"}, {"id": 11, "file_name": "b.jpg"},
                   {"id": 12, "file_name": "gone.jpg"}],
        "categories": [{"id": 18, "name": "dog"}, {"id": 1, "name": "person"},
                       {"id": 5, "name": "airplane"}],
        "annotations": [{"image_id": 10, "category_id": 18, "iscrowd": 0},
                        {"image_id": 10, "category_id": 1, "iscrowd": 1},
                        {"image_id": 12, "category_id": 5, "iscrowd": 0}],
    }
    path = folder / "annotations" / "instances_val2014.json"
    path.write_text(json.dumps(instances))
    return path


def test_coco_reads_categories_in_id_order_and_finds_the_image_folder(tmp_path: Path) -> None:
    instances = write_coco(tmp_path)

    evalset = read_coco(instances)

    assert evalset.classes == ["person", "airplane", "dog"]
    assert [p.name for p in evalset.paths] == ["a.jpg", "b.jpg"]
    assert evalset.missing == 1
    np.testing.assert_array_equal(evalset.targets, [[1, 0, 1], [0, 0, 0]])  # crowd counts
    same = read_dataset(f"coco2014:{instances},{tmp_path / 'val2014'}")
    np.testing.assert_array_equal(same.targets, evalset.targets)


def test_coco_problems_are_one_line_errors(tmp_path: Path) -> None:
    instances = write_coco(tmp_path)
    shutil.rmtree(tmp_path / "val2014")
    with pytest.raises(DatasetError, match="no image folder val2014/"):
        read_coco(instances)
    instances.write_text('{"images": []}')
    with pytest.raises(DatasetError, match="not a COCO instances file"):
        read_coco(instances, tmp_path)
    with pytest.raises(ImfreeError, match="cannot read the COCO instances file"):
        read_dataset(f"coco2014:{tmp_path / 'none.json'},{tmp_path}")


def test_coco_names_match_the_voc_style_names_through_the_alias_table() -> None:
    coco = ["airplane", "motorcycle", "couch", "tv", "dining table", "potted plant", "person"]
    voc = load_labelset("voc2007").classes
    names = [c.name for c in voc]

    matched = match_classes(coco, names)

    assert matched == {"airplane": "aeroplane", "motorcycle": "motorbike", "couch": "sofa",
                       "tv": "tvmonitor", "dining table": "diningtable",
                       "potted plant": "pottedplant", "person": "person"}
    bundled = [c.name for c in load_labelset("coco2014").classes]
    assert match_classes(coco, bundled) == {name: name for name in coco}
    assert match_classes(["Car", "cars"], ["car", "cars"]) == {"Car": "car", "cars": "cars"}


def write_nuswide(folder: Path) -> Path:
    (folder / "ImageList").mkdir(parents=True)
    (folder / "TrainTestLabels").mkdir()
    (folder / "Flickr" / "actor").mkdir(parents=True)
    (folder / "images").mkdir()
    shutil.copy(PHOTOS / "dog.jpg", folder / "Flickr" / "actor" / "0001_1.jpg")
    shutil.copy(PHOTOS / "horses.jpg", folder / "images" / "0002_2.jpg")  # flat layout
    (folder / "ImageList" / "TestImagelist.txt").write_text(
        "actor\\0001_1.jpg\r\nanimal\\0002_2.jpg\r\nanimal\\0003_3.jpg\r\n")
    (folder / "Concepts81.txt").write_text("dog\nhorses\nsky\n")
    for concept, values in (("dog", "1 0 0"), ("horses", "0 1 1"), ("sky", "0 0 0")):
        (folder / "TrainTestLabels" / f"Labels_{concept}_Test.txt").write_text(
            "\n".join(values.split()) + "\n")
    return folder


def test_nuswide_reads_windows_paths_and_counts_the_images_found(tmp_path: Path) -> None:
    folder = write_nuswide(tmp_path / "nus")

    evalset = read_dataset(f"nuswide:{folder}")

    assert evalset.classes == ["dog", "horses", "sky"]
    assert [p.name for p in evalset.paths] == ["0001_1.jpg", "0002_2.jpg"]
    assert (len(evalset.paths), evalset.listed) == (2, 3)
    np.testing.assert_array_equal(evalset.targets, [[1, 0, 0], [0, 1, 0]])
    assert match_classes(evalset.classes, ["dog", "horse"]) == {"dog": "dog", "horses": "horse"}


def test_nuswide_label_files_must_fit_the_image_list(tmp_path: Path) -> None:
    folder = write_nuswide(tmp_path / "nus")
    (folder / "TrainTestLabels" / "Labels_sky_Test.txt").write_text("0\n0\n")
    with pytest.raises(DatasetError, match="Labels_sky_Test.txt has 2 lines for 3 images"):
        read_nuswide(folder)
    (folder / "Concepts81.txt").unlink()
    shutil.rmtree(folder / "TrainTestLabels")
    with pytest.raises(DatasetError, match="neither Concepts81.txt"):
        read_nuswide(folder)


def test_csv_reads_the_examples_label_column() -> None:
    evalset = read_dataset(f"csv:{PHOTOS / 'labels.csv'}", label_column="voc_labels")

    assert evalset.classes == ["dog", "bicycle", "car", "bird", "horse", "person"]
    assert len(evalset.paths) == 7 and evalset.missing == 0
    by_name = {p.name: row for p, row in zip(evalset.paths, evalset.targets, strict=True)}
    assert not by_name["giraffe.jpg"].any()  # no VOC class in it: negative for all
    assert by_name["person.jpg"].sum() == 3
    assert all(p.parent == PHOTOS for p in evalset.paths)  # relative to the CSV's folder


def test_csv_problems_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="has no column 'labels'.*voc_labels"):
        read_csv(PHOTOS / "labels.csv")
    odd = tmp_path / "odd.csv"
    odd.write_text("picture,labels\na.jpg,dog\n")
    with pytest.raises(DatasetError, match="no image column"):
        read_csv(odd)
    with pytest.raises(DatasetError, match="cannot read the dataset CSV"):
        read_csv(tmp_path / "none.csv")
    (tmp_path / "gone.csv").write_text("path,labels\nnothing.jpg,dog\n")
    with pytest.raises(DatasetError, match="none of its 1 images is on disk"):
        read_dataset(f"csv:{tmp_path / 'gone.csv'}")


@pytest.mark.parametrize("spec", ["voc2007", "imagenet:/data", "csv:", "labels.csv"])
def test_unknown_specs_name_the_forms(spec: str) -> None:
    with pytest.raises(DatasetError, match="voc2007:DIR"):
        read_dataset(spec)


def test_subsets_keep_rows_and_columns_together(voc: Path) -> None:
    evalset = read_voc2007(voc)

    first = evalset.first(1)
    assert len(first.paths) == 1 and first.targets.shape == (1, 20)
    picked = evalset.with_classes(["person", "dog"])
    np.testing.assert_array_equal(picked.targets, [[0, 1], [1, 0]])
    np.testing.assert_array_equal(picked.difficult, [[1, 0], [0, 0]])


# Regressions from the tester's report.


def test_voc_names_and_difficult_flags_are_read_as_voc_writes_them(voc: Path) -> None:
    annotations = voc / "VOC2007" / "Annotations"
    (annotations / "000001.xml").write_text(
        "<annotation><object><name>Dog </name><difficult>0</difficult></object>"
        "<object><name>person</name><difficult>yes</difficult></object></annotation>")

    evalset = read_voc2007(voc)

    assert evalset.classes == list(VOC_CLASSES)  # no extra class "Dog"
    dog, person = VOC_CLASSES.index("dog"), VOC_CLASSES.index("person")
    assert evalset.targets[0, dog] and evalset.difficult[0, person]
    (annotations / "000001.xml").write_text(voc_annotation([("dog", "maybe")]))
    with pytest.raises(DatasetError, match="'maybe'; write 0 or 1"):
        read_voc2007(voc)


def test_an_unknown_voc_split_names_the_splits(voc: Path) -> None:
    with pytest.raises(DatasetError, match="'bogus' is not a VOC2007 split: name one of train"):
        read_dataset(f"voc2007:{voc},bogus")


def test_nuswide_labels_other_than_0_and_1_are_refused(tmp_path: Path) -> None:
    (tmp_path / "ImageList").mkdir()
    (tmp_path / "TrainTestLabels").mkdir()
    (tmp_path / "ImageList" / "TestImagelist.txt").write_text("a\\1.jpg\na\\2.jpg\n")
    (tmp_path / "TrainTestLabels" / "Labels_dog_Test.txt").write_text("1\n2\n")
    with pytest.raises(DatasetError, match="Labels_dog_Test.txt, line 2: label '2'"):
        read_nuswide(tmp_path)


@pytest.mark.parametrize("text, message", [
    ("path,labels\n", "lists no images"),
    ("path,labels\ndog.jpg,\nscream.jpg,\n", "empty in every row"),
    ("path,labels\nnone.jpg,dog\n", "looked for .*none.jpg"),
    ("path,labels\ndog.jpg,dog\ndog.jpg,person\n", "lists .*dog.jpg twice"),
])
def test_csv_problems_say_what_is_wrong(tmp_path: Path, text: str, message: str) -> None:
    shutil.copy(PHOTOS / "dog.jpg", tmp_path / "dog.jpg")
    shutil.copy(PHOTOS / "scream.jpg", tmp_path / "scream.jpg")
    (tmp_path / "labels.csv").write_text(text)
    with pytest.raises(DatasetError, match=message):
        read_dataset(f"csv:{tmp_path / 'labels.csv'}")
