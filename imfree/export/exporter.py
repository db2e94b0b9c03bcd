"""From a classifier artifact to an export folder the runtime can run.

The folder is built beside its destination and moved into place only after the
parity gate passes, so a failed or interrupted export never leaves a folder
that looks usable.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

import numpy as np

import imfree
from imfree.errors import BundleError, ConfigError, ExportError
from imfree.export.fp16 import convert_fp16
from imfree.export.graph import ScoringGraph
from imfree.export.onnx_graph import EMBEDDINGS, INPUT, SCORES, export_onnx
from imfree.export.parity import (
    DEFAULT_BATCHES,
    ParityReport,
    Tolerances,
    check_parity,
    reference_outputs,
    require_parity,
)
from imfree.export.prune import drop_output
from imfree.export.quantize import calibration_images, quantize_int8
from imfree.export.torch_program import TORCH_FILE, save_torch_program
from imfree.fileio import make_staging_folder
from imfree.models import load_backbone
from imfree.runtime.bundle import (
    MANIFEST_NAME,
    ExportManifest,
    read_manifest,
    sha256_file,
    write_manifest,
)
from imfree.runtime.engines import OrtEngine
from imfree.runtime.gate import REFERENCE_FILE, Reference, save_reference
from imfree.runtime.sources import is_image_name
from imfree.toolkit.artifact import ClassifierArtifact, load_artifact

logger = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
FP16_FILE = "model.fp16.onnx"
TrtPrecision = Literal["fp16", "fp32", "int8"]
TRT_PRECISIONS: tuple[str, ...] = get_args(TrtPrecision)
# Where the repository keeps its real photos; the parity gate's default input.
REPO_PHOTOS = Path(imfree.__file__).resolve().parents[1] / "examples" / "images"


@dataclass
class ExportConfig:
    artifact: Path
    out: Path
    weights: str | None = None  # image tower weights; default: the artifact's pretrained tag
    embeddings: bool = False
    opset: int = 18
    threshold: float | None = None  # default: twice the uniform score, 2 / classes
    trt: bool = False
    trt_precision: TrtPrecision = "fp16"
    max_batch: int = 256
    opt_batch: int | None = None  # the batch TensorRT tunes for; default max_batch
    int8: bool = False  # also write model.int8.onnx for the CPU
    calibrate: Path | None = None  # unlabelled photos for INT8 calibration
    calibration_images: int = 128
    fp16: bool = False  # also write model.fp16.onnx for onnxruntime CUDA
    torch_program: bool = False  # also write model.pt2 for --engine torch
    parity_images: Path | None = None
    parity_batches: tuple[int, ...] = DEFAULT_BATCHES
    tolerances: Tolerances = field(default_factory=Tolerances)  # for the FP32 graph


@dataclass
class ExportResult:
    folder: Path
    parity: list[ParityReport]
    manifest: ExportManifest


def export_artifact(config: ExportConfig) -> ExportResult:
    """Export, gate, and move the folder into place; raises ExportError on any failure."""
    artifact = load_artifact(config.artifact)
    _check_config(config)
    if config.trt:
        _require_tensorrt()  # fail before minutes of ONNX work, not after
    out = Path(config.out)
    _check_destination(out)

    weights = config.weights or artifact.pretrained
    backbone = load_backbone(artifact.model_name, weights)
    size = artifact.preprocess.image_size
    calibration = (calibration_images(config.calibrate, size, config.calibration_images)
                   if config.int8 else None)  # a bad folder fails before the export work
    # The gate always sees the embeddings, to check their cosine; the output is
    # dropped again below unless it was asked for.
    graph = ScoringGraph(backbone, artifact, embeddings=True).eval()
    threshold = config.threshold if config.threshold is not None else 2.0 / len(artifact.classes)
    photos = _parity_photos(config.parity_images)
    reference = reference_outputs(graph, photos, size, threshold, max(config.parity_batches))

    staging = _staging_folder(out)
    try:
        onnx_path = export_onnx(graph, staging / ONNX_FILE, size,
                                _onnx_metadata(artifact, threshold), config.opset)
        reports = [_gate_onnx(onnx_path, "fp32", reference, config, config.tolerances)]

        variants = []
        if calibration is not None:
            path = quantize_int8(onnx_path, staging / INT8_FILE, calibration)
            reports.append(_gate_onnx(path, "int8", reference, config))
            variants.append(_variant_record(path, reports[-1], "cpu",
                                            calibration={"folder": str(config.calibrate),
                                                         "images": len(calibration)}))
        if config.fp16:
            path = convert_fp16(onnx_path, staging / FP16_FILE)
            reports.append(_gate_onnx(path, "fp16", reference, config))
            variants.append(_variant_record(path, reports[-1], "cuda"))
        if config.torch_program:
            reports.append(_save_and_gate_torch(graph, staging, size, reference, config))

        for path in [onnx_path, *(staging / v["file"] for v in variants)]:
            if not config.embeddings:
                drop_output(path, EMBEDDINGS)
        for variant in variants:
            variant["sha256"] = sha256_file(staging / variant["file"])
        save_reference(staging, reference)

        manifest = _manifest(artifact, config, weights, threshold, onnx_path)
        manifest.onnx_variants = variants
        manifest.torch_program = TORCH_FILE if config.torch_program else None
        if config.trt:
            record, report = _build_tensorrt(onnx_path, staging, config, artifact, reference,
                                             calibration)
            manifest.tensorrt_engines.append(record)
            reports.append(report)
        write_manifest(staging, manifest)
        _move_into_place(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ExportResult(folder=out, parity=reports, manifest=manifest)


def _check_config(config: ExportConfig) -> None:
    if config.int8 and config.calibrate is None:
        raise ConfigError("--int8 needs --calibrate FOLDER: a folder of unlabelled photos "
                          "like the ones you will tag (100 or more is best)")
    if config.calibrate is not None and not config.int8:
        raise ConfigError("--calibrate is only used with --int8; add --int8 or drop it")
    if config.calibration_images < 1:
        raise ConfigError(f"calibration images must be at least 1, not "
                          f"{config.calibration_images}")
    if config.trt_precision not in TRT_PRECISIONS:
        raise ConfigError(f"unknown TensorRT precision {config.trt_precision!r}; choose one "
                          f"of: {', '.join(TRT_PRECISIONS)}")
    if config.trt_precision == "int8" and config.calibrate is None:
        raise ConfigError("a TensorRT INT8 engine needs --calibrate FOLDER of unlabelled photos")
    if config.threshold is not None and not 0.0 <= config.threshold <= 1.0:
        raise ConfigError(f"--threshold must lie in [0, 1] (scores are probabilities), "
                          f"not {config.threshold}")


def _gate_onnx(
    path: Path, precision: str, reference: Reference, config: ExportConfig,
    tolerances: Tolerances | None = None,
) -> ParityReport:
    """Gate an ONNX graph on onnxruntime CPU; ExportError, naming the limit, if it fails."""
    engine = OrtEngine(path, ["CPUExecutionProvider"])
    name = "onnxruntime CPU" if precision == "fp32" else f"onnxruntime CPU, {path.name}"
    report = check_parity(reference, engine.run, name, batches=config.parity_batches,
                          tolerances=tolerances, precision=precision)
    require_parity(report)
    return report


def _save_and_gate_torch(
    graph: ScoringGraph, staging: Path, size: tuple[int, int], reference: Reference,
    config: ExportConfig,
) -> ParityReport:
    from imfree.runtime.torch_engine import TorchEngine

    path = save_torch_program(graph, staging / TORCH_FILE, size)
    # Gate the saved file as the runtime will load it, on the CPU in FP32.
    engine = TorchEngine(path, [SCORES, EMBEDDINGS], device="cpu")
    report = check_parity(reference, engine.run, "PyTorch program", batches=config.parity_batches,
                          tolerances=config.tolerances)
    require_parity(report)
    return report


def _variant_record(path: Path, report: ParityReport, device: str, **extra) -> dict:
    return {"file": path.name, "precision": report.precision, "sha256": "", "device": device,
            "parity": report.summary(), **extra}


def _manifest(
    artifact: ClassifierArtifact, config: ExportConfig, weights: str, threshold: float,
    onnx_path: Path,
) -> ExportManifest:
    height, width = artifact.preprocess.image_size
    return ExportManifest(
        classes=list(artifact.classes),
        image_height=height,
        image_width=width,
        mean=list(artifact.preprocess.mean),
        std=list(artifact.preprocess.std),
        threshold=threshold,
        onnx_sha256=sha256_file(onnx_path),
        input_name=INPUT,
        scores_output=SCORES,
        embeddings_output=EMBEDDINGS if config.embeddings else None,
        resize=artifact.preprocess.resize,
        interpolation=artifact.preprocess.interpolation,
        onnx_file=ONNX_FILE,
        model={
            "backbone": artifact.model_name,
            "pretrained": weights,
            "artifact": str(Path(config.artifact).resolve()),
            "artifact_kind": artifact.kind,
            "scales": vars(artifact.scales),
            "opset": config.opset,
        },
        versions=artifact.versions | _export_versions(),
    )


def _onnx_metadata(artifact: ClassifierArtifact, threshold: float) -> dict:
    return {
        "imfree.classes": artifact.classes,
        "imfree.preprocess": artifact.preprocess.to_dict(),
        "imfree.input": "uint8 [batch, height, width, 3] RGB, resized without crop",
        "imfree.threshold": threshold,
        "imfree.model": {"backbone": artifact.model_name, "pretrained": artifact.pretrained},
        "imfree.versions": artifact.versions | _export_versions(),
    }


def _export_versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import torch

    return {"imfree": imfree.__version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__}


def _require_tensorrt() -> None:
    from imfree.runtime.tensorrt_runner import import_tensorrt, probe_machine

    import_tensorrt()
    probe_machine()


def _build_tensorrt(
    onnx_path: Path, staging: Path, config: ExportConfig, artifact: ClassifierArtifact,
    reference: Reference, calibration: np.ndarray | None,
) -> tuple[dict, ParityReport]:
    """Build, then gate, the engine; INT8 reuses the images decoded for the ONNX variant."""
    from imfree.export.tensorrt import build_engine, engine_file_name
    from imfree.runtime.tensorrt_runner import TensorRTEngine

    if config.trt_precision != "int8":
        calibration = None
    opt_batch = config.opt_batch or config.max_batch
    engine_path = staging / engine_file_name(config.trt_precision, config.max_batch, opt_batch)
    record = build_engine(onnx_path, engine_path, config.max_batch, opt_batch,
                          precision=config.trt_precision, calibration=calibration,
                          input_shape=artifact.preprocess.image_size)

    engine = TensorRTEngine(engine_path, INPUT)
    try:
        report = check_parity(reference, engine.run, f"TensorRT {config.trt_precision}",
                              batches=config.parity_batches, precision=config.trt_precision)
    finally:
        engine.close()
    require_parity(report)
    record["parity"] = report.summary()
    return record, report


def _check_destination(out: Path) -> None:
    """Refuse any destination whose replacement could lose a file of the user's."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is a file; pass a folder path with --out")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not (out / MANIFEST_NAME).exists():
        raise ExportError(f"{out} is a non-empty folder that holds no export; pass an empty "
                          f"or new folder with --out, so nothing of yours is overwritten")

    # An older export is replaced whole, so it may hold nothing but its own files.
    try:
        manifest = read_manifest(out)
    except BundleError as err:
        raise ExportError(f"{out} holds a damaged export ({err}); delete it or pass another "
                          f"--out") from err
    foreign = sorted(p.name for p in out.iterdir() if p.name not in _export_files(manifest))
    if foreign:
        raise ExportError(f"{out} holds files that are not part of its export "
                          f"({', '.join(foreign[:5])}); move them out or pass another --out")


