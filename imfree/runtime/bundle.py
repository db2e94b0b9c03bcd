"""The export folder: `model.onnx` plus `imfree_export.json`, read and written here.

This is the only place that knows the manifest's layout. The export writes it,
the runtime reads it, and neither needs the other's code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imfree.errors import BundleError
from imfree.fileio import write_atomically
from imfree.runtime.images import INTERPOLATIONS

logger = logging.getLogger(__name__)

MANIFEST_NAME = "imfree_export.json"
FORMAT = "imfree-export"
FORMAT_VERSION = 1
RESIZE_MODES = ("stretch",)
ENGINE_RECORD_KEYS = (
    "file",
    "precision",
    "max_batch",
    "gpu_name",
    "compute_capability",
    "tensorrt_version",
    "onnx_sha256",
)
VARIANT_RECORD_KEYS = ("file", "precision", "sha256")

# The fix for every damaged or mismatched export folder.
REEXPORT_HINT = "run `imfree export ARTIFACT --out DIR` to write a fresh export folder"


@dataclass
class ExportManifest:
    """What the runtime needs to know about an export, besides the graph itself."""

    classes: list[str]
    image_height: int
    image_width: int
    mean: list[float]  # informational: normalisation happens inside the graph
    std: list[float]
    threshold: float  # default decision threshold on scores
    onnx_sha256: str
    input_name: str = "images"
    scores_output: str = "scores"
    embeddings_output: str | None = None
    resize: str = "stretch"  # to exactly height x width, no centre crop
    interpolation: str = "bicubic"
    onnx_file: str = "model.onnx"
    tensorrt_engines: list[dict[str, Any]] = field(default_factory=list)
    # Other ONNX graphs of the same model, each gated on parity at export:
    # {"file", "precision" ("int8" | "fp16"), "sha256", "device", "parity": {...}}.
    onnx_variants: list[dict[str, Any]] = field(default_factory=list)
    torch_program: str | None = None  # a torch.export program (.pt2) for --engine torch
    model: dict[str, Any] = field(default_factory=dict)  # backbone, pretrained tag, artifact
    versions: dict[str, str] = field(default_factory=dict)  # package versions at export


_FIELDS = dataclasses.fields(ExportManifest)
_FIELD_NAMES = frozenset(f.name for f in _FIELDS)
_REQUIRED_FIELDS = tuple(
    f.name
    for f in _FIELDS
    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
)


def sha256_file(path: str | os.PathLike[str], chunk_bytes: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks so a large graph never sits in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: str | os.PathLike[str], manifest: ExportManifest) -> Path:
    """Write `imfree_export.json` into `folder` atomically and return its path."""
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    _check_fields(manifest, path)

    document = {"format": FORMAT, "format_version": FORMAT_VERSION}
    document.update(dataclasses.asdict(manifest))
    text = json.dumps(document, indent=2, ensure_ascii=False) + "\n"

    folder.mkdir(parents=True, exist_ok=True)
    write_atomically(path, text.encode("utf-8"))
    logger.debug("wrote %s (%d classes)", path, len(manifest.classes))
    return path


def read_manifest(folder: str | os.PathLike[str]) -> ExportManifest:
    """Read and check the manifest of the export folder `folder`."""
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    document = _load_document(folder, path)

    _check_format(document, path)
    values = {key: value for key, value in document.items() if key in _FIELD_NAMES}
    missing = [name for name in _REQUIRED_FIELDS if name not in values]
    if missing:
        raise BundleError(f"{path} lacks the field(s) {', '.join(missing)}; {REEXPORT_HINT}")

    unknown = sorted(set(document) - _FIELD_NAMES - {"format", "format_version"})
    if unknown:
        logger.debug("%s: ignoring unknown fields %s", path, ", ".join(unknown))

    manifest = ExportManifest(**values)
    _check_fields(manifest, path)
    return manifest


def _load_document(folder: Path, path: Path) -> dict[str, Any]:
    if not folder.is_dir():
        raise BundleError(f"export folder {folder} does not exist; {REEXPORT_HINT}")
    if not path.is_file():
        raise BundleError(
            f"{folder} is not an export folder: {MANIFEST_NAME} is missing; {REEXPORT_HINT}"
        )

    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BundleError(f"{path} is unreadable ({error}); {REEXPORT_HINT}") from error
    if not isinstance(document, dict):
        raise BundleError(f"{path} holds no JSON object; {REEXPORT_HINT}")
    return document


def _check_format(document: dict[str, Any], path: Path) -> None:
    if document.get("format") != FORMAT:
        raise BundleError(
            f"{path} is not an imfree export manifest (format {document.get('format')!r}, "
            f"expected {FORMAT!r}); {REEXPORT_HINT}"
        )
    version = document.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(
            f"{path} has format_version {version!r}, this imfree reads version "
            f"{FORMAT_VERSION}; upgrade imfree, or {REEXPORT_HINT} with this version"
        )


def _check_fields(manifest: ExportManifest, path: Path) -> None:
    problems = _field_problems(manifest)
    if problems:
        raise BundleError(f"{path} is invalid: {'; '.join(problems)}. {REEXPORT_HINT}")


def _field_problems(m: ExportManifest) -> list[str]:
    problems = []
    if not _is_list_of(m.classes, str) or not m.classes:
        problems.append("classes must be a non-empty list of names")
    elif len(set(m.classes)) != len(m.classes):
        problems.append("classes holds duplicate names")
    for name in ("image_height", "image_width"):
        value = getattr(m, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            problems.append(f"{name} must be a positive integer, not {value!r}")
    for name in ("mean", "std"):
        if not _is_list_of(getattr(m, name), (int, float)) or len(getattr(m, name)) != 3:
            problems.append(f"{name} must list 3 numbers")
    if (not isinstance(m.threshold, (int, float)) or isinstance(m.threshold, bool)
            or not 0.0 <= m.threshold <= 1.0):
        problems.append(f"threshold must be a number in [0, 1], not {m.threshold!r}")
    for name in ("input_name", "scores_output", "onnx_file", "onnx_sha256"):
        if not isinstance(getattr(m, name), str) or not getattr(m, name):
            problems.append(f"{name} must be a non-empty string")
    variants = m.onnx_variants if isinstance(m.onnx_variants, list) else []
    files = [m.onnx_file, m.torch_program] + [r.get("file") for r in variants
                                               if isinstance(r, dict)]
    if any(isinstance(f, str) and Path(f).name != f for f in files):
        problems.append("graph files must be plain names inside the export folder")
    if m.embeddings_output is not None and not isinstance(m.embeddings_output, str):
        problems.append("embeddings_output must be a string or null")
    if not isinstance(m.model, dict) or not isinstance(m.versions, dict):
        problems.append("model and versions must be objects")
    if m.resize not in RESIZE_MODES:
        problems.append(f"resize {m.resize!r} is not one of {', '.join(RESIZE_MODES)}")
    if m.interpolation not in INTERPOLATIONS:
        problems.append(
            f"interpolation {m.interpolation!r} is not one of {', '.join(INTERPOLATIONS)}"
        )
    problems.extend(_record_problems(m.tensorrt_engines, "tensorrt_engines", ENGINE_RECORD_KEYS))
    problems.extend(_record_problems(m.onnx_variants, "onnx_variants", VARIANT_RECORD_KEYS))
    if m.torch_program is not None and (not isinstance(m.torch_program, str)
                                        or not m.torch_program):
        problems.append("torch_program must be a file name or null")
    return problems


def _record_problems(records: Any, field_name: str, keys: tuple[str, ...]) -> list[str]:
    """Problems of a list of file records (ONNX variants, TensorRT engines)."""
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        return [f"{field_name} must be a list of objects"]
    problems = []
    for index, record in enumerate(records):
        missing = [key for key in keys if key not in record]
        if missing:
            problems.append(f"{field_name}[{index}] lacks {', '.join(missing)}")
    return problems


def find_variant(manifest: ExportManifest, precision: str) -> dict[str, Any] | None:
    """The manifest's ONNX variant of `precision`, or None if the export holds none."""
    return next((v for v in manifest.onnx_variants if v.get("precision") == precision), None)


def _is_list_of(value: Any, kinds: type | tuple[type, ...]) -> bool:
    return isinstance(value, list) and all(
        isinstance(item, kinds) and not isinstance(item, bool) for item in value
    )
