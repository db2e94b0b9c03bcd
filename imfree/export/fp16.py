"""FP16 for onnxruntime on CUDA: the encoder in half precision, its ends in float.

The input normalisation and the scoring head (L2 normalisation, classifier
matmuls, logit scales, softmaxes, mixing) stay FP32, as in the INT8 graph and
for a sharper reason: a softmax over logits scaled by 50 overflows half
precision's 65,504 once exponentiated. Input and outputs keep their types, so
the runtime feeds it the same uint8 batch as every other engine.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import onnx

from imfree.errors import ExportError
from imfree.export.quantize import float_nodes

logger = logging.getLogger(__name__)

# Always float, wherever they sit: reductions and softmax lose the most in FP16.
FLOAT_OPS = ("Softmax", "ReduceL2", "ReduceSum", "ReduceMean", "LpNormalization", "Cast")


def convert_fp16(onnx_path: str | os.PathLike[str], out_path: str | os.PathLike[str]) -> Path:
    """Write the FP16 version of `onnx_path` to `out_path`."""
    # onnxruntime's own converter: the onnxconverter-common one does the same but
    # took minutes on RN50's graph where this takes seconds.
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(onnx_path))
    kept = float_nodes(model)
    try:
        half = convert_float_to_float16(
            model, keep_io_types=True, op_block_list=list(FLOAT_OPS), node_block_list=kept,
        )
    except Exception as error:  # the converter raises many types
        raise ExportError(f"FP16 conversion of {onnx_path} failed: {error}") from error
    out_path = Path(out_path)
    onnx.save(half, str(out_path))
    logger.info("FP16: %d nodes kept in float", len(kept))
    return out_path
