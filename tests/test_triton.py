"""The Triton model repository: layout, a config Triton's own protobuf parses, the graph's names.

No Triton server runs here (no Docker, no GPU): the config is checked against
Triton's ModelConfig definition from the tritonclient package, and against the
ONNX graph it serves.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import onnx
import pytest
from typer.testing import CliRunner

from imfree.cli import app
from imfree.errors import BundleError, ConfigError, ExportError
from imfree.export.triton import TritonConfig, write_triton_repository
from imfree.runtime.bundle import MANIFEST_NAME, read_manifest, sha256_file, write_manifest

text_format = pytest.importorskip("google.protobuf.text_format")
model_config_pb2 = pytest.importorskip(
    "tritonclient.grpc.model_config_pb2",
    reason="Triton's protobuf definitions come with tritonclient: pip install 'imfree[triton]'",
)

# ONNX element types as Triton's ModelConfig names them.
TRITON_TYPE = {onnx.TensorProto.UINT8: "TYPE_UINT8", onnx.TensorProto.FLOAT: "TYPE_FP32"}


@pytest.fixture(scope="module")
def exported(tmp_path_factory, trained_artifacts) -> tuple[Path, Path]:
    """An export with the embeddings output, and the repository `export --triton` wrote."""
    root = tmp_path_factory.mktemp("triton")
    result = CliRunner().invoke(app, [
        "export", str(trained_artifacts("imfree-tiny-rn")), "--out", str(root / "voc-export"),
        "--embeddings", "--triton", str(root / "repo"),
    ])
    assert result.exit_code == 0, result.output
    assert "Triton models voc-export written to" in result.output
    return root / "voc-export", root / "repo"


def parse_config(folder: Path):
    """config.pbtxt through Triton's own ModelConfig message; any unknown field fails."""
    text = (folder / "config.pbtxt").read_text()
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def test_the_repository_layout(exported):
    export_dir, repo = exported
    files = sorted(p.relative_to(repo).as_posix() for p in repo.rglob("*") if p.is_file())

    assert files == ["voc-export/1/model.onnx", "voc-export/config.pbtxt",
                     f"voc-export/{MANIFEST_NAME}", "voc-export/labels.txt"]
    graph = repo / "voc-export" / "1" / "model.onnx"
    assert sha256_file(graph) == read_manifest(export_dir).onnx_sha256
    assert not [p for p in repo.parent.iterdir() if p.name.startswith(".")]  # no staging left


def test_the_config_parses_with_tritons_definitions(exported):
    _, repo = exported
    config = parse_config(repo / "voc-export")

    assert config.name == "voc-export"
    assert config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 64
    assert list(config.dynamic_batching.preferred_batch_size) == [64]
    assert config.dynamic_batching.max_queue_delay_microseconds == 5000
    assert [(g.count, g.kind) for g in config.instance_group] == [
        (1, model_config_pb2.ModelInstanceGroup.Kind.Value("KIND_AUTO"))]
    assert config.output[0].label_filename == "labels.txt"


def test_names_types_and_dims_match_the_onnx_graph(exported):
    _, repo = exported
    config = parse_config(repo / "voc-export")
    graph = onnx.load(str(repo / "voc-export" / "1" / "model.onnx")).graph

    for declared, tensors in ((config.input, graph.input), (config.output, graph.output)):
        assert [t.name for t in declared] == [t.name for t in tensors]
        for entry, tensor in zip(declared, tensors, strict=True):
            shape = tensor.type.tensor_type.shape.dim
            assert shape[0].dim_param  # the batch, which max_batch_size stands for
            assert list(entry.dims) == [d.dim_value for d in shape[1:]]
            type_name = TRITON_TYPE[tensor.type.tensor_type.elem_type]
            assert entry.data_type == model_config_pb2.DataType.Value(type_name)
    assert [t.name for t in config.output] == ["scores", "embeddings"]


def test_the_labels_file_lists_the_classes_in_score_order(exported):
    export_dir, repo = exported
    labels = (repo / "voc-export" / "labels.txt").read_text().splitlines()

    assert labels == read_manifest(export_dir).classes
    assert list(parse_config(repo / "voc-export").output[0].dims) == [len(labels)]


