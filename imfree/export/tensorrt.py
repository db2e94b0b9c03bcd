"""Building a TensorRT engine from an export's ONNX graph (TensorRT 10 builder API).

The engine is bound to the GPU model and TensorRT release that built it; the
record this returns, kept in the manifest's `tensorrt_engines`, says which, so
the runtime can refuse an engine from another machine instead of crashing.
TensorRT is imported only when a build is asked for.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

from imfree.errors import ConfigError, ExportError
from imfree.fileio import write_atomically
from imfree.runtime.bundle import sha256_file
from imfree.runtime.tensorrt_runner import import_tensorrt, probe_machine

logger = logging.getLogger(__name__)

Precision = Literal["fp16", "fp32"]
PRECISIONS: tuple[str, ...] = ("fp16", "fp32")
TIMING_CACHE_NAME = "tensorrt.timing-cache"


def build_engine(
    onnx_path: str | os.PathLike[str],
    engine_path: str | os.PathLike[str],
    max_batch: int,
    opt_batch: int | None = None,
    precision: Precision = "fp16",
    *,
    input_shape: tuple[int, int],
    input_name: str = "images",
    device: int = 0,
) -> dict[str, Any]:
    """Build and save an engine for uint8 input [1..max_batch, H, W, 3]; return its record.

    `opt_batch` (default `max_batch`) is the batch size TensorRT tunes its kernels
    for. The record's `file` is the engine's name, relative to the export folder
    it is meant to sit in.
    """
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    opt_batch = max_batch if opt_batch is None else opt_batch
    _check_arguments(onnx_path, max_batch, opt_batch, precision, input_shape)
    machine = probe_machine(device)  # EngineUnavailable, with the fix, before any work
    tensorrt = import_tensorrt()

    trt_logger = tensorrt.Logger(tensorrt.Logger.WARNING)
    builder = tensorrt.Builder(trt_logger)
    network = builder.create_network(_explicit_batch_flags(tensorrt))
    _parse_onnx(tensorrt, network, trt_logger, onnx_path)

    config = builder.create_builder_config()
    if precision == "fp16":
        # FP16 lets TensorRT pick half-precision kernels where they are faster; layers
        # are still free to stay in FP32, so the scores stay close to the ONNX graph's.
        config.set_flag(tensorrt.BuilderFlag.FP16)
    height, width = input_shape
    profile = builder.create_optimization_profile()
    profile.set_shape(
        input_name,
        (1, height, width, 3),
        (opt_batch, height, width, 3),
        (max_batch, height, width, 3),
    )
    config.add_optimization_profile(profile)
    cache_path = engine_path.parent / TIMING_CACHE_NAME
    _use_timing_cache(config, cache_path)

    started = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(
            f"TensorRT could not build an engine from {onnx_path} (its log above says why); "
            "try precision fp32 or a smaller max batch"
        )
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(engine_path, memoryview(serialized))
    write_atomically(cache_path, memoryview(config.get_timing_cache().serialize()))
    logger.info(
        "built %s (%s, batch 1..%d, opt %d) in %.0f s on %s",
        engine_path,
        precision,
        max_batch,
        opt_batch,
        time.perf_counter() - started,
        machine.gpu_name,
    )

    return {
        "file": engine_path.name,
        "precision": precision,
        "max_batch": max_batch,
        "gpu_name": machine.gpu_name,
        "compute_capability": machine.compute_capability,
        "tensorrt_version": machine.tensorrt_version,
        "onnx_sha256": sha256_file(onnx_path),
    }


def _check_arguments(
    onnx_path: Path, max_batch: int, opt_batch: int, precision: str, input_shape: tuple[int, int]
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
