"""INT8 for the CPU: onnxruntime static quantisation, calibrated on unlabelled photos.

Static, not dynamic: dynamic quantisation measures every activation's range
at run time and made RN50 slower than FP32; static QDQ quantisation fixes the
ranges once from calibration images and lets onnxruntime fuse whole
int8 Conv-Relu-Add chains.

What stays in float, and why: the input's cast and normalisation (uint8 to a
centred float is already exact, and quantising it again only loses range), and
everything from the L2 normalisation of the features on (the two classifier
matmuls, the logit scales, both softmaxes, the spatial pooling, the mixing).
The head is a few small matmuls, so int8 saves nothing there, while a logit
scale of 50 on the local branch would magnify rounding into flipped decisions.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx

from imfree.errors import ConfigError, ExportError
from imfree.runtime.images import DecodeError, decode_image
from imfree.runtime.sources import list_images

logger = logging.getLogger(__name__)

# Op types onnxruntime quantises; Add, Relu and pooling are listed so residual
# blocks stay int8 end to end instead of bouncing through float between convs.
QUANTISED_OPS = ("Conv", "MatMul", "Gemm", "Add", "Relu", "AveragePool", "MaxPool", "Mul",
                 "Concat", "Transpose", "Reshape", "GlobalAveragePool")
# Ops whose output ends the encoder: the L2 normalisation of the features.
HEAD_STARTS = ("ReduceL2", "LpNormalization")
# Ops that carry the encoder's weights; nothing before the first is encoder.
WEIGHTED_OPS = ("Conv", "MatMul", "Gemm")
MIN_CALIBRATION_IMAGES = 4


def calibration_images(
    folder: str | os.PathLike[str], image_size: tuple[int, int], limit: int = 128,
) -> np.ndarray:
    """Up to `limit` decoded images [N, H, W, 3] uint8 from `folder`, spread over it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"calibration folder {folder} does not exist; pass a folder of "
                          f"photos like the ones you will tag with --calibrate")
    paths = list_images(folder)
    # Take every k-th file, so a folder sorted by scene still calibrates on all scenes.
    step = max(1, len(paths) // limit)
    height, width = image_size
    images = []
    for path in paths[::step][:limit]:
        try:
            images.append(decode_image(path, height, width))
        except DecodeError as error:
            logger.warning("calibration skips %s: %s", path, error)
    if len(images) < MIN_CALIBRATION_IMAGES:
        raise ConfigError(
            f"{folder} holds {len(images)} readable image(s); INT8 calibration needs at "
            f"least {MIN_CALIBRATION_IMAGES}, ideally 100 or more like those you will tag"
        )
    return np.stack(images)


def float_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes kept in float: the input normalisation and the scoring head."""
    graph = model.graph
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    head = _descendants([n for n in graph.node if n.op_type in HEAD_STARTS], consumers)
    encoder = _descendants([n for n in graph.node if n.op_type in WEIGHTED_OPS], consumers)
    stem = [n.name for n in graph.node if n.name not in encoder]
    return sorted(set(stem) | head)


def quantize_int8(
    onnx_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    images: np.ndarray,
    input_name: str = "images",
    batch: int = 8,
) -> Path:
    """Write the static QDQ, per-channel INT8 version of `onnx_path` to `out_path`."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches: Iterator[np.ndarray] = (
                images[i : i + batch] for i in range(0, len(images), batch)
            )

        def get_next(self) -> dict[str, np.ndarray] | None:
            chunk = next(self._batches, None)
            return None if chunk is None else {input_name: chunk}

    out_path = Path(out_path)
    with tempfile.TemporaryDirectory(prefix="imfree-int8-") as scratch:
        # Shape inference and constant folding first, as onnxruntime advises: the
        # quantiser needs every tensor's shape to choose per-channel axes.
        prepared = Path(scratch) / "prepared.onnx"
        quant_pre_process(str(onnx_path), str(prepared), skip_symbolic_shape=True)
        excluded = float_nodes(onnx.load(str(prepared)))
        try:
            quantize_static(
                str(prepared), str(out_path), _Reader(),
                quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                op_types_to_quantize=list(QUANTISED_OPS), nodes_to_exclude=excluded,
                calibrate_method=CalibrationMethod.MinMax,
                extra_options={"CalibTensorRangeSymmetric": False},
            )
        except Exception as error:  # the quantiser raises many types
            raise ExportError(f"INT8 quantisation of {onnx_path} failed: {error}") from error
    logger.info("INT8: %d images calibrated, %d nodes kept in float", len(images), len(excluded))
    return out_path


def _descendants(
    starts: list[onnx.NodeProto], consumers: dict[str, list[onnx.NodeProto]]
) -> set[str]:
    seen: set[str] = set()
    stack = list(starts)
    while stack:
        node = stack.pop()
        if node.name in seen:
            continue
        seen.add(node.name)
        for output in node.output:
            stack.extend(consumers.get(output, []))
    return seen
