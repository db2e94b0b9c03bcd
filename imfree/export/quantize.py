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

One rewrite before quantising: ResNet's anti-aliased strides (average pooling
with kernel = stride, no padding) become depthwise convolutions with weights
1/k^2, which compute the same numbers in float. onnxruntime's int8 average
pool is a slow generic kernel (a quarter of RN50's INT8 time here), while an
int8 depthwise convolution runs on its vectorised kernels; a 1 x 1 pool is an
identity and is dropped. And a Gemm with constant weights (RN50's attention-pool
output projection) becomes MatMul + Add, which onnxruntime runs in int8, where
it has no int8 kernel for a QDQ Gemm and would run it in float.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

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
        model = onnx.load(str(prepared))
        rewritten = pools_as_convolutions(model) + gemms_as_matmuls(model)
        onnx.save(model, str(prepared))
        excluded = float_nodes(model)
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
    logger.info("INT8: %d images calibrated, %d nodes kept in float, %d nodes rewritten",
                len(images), len(excluded), rewritten)
    return out_path


def pools_as_convolutions(model: onnx.ModelProto) -> int:
    """Rewrite, in place, non-overlapping average pools as equal depthwise convolutions.

    Needs the input's channel count from shape inference; a pool with padding,
    overlap or an unknown channel count is left as it is. Returns how many changed.
    """
    graph = model.graph
    channels = {value.name: _channel_dim(value)
                for value in [*graph.value_info, *graph.input]}
    nodes, rewritten = [], 0
    for node in graph.node:
        replacement = _pool_replacement(node, channels.get(node.input[0]) if node.input else None)
        if replacement is None:
            nodes.append(node)
            continue
        rewritten += 1
        new_node, weight = replacement
        nodes.append(new_node)
        if weight is not None:
            graph.initializer.append(weight)
    graph.ClearField("node")
    graph.node.extend(nodes)
    return rewritten


def gemms_as_matmuls(model: onnx.ModelProto) -> int:
    """Rewrite, in place, each plain Gemm with constant weights and bias as MatMul + Add.

    Plain: no transposed input, alpha and beta 1. Returns how many changed.
    """
    graph = model.graph
    constants = {tensor.name: tensor for tensor in graph.initializer}
    nodes, rewritten = [], 0
    for node in graph.node:
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        plain = (attributes.get("transA", 0) == 0 and attributes.get("alpha", 1.0) == 1.0
                 and attributes.get("beta", 1.0) == 1.0)
        if (node.op_type != "Gemm" or not plain or len(node.input) != 3
                or node.input[1] not in constants or node.input[2] not in constants):
            nodes.append(node)
            continue
        weight = numpy_helper.to_array(constants[node.input[1]])
        if attributes.get("transB", 0):
            weight = weight.T  # [K, N], as MatMul takes it
        name = f"{node.input[1]}_for_matmul"
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(weight), name))
        product = f"{node.output[0]}_without_bias"
        nodes.append(helper.make_node("MatMul", [node.input[0], name], [product],
                                      name=f"{node.name}_matmul"))
        nodes.append(helper.make_node("Add", [product, node.input[2]], list(node.output),
                                      name=f"{node.name}_bias"))
        rewritten += 1
    graph.ClearField("node")
    graph.node.extend(nodes)
    return rewritten


def _pool_replacement(
    node: onnx.NodeProto, channels: int | None
) -> tuple[onnx.NodeProto, onnx.TensorProto | None] | None:
    if node.op_type != "AveragePool" or not channels:
        return None
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    kernel = list(attributes["kernel_shape"])
    strides = list(attributes.get("strides", [1] * len(kernel)))
    if (kernel != strides or any(attributes.get("pads", [])) or attributes.get("ceil_mode", 0)
            or attributes.get("auto_pad", b"NOTSET") != b"NOTSET"):
        return None  # windows that overlap or reach into padding: not a plain mean

    if all(k == 1 for k in kernel):
        return helper.make_node("Identity", [node.input[0]], list(node.output),
                                name=node.name), None
    weight = numpy_helper.from_array(
        np.full((channels, 1, *kernel), 1.0 / np.prod(kernel), np.float32),  # [C, 1, kh, kw]
        f"{node.name}_depthwise_weight",
    )
    conv = helper.make_node("Conv", [node.input[0], weight.name], list(node.output),
                            name=node.name, group=channels, kernel_shape=kernel, strides=strides)
    return conv, weight


def _channel_dim(value: onnx.ValueInfoProto) -> int | None:
    dims = value.type.tensor_type.shape.dim
    return dims[1].dim_value or None if len(dims) == 4 else None


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
