"""INT8, FP16 and PyTorch variants of an export: written, gated, recorded, and run.

One tiny export with every CPU-checkable variant is built once and shared; the
TensorRT paths that need a GPU are tested only up to the point where one is
needed (argument checks, cache keys, refusing a foreign engine).
"""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import numpy as np
import onnx
import pytest

from imfree.errors import BundleError, ConfigError, EngineUnavailable, ExportError
from imfree.export.exporter import ExportConfig, export_artifact
from imfree.runtime import engines, tensorrt_runner
from imfree.runtime.bundle import find_variant, read_manifest, sha256_file, write_manifest
from imfree.runtime.gate import REFERENCE_FILE, TOLERANCES, load_reference
from imfree.runtime.tensorrt_runner import MachineInfo

HERE = MachineInfo(gpu_name="NVIDIA H100", compute_capability="9.0", tensorrt_version="10.3.0")


@pytest.fixture(scope="module")
def variants(tmp_path_factory, trained_artifacts, real_photos):
    """imfree-tiny-rn exported with --int8 --calibrate, --fp16 and --torch. Read only."""
    out = tmp_path_factory.mktemp("variants") / "export"
    return export_artifact(ExportConfig(
        artifact=trained_artifacts("imfree-tiny-rn"), out=out, int8=True,
        calibrate=real_photos, fp16=True, torch_program=True, parity_images=real_photos,
    ))


@pytest.fixture
def folder(variants):
    return variants.folder


def test_every_variant_is_recorded_with_its_hash_and_parity(folder):
    manifest = read_manifest(folder)

    assert [v["precision"] for v in manifest.onnx_variants] == ["int8", "fp16"]
    for variant in manifest.onnx_variants:
        assert variant["sha256"] == sha256_file(folder / variant["file"])
        assert variant["parity"]["max_score_diff"] <= TOLERANCES[variant["precision"]].score_abs
        assert variant["parity"]["min_embedding_cosine"] >= 0.98
    assert find_variant(manifest, "int8")["calibration"]["images"] == 7
    assert manifest.torch_program == "model.pt2" and (folder / "model.pt2").is_file()


def test_parity_lines_are_printed_for_each_precision(variants):
    precisions = [r.precision for r in variants.parity]
    assert precisions == ["fp32", "int8", "fp16", "fp32"]
    assert all(r.passed and len(r.lines) == 3 for r in variants.parity)


def test_int8_graph_is_quantised_but_keeps_its_head_in_float(folder):
    model = onnx.load(str(folder / "model.int8.onnx"))
    ops = [n.op_type for n in model.graph.node]
    consumers = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    assert ops.count("QuantizeLinear") > 10 and ops.count("DequantizeLinear") > 10
    # Float head: nothing from the features' L2 norm on (classifiers, softmaxes, mixing)
    # is quantised.
    stack = [n for n in model.graph.node if n.op_type == "ReduceL2"]
    head = []
    while stack:
        node = stack.pop()
        head.append(node.op_type)
        stack += [c for out in node.output for c in consumers.get(out, [])]
    assert "Softmax" in head and "MatMul" in head
    assert "QuantizeLinear" not in head


def test_fp16_graph_keeps_uint8_input_and_float_outputs(folder):
    model = onnx.load(str(folder / "model.fp16.onnx"))
    half = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT16]

    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert len(half) > 10


def test_embeddings_output_is_dropped_when_not_asked_for(folder):
    for file in ("model.onnx", "model.int8.onnx", "model.fp16.onnx"):
        model = onnx.load(str(folder / file))
        assert [o.name for o in model.graph.output] == ["scores"], file


def test_reference_outputs_are_saved_for_the_runtime_gate(folder):
    reference = load_reference(folder)
    assert (folder / REFERENCE_FILE).is_file()
    assert reference.images.shape == (32, 96, 96, 3) and reference.images.dtype == np.uint8
    assert reference.scores.shape == (32, 6) and reference.embeddings.shape[0] == 32
    assert "photos" in reference.source


@pytest.mark.parametrize("choice", ["ort-cpu-int8", "torch"])
def test_variant_engines_match_fp32_within_their_tolerance(folder, choice):
    manifest = read_manifest(folder)
    reference = load_reference(folder)
    engine = engines.open_engine(folder, manifest, choice)
    try:
        scores = engine.run(reference.images[:5])["scores"]
    finally:
        engine.close()

    assert engine.name == choice
    limit = TOLERANCES[engines.ENGINE_PRECISION[choice]].score_abs
    np.testing.assert_allclose(scores, reference.scores[:5], atol=limit)