def _export_files(manifest: ExportManifest) -> set[str]:
    names = {MANIFEST_NAME, manifest.onnx_file, REFERENCE_FILE}
    names |= {v["file"] for v in manifest.onnx_variants}
    names |= {e["file"] for e in manifest.tensorrt_engines}
    if manifest.torch_program:
        names.add(manifest.torch_program)
    return names


def _staging_folder(out: Path) -> Path:
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        return make_staging_folder(out.parent, prefix=f".{out.name}.partial-")
    except OSError as err:
        raise ExportError(f"cannot write beside {out}: {err.strerror}; pass a writable "
                          f"--out") from err


def _parity_photos(asked: Path | None) -> Path | None:
    """The gate's photos: the folder asked for, else the repository's real photos."""
    if asked is not None:
        if not any(is_image_name(p.name) for p in Path(asked).rglob("*")):
            raise ConfigError(f"--parity-images {asked} holds no image files; pass a folder "
                              f"of photos")
        return asked
    if REPO_PHOTOS.is_dir():
        return REPO_PHOTOS
    logger.warning("the repository's photos (examples/images) are not here, so the parity "
                   "gate runs on seeded noise images; pass --parity-images FOLDER of real "
                   "photos for a meaningful check")
    return None


def _move_into_place(staging: Path, out: Path) -> None:
    """Swap the finished folder in; an older export there is replaced whole."""
    if out.exists():
        retired = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, retired / out.name)
        os.replace(staging, out)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staging, out)
