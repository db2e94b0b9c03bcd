"""Shared fixtures for the runtime tests: a tiny export folder and the real photos."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from imfree.runtime.bundle import ExportManifest, sha256_file, write_manifest

REPO = Path(__file__).resolve().parents[2]
PHOTO_FOLDERS = (REPO / "examples" / "images", REPO.parent / "shared" / "photos")

HEIGHT, WIDTH = 32, 48  # not square, so a swapped height and width would show
CLASSES = ["red", "green", "blue", "dark"]

# Mean colour (0..1) @ WEIGHTS -> logits: each primary scores its own channel, and
# "dark" wins when every channel is low.
WEIGHTS = np.array(
    [[6.0, 0.0, 0.0, -3.0], [0.0, 6.0, 0.0, -3.0], [0.0, 0.0, 6.0, -3.0]], dtype=np.float32
)


def tiny_model(path: Path) -> None:
    """uint8 [N, H, W, 3] -> scores [N, 4] (softmax of mean colour) and embeddings [N, 3]."""
    nodes = [
        helper.make_node("Cast", ["images"], ["pixels"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["pixels", "scale"], ["unit"]),
        helper.make_node("ReduceMean", ["unit"], ["embeddings"], axes=[1, 2], keepdims=0),
        helper.make_node("MatMul", ["embeddings", "weights"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["scores"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "imfree_tiny",
        [helper.make_tensor_value_info("images", TensorProto.UINT8, ["N", HEIGHT, WIDTH, 3])],
        [
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", len(CLASSES)]),
            helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, ["N", 3]),
        ],
        initializer=[
            numpy_helper.from_array(np.array(255.0, dtype=np.float32), "scale"),
            numpy_helper.from_array(WEIGHTS, "weights"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by every onnxruntime the project supports
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def tiny_manifest(onnx_path: Path) -> ExportManifest:
    return ExportManifest(
        classes=list(CLASSES),
        image_height=HEIGHT,
        image_width=WIDTH,
        mean=[0.0, 0.0, 0.0],
        std=[1.0, 1.0, 1.0],
        threshold=0.5,
        onnx_sha256=sha256_file(onnx_path),
        embeddings_output="embeddings",
        model={"backbone": "tiny-mean-colour"},
        versions={"onnx": onnx.__version__},
    )


@pytest.fixture
def export_dir(tmp_path: Path) -> Path:
    """A complete export folder around the tiny model."""
    folder = tmp_path / "export"
    folder.mkdir()
    tiny_model(folder / "model.onnx")
    write_manifest(folder, tiny_manifest(folder / "model.onnx"))
    return folder


@pytest.fixture(scope="session")
def photos() -> list[Path]:
    """The real JPEG photos, from the repository's examples or the shared folder."""
    for folder in PHOTO_FOLDERS:
        found = sorted(folder.glob("*.jpg"))
        if found:
            return found
    pytest.skip(f"no photos in {' or '.join(map(str, PHOTO_FOLDERS))}")
