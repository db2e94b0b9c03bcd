"""Exporting a classifier artifact to one ONNX graph, gated on parity with PyTorch."""

from __future__ import annotations

import json
import shutil
import stat

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

import imfree.export.exporter as exporter
from imfree.errors import EngineUnavailable, ExportError
from imfree.export.exporter import ExportConfig, export_artifact
from imfree.export.graph import ScoringGraph
from imfree.export.onnx_graph import export_onnx
from imfree.export.parity import parity_images
from imfree.runtime.bundle import MANIFEST_NAME, read_manifest, sha256_file
from imfree.runtime.engines import OrtEngine
from imfree.toolkit.artifact import load_artifact

IMAGE_SIZE = (96, 96)


@pytest.fixture(scope="session")
def exports(tmp_path_factory, trained_artifacts, real_photos):
    """Export folders by (model, embeddings), built once per session. Read only."""
    cache = {}

    def get(model, embeddings=False):
        key = (model, embeddings)
        if key not in cache:
            out = tmp_path_factory.mktemp("exports") / f"{model}-{embeddings}"
            cache[key] = export_artifact(ExportConfig(
                artifact=trained_artifacts(model), out=out, embeddings=embeddings,
                parity_images=real_photos,
            ))
        return cache[key]

    return get


@pytest.fixture
def export_result(exports, tiny_model_name):
    return exports(tiny_model_name)


@pytest.fixture
def onnx_model(export_result):
    return onnx.load(str(export_result.folder / "model.onnx"))


@pytest.fixture(scope="session")
def photo_batch(real_photos):
    images, source = parity_images(real_photos, IMAGE_SIZE, 32)
    assert "photos" in source
    return images


def scoring_graph(backbone_cache, artifact_folder, embeddings=False):
    artifact = load_artifact(artifact_folder)
    return ScoringGraph(backbone_cache(artifact.model_name), artifact, embeddings).eval()


def ort_session(folder):
    return onnxruntime.InferenceSession(str(folder / "model.onnx"),
                                        providers=["CPUExecutionProvider"])


def metadata(model):
    return {p.key: p.value for p in model.metadata_props}


# --- the exported folder and graph ----------------------------------------------------------


def test_export_writes_model_and_manifest(export_result):
    folder = export_result.folder
    expected = ["model.onnx", "parity_reference.npz", MANIFEST_NAME]
    assert sorted(p.name for p in folder.iterdir()) == sorted(expected)


def test_manifest_describes_the_graph(export_result, trained_artifacts, tiny_model_name):
    manifest = read_manifest(export_result.folder)
    artifact = load_artifact(trained_artifacts(tiny_model_name))
    assert manifest.classes == artifact.classes
    assert (manifest.image_height, manifest.image_width) == IMAGE_SIZE
    assert manifest.onnx_sha256 == sha256_file(export_result.folder / "model.onnx")
    assert manifest.threshold == pytest.approx(2.0 / len(artifact.classes))
    assert manifest.embeddings_output is None
    assert manifest.model["backbone"] == tiny_model_name


def test_graph_input_is_uint8_images_with_dynamic_batch(onnx_model):
    (graph_input,) = onnx_model.graph.input
    assert graph_input.name == "images"
    tensor = graph_input.type.tensor_type
    assert tensor.elem_type == onnx.TensorProto.UINT8
    batch, height, width, channels = tensor.shape.dim
    assert batch.dim_param and not batch.HasField("dim_value")
    assert (height.dim_value, width.dim_value, channels.dim_value) == (96, 96, 3)


def test_graph_outputs_scores_only_by_default(onnx_model):
    assert [o.name for o in onnx_model.graph.output] == ["scores"]


def test_opset_is_at_least_17(onnx_model):
    versions = {o.domain: o.version for o in onnx_model.opset_import}
    assert versions.get("", versions.get("ai.onnx")) >= 17


def test_graph_passes_the_onnx_checker(onnx_model):
    onnx.checker.check_model(onnx_model)


def test_metadata_holds_preprocess_and_classes(onnx_model, trained_artifacts, tiny_model_name):
    props = metadata(onnx_model)
    artifact = load_artifact(trained_artifacts(tiny_model_name))
    assert json.loads(props["imfree.classes"]) == artifact.classes
    assert json.loads(props["imfree.preprocess"]) == artifact.preprocess.to_dict()
    assert json.loads(props["imfree.model"])["backbone"] == tiny_model_name