def test_only_the_int8_engine_keeps_a_memory_arena(folder):
    # The arena made INT8 runs faster for little memory; FP32 would have gone over
    # the memory budget at batch 256 (see OrtEngine).
    manifest, reference = read_manifest(folder), load_reference(folder)
    int8 = engines.open_engine(folder, manifest, "ort-cpu-int8")
    fp32 = engines.open_engine(folder, manifest, "ort-cpu")
    try:
        scores = int8.run(reference.images[:3])["scores"]
    finally:
        int8.close()
        fp32.close()

    assert int8._session.get_session_options().enable_cpu_mem_arena
    assert not fp32._session.get_session_options().enable_cpu_mem_arena
    np.testing.assert_allclose(scores, reference.scores[:3], atol=TOLERANCES["int8"].score_abs)


def test_auto_prefers_the_int8_graph_on_the_cpu(folder):
    engine = engines.open_engine(folder, read_manifest(folder))
    assert engine.name == "ort-cpu-int8"


def test_asking_for_a_variant_the_export_lacks_says_how_to_add_it(folder):
    manifest = dataclasses.replace(read_manifest(folder), onnx_variants=[], torch_program=None)
    with pytest.raises(EngineUnavailable, match="no INT8 graph.*--int8 --calibrate FOLDER"):
        engines.open_engine(folder, manifest, "ort-cpu-int8")
    with pytest.raises(EngineUnavailable, match="no PyTorch program.*--torch"):
        engines.open_engine(folder, manifest, "torch")


def test_a_missing_variant_file_is_a_bundle_error(folder, tmp_path):
    manifest = read_manifest(folder)
    record = {**find_variant(manifest, "int8"), "file": "gone.onnx"}
    manifest = dataclasses.replace(manifest, onnx_variants=[record])
    with pytest.raises(BundleError, match="gone.onnx is missing"):
        engines.open_engine(folder, manifest, "ort-cpu-int8")


def test_manifest_refuses_a_variant_without_its_hash(folder, tmp_path):
    manifest = read_manifest(folder)
    broken = dataclasses.replace(manifest, onnx_variants=[{"file": "x.onnx", "precision": "int8"}])
    with pytest.raises(BundleError, match=r"onnx_variants\[0\] lacks sha256"):
        write_manifest(tmp_path, broken)


def test_manifest_without_variants_still_reads(folder, tmp_path):
    document = json.loads((folder / "imfree_export.json").read_text())
    for key in ("onnx_variants", "torch_program"):
        document.pop(key)
    (tmp_path / "imfree_export.json").write_text(json.dumps(document))
    manifest = read_manifest(tmp_path)
    assert manifest.onnx_variants == [] and manifest.torch_program is None


class _Shifted:
    """An engine whose scores are off by a fixed amount: what a broken GPU kernel looks like."""

    name = "ort-cuda"
    precision = "fp32"

    def __init__(self, shift):
        self.shift = shift
        self.closed = False

    def run(self, images):
        reference = self.reference
        return {"scores": reference.scores[: len(images)] + self.shift}

    def close(self):
        self.closed = True


def test_runtime_gate_refuses_an_engine_over_its_tolerance(folder):
    engine = _Shifted(1e-3)
    engine.reference = load_reference(folder)
    with pytest.raises(EngineUnavailable, match="failed its parity gate.*over the limit 1e-04"):
        engines._gate_on_open(engine, folder, read_manifest(folder))
    assert engine.closed


def test_runtime_gate_keeps_an_engine_within_tolerance(folder):
    engine = _Shifted(1e-6)
    engine.reference = load_reference(folder)
    engines._gate_on_open(engine, folder, read_manifest(folder))
    assert not engine.closed


# --- export options checked before any work ----------------------------------------------------


def test_int8_without_a_calibration_folder_is_refused(trained_artifacts, tmp_path):
    with pytest.raises(ConfigError, match="--int8 needs --calibrate FOLDER"):
        export_artifact(ExportConfig(artifact=trained_artifacts("imfree-tiny-rn"),
                                     out=tmp_path / "e", int8=True))
    assert not (tmp_path / "e").exists()


