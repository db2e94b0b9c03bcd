"""A Triton Inference Server model repository for an export folder.

Each model is one folder in the repository: `config.pbtxt`, the class names in
`labels.txt` (Triton's classification extension reads them through the scores
output's `label_filename`), a copy of the export's manifest for provenance,
and version `1/` holding the graph. The ONNX graph becomes the model NAME on
the `onnxruntime_onnx` platform; a TensorRT engine in the export becomes a
second model, NAME_trt, on `tensorrt_plan`, since Triton serves one platform
per model. The graph takes uint8 NHWC images and does the normalisation itself,
so a client sends decoded, resized pixels and nothing else.

Names, shapes and types come from the graph as onnxruntime reads it, not from
assumptions, and each model folder is built in a hidden staging folder inside
the repository (the same file system, even where the repository is a mounted
volume) and renamed into place, so Triton never sees half of one.

An existing model folder is replaced only when imfree wrote it from the same
graph and it holds nothing else; another export's model, or files a user added,
need `replace`. A folder imfree did not write is never replaced.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

import onnxruntime

from imfree.errors import BundleError, ExportError
from imfree.fileio import make_folder, make_staging_folder, unwritable, write_atomically
from imfree.runtime.bundle import (
    MANIFEST_NAME,
    REEXPORT_HINT,
    ExportManifest,
    read_manifest,
    sha256_file,
)

logger = logging.getLogger(__name__)

ONNX_PLATFORM = "onnxruntime_onnx"
PLAN_PLATFORM = "tensorrt_plan"
LABELS_FILE = "labels.txt"
CONFIG_FILE = "config.pbtxt"
VERSION = "1"
STAGING_PREFIX = ".imfree-staging-"  # hidden, inside the repository, for its renames
_NAME_OPTIONS = "--name of imfree export-triton, --triton-name of imfree export"
InstanceKind = Literal["auto", "gpu", "cpu"]

# onnxruntime's element types, as Triton names them.
_TRITON_TYPES = {"tensor(uint8)": "TYPE_UINT8", "tensor(float)": "TYPE_FP32",
                 "tensor(float16)": "TYPE_FP16"}


@dataclass
class TritonConfig:
    """One Triton repository written from one export folder."""

    export_dir: Path
    repo: Path
    model_name: str | None = None  # default: the export folder's name
    max_batch_size: int = 64  # the ONNX model's; the plan model keeps its engine's profile
    preferred_batch_size: int | None = None  # default: max_batch_size
    max_queue_delay_us: int = 5_000  # how long a request waits for others to batch with
    instances: int = 1  # model instances per device
    kind: InstanceKind = "auto"  # auto: one group per GPU if the server has GPUs, else CPU
    replace: bool = False  # replace an imfree model of another export, or with added files


@dataclass
class TensorSpec:
    name: str
    data_type: str  # Triton's TYPE_*
    dims: list[int]  # without the batch dimension


Tensors = tuple[list[TensorSpec], list[TensorSpec]]  # a graph's inputs and outputs


@dataclass
class TritonModel:
    """What one model folder of the repository holds."""

    name: str
    platform: str
    graph_file: str  # model.onnx or model.plan, inside version 1/
    max_batch_size: int
    preferred_batch_size: int
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    kind: str = "KIND_AUTO"  # Triton's instance kind
    instances: int = 1
    max_queue_delay_us: int = 5_000


@dataclass
class TritonRepository:
    root: Path
    models: list[str] = field(default_factory=list)


def write_triton_repository(config: TritonConfig) -> TritonRepository:
    """Write the export's model (and its TensorRT plan, if built) into `config.repo`."""
    export_dir = Path(config.export_dir)
    manifest = read_manifest(export_dir)
    _check_config(config)
    name = config.model_name or export_dir.resolve().name
    tensors = _graph_tensors(export_dir, manifest)
    models = [_onnx_model(name, tensors, config)]
    # One engine is enough: Triton loads a plan only on the GPU it was built for.
    models += [_plan_model(name, tensors, record, config)
               for record in manifest.tensorrt_engines[:1]]

    repo = check_repository(config.repo, [m.name for m in models], config.replace,
                            manifest.onnx_sha256)
    try:
        staging = make_staging_folder(repo, prefix=STAGING_PREFIX)
    except OSError as err:
        raise unwritable(repo, err, "the Triton repository") from None
    try:
        for model, source in zip(models, _graph_sources(export_dir, manifest), strict=True):
            _write_model(staging / model.name, model, source, export_dir, manifest)
        for model in models:
            _move_into_place(staging / model.name, repo / model.name, staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.debug("Triton repository %s: %s", repo, ", ".join(m.name for m in models))
    return TritonRepository(root=repo, models=[m.name for m in models])


def model_names(name: str, with_plan: bool) -> list[str]:
    """The model folders an export named `name` becomes (NAME, and NAME_trt for a plan)."""
    return [name, f"{name}_trt"] if with_plan else [name]


def check_repository(repo: str | os.PathLike[str], names: list[str], replace: bool = False,
                     onnx_sha256: str | None = None) -> Path:
    """Make the repository folder and check that models `names` may be written there.

    Called before an export's work too, so a clash or an unwritable repository is
    found at once. Without `onnx_sha256` (the graph is not made yet) an imfree
    model of another export is not found here but by the write itself.
    """
    repo = make_folder(repo, "the Triton repository")
    for name in names:
        _check_model_destination(repo / name, replace, onnx_sha256)
    return repo


def render_config(model: TritonModel) -> str:
    """The model's config.pbtxt, in the protobuf text format of Triton's ModelConfig."""
    height, width, _ = model.inputs[0].dims
    lines = [
        f"# Written by imfree. Input: RGB uint8 images, NHWC, resized to {height} x {width}",
        "# without a crop; the graph normalises them itself. Scores: one per class, in the",
        f"# order of {LABELS_FILE}.",
        f'name: "{model.name}"',
        f'platform: "{model.platform}"',
        f"max_batch_size: {model.max_batch_size}",
        "input [",
        ",\n".join(_tensor_block(spec) for spec in model.inputs),
        "]",
        "output [",
        ",\n".join(_tensor_block(spec, labels=spec is model.outputs[0])
                   for spec in model.outputs),
        "]",
        "dynamic_batching {",
        f"  preferred_batch_size: [ {model.preferred_batch_size} ]",
        f"  max_queue_delay_microseconds: {model.max_queue_delay_us}",
        "}",
        "instance_group [",
        "  {",
        f"    count: {model.instances}",
        f"    kind: {model.kind}",
        "  }",
        "]",
        "version_policy: { latest: { num_versions: 1 } }",
    ]
    return "\n".join(lines) + "\n"


def _tensor_block(spec: TensorSpec, labels: bool = False) -> str:
    lines = ["  {", f'    name: "{spec.name}"', f"    data_type: {spec.data_type}"]
    lines.append(f"    dims: [ {', '.join(str(d) for d in spec.dims)} ]")
    if labels:
        lines.append(f'    label_filename: "{LABELS_FILE}"')
    lines.append("  }")
    return "\n".join(lines)


def _check_config(config: TritonConfig) -> None:
    if config.max_batch_size < 1:
        raise ExportError(f"Triton max batch size must be at least 1, not "
                          f"{config.max_batch_size}")
    preferred = config.preferred_batch_size
    if preferred is not None and not 1 <= preferred <= config.max_batch_size:
        raise ExportError(f"the preferred batch size must lie in 1..{config.max_batch_size}, "
                          f"not {preferred}")
    if config.max_queue_delay_us < 0:
        raise ExportError(f"the queue delay must be 0 or more microseconds, not "
                          f"{config.max_queue_delay_us}")
    if config.kind not in get_args(InstanceKind):
        raise ExportError(f"unknown instance kind {config.kind!r}; choose one of: "
                          f"{', '.join(get_args(InstanceKind))}")
    if config.instances < 1:
        raise ExportError(f"Triton instances must be at least 1, not {config.instances}")
    if config.model_name is not None and (not config.model_name or "/" in config.model_name
                                          or config.model_name.startswith(".")):
        raise ExportError(f"{config.model_name!r} cannot name a model folder; pass a plain "
                          "name such as voc-tagger")


def _onnx_model(name: str, tensors: Tensors, config: TritonConfig) -> TritonModel:
    inputs, outputs = tensors
    return TritonModel(
        name=name,
        platform=ONNX_PLATFORM,
        graph_file="model.onnx",
        max_batch_size=config.max_batch_size,
        preferred_batch_size=config.preferred_batch_size or config.max_batch_size,
        inputs=inputs,
        outputs=outputs,
        kind=f"KIND_{config.kind.upper()}",
        instances=config.instances,
        max_queue_delay_us=config.max_queue_delay_us,
    )


def _plan_model(name: str, tensors: Tensors, record: dict, config: TritonConfig) -> TritonModel:
    # The engine's own profile bounds its batch; Triton refuses a larger max_batch_size.
    inputs, outputs = tensors
    max_batch = int(record["max_batch"])
    return TritonModel(
        name=f"{name}_trt",
        platform=PLAN_PLATFORM,
        graph_file="model.plan",
        max_batch_size=max_batch,
        preferred_batch_size=int(record.get("opt_batch") or max_batch),
        inputs=inputs,
        outputs=outputs,
        kind="KIND_GPU",
        instances=config.instances,
        max_queue_delay_us=config.max_queue_delay_us,
    )


def _graph_tensors(export_dir: Path, manifest: ExportManifest) -> Tensors:
    """The graph's inputs and outputs, checked against the manifest, batch dimension off."""
    path = _checked_graph(export_dir, manifest)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs = [_spec(tensor, path) for tensor in session.get_inputs()]
    outputs = [_spec(tensor, path) for tensor in session.get_outputs()]

    expected = [manifest.input_name]
    if [t.name for t in inputs] != expected or inputs[0].data_type != "TYPE_UINT8":
        raise BundleError(f"{path} does not take uint8 {manifest.input_name!r} images as its "
                          f"only input; {REEXPORT_HINT}")
    if inputs[0].dims != [manifest.image_height, manifest.image_width, 3]:
        raise BundleError(f"{path} takes images of {inputs[0].dims}, the manifest says "
                          f"{manifest.image_height} x {manifest.image_width}; {REEXPORT_HINT}")
    # The scores first: it is the output the labels file belongs to.
    outputs.sort(key=lambda spec: spec.name != manifest.scores_output)
    if outputs[0].name != manifest.scores_output or outputs[0].dims != [len(manifest.classes)]:
        raise BundleError(f"{path} has no {manifest.scores_output!r} output of "
                          f"{len(manifest.classes)} scores; {REEXPORT_HINT}")
    return inputs, outputs


def _spec(tensor: onnxruntime.NodeArg, path: Path) -> TensorSpec:
    kind = _TRITON_TYPES.get(tensor.type)
    dims = tensor.shape[1:]
    if kind is None or not all(isinstance(d, int) for d in dims):
        raise BundleError(f"{path}: {tensor.name} is {tensor.type} {tensor.shape}, which the "
                          f"Triton repository cannot describe; {REEXPORT_HINT}")
    return TensorSpec(tensor.name, kind, list(dims))


def _checked_graph(export_dir: Path, manifest: ExportManifest) -> Path:
    path = export_dir / manifest.onnx_file
    if not path.is_file() or sha256_file(path) != manifest.onnx_sha256:
        raise BundleError(f"{path} is missing or not the graph this export was made with; "
                          f"{REEXPORT_HINT}")
    return path


def _graph_sources(export_dir: Path, manifest: ExportManifest) -> list[Path]:
    sources = [export_dir / manifest.onnx_file]
    for record in manifest.tensorrt_engines[:1]:
        path = export_dir / record["file"]
        if not path.is_file():
            raise BundleError(f"the TensorRT engine {path} listed in the manifest is missing; "
                              f"{REEXPORT_HINT}")
        sources.append(path)
    return sources


def _write_model(folder: Path, model: TritonModel, graph: Path, export_dir: Path,
                 manifest: ExportManifest) -> None:
    (folder / VERSION).mkdir(parents=True)
    # A hard link where the file system allows: an RN50 graph is 100 MB.
    try:
        os.link(graph, folder / VERSION / model.graph_file)
    except OSError:
        shutil.copyfile(graph, folder / VERSION / model.graph_file)
    write_atomically(folder / CONFIG_FILE, render_config(model))
    write_atomically(folder / LABELS_FILE, "".join(f"{name}\n" for name in manifest.classes))
    shutil.copyfile(export_dir / MANIFEST_NAME, folder / MANIFEST_NAME)


def _check_model_destination(folder: Path, replace: bool, onnx_sha256: str | None) -> None:
    """An earlier imfree model of the same graph is replaced; anything else only on request."""
    if not folder.exists():
        return
    if not (folder / MANIFEST_NAME).is_file():
        raise ExportError(f"{folder} exists and is not a model imfree wrote; choose another "
                          f"model name ({_NAME_OPTIONS}) or repository, so nothing of yours "
                          "is overwritten")
    if replace:
        return
    if onnx_sha256 is not None and _model_graph(folder) != onnx_sha256:
        raise ExportError(f"{folder} holds the model of another export (another graph); "
                          f"choose another model name ({_NAME_OPTIONS}), or pass --replace "
                          "to replace it")
    added = _added_files(folder)
    if added:
        raise ExportError(f"{folder} holds files imfree did not write ({', '.join(added[:3])}"
                          f"{', ...' if len(added) > 3 else ''}); move them out, or pass "
                          "--replace to replace the model folder with them")


def _model_graph(folder: Path) -> str | None:
    try:
        return read_manifest(folder).onnx_sha256
    except BundleError:
        return None


def _added_files(folder: Path) -> list[str]:
    written = {CONFIG_FILE, LABELS_FILE, MANIFEST_NAME, f"{VERSION}/model.onnx",
               f"{VERSION}/model.plan"}
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if p.is_file() or p.is_symlink()
                  if str(p.relative_to(folder)) not in written)


def _move_into_place(built: Path, out: Path, staging: Path) -> None:
    # The retired model goes into the staging folder, inside the repository: both
    # renames stay on one file system, and the staging folder's removal takes it.
    if out.exists():
        os.replace(out, staging / f".{out.name}.old")
    os.replace(built, out)
