"""Building a TensorRT engine from an export's ONNX graph (TensorRT 10 builder API).

The engine is bound to the GPU model and TensorRT release that built it; the
record this returns, kept in the manifest's `tensorrt_engines`, says which, so
the runtime can refuse an engine from another machine instead of crashing.
Built engines are cached under a key of everything they depend on (ONNX hash,
TensorRT version, GPU, compute capability, precision, profile), so a repeated
export copies instead of rebuilding. TensorRT is imported only when a build is
asked for. This module has not run here: the project's machine has no GPU.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import numpy as np
import onnx

from imfree.errors import ConfigError, ExportError
from imfree.export.quantize import float_nodes
from imfree.fileio import write_atomically
from imfree.runtime.bundle import sha256_file
from imfree.runtime.tensorrt_runner import (
    MachineInfo,
    import_cudart,
    import_tensorrt,
    probe_machine,
)

logger = logging.getLogger(__name__)

Precision = Literal["fp16", "fp32", "int8"]
PRECISIONS: tuple[str, ...] = ("fp16", "fp32", "int8")
TIMING_CACHE_NAME = "tensorrt.timing-cache"
CACHE_ENV = "IMFREE_TRT_CACHE"  # where built engines are kept; default ~/.cache/imfree/tensorrt


def engine_file_name(precision: str, max_batch: int, opt_batch: int) -> str:
    return f"model.{precision}.b{max_batch}.opt{opt_batch}.engine"


def cache_key(onnx_sha256: str, machine: MachineInfo, precision: str, profile: dict) -> str:
    """The hex key of an engine: it may be reused only when all of these match."""
    document = {"onnx_sha256": onnx_sha256, "tensorrt_version": machine.tensorrt_version,
                "gpu_name": machine.gpu_name, "compute_capability": machine.compute_capability,
                "precision": precision, "profile": profile}
    return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()[:32]


def build_engine(
    onnx_path: str | os.PathLike[str],
    engine_path: str | os.PathLike[str],
    max_batch: int,
    opt_batch: int | None = None,
    precision: Precision = "fp16",
    *,
    input_shape: tuple[int, int],
    input_name: str = "images",
    calibration: np.ndarray | None = None,
    device: int = 0,
    cache_dir: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Build (or take from the cache) an engine for uint8 [1..max_batch, H, W, 3]; its record.

    `opt_batch` (default `max_batch`) is the batch size TensorRT tunes its kernels
    for. INT8 needs `calibration`, decoded unlabelled images [N, H, W, 3]. The
    record's `file` is the engine's name, relative to the export folder.
    """
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    opt_batch = max_batch if opt_batch is None else opt_batch
    _check_arguments(onnx_path, max_batch, opt_batch, precision, input_shape, calibration)
    machine = probe_machine(device)  # EngineUnavailable, with the fix, before any work
    height, width = input_shape
    profile = {"min": 1, "opt": opt_batch, "max": max_batch, "height": height, "width": width}
    onnx_sha256 = sha256_file(onnx_path)
    key = cache_key(onnx_sha256, machine, precision, profile)
    cache = Path(cache_dir or os.environ.get(CACHE_ENV) or
                 Path.home() / ".cache" / "imfree" / "tensorrt")
    cached = cache / f"{key}.engine"

    engine_path.parent.mkdir(parents=True, exist_ok=True)
    if cached.is_file():
        shutil.copyfile(cached, engine_path)
        logger.info("TensorRT engine taken from the cache %s", cached)
    else:
        serialized = _build(onnx_path, precision, profile, input_name, calibration, cache)
        write_atomically(engine_path, memoryview(serialized))
        cache.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(engine_path, cached)

    return {
        "file": engine_path.name,
        "precision": precision,
        "max_batch": max_batch,
        "opt_batch": opt_batch,
        "gpu_name": machine.gpu_name,
        "compute_capability": machine.compute_capability,
        "tensorrt_version": machine.tensorrt_version,
        "onnx_sha256": onnx_sha256,
        "cache_key": key,
    }


def _build(
    onnx_path: Path, precision: str, profile_shape: dict, input_name: str,
    calibration: np.ndarray | None, cache: Path,
) -> Any:
    tensorrt = import_tensorrt()
    trt_logger = tensorrt.Logger(tensorrt.Logger.WARNING)
    builder = tensorrt.Builder(trt_logger)
    network = builder.create_network(_explicit_batch_flags(tensorrt))
    _parse_onnx(tensorrt, network, trt_logger, onnx_path)

    config = builder.create_builder_config()
    if precision in ("fp16", "int8"):
        # INT8 builds allow FP16 too, for the layers INT8 has no kernel for.
        config.set_flag(tensorrt.BuilderFlag.FP16)
        _keep_float(tensorrt, network, config, float_nodes(onnx.load(str(onnx_path))))
    if precision == "int8":
        config.set_flag(tensorrt.BuilderFlag.INT8)
        config.int8_calibrator = _calibrator(tensorrt, calibration, input_name, cache)

    height, width = profile_shape["height"], profile_shape["width"]
    profile = builder.create_optimization_profile()
    profile.set_shape(input_name, *[(profile_shape[k], height, width, 3)
                                    for k in ("min", "opt", "max")])
    config.add_optimization_profile(profile)
    if precision == "int8":
        config.set_calibration_profile(profile)
    timing_cache = cache / TIMING_CACHE_NAME
    _use_timing_cache(config, timing_cache)

    started = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(
            f"TensorRT could not build an engine from {onnx_path} (its log above says why); "
            "try --trt-precision fp32 or a smaller --max-batch"
        )
    cache.mkdir(parents=True, exist_ok=True)
    write_atomically(timing_cache, memoryview(config.get_timing_cache().serialize()))
    logger.info("built a TensorRT %s engine (batch 1..%d, opt %d) in %.0f s", precision,
                profile_shape["max"], profile_shape["opt"], time.perf_counter() - started)
    return serialized