def test_calibration_folder_without_enough_images_is_refused(trained_artifacts, tmp_path,
                                                             real_photos):
    few = tmp_path / "few"
    few.mkdir()
    (few / "dog.jpg").write_bytes((real_photos / "dog.jpg").read_bytes())
    with pytest.raises(ConfigError, match="holds 1 readable image.*at least 4"):
        export_artifact(ExportConfig(artifact=trained_artifacts("imfree-tiny-rn"),
                                     out=tmp_path / "e", int8=True, calibrate=few))


def test_int8_over_its_tolerance_is_not_kept(trained_artifacts, tmp_path, real_photos,
                                             monkeypatch):
    # No real INT8 graph is 1e-9 away from FP32: the gate must refuse it and keep nothing.
    monkeypatch.setitem(TOLERANCES, "int8", dataclasses.replace(TOLERANCES["int8"],
                                                                score_abs=1e-9))
    with pytest.raises(ExportError, match=r"\(int8\) failed its parity gate.*over the limit"):
        export_artifact(ExportConfig(artifact=trained_artifacts("imfree-tiny-rn"),
                                     out=tmp_path / "e", int8=True, calibrate=real_photos,
                                     parity_images=real_photos, parity_batches=(1, 7)))
    assert not (tmp_path / "e").exists()


# --- TensorRT, up to where a GPU is needed ------------------------------------------------------


def test_tensorrt_cache_key_changes_with_everything_the_engine_depends_on():
    from imfree.export.tensorrt import cache_key

    profile = {"min": 1, "opt": 32, "max": 64, "height": 224, "width": 224}
    base = cache_key("ab" * 32, HERE, "fp16", profile)
    other_gpu = dataclasses.replace(HERE, gpu_name="NVIDIA L4", compute_capability="8.9")
    assert base == cache_key("ab" * 32, HERE, "fp16", dict(profile))
    assert base != cache_key("cd" * 32, HERE, "fp16", profile)
    assert base != cache_key("ab" * 32, other_gpu, "fp16", profile)
    assert base != cache_key("ab" * 32, HERE, "int8", profile)
    assert base != cache_key("ab" * 32, HERE, "fp16", {**profile, "opt": 64})


def test_tensorrt_int8_without_calibration_images_is_refused(folder):
    from imfree.export.tensorrt import build_engine

    with pytest.raises(ConfigError, match="INT8 engine needs at least 8 calibration images"):
        build_engine(folder / "model.onnx", folder / "x.engine", max_batch=8, precision="int8",
                     input_shape=(96, 96))


def test_tensorrt_engine_built_from_another_graph_is_refused(folder, tmp_path, monkeypatch):
    monkeypatch.setattr(tensorrt_runner, "probe_machine", lambda device=0: HERE)
    (tmp_path / "model.fp16.engine").write_bytes(b"not an engine")
    record = {"file": "model.fp16.engine", "precision": "fp16", "max_batch": 8,
              "gpu_name": HERE.gpu_name, "compute_capability": HERE.compute_capability,
              "tensorrt_version": HERE.tensorrt_version, "onnx_sha256": "00" * 32}
    manifest = dataclasses.replace(read_manifest(folder), tensorrt_engines=[record])
    with pytest.raises(EngineUnavailable, match="built from another ONNX graph.*--trt"):
        engines.open_engine(tmp_path, manifest, "tensorrt")


def test_tensorrt_takes_the_engine_built_from_this_graph(folder, tmp_path, monkeypatch):
    # Two engines built on this machine: a stale one first, then this export's.
    monkeypatch.setattr(tensorrt_runner, "probe_machine", lambda device=0: HERE)
    opened = []
    monkeypatch.setattr(tensorrt_runner, "TensorRTEngine",
                        lambda path, *args: opened.append(path.name) or SimpleNamespace())
    manifest = read_manifest(folder)
    records = [{"file": name, "precision": "fp16", "max_batch": 8, "gpu_name": HERE.gpu_name,
                "compute_capability": HERE.compute_capability,
                "tensorrt_version": HERE.tensorrt_version, "onnx_sha256": sha}
               for name, sha in (("stale.engine", "00" * 32),
                                 ("current.engine", manifest.onnx_sha256))]
    for record in records:
        (tmp_path / record["file"]).write_bytes(b"engine")
    manifest = dataclasses.replace(manifest, tensorrt_engines=records)

    engines._open_tensorrt(tmp_path, manifest, device=0)

    assert opened == ["current.engine"]
