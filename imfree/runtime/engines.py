"""Inference engines for an export folder, and the choice between them.

`auto` takes the fastest engine this machine can run: a TensorRT engine built
for this GPU, then onnxruntime on CUDA, then onnxruntime on the CPU.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Literal, Protocol, get_args

import numpy as np
import onnxruntime

from imfree.errors import BundleError, ConfigError, EngineUnavailable
from imfree.runtime import tensorrt_runner
from imfree.runtime.bundle import REEXPORT_HINT, ExportManifest

logger = logging.getLogger(__name__)

EngineChoice = Literal["auto", "tensorrt", "ort-cuda", "ort-cpu"]
ENGINE_CHOICES: tuple[str, ...] = get_args(EngineChoice)

# A provider name, or a name with its options, as onnxruntime takes them.
Provider = str | tuple[str, dict]

_CUDA = "CUDAExecutionProvider"
_CPU = "CPUExecutionProvider"


class Engine(Protocol):
    """Runs the export graph on a batch of images."""

    name: str

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Outputs by name for uint8 images [N, H, W, 3]; exactly N rows each."""
        ...

    def close(self) -> None:
        """Release what the engine holds (device memory, sessions)."""
        ...


class OrtEngine:
    """The ONNX graph on onnxruntime, with the first provider it can actually use."""

    def __init__(
        self,
        onnx_path: str | os.PathLike[str],
        providers: list[Provider],
        intra_threads: int | None = None,
    ):
        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        if intra_threads is not None:
            options.intra_op_num_threads = intra_threads

        self._session = onnxruntime.InferenceSession(
            str(onnx_path), sess_options=options, providers=providers
        )
        self._input = self._session.get_inputs()[0].name
        self._outputs = [output.name for output in self._session.get_outputs()]

        # onnxruntime silently drops a provider it cannot load (a missing cuDNN, say)
        # and runs on the next one: say so, since it costs an order of magnitude.
        wanted = _provider_name(providers[0])
        running = self._session.get_providers()
        if running[0] != wanted:
            logger.warning(
                "asked onnxruntime for %s but it runs on %s; check the CUDA and "
                "cuDNN libraries onnxruntime-gpu needs",
                wanted,
                running[0],
            )
        self.name = "ort-cuda" if running[0] == _CUDA else "ort-cpu"

    @property
    def input_name(self) -> str:
        return self._input

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Outputs by name for uint8 images [N, H, W, 3]; exactly N rows each."""
        values = self._session.run(self._outputs, {self._input: images})
        return dict(zip(self._outputs, values, strict=True))

    def close(self) -> None:
        """Nothing to release beyond what garbage collection frees."""


def check_engine_choice(choice: str) -> None:
    """ConfigError, listing the choices, for an engine name that is not one."""
    if choice not in ENGINE_CHOICES:
        raise ConfigError(f"unknown engine {choice!r}; choose one of: {', '.join(ENGINE_CHOICES)}")


def open_engine(
    folder: str | os.PathLike[str],
    manifest: ExportManifest,
    choice: EngineChoice = "auto",
    *,
    intra_threads: int | None = None,
    device: int = 0,
) -> Engine:
    """The engine `choice` for the export in `folder`; `auto` takes the fastest that runs."""
    folder = Path(folder)
    check_engine_choice(choice)

    if choice == "auto":
        engine = _open_fastest(folder, manifest, intra_threads, device)
    elif choice == "tensorrt":
        engine = _open_tensorrt(folder, manifest, device)
    elif choice == "ort-cuda":
        engine = _open_ort_cuda(folder, manifest, intra_threads, device)
        if engine.name != "ort-cuda":
            raise EngineUnavailable(
                "onnxruntime could not start on CUDA (see the warning "
                "above); run with --engine ort-cpu, or fix the CUDA setup"
            )
    else:
        engine = _open_ort(folder, manifest, [_CPU], intra_threads)

    logger.info("engine: %s", engine.name)
    return engine


def _provider_name(provider: Provider) -> str:
    return provider if isinstance(provider, str) else provider[0]


def _open_fastest(
    folder: Path, manifest: ExportManifest, intra_threads: int | None, device: int
) -> Engine:
    # Importing TensorRT takes seconds: only try it when the export holds an engine.
    if manifest.tensorrt_engines:
        try:
            return _open_tensorrt(folder, manifest, device)
        except EngineUnavailable as error:
            # The export was built for TensorRT, so falling back is worth a warning.
            logger.warning("TensorRT skipped: %s", error)

    try:
        return _open_ort_cuda(folder, manifest, intra_threads, device)
    except EngineUnavailable as error:
        logger.debug("onnxruntime CUDA skipped: %s", error)

    return _open_ort(folder, manifest, [_CPU], intra_threads)


def _open_tensorrt(folder: Path, manifest: ExportManifest, device: int) -> Engine:
    machine = tensorrt_runner.probe_machine(device)
    record = tensorrt_runner.select_engine_record(manifest.tensorrt_engines, machine)

    path = folder / record["file"]
    if not path.is_file():
        raise EngineUnavailable(
            f"the TensorRT engine {path} listed in the manifest is missing; "
            f"{tensorrt_runner.REBUILD_HINT}"
        )
    return tensorrt_runner.TensorRTEngine(path, manifest.input_name, device)


def _open_ort_cuda(
    folder: Path, manifest: ExportManifest, intra_threads: int | None, device: int
) -> OrtEngine:
    available = onnxruntime.get_available_providers()
    if _CUDA not in available:
        raise EngineUnavailable(
            f"this onnxruntime has no CUDA provider (it has {', '.join(available)}): "
            "pip install onnxruntime-gpu (in place of onnxruntime) on a machine with an "
            "NVIDIA GPU, or run with --engine ort-cpu"
        )
    providers = [(_CUDA, {"device_id": device}), _CPU]
    return _open_ort(folder, manifest, providers, intra_threads)


def _open_ort(
    folder: Path, manifest: ExportManifest, providers: list[Provider], intra_threads: int | None
) -> OrtEngine:
    path = folder / manifest.onnx_file
    if not path.is_file():
        raise BundleError(f"{path} is missing from the export folder; {REEXPORT_HINT}")

    engine = OrtEngine(path, providers, intra_threads)
    if engine.input_name != manifest.input_name:
        raise BundleError(
            f"{path} takes input {engine.input_name!r} but the manifest says "
            f"{manifest.input_name!r}: the folder mixes two exports; {REEXPORT_HINT}"
        )
    return engine
