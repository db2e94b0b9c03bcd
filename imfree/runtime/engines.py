"""Inference engines for an export folder, and the choice between them.

`auto` takes the fastest engine this machine can run: a TensorRT engine built
for this GPU, then onnxruntime on CUDA (the FP16 graph if the export has one),
then onnxruntime on the CPU (the INT8 graph if the export has one). Every
variant the export holds passed its parity gate there; an engine the export
could not try (anything on a GPU) is gated when it opens, against the
reference outputs the export saved, and refused if it strays.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, get_args

import numpy as np
import onnxruntime

from imfree.errors import BundleError, ConfigError, EngineUnavailable
from imfree.runtime import tensorrt_runner
from imfree.runtime.bundle import REEXPORT_HINT, ExportManifest, find_variant, sha256_file
from imfree.runtime.gate import REFERENCE_FILE, load_reference
from imfree.runtime.gate import gate as run_gate

logger = logging.getLogger(__name__)

EngineChoice = Literal[
    "auto", "tensorrt", "ort-cuda", "ort-cpu", "ort-cuda-fp16", "ort-cpu-int8",
    "torch", "torch-compile",
]
ENGINE_CHOICES: tuple[str, ...] = get_args(EngineChoice)
# The precision each named engine runs at (TensorRT's comes from its engine record).
ENGINE_PRECISION = {"ort-cuda": "fp32", "ort-cuda-fp16": "fp16", "ort-cpu": "fp32",
                    "ort-cpu-int8": "int8", "torch": "fp32", "torch-compile": "fp32"}

# A provider name, or a name with its options, as onnxruntime takes them.
Provider = str | tuple[str, dict]

_CUDA = "CUDAExecutionProvider"
_CPU = "CPUExecutionProvider"
# How often a thread waiting for onnxruntime wakes, so signal handlers run promptly.
_WAIT_STEP_SECONDS = 0.1
# The torch program's second output: the pooled embedding, always in the program.
EMBEDDINGS_OUTPUT = "embeddings"


class Engine(Protocol):
    """Runs the export graph on a batch of images."""

    name: str

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Outputs by name for uint8 images [N, H, W, 3]; exactly N rows each."""
        ...

    def close(self) -> None:
        """Release what the engine holds (device memory, sessions)."""
        ...


@dataclass(frozen=True)
class _OrtOptions:
    """onnxruntime settings a caller may choose: threads (None: one per core), whether
    idle ones spin, the batch size short batches are padded to (None: no padding),
    and whether a CPU batch runs as one single-threaded slice per thread."""

    intra: int | None = None
    spinning: bool = True
    pad_to: int | None = None
    split: bool = False


