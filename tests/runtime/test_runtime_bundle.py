import dataclasses
import hashlib
import json
from pathlib import Path

import pytest

from imfree.errors import BundleError
from imfree.runtime.bundle import (
    MANIFEST_NAME,
    ExportManifest,
    read_manifest,
    sha256_file,
    write_manifest,
)


def _document(export_dir: Path) -> dict:
    return json.loads((export_dir / MANIFEST_NAME).read_text())


def _rewrite(export_dir: Path, document: dict) -> None:
    (export_dir / MANIFEST_NAME).write_text(json.dumps(document))


def test_round_trip_keeps_every_field(tmp_path, export_dir):
    engine = {
        "file": "model.fp16.engine",
        "precision": "fp16",
        "max_batch": 256,
        "gpu_name": "NVIDIA H100",
        "compute_capability": "9.0",
        "tensorrt_version": "10.3.0",
        "onnx_sha256": "ab" * 32,
    }
    folder = tmp_path / "copy"
    manifest = dataclasses.replace(read_manifest(export_dir), tensorrt_engines=[engine])

    path = write_manifest(folder, manifest)

    assert path == folder / MANIFEST_NAME
    assert read_manifest(folder) == manifest
    document = _document(folder)
    assert document["format"] == "imfree-export"
    assert document["format_version"] == 1
    # No temporary file is left behind.
    assert [p.name for p in folder.iterdir()] == [MANIFEST_NAME]


def test_defaults_fill_optional_fields(export_dir):
    document = _document(export_dir)
    for optional in ("input_name", "resize", "tensorrt_engines", "model", "versions"):
        del document[optional]
    _rewrite(export_dir, document)

    manifest = read_manifest(export_dir)

    assert manifest.input_name == "images"
    assert manifest.resize == "stretch"
    assert manifest.tensorrt_engines == []


def test_sha256_file_matches_hashlib(tmp_path):
    data = bytes(range(256)) * 5000
    (tmp_path / "blob").write_bytes(data)
    assert sha256_file(tmp_path / "blob", chunk_bytes=1000) == hashlib.sha256(data).hexdigest()


def test_missing_folder_names_it_and_the_fix(tmp_path):
    with pytest.raises(BundleError, match=r"does not exist.*imfree export ARTIFACT --out DIR"):
        read_manifest(tmp_path / "nowhere")


def test_missing_manifest_says_not_an_export_folder(tmp_path):
    with pytest.raises(BundleError, match=rf"not an export folder: {MANIFEST_NAME} is missing"):
        read_manifest(tmp_path)


def test_bad_json_is_reported(export_dir):
    (export_dir / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(BundleError, match=r"imfree_export.json is unreadable"):
        read_manifest(export_dir)


def test_json_that_is_not_an_object(export_dir):
    (export_dir / MANIFEST_NAME).write_text("[1, 2]")
    with pytest.raises(BundleError, match="holds no JSON object"):
        read_manifest(export_dir)


def test_wrong_format(export_dir):
    _rewrite(export_dir, {**_document(export_dir), "format": "something-else"})
    with pytest.raises(BundleError, match="is not an imfree export manifest"):
        read_manifest(export_dir)


def test_wrong_format_version(export_dir):
    _rewrite(export_dir, {**_document(export_dir), "format_version": 2})
    with pytest.raises(BundleError, match="format_version 2, this imfree reads version 1"):
        read_manifest(export_dir)


def test_missing_fields_are_all_named(export_dir):
    document = _document(export_dir)
    del document["classes"], document["threshold"]
    _rewrite(export_dir, document)
    with pytest.raises(BundleError, match=r"lacks the field\(s\) classes, threshold"):
        read_manifest(export_dir)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("classes", [], "classes must be a non-empty list"),
        ("classes", ["dog", "dog"], "duplicate names"),
        ("image_height", 0, "image_height must be a positive integer"),
        ("mean", [0.5, 0.5], "mean must list 3 numbers"),
        ("threshold", "high", "threshold must be a number"),
        ("resize", "centre-crop", "resize 'centre-crop' is not one of stretch"),
        ("interpolation", "magic", "interpolation 'magic' is not one of"),
        ("tensorrt_engines", [{"file": "x.engine"}], r"tensorrt_engines\[0\] lacks precision"),
    ],
)
def test_invalid_fields_are_refused(export_dir, field, value, message):
    _rewrite(export_dir, {**_document(export_dir), field: value})
    with pytest.raises(BundleError, match=message):
        read_manifest(export_dir)


def test_writer_refuses_an_invalid_manifest(tmp_path, export_dir):
    manifest = dataclasses.replace(read_manifest(export_dir), classes=[])
    with pytest.raises(BundleError, match="classes must be a non-empty list"):
        write_manifest(tmp_path, manifest)
    assert not (tmp_path / MANIFEST_NAME).exists()


def test_unknown_fields_are_ignored(export_dir):
    _rewrite(export_dir, {**_document(export_dir), "added_later": 1})
    assert isinstance(read_manifest(export_dir), ExportManifest)
