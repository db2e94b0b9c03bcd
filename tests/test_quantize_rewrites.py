"""The graph rewrites before INT8 quantisation: the same numbers, in ops that run in int8."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper

from imfree.export.quantize import gemms_as_matmuls, pools_as_convolutions


def _pool(name: str, source: str, kernel: int, stride: int, pads: int = 0) -> onnx.NodeProto:
    return helper.make_node("AveragePool", [source], [name], name=name,
                            kernel_shape=[kernel, kernel], strides=[stride, stride],
                            pads=[pads] * 4)


def _model() -> onnx.ModelProto:
    """x [N, 6, 8, 8] through a 2 x 2 pool, a 1 x 1 pool, and an overlapping padded pool."""
    nodes = [
        _pool("halved", "x", kernel=2, stride=2),  # [N, 6, 4, 4]
        _pool("same", "halved", kernel=1, stride=1),  # identity
        _pool("overlapping", "same", kernel=3, stride=1, pads=1),  # not a plain mean
    ]
    graph = helper.make_graph(
        nodes, "pools",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 6, 8, 8])],
        [helper.make_tensor_value_info("overlapping", TensorProto.FLOAT, ["n", 6, 4, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return onnx.shape_inference.infer_shapes(model)


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = onnxruntime.InferenceSession(model.SerializeToString(),
                                           providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def test_plain_pools_become_convolutions_with_the_same_outputs():
    x = np.random.default_rng(0).normal(size=(3, 6, 8, 8)).astype(np.float32)
    model = _model()
    before = _run(model, x)

    assert pools_as_convolutions(model) == 2
    onnx.checker.check_model(model)

    ops = {node.name: node.op_type for node in model.graph.node}
    assert ops == {"halved": "Conv", "same": "Identity", "overlapping": "AveragePool"}
    np.testing.assert_allclose(_run(model, x), before, rtol=1e-6, atol=1e-6)


def test_a_pool_whose_channels_are_unknown_is_left_alone():
    model = _model()
    model.graph.ClearField("value_info")  # no shapes for the inner tensors
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "c"

    assert pools_as_convolutions(model) == 0
    assert [n.op_type for n in model.graph.node] == ["AveragePool"] * 3


@pytest.mark.parametrize("kernel", [2, 4])
def test_the_depthwise_weights_average_each_window(kernel):
    graph = helper.make_graph(
        [_pool("pooled", "x", kernel=kernel, stride=kernel)], "pool",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 6, 8, 8])],
        [helper.make_tensor_value_info("pooled", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])

    assert pools_as_convolutions(model) == 1

    weight = onnx.numpy_helper.to_array(model.graph.initializer[0])
    assert weight.shape == (6, 1, kernel, kernel)  # [C, 1, kh, kw]: one filter per channel
    assert np.allclose(weight, 1 / kernel**2)


@pytest.mark.parametrize("transposed", [False, True])
def test_a_constant_gemm_becomes_matmul_and_add_with_the_same_outputs(transposed):
    rng = np.random.default_rng(2)
    weight = rng.normal(size=(5, 4) if transposed else (4, 5)).astype(np.float32)
    bias = rng.normal(size=5).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="proj", transB=int(transposed))],
        "gemm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 5])],
        initializer=[onnx.numpy_helper.from_array(weight, "w"),
                     onnx.numpy_helper.from_array(bias, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = rng.normal(size=(3, 4)).astype(np.float32)
    before = _run(model, x)

    assert gemms_as_matmuls(model) == 1

    assert [n.op_type for n in model.graph.node] == ["MatMul", "Add"]
    np.testing.assert_allclose(_run(model, x), before, rtol=1e-5, atol=1e-6)
