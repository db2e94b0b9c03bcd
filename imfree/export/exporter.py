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

import imfree
from imfree.errors import ExportError
from imfree.export.graph import ScoringGraph
from imfree.export.onnx_graph import EMBEDDINGS, INPUT, SCORES, export_onnx
from imfree.export.parity import (
    DEFAULT_BATCHES,
    ParityReport,
    Tolerances,
    check_parity,
    require_parity,
)
from imfree.fileio import make_staging_folder
from imfree.models import load_backbone
from imfree.runtime.bundle import MANIFEST_NAME, ExportManifest, sha256_file, write_manifest
from imfree.runtime.engines import OrtEngine
from imfree.toolkit.artifact import ClassifierArtifact, load_artifact

logger = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
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
    max_batch: int = 256
    parity_images: Path | None = None
    parity_batches: tuple[int, ...] = DEFAULT_BATCHES
    tolerances: Tolerances = field(default_factory=Tolerances)


@dataclass
class ExportResult:
    folder: Path
    parity: list[ParityReport]
    manifest: ExportManifest


def export_artifact(config: ExportConfig) -> ExportResult:
    """Export, gate, and move the folder into place; raises ExportError on any failure."""
    artifact = load_artifact(config.artifact)
    if config.trt:
        _require_tensorrt()  # fail before minutes of ONNX work, not after
    out = Path(config.out)
    _check_destination(out)

    weights = config.weights or artifact.pretrained
    backbone = load_backbone(artifact.model_name, weights)
    graph = ScoringGraph(backbone, artifact, embeddings=config.embeddings).eval()
    threshold = config.threshold if config.threshold is not None else 2.0 / len(artifact.classes)
    photos = config.parity_images or (REPO_PHOTOS if REPO_PHOTOS.is_dir() else None)

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = make_staging_folder(out.parent, prefix=f".{out.name}.partial-")
    try:
        onnx_path = export_onnx(graph, staging / ONNX_FILE, artifact.preprocess.image_size,
                                _onnx_metadata(artifact, threshold), config.opset)
        engine = OrtEngine(onnx_path, ["CPUExecutionProvider"])
        reports = [check_parity(graph, engine.run, "onnxruntime CPU", photos,
                                artifact.preprocess.image_size, threshold,
                                config.parity_batches, config.tolerances)]
        require_parity(reports[0])

        manifest = _manifest(artifact, config, weights, threshold, onnx_path)
        if config.trt:
            manifest.tensorrt_engines.append(_build_tensorrt(onnx_path, staging, config, artifact))
        write_manifest(staging, manifest)
        _move_into_place(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ExportResult(folder=out, parity=reports, manifest=manifest)


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
    onnx_path: Path, staging: Path, config: ExportConfig, artifact: ClassifierArtifact
) -> dict:
    from imfree.export.tensorrt import build_engine

    engine_path = staging / f"model.fp16.b{config.max_batch}.engine"
    return build_engine(onnx_path, engine_path, config.max_batch, precision="fp16",
                        input_shape=artifact.preprocess.image_size)


def _check_destination(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is a file; pass a folder path with --out")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST_NAME).exists():
        raise ExportError(f"{out} is a non-empty folder that holds no export; pass an empty "
                          f"or new folder with --out, so nothing of yours is overwritten")


def _move_into_place(staging: Path, out: Path) -> None:
    """Swap the finished folder in; an older export there is replaced whole."""
    if out.exists():
        retired = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, retired / out.name)
        os.replace(staging, out)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staging, out)