class OrtEngine:
    """The ONNX graph on onnxruntime, with the first provider it can actually use."""

    def __init__(
        self,
        onnx_path: str | os.PathLike[str],
        providers: list[Provider],
        intra_threads: int | None = None,
        precision: str = "fp32",
        *,
        spinning: bool = True,
        pad_to: int | None = None,
        split: bool = False,
    ):
        # With `split`, a batch on the CPU runs as `intra_threads` slices at once, each
        # on one thread, instead of one run whose threads meet at every operator. RN50
        # INT8 on 2 cores, alone: 18% more images per second at batch 64 and 4% at 256
        # (with its memory arena), and no thread waits at an operator's end for one
        # that a decode worker delayed.
        self._slices = 1
        if split and _provider_name(providers[0]) == _CPU and (intra_threads or 1) > 1:
            self._slices, intra_threads = intra_threads, 1
        # Runs happen in these threads while the caller's waits in short steps: Python
        # runs a signal handler only in the main thread and never during a call into
        # onnxruntime, so a Ctrl-C would otherwise wait out the whole batch.
        self._pool: ThreadPoolExecutor | None = ThreadPoolExecutor(self._slices)

        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        # The CPU arena keeps every block it ever grew to, rounded up to powers of two.
        # Without it each run maps its working memory afresh and faults every page in.
        # Measured here on RN50 with 2 threads: INT8 ran 6% faster with it split (batches
        # 64 and 256) and 25% faster unsplit (256), for 7% more memory split at 256
        # (1.58 against 1.48 GiB) and 39% more unsplit (1.98 against 1.42). FP32 gained
        # 2-4% for 33% more (3.3 against 2.5 GiB split at 256, over the 3 GiB the memory
        # benchmark allows), so it runs without.
        options.enable_cpu_mem_arena = precision == "int8"
        if intra_threads is not None:
            options.intra_op_num_threads = intra_threads
        if not spinning:
            # Idle engine threads normally spin for work; where decode workers share the
            # cores, those spins are cycles taken from the decoders the engine waits for.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")

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
        self._pad_to = pad_to
        self._full_batch_seen = False
        self.name = "ort-cuda" if running[0] == _CUDA else "ort-cpu"
        self.precision = precision
        if precision != "fp32":
            self.name += f"-{precision}"

    @property
    def input_name(self) -> str:
        return self._input

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Outputs by name for uint8 images [N, H, W, 3]; exactly N rows each."""
        if self._pool is None:
            raise RuntimeError(f"the {self.name} engine was closed; open a new one")
        rows = len(images)
        padded = self._padded(images)
        # Slices of consecutive rows, run at once on the one session (onnxruntime
        # allows concurrent runs), then joined in order.
        parts = np.array_split(padded, max(1, min(self._slices, len(padded))))
        results = self._run_parts(parts)
        if len(results) == 1:
            values = results[0]  # one run: nothing to join, and no copy
        else:
            values = [np.concatenate(outputs) for outputs in zip(*results, strict=True)]
        return {name: value[:rows] for name, value in zip(self._outputs, values, strict=True)}

    def close(self) -> None:
        """Stop the threads runs happen in; the session goes with garbage collection."""
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def _run_parts(self, parts: list[np.ndarray]) -> list[list[np.ndarray]]:
        options = onnxruntime.RunOptions()
        futures = [self._pool.submit(self._session.run, self._outputs, {self._input: part},
                                     options) for part in parts]
        try:
            while wait(futures, timeout=_WAIT_STEP_SECONDS).not_done:
                pass
        except BaseException:
            # A second Ctrl-C (KeyboardInterrupt) must not wait for the batch: onnxruntime
            # checks this flag between operators and ends the runs in flight.
            options.terminate = True
            wait(futures)
            raise
        return [future.result() for future in futures]

    def _padded(self, images: np.ndarray) -> np.ndarray:
        # onnxruntime plans its memory once per input shape; a short batch (the last,
        # or one thinned by failures or --resume) is padded with black images to the
        # run's batch size, so one plan serves the whole run and memory stays flat.
        # Only once a full batch has run: a run smaller than one batch pays nothing.
        # A batch of at most a quarter of the size runs as it is: its working memory
        # fits in what full batches already took (RN50 INT8 at 256: 16, 64 and 80
        # images added nothing to the peak; 96, 128 and 200 did), and padding it
        # would spend three quarters of a batch of engine time on black images.
        if len(images) == self._pad_to:
            self._full_batch_seen = True
        if not self._full_batch_seen or not self._pad_to // 4 < len(images) < self._pad_to:
            return images
        padded = np.zeros((self._pad_to, *images.shape[1:]), images.dtype)  # [B, H, W, 3]
        padded[: len(images)] = images
        return padded


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
    gate: bool = True,
    spinning: bool = True,
    pad_to: int | None = None,
    split: bool = False,
) -> Engine:
    """The engine `choice` for the export in `folder`; `auto` takes the fastest that runs.

    With `gate`, an engine on a GPU is checked against the export's saved
    reference outputs before it is returned, and refused if it strays. Without
    `spinning`, idle onnxruntime threads sleep at once instead of spinning: the
    choice where other processes (decode workers) share the cores. With `pad_to`,
    onnxruntime engines that have run a batch of that size pad shorter ones to it
    (and return only the rows given), so a run keeps one memory plan. With
    `split` and `intra_threads` above 1, onnxruntime on the CPU runs each batch
    as `intra_threads` slices at once, one thread each: the faster way for
    batches of many images, though a batch of one image then uses one core.
    """
    folder = Path(folder)
    check_engine_choice(choice)
    options = _OrtOptions(intra_threads, spinning, pad_to, split)

    if choice == "auto":
        engine = _open_fastest(folder, manifest, options, device, gate)
    else:
        engine = _open_choice(folder, manifest, choice, options, device, gate)
    logger.info("engine: %s", engine.name)
    return engine


def _open_choice(
    folder: Path, manifest: ExportManifest, choice: str, options: _OrtOptions,
    device: int, gate: bool,
) -> Engine:
    if choice == "tensorrt":
        engine = _open_tensorrt(folder, manifest, device)
    elif choice in ("ort-cuda", "ort-cuda-fp16"):
        precision = ENGINE_PRECISION[choice]
        engine = _open_ort_cuda(folder, manifest, options, device, precision)
        if not engine.name.startswith("ort-cuda"):
            raise EngineUnavailable(
                "onnxruntime could not start on CUDA (see the warning "
                "above); run with --engine ort-cpu, or fix the CUDA setup"
            )
    elif choice in ("torch", "torch-compile"):
        engine = _open_torch(folder, manifest, choice == "torch-compile", device)
    else:
        engine = _open_ort(folder, manifest, [_CPU], options, ENGINE_PRECISION[choice])

    # What the export already gated (onnxruntime and PyTorch on the CPU) is not gated again.
    on_cpu = engine.name.startswith("ort-cpu") or getattr(engine, "device", "") == "cpu"
    if gate and not on_cpu:
        _gate_on_open(engine, folder, manifest)
    return engine


def _gate_on_open(engine: Engine, folder: Path, manifest: ExportManifest) -> None:
    reference = load_reference(folder)
    if reference is None:
        logger.warning("%s: the export holds no %s, so this engine is not checked against "
                       "PyTorch; re-export to add it", engine.name, REFERENCE_FILE)
        return
    precision = getattr(engine, "precision", "fp32")
    report = run_gate(engine.run, reference, engine.name, precision,
                      scores_output=manifest.scores_output,
                      embeddings_output=manifest.embeddings_output)
    for line in report.lines:
        logger.debug("  %s", line)
    if not report.passed:
        engine.close()
        raise EngineUnavailable(
            f"{engine.name} ({precision}) failed its parity gate against PyTorch FP32: "
            f"{'; '.join(report.failures)}; run with --engine ort-cpu, or re-export"
        )


def _open_torch(folder: Path, manifest: ExportManifest, compile: bool, device: int) -> Engine:
    if manifest.torch_program is None:
        raise EngineUnavailable(
            "the export holds no PyTorch program; re-export with `imfree export ARTIFACT "
            "--out DIR --torch`, or run with --engine ort-cpu"
        )
    path = folder / manifest.torch_program
    if not path.is_file():
        raise BundleError(f"{path} is missing from the export folder; {REEXPORT_HINT}")
    from imfree.runtime.torch_engine import TorchEngine  # imports torch: only on request

    outputs = [manifest.scores_output, EMBEDDINGS_OUTPUT]
    return TorchEngine(path, outputs, compile=compile, gpu=device)


def _provider_name(provider: Provider) -> str:
    return provider if isinstance(provider, str) else provider[0]


def _open_fastest(
    folder: Path, manifest: ExportManifest, options: _OrtOptions, device: int, gate: bool
) -> Engine:
    # Importing TensorRT takes seconds: only try it when the export holds an engine.
    candidates = []
    if manifest.tensorrt_engines:
        candidates.append("tensorrt")
    if find_variant(manifest, "fp16"):
        candidates.append("ort-cuda-fp16")
    candidates.append("ort-cuda")
    if find_variant(manifest, "int8"):
        candidates.append("ort-cpu-int8")

    for choice in candidates:
        try:
            return _open_choice(folder, manifest, choice, options, device, gate)
        except EngineUnavailable as error:
            # The export was built for TensorRT, so falling back is worth a warning.
            log = logger.warning if choice == "tensorrt" else logger.debug
            log("%s skipped: %s", choice, error)
    return _open_ort(folder, manifest, [_CPU], options)


def _open_tensorrt(folder: Path, manifest: ExportManifest, device: int) -> Engine:
    machine = tensorrt_runner.probe_machine(device)
    # Of several engines built here, the one built from this export's graph.
    record = tensorrt_runner.select_engine_record(manifest.tensorrt_engines, machine,
                                                  manifest.onnx_sha256)

    path = folder / record["file"]
    if not path.is_file():
        raise EngineUnavailable(
            f"the TensorRT engine {path} listed in the manifest is missing; "
            f"{tensorrt_runner.REBUILD_HINT}"
        )
    engine = tensorrt_runner.TensorRTEngine(path, manifest.input_name, device)
    engine.precision = record["precision"]
    return engine


def _open_ort_cuda(
    folder: Path, manifest: ExportManifest, options: _OrtOptions, device: int,
    precision: str = "fp32",
) -> OrtEngine:
    available = onnxruntime.get_available_providers()
    if _CUDA not in available:
        raise EngineUnavailable(
            f"this onnxruntime has no CUDA provider (it has {', '.join(available)}): "
            "pip install onnxruntime-gpu (in place of onnxruntime) on a machine with an "
            "NVIDIA GPU, or run with --engine ort-cpu"
        )
    providers = [(_CUDA, {"device_id": device}), _CPU]
    return _open_ort(folder, manifest, providers, options, precision)


def _open_ort(
    folder: Path, manifest: ExportManifest, providers: list[Provider], options: _OrtOptions,
    precision: str = "fp32",
) -> OrtEngine:
    file, expected = manifest.onnx_file, manifest.onnx_sha256
    if precision != "fp32":
        variant = find_variant(manifest, precision)
        if variant is None:
            flags = "--int8 --calibrate FOLDER" if precision == "int8" else "--fp16"
            raise EngineUnavailable(
                f"the export holds no {precision.upper()} graph; re-export with "
                f"`imfree export ARTIFACT --out DIR {flags}`, or run with --engine ort-cpu"
            )
        file, expected = variant["file"], variant["sha256"]
    path = folder / file
    if not path.is_file():
        raise BundleError(f"{path} is missing from the export folder; {REEXPORT_HINT}")
    # A graph swapped or cut short since the export would give wrong scores or
    # a parser crash; the manifest's hash catches both before the session opens.
    if sha256_file(path) != expected:
        raise BundleError(f"{path} is not the graph this export was made with (its hash "
                          f"differs from the manifest's); {REEXPORT_HINT}")

    engine = OrtEngine(path, providers, options.intra, precision, spinning=options.spinning,
                       pad_to=options.pad_to, split=options.split)
    if engine.input_name != manifest.input_name:
        raise BundleError(
            f"{path} takes input {engine.input_name!r} but the manifest says "
            f"{manifest.input_name!r}: the folder mixes two exports; {REEXPORT_HINT}"
        )
    return engine
