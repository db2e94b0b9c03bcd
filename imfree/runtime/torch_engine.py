"""The PyTorch engine: the export's torch.export program, eager or compiled.

Imported only when `--engine torch` or `torch-compile` is chosen, so the rest
of the runtime never imports torch. On a GPU the encoder runs under FP16
autocast (the program's softmaxes and norms stay FP32, as autocast keeps
them); on the CPU it runs FP32.
"""

from __future__ import annotations

import logging
import os

import numpy as np

from imfree.errors import EngineUnavailable

logger = logging.getLogger(__name__)


class TorchEngine:
    """A `model.pt2` program on the GPU (FP16 autocast) or the CPU (FP32)."""

    def __init__(
        self,
        program_path: str | os.PathLike[str],
        output_names: list[str],
        *,
        compile: bool = False,
        device: str | None = None,
        gpu: int = 0,
    ):
        """`device`: "cpu", "cuda:N", or None for GPU `gpu` when CUDA is there, else the CPU."""
        try:
            import torch
        except ImportError as error:
            raise EngineUnavailable(
                "the torch engine needs PyTorch: pip install torch, or run with "
                "--engine ort-cpu"
            ) from error
        self._torch = torch
        self.device = device or (f"cuda:{gpu}" if torch.cuda.is_available() else "cpu")
        self.precision = "fp16" if self.device.startswith("cuda") else "fp32"

        module = torch.export.load(str(program_path)).module()
        module = module.to(self.device)
        # Compiling costs a minute on first call; it pays off only over long runs.
        self._module = torch.compile(module, dynamic=True) if compile else module
        self._outputs = output_names
        self.name = "torch-compile" if compile else "torch"

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Outputs by name for uint8 images [N, H, W, 3]; exactly N rows each."""
        torch = self._torch
        batch = torch.from_numpy(np.ascontiguousarray(images)).to(self.device, non_blocking=True)
        half = self.precision == "fp16"
        with torch.inference_mode(), torch.autocast("cuda", torch.float16, enabled=half):
            output = self._module(batch)
        values = output if isinstance(output, tuple) else (output,)
        return {name: value.float().cpu().numpy()
                for name, value in zip(self._outputs, values, strict=True)}

    def close(self) -> None:
        """Free cached GPU memory once the module is gone."""
        self._module = None
        if self.device.startswith("cuda"):
            self._torch.cuda.empty_cache()