def _keep_float(tensorrt: ModuleType, network: Any, config: Any, float_names: list[str]) -> None:
    """Pin normalisation, softmax and the scoring head to FP32.

    A softmax over logits scaled by 50 overflows FP16 once exponentiated, and the
    input normalisation maps 0..255 pixels where FP16's steps are coarse.
    """
    config.set_flag(tensorrt.BuilderFlag.PREFER_PRECISION_CONSTRAINTS)
    types = tensorrt.LayerType
    always = {types.SOFTMAX, types.REDUCE, types.NORMALIZATION}
    names = set(float_names)
    pinned = 0
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        # The ONNX parser names a layer after its node, sometimes with a suffix.
        if layer.type in always or layer.name.split("_output")[0] in names:
            layer.precision = tensorrt.float32
            for output in range(layer.num_outputs):
                if layer.get_output_type(output) in (tensorrt.float16, tensorrt.float32):
                    layer.set_output_type(output, tensorrt.float32)
            pinned += 1
    logger.info("TensorRT: %d layers pinned to FP32", pinned)


def _calibrator(
    tensorrt: ModuleType, images: np.ndarray | None, input_name: str, cache: Path
) -> Any:
    """An entropy calibrator that feeds `images` in batches of 8 through CUDA memory."""
    if images is None:
        raise ConfigError("a TensorRT INT8 engine needs calibration images (--calibrate)")
    cudart = import_cudart()

    class Calibrator(tensorrt.IInt8EntropyCalibrator2):
        batch = 8

        def __init__(self) -> None:
            super().__init__()
            self._next = 0
            nbytes = self.batch * int(np.prod(images.shape[1:]))
            error, self._pointer = cudart.cudaMalloc(nbytes)
            if error != cudart.cudaError_t.cudaSuccess:
                raise ExportError(f"cudaMalloc for INT8 calibration failed: {error}")

        def get_batch_size(self) -> int:
            return self.batch

        def get_batch(self, names: list[str]) -> list[int] | None:
            chunk = images[self._next : self._next + self.batch]
            if len(chunk) < self.batch:
                cudart.cudaFree(self._pointer)
                return None
            self._next += self.batch
            chunk = np.ascontiguousarray(chunk)
            cudart.cudaMemcpy(self._pointer, chunk.ctypes.data, chunk.nbytes,
                              cudart.cudaMemcpyKind.cudaMemcpyHostToDevice)
            return [int(self._pointer)]

        def read_calibration_cache(self) -> bytes | None:
            return None  # always calibrate on the images given

        def write_calibration_cache(self, cache_bytes: bytes) -> None:
            logger.debug("INT8 calibration table: %d bytes", len(cache_bytes))

    return Calibrator()


def _check_arguments(
    onnx_path: Path, max_batch: int, opt_batch: int, precision: str,
    input_shape: tuple[int, int], calibration: np.ndarray | None,
) -> None:
    if not onnx_path.is_file():
        raise ConfigError(f"ONNX graph {onnx_path} does not exist")
    if max_batch < 1:
        raise ConfigError(f"TensorRT max batch must be at least 1, not {max_batch}")
    if not 1 <= opt_batch <= max_batch:
        raise ConfigError(f"TensorRT opt batch must lie in 1..{max_batch}, not {opt_batch}")
    if precision not in PRECISIONS:
        raise ConfigError(
            f"unknown precision {precision!r}; choose one of: {', '.join(PRECISIONS)}"
        )
    if precision == "int8" and (calibration is None or len(calibration) < 8):
        raise ConfigError("a TensorRT INT8 engine needs at least 8 calibration images; "
                          "pass --calibrate FOLDER")
    if len(input_shape) != 2 or min(input_shape) < 1:
        raise ConfigError(f"input shape must be (height, width), not {input_shape}")


def _explicit_batch_flags(tensorrt: ModuleType) -> int:
    # TensorRT 10 networks are always explicit-batch and the flag is deprecated; only
    # older releases need it set.
    if int(tensorrt.__version__.split(".")[0]) >= 10:
        return 0
    return 1 << int(tensorrt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)


def _parse_onnx(tensorrt: ModuleType, network: Any, trt_logger: Any, onnx_path: Path) -> None:
    parser = tensorrt.OnnxParser(network, trt_logger)
    # parse_from_file, not parse(bytes): it finds weights stored beside the graph
    # (ONNX external data), which large backbones need past 2 GB.
    if parser.parse_from_file(str(onnx_path)):
        return
    errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
    raise ExportError(
        f"TensorRT's ONNX parser rejected {onnx_path}: {'; '.join(errors) or 'no details'}"
    )


def _use_timing_cache(config: Any, cache_path: Path) -> None:
    # The cache remembers which kernels won on this GPU, cutting a rebuild (another
    # batch size, the other precision) from minutes to seconds.
    data = cache_path.read_bytes() if cache_path.is_file() else b""
    cache = config.create_timing_cache(data)
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        logger.info("timing cache %s is from another GPU or TensorRT; starting afresh", cache_path)
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