def test_old_opset_is_refused(tmp_path, backbone_cache, trained_artifacts):
    graph = scoring_graph(backbone_cache, trained_artifacts("imfree-tiny-rn"))
    with pytest.raises(ExportError, match="opset 16"):
        export_onnx(graph, tmp_path / "m.onnx", IMAGE_SIZE, {}, opset=16)


# --- numbers ------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 3, 32])
def test_onnxruntime_matches_scoring_graph(
    export_result, backbone_cache, trained_artifacts, tiny_model_name, photo_batch, batch
):
    graph = scoring_graph(backbone_cache, trained_artifacts(tiny_model_name))
    images = photo_batch[:batch]
    with torch.no_grad():
        expected = graph(torch.from_numpy(images)).numpy()
    (got,) = ort_session(export_result.folder).run(["scores"], {"images": images})
    assert got.shape == (batch, 6)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_scores_are_probabilities_that_vary_by_image(export_result, photo_batch):
    (scores,) = ort_session(export_result.folder).run(["scores"], {"images": photo_batch[:7]})
    np.testing.assert_allclose(scores.sum(axis=1), 1.0, atol=1e-5)
    assert np.ptp(scores, axis=0).max() > 0


def test_parity_report_ticks_every_batch(export_result, real_photos):
    (report,) = export_result.parity
    assert report.passed and report.engine == "onnxruntime CPU"
    assert str(real_photos) in report.images
    assert len(report.lines) == 3
    for line, batch in zip(report.lines, (1, 7, 32), strict=True):
        assert line.startswith(f"✓ batch {batch:>3}:"), line
    assert report.max_score_diff < 1e-5


def test_embeddings_output_is_unit_norm(exports, tiny_model_name, photo_batch):
    result = exports(tiny_model_name, embeddings=True)
    model = onnx.load(str(result.folder / "model.onnx"))
    assert [o.name for o in model.graph.output] == ["scores", "embeddings"]
    assert read_manifest(result.folder).embeddings_output == "embeddings"

    scores, embeddings = ort_session(result.folder).run(None, {"images": photo_batch[:3]})
    assert scores.shape == (3, 6) and embeddings.shape == (3, 64)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    assert "embedding cosine" in result.parity[0].lines[0]


def test_export_folder_is_as_readable_as_an_ordinary_folder(export_result, tmp_path):
    """Built in a temporary folder, it must still get the usual (umask) permissions."""
    reference = tmp_path / "ordinary"
    reference.mkdir()
    expected = stat.S_IMODE(reference.stat().st_mode)
    assert stat.S_IMODE(export_result.folder.stat().st_mode) == expected


# --- the gate refuses a bad engine --------------------------------------------------------


class ShiftedEngine(OrtEngine):
    def run(self, images):
        return {k: v + 0.01 for k, v in super().run(images).items()}


class NanEngine(OrtEngine):
    def run(self, images):
        outputs = super().run(images)
        outputs["scores"][0, 0] = np.nan
        return outputs


class ConstantEngine(OrtEngine):
    def run(self, images):
        outputs = super().run(images)
        outputs["scores"] = np.full_like(outputs["scores"], 1.0 / outputs["scores"].shape[1])
        return outputs


@pytest.fixture
def reuse_onnx(monkeypatch, exports):
    """Skip the slow ONNX export: copy the session's graph (the gate still runs on it)."""
    source = exports("imfree-tiny-rn").folder / "model.onnx"

    def copy_graph(graph, path, image_size, metadata, opset=18):
        shutil.copyfile(source, path)
        return path

    monkeypatch.setattr(exporter, "export_onnx", copy_graph)


