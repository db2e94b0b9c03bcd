"""The classifier artifact: what training leaves behind, and all that export needs.

A folder with `classifier.safetensors` (the two class matrices, and the learned
prompt vectors for inspection) and `classifier.json` (class names, scales,
mixing weight, backbone, preprocessing, training config, versions). No pickle:
loading an artifact never runs code.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from imfree.errors import ArtifactError
from imfree.fileio import write_atomically
from imfree.models import Preprocess

FORMAT = "imfree-classifier"
FORMAT_VERSION = 1
TENSORS = "classifier.safetensors"
METADATA = "classifier.json"


@dataclass
class Scales:
    global_: float = 4.0
    local: float = 4.0
    spatial: float = 50.0
    mix_global: float = 0.65


@dataclass
class ClassifierArtifact:
    classes: list[str]
    prompt_names: list[str]
    global_classifier: torch.Tensor  # [C, E], rows normalised
    local_classifier: torch.Tensor  # [C, E], rows normalised
    model_name: str
    pretrained: str
    preprocess: Preprocess
    scales: Scales = field(default_factory=Scales)
    kind: str = "trained"  # or "zero-shot"
    training: dict[str, Any] = field(default_factory=dict)
    hierarchy: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    extra_tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    def save(self, folder: Path) -> Path:
        """Write both files atomically into `folder`.

        The metadata records the tensor file's hash, so a reader notices two
        files that do not belong together (a crash between the writes, a copy).
        """
        folder = Path(folder)
        check_writable_folder(folder)
        tensors = {
            # Cloned: the two classifiers may be one tensor (zero-shot), which
            # safetensors refuses to write twice.
            "global_classifier": self.global_classifier.detach().float().clone(),
            "local_classifier": self.local_classifier.detach().float().clone(),
            **{k: v.detach().float().clone() for k, v in self.extra_tensors.items()},
        }
        payload = save(tensors)
        metadata = self._metadata() | {"tensors_sha256": hashlib.sha256(payload).hexdigest()}
        try:
            write_atomically(folder / TENSORS, payload)
            write_atomically(folder / METADATA, json.dumps(metadata, indent=2))
        except OSError as err:
            raise ArtifactError(f"cannot write the artifact into {folder}: {err.strerror}; "
                                f"pass a writable folder with --out") from err
        return folder

    def _metadata(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "classes": self.classes,
            "prompt_names": self.prompt_names,
            "scales": {
                "global": self.scales.global_,
                "local": self.scales.local,
                "spatial": self.scales.spatial,
                "mix_global": self.scales.mix_global,
            },
            "model": {"name": self.model_name, "pretrained": self.pretrained},
            "preprocess": self.preprocess.to_dict(),
            "hierarchy": self.hierarchy,
            "training": self.training,
            "versions": self.versions,
        }


def load_artifact(folder: Path) -> ClassifierArtifact:
    folder = Path(folder)
    metadata = _read_metadata(folder)
    try:
        payload = (folder / TENSORS).read_bytes()
        tensors = load(payload)
    except (OSError, SafetensorError) as err:
        raise ArtifactError(
            f"cannot read {folder / TENSORS}: {err}; re-run `imfree train`"
        ) from err
    expected = metadata.get("tensors_sha256")
    if expected is not None and hashlib.sha256(payload).hexdigest() != expected:
        raise ArtifactError(f"{folder / TENSORS} is not the tensor file {METADATA} was written "
                            f"with (its hash differs); re-run `imfree train`")

    try:
        scales = metadata["scales"]
        artifact = ClassifierArtifact(
            classes=list(metadata["classes"]),
            prompt_names=list(metadata.get("prompt_names", metadata["classes"])),
            global_classifier=tensors.pop("global_classifier"),
            local_classifier=tensors.pop("local_classifier"),
            model_name=metadata["model"]["name"],
            pretrained=metadata["model"]["pretrained"],
            preprocess=Preprocess.from_dict(metadata["preprocess"]),
            scales=Scales(scales["global"], scales["local"], scales["spatial"],
                          scales["mix_global"]),
            kind=metadata.get("kind", "trained"),
            training=metadata.get("training", {}),
            hierarchy=metadata.get("hierarchy", {}),
            versions=metadata.get("versions", {}),
            extra_tensors=tensors,
        )
    except (KeyError, TypeError, ValueError) as err:
        raise ArtifactError(f"{folder} is missing {err} in its metadata or tensors; "
                            f"re-run `imfree train`") from err
    _check_shapes(artifact, folder)
    return artifact


def check_writable_folder(folder: Path) -> None:
    """Make `folder` or say, before any long work, why it cannot be an output folder."""
    if folder.exists() and not folder.is_dir():
        raise ArtifactError(f"{folder} exists and is not a folder; pass a folder with --out")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ArtifactError(f"cannot create {folder}: {err.strerror}; pass a writable folder "
                            f"with --out") from err
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ArtifactError(f"{folder} is not writable; pass a writable folder with --out")


def _read_metadata(folder: Path) -> dict[str, Any]:
    path = folder / METADATA
    if not folder.is_dir():
        raise ArtifactError(f"{folder} is not a folder; pass the --out folder of `imfree train`")
    try:
        metadata = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise ArtifactError(f"{folder} holds no {METADATA}; pass the --out folder of "
                            f"`imfree train`") from err
    except OSError as err:
        raise ArtifactError(f"cannot read {path}: {err.strerror}") from err
    except json.JSONDecodeError as err:
        raise ArtifactError(f"{path} is not valid JSON ({err.msg}); re-run `imfree train`") from err
    except UnicodeDecodeError as err:
        raise ArtifactError(f"{path} is not UTF-8 text; re-run `imfree train`") from err
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise ArtifactError(f"{path} is not an imfree classifier artifact; pass the --out "
                            f"folder of `imfree train`")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{path} has format version {metadata.get('format_version')}, this imfree reads "
            f"{FORMAT_VERSION}; re-run `imfree train` with this version"
        )
    return metadata


def _check_shapes(artifact: ClassifierArtifact, folder: Path) -> None:
    classes = len(artifact.classes)
    for name in ("global_classifier", "local_classifier"):
        matrix = getattr(artifact, name)
        if matrix.ndim != 2 or matrix.shape[0] != classes:
            raise ArtifactError(f"{folder}: {name} has shape {tuple(matrix.shape)} for "
                                f"{classes} classes; re-run `imfree train`")


def library_versions() -> dict[str, str]:
    import open_clip

    import imfree

    return {"imfree": imfree.__version__, "torch": torch.__version__,
            "open_clip": open_clip.__version__}
