"""An export folder tampered with after the export is refused, not run."""

from __future__ import annotations

import json
import shutil

import pytest

from imfree.errors import BundleError
from imfree.runtime.bundle import MANIFEST_NAME, read_manifest
from imfree.runtime.engines import open_engine


def test_a_swapped_graph_is_refused_by_its_hash(tmp_path, export_dir):
    folder = shutil.copytree(export_dir, tmp_path / "swapped")
    manifest = read_manifest(folder)
    graph = folder / manifest.onnx_file
    graph.write_bytes(graph.read_bytes()[:-10])
    with pytest.raises(BundleError, match="hash differs"):
        open_engine(folder, manifest, "ort-cpu")


def test_a_graph_path_outside_the_folder_is_refused(tmp_path, export_dir):
    folder = shutil.copytree(export_dir, tmp_path / "escape")
    document = json.loads((folder / MANIFEST_NAME).read_text())
    document["onnx_file"] = "../../etc/passwd"
    (folder / MANIFEST_NAME).write_text(json.dumps(document))
    with pytest.raises(BundleError, match="plain names"):
        read_manifest(folder)


def test_infer_exits_1_when_no_file_could_be_tagged(tmp_path, export_dir):
    from typer.testing import CliRunner

    from imfree.cli import app

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.jpg").write_bytes(b"")
    (bad / "b.png").write_text("not a png")
    out = tmp_path / "tags.csv"
    result = CliRunner().invoke(app, ["infer", str(bad), "--model", str(export_dir),
                                      "--out", str(out)])
    assert result.exit_code == 1, result.output
    assert "none of the 2 files could be tagged" in result.output
    assert len(out.read_text().splitlines()) == 3  # header and two error rows, kept