@pytest.mark.parametrize(
    "engine, reason",
    [
        (ShiftedEngine, "score difference"),
        (NanEngine, "NaN"),
        (ConstantEngine, "the same for every image"),
    ],
)
def test_failed_gate_leaves_no_folder(
    engine, reason, monkeypatch, reuse_onnx, tmp_path, trained_artifacts, real_photos
):
    monkeypatch.setattr(exporter, "OrtEngine", engine)
    parent = tmp_path / "exports"
    out = parent / "export"
    config = ExportConfig(artifact=trained_artifacts("imfree-tiny-rn"), out=out,
                          parity_images=real_photos)
    with pytest.raises(ExportError, match=reason) as caught:
        export_artifact(config)
    assert "not kept" in str(caught.value)
    assert not out.exists()
    assert list(parent.iterdir()) == []  # no leftover .partial folder either


def test_failed_gate_keeps_an_older_export(
    monkeypatch, reuse_onnx, tmp_path, exports, trained_artifacts, real_photos
):
    out = shutil.copytree(exports("imfree-tiny-rn").folder, tmp_path / "export")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(exporter, "OrtEngine", ShiftedEngine)
    with pytest.raises(ExportError):
        export_artifact(ExportConfig(artifact=trained_artifacts("imfree-tiny-rn"), out=out,
                                     parity_images=real_photos))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


# --- destinations -------------------------------------------------------------------------


def test_non_empty_unrelated_folder_is_refused(tmp_path, trained_artifacts):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="non-empty folder"):
        export_artifact(ExportConfig(artifact=trained_artifacts("imfree-tiny-rn"), out=out))
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "keep me"


def test_file_as_destination_is_refused(tmp_path, trained_artifacts):
    out = tmp_path / "file"
    out.write_text("x")
    with pytest.raises(ExportError, match="is a file"):
        export_artifact(ExportConfig(artifact=trained_artifacts("imfree-tiny-rn"), out=out))


def test_empty_folder_is_accepted(reuse_onnx, tmp_path, trained_artifacts, real_photos):
    out = tmp_path / "empty"
    out.mkdir()
    result = export_artifact(ExportConfig(artifact=trained_artifacts("imfree-tiny-rn"), out=out,
                                          parity_images=real_photos, parity_batches=(1, 2)))
    assert (result.folder / "model.onnx").exists()


def test_reexport_replaces_an_existing_export(tmp_path, exports, trained_artifacts, real_photos):
    out = shutil.copytree(exports("imfree-tiny-rn").folder, tmp_path / "export")
    result = export_artifact(ExportConfig(
        artifact=trained_artifacts("imfree-tiny-rn"), out=out, threshold=0.5,
        parity_images=real_photos, parity_batches=(1, 2),
    ))
    assert result.folder == out
    expected = ["model.onnx", "parity_reference.npz", MANIFEST_NAME]
    assert sorted(p.name for p in out.iterdir()) == sorted(expected)
    assert read_manifest(out).threshold == 0.5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no .old or .partial


def test_reexport_refuses_an_export_holding_files_of_the_users(
    tmp_path, exports, trained_artifacts, real_photos
):
    out = shutil.copytree(exports("imfree-tiny-rn").folder, tmp_path / "export")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="notes.txt"):
        export_artifact(ExportConfig(
            artifact=trained_artifacts("imfree-tiny-rn"), out=out,
            parity_images=real_photos, parity_batches=(1,),
        ))
    assert (out / "notes.txt").read_text() == "mine"


def test_a_fake_manifest_does_not_make_a_folder_replaceable(tmp_path, trained_artifacts):
    out = tmp_path / "fake"
    out.mkdir()
    (out / MANIFEST_NAME).write_text("{}")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="damaged export"):
        export_artifact(ExportConfig(artifact=trained_artifacts("imfree-tiny-rn"), out=out))
    assert (out / "notes.txt").read_text() == "mine"


def test_tensorrt_unavailable_fails_before_onnx_work(monkeypatch, tmp_path, trained_artifacts):
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("TensorRT is installed here")

    def forbidden(*args, **kwargs):
        raise AssertionError("ONNX work started before TensorRT was checked")

    monkeypatch.setattr(exporter, "export_onnx", forbidden)
    monkeypatch.setattr(exporter, "load_backbone", forbidden)
    out = tmp_path / "export"
    with pytest.raises(EngineUnavailable, match="TensorRT"):
        export_artifact(ExportConfig(artifact=trained_artifacts("imfree-tiny-rn"), out=out,
                                     trt=True))
    assert list(tmp_path.iterdir()) == []
