"""The scoring graph as a torch.export program (`model.pt2`) for `--engine torch`.

A saved program carries the graph and its weights, so the runtime's PyTorch
engine loads it with torch alone: no open_clip, no imfree.models, no artifact.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from imfree.errors import ExportError
from imfree.export.graph import ScoringGraph

logger = logging.getLogger(__name__)

TORCH_FILE = "model.pt2"


def save_torch_program(
    graph: ScoringGraph, path: str | os.PathLike[str], image_size: tuple[int, int]
) -> Path:
    """Trace `graph` with a dynamic batch axis and save it to `path`."""
    height, width = image_size
    # Batch 2, not 1: an example batch of 1 lets the tracer treat it as a constant.
    example = torch.zeros(2, height, width, 3, dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1, max=65536)
    try:
        with torch.no_grad():
            program = torch.export.export(graph.eval(), (example,),
                                          dynamic_shapes={"images": {0: batch}})
        torch.export.save(program, str(path))
    except Exception as error:  # torch.export raises many types
        raise ExportError(f"torch.export of the scoring graph failed: {error}") from error
    logger.info("saved the PyTorch program %s", path)
    return Path(path)