def test_a_second_model_joins_and_a_rewrite_replaces_only_its_own(tmp_path, exported):
    export_dir, built = exported
    repo = tmp_path / "repo"
    shutil.copytree(built, repo)
    (repo / "someone-else").mkdir()

    result = CliRunner().invoke(app, [
        "export-triton", str(export_dir), "--repo", str(repo), "--name", "small",
        "--max-batch", "16", "--preferred-batch", "8", "--instances", "2", "--kind", "cpu",
    ])
    assert result.exit_code == 0, result.output
    write_triton_repository(TritonConfig(export_dir, repo, model_name="small", max_batch_size=4))

    assert sorted(p.name for p in repo.iterdir()) == ["small", "someone-else", "voc-export"]
    config = parse_config(repo / "small")
    assert (config.name, config.max_batch_size) == ("small", 4)
    assert list(config.dynamic_batching.preferred_batch_size) == [4]


def test_options_reach_the_config(tmp_path, exported):
    export_dir, _ = exported
    write_triton_repository(TritonConfig(export_dir, tmp_path, model_name="m", max_batch_size=16,
                                         preferred_batch_size=8, max_queue_delay_us=100,
                                         instances=2, kind="gpu"))
    config = parse_config(tmp_path / "m")

    assert list(config.dynamic_batching.preferred_batch_size) == [8]
    assert config.dynamic_batching.max_queue_delay_microseconds == 100
    assert [(g.count, g.kind) for g in config.instance_group] == [
        (2, model_config_pb2.ModelInstanceGroup.Kind.Value("KIND_GPU"))]


def test_a_folder_of_the_users_is_not_overwritten(tmp_path, exported):
    export_dir, _ = exported
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")

    with pytest.raises(ExportError, match="not a model imfree wrote"):
        write_triton_repository(TritonConfig(export_dir, tmp_path, model_name="taken"))
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("options, message", [
    (dict(max_batch_size=0), "at least 1"),
    (dict(preferred_batch_size=128), "1..64"),
    (dict(model_name="a/b"), "cannot name a model folder"),
    (dict(kind="tpu"), "unknown instance kind"),
])
def test_bad_options_are_refused(tmp_path, exported, options, message):
    with pytest.raises(ExportError, match=message):
        write_triton_repository(TritonConfig(exported[0], tmp_path, **options))


def test_a_tensorrt_engine_becomes_a_plan_model(tmp_path, exported):
    # No TensorRT here: a stand-in engine file, listed as a real build would list it.
    export_dir = tmp_path / "export"
    shutil.copytree(exported[0], export_dir)
    (export_dir / "model.fp16.b32.opt8.engine").write_bytes(b"a serialized engine")
    record = {"file": "model.fp16.b32.opt8.engine", "precision": "fp16", "max_batch": 32,
              "opt_batch": 8, "gpu_name": "NVIDIA H100", "compute_capability": "9.0",
              "tensorrt_version": "10.3.0", "onnx_sha256": read_manifest(export_dir).onnx_sha256}
    write_manifest(export_dir, dataclasses.replace(read_manifest(export_dir),
                                                   tensorrt_engines=[record]))

    repository = write_triton_repository(TritonConfig(export_dir, tmp_path / "repo",
                                                      model_name="voc"))

    assert repository.models == ["voc", "voc_trt"]
    plan = tmp_path / "repo" / "voc_trt"
    assert (plan / "1" / "model.plan").read_bytes() == b"a serialized engine"
    config = parse_config(plan)
    assert (config.platform, config.max_batch_size) == ("tensorrt_plan", 32)
    assert list(config.dynamic_batching.preferred_batch_size) == [8]
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.Kind.Value(
        "KIND_GPU")
    assert (plan / "labels.txt").read_text() == (tmp_path / "repo" / "voc" /
                                                 "labels.txt").read_text()


def test_a_damaged_export_is_refused(tmp_path, exported):
    export_dir = tmp_path / "export"
    shutil.copytree(exported[0], export_dir)
    (export_dir / "model.onnx").write_bytes(b"not the graph")

    with pytest.raises(BundleError, match="not the graph this export was made with"):
        write_triton_repository(TritonConfig(export_dir, tmp_path / "repo"))


# Regressions from the tester's report.


