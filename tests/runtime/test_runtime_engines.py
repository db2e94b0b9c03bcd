import dataclasses
import importlib.util

import numpy as np
import onnxruntime
import pytest

from imfree.errors import BundleError, ConfigError, EngineUnavailable
from imfree.runtime import engines, tensorrt_runner
from imfree.runtime.bundle import read_manifest
from imfree.runtime.tensorrt_runner import MachineInfo, select_engine_record


def _has_tensorrt_and_gpu() -> bool:
    if importlib.util.find_spec("tensorrt") is None:
        return False
    try:
        tensorrt_runner.probe_machine()
    except EngineUnavailable:
        return False
    return True


HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
HAS_TENSORRT_AND_GPU = _has_tensorrt_and_gpu()
HERE = MachineInfo(gpu_name="NVIDIA H100", compute_capability="9.0", tensorrt_version="10.3.0")


def _record(**changes) -> dict:
    record = {
        "file": "model.fp16.engine",
        "precision": "fp16",
        "max_batch": 64,
        "gpu_name": "NVIDIA H100",
        "compute_capability": "9.0",
        "tensorrt_version": "10.3.0",
        "onnx_sha256": "00" * 32,
    }
    return {**record, **changes}


def test_auto_falls_back_to_onnxruntime_cpu_here(export_dir):
    engine = engines.open_engine(export_dir, read_manifest(export_dir))

    assert engine.name == "ort-cpu"
    images = np.zeros((3, 32, 48, 3), dtype=np.uint8)
    outputs = engine.run(images)
    assert outputs["scores"].shape == (3, 4)
    assert outputs["embeddings"].shape == (3, 3)


def test_explicit_ort_cpu(export_dir):
    engine = engines.open_engine(export_dir, read_manifest(export_dir), "ort-cpu")
    assert engine.name == "ort-cpu"


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed here")
def test_explicit_tensorrt_without_tensorrt_says_how_to_install(export_dir):
    with pytest.raises(EngineUnavailable, match=r"TensorRT is not installed: pip install"):
        engines.open_engine(export_dir, read_manifest(export_dir), "tensorrt")


@pytest.mark.skipif(
    "CUDAExecutionProvider" in onnxruntime.get_available_providers(),
    reason="this onnxruntime has CUDA",
)
def test_explicit_ort_cuda_without_cuda_provider(export_dir):
    with pytest.raises(EngineUnavailable, match="no CUDA provider.*onnxruntime-gpu"):
        engines.open_engine(export_dir, read_manifest(export_dir), "ort-cuda")


def test_unknown_engine_lists_the_choices(export_dir):
    with pytest.raises(ConfigError, match="auto, tensorrt, ort-cuda, ort-cpu"):
        engines.open_engine(export_dir, read_manifest(export_dir), "openvino")


def test_missing_graph_is_a_bundle_error(export_dir):
    (export_dir / "model.onnx").unlink()
    with pytest.raises(BundleError, match="model.onnx is missing"):
        engines.open_engine(export_dir, read_manifest(export_dir), "ort-cpu")


def test_graph_and_manifest_disagreeing_on_the_input(export_dir):
    manifest = dataclasses.replace(read_manifest(export_dir), input_name="pixels")
    with pytest.raises(BundleError, match="takes input 'images' but the manifest says 'pixels'"):
        engines.open_engine(export_dir, manifest, "ort-cpu")


def test_tensorrt_with_no_engine_in_the_export(export_dir, monkeypatch):
    # A machine with TensorRT and a GPU, imitated: the export still has no engine.
    monkeypatch.setattr(tensorrt_runner, "probe_machine", lambda device=0: HERE)
    with pytest.raises(EngineUnavailable, match="holds no TensorRT engine.*rebuild it"):
        engines.open_engine(export_dir, read_manifest(export_dir), "tensorrt")


def test_tensorrt_engine_file_missing(export_dir, monkeypatch):
    monkeypatch.setattr(tensorrt_runner, "probe_machine", lambda device=0: HERE)
    manifest = read_manifest(export_dir)
    record = _record(onnx_sha256=manifest.onnx_sha256)  # built from this graph, but not there
    manifest = dataclasses.replace(manifest, tensorrt_engines=[record])
    with pytest.raises(EngineUnavailable, match="model.fp16.engine listed in the manifest is"):
        engines.open_engine(export_dir, manifest, "tensorrt")


def test_auto_skips_an_unusable_tensorrt_engine(export_dir, monkeypatch):
    monkeypatch.setattr(tensorrt_runner, "probe_machine", lambda device=0: HERE)
    manifest = dataclasses.replace(read_manifest(export_dir), tensorrt_engines=[_record()])
    assert engines.open_engine(export_dir, manifest).name == "ort-cpu"


@pytest.mark.skipif(HAS_TENSORRT_AND_GPU, reason="TensorRT and a GPU are present")
def test_build_engine_without_tensorrt_or_gpu_says_so(export_dir):
    from imfree.export.tensorrt import build_engine

    with pytest.raises(EngineUnavailable, match="TensorRT is not installed|no NVIDIA GPU"):
        build_engine(
            export_dir / "model.onnx",
            export_dir / "model.engine",
            max_batch=8,
            input_shape=(32, 48),
        )
    assert not (export_dir / "model.engine").exists()


def test_build_engine_checks_its_arguments_first(export_dir):
    from imfree.export.tensorrt import build_engine

    with pytest.raises(ConfigError, match=r"opt batch must lie in 1..8, not 9"):
        build_engine(
            export_dir / "model.onnx",
            export_dir / "e",
            max_batch=8,
            opt_batch=9,
            input_shape=(32, 48),
        )


def test_select_engine_record_takes_the_one_built_here():
    other = _record(file="a100.engine", gpu_name="NVIDIA A100", compute_capability="8.0")
    assert select_engine_record([other, _record()], HERE)["file"] == "model.fp16.engine"


def test_select_engine_record_refuses_another_release_or_gpu():
    records = [_record(tensorrt_version="10.0.1"), _record(file="b", gpu_name="NVIDIA L4")]
    with pytest.raises(EngineUnavailable) as caught:
        select_engine_record(records, HERE)
    message = str(caught.value)
    assert "tensorrt_version 10.0.1 (here 10.3.0)" in message
    assert "gpu_name NVIDIA L4 (here NVIDIA H100)" in message
    assert "imfree export ARTIFACT --out DIR --trt" in message


@pytest.mark.skipif(not HAS_TENSORRT_AND_GPU, reason="needs TensorRT and an NVIDIA GPU")
def test_tensorrt_engine_matches_onnxruntime(export_dir):  # pragma: no cover - GPU only
    from imfree.export.tensorrt import build_engine

    manifest = read_manifest(export_dir)
    record = build_engine(
        export_dir / "model.onnx",
        export_dir / "model.fp32.engine",
        max_batch=4,
        precision="fp32",
        input_shape=(32, 48),
    )
    manifest = dataclasses.replace(manifest, tensorrt_engines=[record])
    images = np.random.default_rng(0).integers(0, 256, (7, 32, 48, 3), dtype=np.uint8)

    trt = engines.open_engine(export_dir, manifest, "tensorrt")
    ort = engines.open_engine(export_dir, manifest, "ort-cpu")

    np.testing.assert_allclose(trt.run(images)["scores"], ort.run(images)["scores"], atol=1e-4)
    trt.close()
