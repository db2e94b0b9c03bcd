"""Writing the scoring graph to ONNX, with its preprocessing in the metadata."""

from __future__ import annotations

import contextlib
import io
import json
import logging
from pathlib import Path
from typing import Any

import onnx
import torch

from imfree.errors import ExportError
from imfree.export.graph import ScoringGraph

logger = logging.getLogger(__name__)

INPUT = "images"
SCORES = "scores"
EMBEDDINGS = "embeddings"
MIN_OPSET = 17


def export_onnx(
    graph: ScoringGraph,
    path: Path,
    image_size: tuple[int, int],
    metadata: dict[str, Any],
    opset: int = 18,
) -> Path:
    """Export `graph` with a dynamic batch axis and attach `metadata` as JSON strings."""
    if opset < MIN_OPSET:
        raise ExportError(f"opset {opset} is too old; use {MIN_OPSET} or later")
    height, width = image_size
    # Batch 2, not 1: an example batch of 1 lets the tracer treat it as a constant.
    example = torch.zeros(2, height, width, 3, dtype=torch.uint8)
    outputs = [SCORES, EMBEDDINGS] if graph.embeddings else [SCORES]
    batch = torch.export.Dim("batch", min=1, max=65536)

    # The exporter narrates each stage on stdout; keep it for the log instead.
    chatter = io.StringIO()
    try:
        with torch.no_grad(), contextlib.redirect_stdout(chatter):
            torch.onnx.export(
                graph.eval(), (example,), str(path), input_names=[INPUT], output_names=outputs,
                opset_version=opset, dynamo=True, external_data=False,
                dynamic_shapes={INPUT: {0: batch}},
            )
    except Exception as err:  # the exporter raises many types
        logger.debug("exporter output:\n%s", chatter.getvalue())
        raise ExportError(f"ONNX export failed: {' '.join(str(err).split())[:400]}") from err
    logger.debug("exporter output:\n%s", chatter.getvalue())

    _attach_metadata(path, metadata)
    return path


def _attach_metadata(path: Path, metadata: dict[str, Any]) -> None:
    model = onnx.load(str(path))
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key = key
        entry.value = value if isinstance(value, str) else json.dumps(value)
    model.producer_name = "imfree"
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