def _other_export(tmp_path: Path, export_dir: Path) -> Path:
    """A copy of the export whose graph differs (as a tiny-vit export's would)."""
    other = tmp_path / "other" / export_dir.name
    shutil.copytree(export_dir, other)
    model = onnx.load(other / "model.onnx")
    model.doc_string = "another export"
    onnx.save(model, other / "model.onnx")
    manifest = dataclasses.replace(read_manifest(other),
                                   onnx_sha256=sha256_file(other / "model.onnx"))
    write_manifest(other, manifest)
    return other


def test_a_model_of_another_export_is_replaced_only_on_request(tmp_path, exported):
    export_dir, built = exported
    repo = tmp_path / "repo"
    shutil.copytree(built, repo)
    other = _other_export(tmp_path, export_dir)

    with pytest.raises(ExportError, match="another export.*--replace"):
        write_triton_repository(TritonConfig(other, repo))
    assert read_manifest(repo / "voc-export").onnx_sha256 == read_manifest(export_dir).onnx_sha256

    result = CliRunner().invoke(app, ["export-triton", str(other), "--repo", str(repo),
                                      "--replace"])
    assert result.exit_code == 0, result.output
    assert read_manifest(repo / "voc-export").onnx_sha256 == read_manifest(other).onnx_sha256


def test_files_added_to_a_model_are_kept_unless_replace(tmp_path, exported):
    export_dir, built = exported
    repo = tmp_path / "repo"
    shutil.copytree(built, repo)
    (repo / "voc-export" / "NOTES").write_text("mine")

    with pytest.raises(ExportError, match="NOTES"):
        write_triton_repository(TritonConfig(export_dir, repo))
    assert (repo / "voc-export" / "NOTES").read_text() == "mine"

    (repo / "voc-export" / "NOTES").unlink()
    write_triton_repository(TritonConfig(export_dir, repo, max_batch_size=8))  # same graph
    assert parse_config(repo / "voc-export").max_batch_size == 8


def test_staging_stays_inside_the_repository(tmp_path, exported, monkeypatch):
    # A mounted repository is its own file system: a rename from its parent fails
    # with EXDEV. Any rename that crosses the repository's edge fails here the same way.
    import os

    export_dir, built = exported
    repo = tmp_path / "repo"
    shutil.copytree(built, repo)
    rename = os.replace

    def same_file_system_only(source, target):
        inside = [Path(p).resolve().is_relative_to(repo.resolve()) for p in (source, target)]
        if not all(inside):
            raise OSError(18, "Invalid cross-device link", str(source))
        rename(source, target)

    monkeypatch.setattr("imfree.export.triton.os.replace", same_file_system_only)
    write_triton_repository(TritonConfig(export_dir, repo, max_batch_size=4))

    assert parse_config(repo / "voc-export").max_batch_size == 4
    assert sorted(p.name for p in repo.iterdir()) == ["voc-export"]  # no staging left
    assert [p.name for p in tmp_path.iterdir()] == ["repo"]


def test_an_unwritable_repository_is_one_line_before_the_export(tmp_path, exported,
                                                                trained_artifacts):
    export_dir, _ = exported
    (tmp_path / "afile").write_text("a file")
    for command in (["export-triton", str(export_dir), "--repo"],
                    ["export", str(trained_artifacts("imfree-tiny-rn")), "--out",
                     str(tmp_path / "e"), "--triton"]):
        result = CliRunner().invoke(app, [*command, str(tmp_path / "afile" / "t")])
        # main() prints an ImfreeError as one `error:` line.
        assert isinstance(result.exception, ExportError | ConfigError), result.output
        assert "cannot write the Triton repository" in str(result.exception)
        assert "afile" in str(result.exception)
    assert not (tmp_path / "e").exists()  # refused before the export's work


def test_a_foreign_folder_stops_export_before_its_work(tmp_path, trained_artifacts):
    (tmp_path / "repo" / "e3").mkdir(parents=True)
    result = CliRunner().invoke(app, ["export", str(trained_artifacts("imfree-tiny-rn")),
                                      "--out", str(tmp_path / "e3"), "--triton",
                                      str(tmp_path / "repo")])
    assert isinstance(result.exception, ExportError)
    assert "--triton-name" in str(result.exception)
    assert not (tmp_path / "e3").exists()

    result = CliRunner().invoke(app, ["export", str(trained_artifacts("imfree-tiny-rn")),
                                      "--out", str(tmp_path / "e3"), "--triton",
                                      str(tmp_path / "repo"), "--triton-name", "e3b"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "repo" / "e3b" / "config.pbtxt").is_file()
