"""Running a serialized TensorRT engine (TensorRT 10 Python API, cuda-python for memory).

Nothing here imports TensorRT or CUDA until it is asked to, so the runtime
stays importable, and testable, on machines without either.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from imfree.errors import EngineUnavailable

logger = logging.getLogger(__name__)

INSTALL_HINT = (
    "pip install 'imfree[gpu]' on a machine with an NVIDIA GPU, "
    "then `imfree export ARTIFACT --out DIR --trt`"
)
REBUILD_HINT = (
    "rebuild it on this machine with `imfree export ARTIFACT --out DIR --trt`, "
    "or run with --engine ort-cuda / ort-cpu"
)


@dataclass(frozen=True)
class MachineInfo:
    """What a TensorRT engine is bound to: the GPU model and the TensorRT release."""

    gpu_name: str
    compute_capability: str
    tensorrt_version: str


def import_tensorrt() -> ModuleType:
    """The `tensorrt` module, or EngineUnavailable saying how to install it."""
    try:
        import tensorrt
    except ImportError as error:
        raise EngineUnavailable(f"TensorRT is not installed: {INSTALL_HINT}") from error
    return tensorrt


def import_cudart() -> ModuleType:
    """cuda-python's runtime bindings, under their newer or older module path."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError as error:
            raise EngineUnavailable(
                f"cuda-python is not installed (TensorRT needs it for GPU memory): {INSTALL_HINT}"
            ) from error
    return cudart


def probe_machine(device: int = 0) -> MachineInfo:
    """This machine's GPU and TensorRT release; EngineUnavailable where either is missing."""
    tensorrt = import_tensorrt()
    cudart = import_cudart()

    error, count = cudart.cudaGetDeviceCount()
    if error != cudart.cudaError_t.cudaSuccess or count == 0:
        raise EngineUnavailable(
            f"no NVIDIA GPU is visible to CUDA ({_cuda_error_name(error)}); TensorRT needs one. "
            f"Run with --engine ort-cpu, or {INSTALL_HINT}"
        )
    if device >= count:
        raise EngineUnavailable(f"GPU {device} does not exist: CUDA sees {count} GPU(s)")

    props = _cuda(cudart, cudart.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else props.name
    return MachineInfo(
        gpu_name=name.split("\x00", 1)[0].strip(),
        compute_capability=f"{props.major}.{props.minor}",
        tensorrt_version=str(tensorrt.__version__),
    )


def select_engine_record(
    records: list[dict[str, Any]], machine: MachineInfo, onnx_sha256: str | None = None
) -> dict[str, Any]:
    """The first engine record built for this machine's GPU and TensorRT release.

    A serialized engine only runs on the TensorRT release that built it, and is
    tuned for one GPU model, so any other is refused with how to rebuild; so is
    an engine built from another graph than the export's (`onnx_sha256`).
    """
    if not records:
        raise EngineUnavailable(f"the export holds no TensorRT engine; {REBUILD_HINT}")

    mismatches = []
    for record in records:
        differences = _differences(record, machine)
        if onnx_sha256 is not None and record.get("onnx_sha256") != onnx_sha256:
            differences.append("built from another ONNX graph than this export's")
        if not differences:
            return record
        mismatches.append(f"{record.get('file')}: {', '.join(differences)}")

    raise EngineUnavailable(
        f"no TensorRT engine in the export was built for this machine ("
        f"{'; '.join(mismatches)}); {REBUILD_HINT}"
    )


def _differences(record: dict[str, Any], machine: MachineInfo) -> list[str]:
    differences = []
    for key in ("tensorrt_version", "gpu_name", "compute_capability"):
        built, here = str(record.get(key)), str(getattr(machine, key))
        if built != here:
            differences.append(f"{key} {built} (here {here})")
    return differences


class TensorRTEngine:
    """One deserialized engine, its execution context, one CUDA stream and device buffers.

    Buffers are sized once for `max_batch` rows; a longer call is split into chunks.
    """

    name = "tensorrt"

    def __init__(self, engine_path: str | os.PathLike[str], input_name: str, device: int = 0):
        tensorrt = import_tensorrt()
        self._cudart = cudart = import_cudart()
        _cuda(cudart, cudart.cudaSetDevice(device), "cudaSetDevice")

        # The runtime and logger must outlive the engine they deserialized.
        self._trt_logger = tensorrt.Logger(tensorrt.Logger.WARNING)
        self._runtime = tensorrt.Runtime(self._trt_logger)
        self._engine = self._runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self._engine is None:
            raise EngineUnavailable(f"TensorRT could not load {engine_path}; {REBUILD_HINT}")
        self._context = self._engine.create_execution_context()

        self._input = input_name
        self._outputs = self._output_names(tensorrt)
        self._max_batch = self._profile_max_batch()
        self._stream = _cuda(cudart, cudart.cudaStreamCreate(), "cudaStreamCreate")
        self._buffers: dict[str, Any] = {}
        self._row_shapes: dict[str, tuple[int, ...]] = {}
        self._dtypes = {
            name: np.dtype(tensorrt.nptype(self._engine.get_tensor_dtype(name)))
            for name in [self._input, *self._outputs]
        }
        self._allocate()

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Outputs for `images` (uint8 [N, H, W, 3]), exactly N rows each."""
        images = np.ascontiguousarray(images, dtype=np.uint8)
        if len(images) == 0:
            # The profile's smallest batch is one row: answer an empty call without TensorRT.
            return {
                name: np.zeros((0, *self._row_shapes[name]), np.float32) for name in self._outputs
            }

        chunks = [
            self._run_chunk(images[start : start + self._max_batch])
            for start in range(0, len(images), self._max_batch)
        ]
        return {name: np.concatenate([c[name] for c in chunks]) for name in self._outputs}

    def close(self) -> None:
        """Free the device buffers and the stream; the engine is unusable afterwards."""
        cudart = self._cudart
        for pointer in self._buffers.values():
            cudart.cudaFree(pointer)
        self._buffers = {}
        if self._stream is not None:
            cudart.cudaStreamDestroy(self._stream)
            self._stream = None

    def _output_names(self, tensorrt: ModuleType) -> list[str]:
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        if self._input not in names:
            raise EngineUnavailable(
                f"the TensorRT engine has no input {self._input!r} (it has {names}); {REBUILD_HINT}"
            )
        output = tensorrt.TensorIOMode.OUTPUT
        return [name for name in names if self._engine.get_tensor_mode(name) == output]

    def _profile_max_batch(self) -> int:
        # Profile 0 is the one the export builds: min 1, opt, max = max_batch rows.
        _, _, largest = self._engine.get_tensor_profile_shape(self._input, 0)
        return int(largest[0])

    def _allocate(self) -> None:
        cudart = self._cudart
        row_shape = tuple(self._engine.get_tensor_shape(self._input))[1:]  # (H, W, 3)
        self._set_input_shape((self._max_batch, *row_shape))

        for name in [self._input, *self._outputs]:
            shape = tuple(self._context.get_tensor_shape(name))
            nbytes = int(np.prod(shape)) * self._dtypes[name].itemsize
            pointer = _cuda(cudart, cudart.cudaMalloc(nbytes), f"cudaMalloc({name})")
            self._buffers[name] = pointer
            self._row_shapes[name] = shape[1:]
            # Addresses never change, so they are bound once rather than per call.
            self._context.set_tensor_address(name, int(pointer))

    def _set_input_shape(self, shape: tuple[int, ...]) -> None:
        if not self._context.set_input_shape(self._input, shape):
            raise RuntimeError(
                f"TensorRT refused input shape {shape} for {self._input!r}; the engine "
                f"takes {tuple(self._engine.get_tensor_shape(self._input))}"
            )

    def _run_chunk(self, images: np.ndarray) -> dict[str, np.ndarray]:
        cudart = self._cudart
        to_device = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        to_host = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        count = len(images)

        self._set_input_shape(images.shape)  # [n, H, W, 3]
        _cuda(
            cudart,
            cudart.cudaMemcpyAsync(
                self._buffers[self._input],
                images.ctypes.data,
                images.nbytes,
                to_device,
                self._stream,
            ),
            "cudaMemcpyAsync(input)",
        )

        if not self._context.execute_async_v3(int(self._stream)):
            raise RuntimeError("TensorRT execute_async_v3 failed; see TensorRT's log above")

        results = {}
        for name in self._outputs:
            host = np.empty(tuple(self._context.get_tensor_shape(name)), self._dtypes[name])
            _cuda(
                cudart,
                cudart.cudaMemcpyAsync(
                    host.ctypes.data, self._buffers[name], host.nbytes, to_host, self._stream
                ),
                f"cudaMemcpyAsync({name})",
            )
            results[name] = host

        # The copies above are asynchronous: the host arrays are only valid after this.
        _cuda(cudart, cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
        return {name: host[:count].astype(np.float32, copy=False) for name, host in results.items()}


def _cuda(cudart: ModuleType, result: tuple[Any, ...], what: str) -> Any:
    # cuda-python returns (error, *values) from every call instead of raising.
    error, *values = result
    if error != cudart.cudaError_t.cudaSuccess:
        raise RuntimeError(f"{what} failed: {_cuda_error_name(error)}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def _cuda_error_name(error: Any) -> str:
    return getattr(error, "name", str(error))
