"""`imfree bench`: timing rows per engine and batch, a Markdown table and a PNG plot."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from imfree.cli import app
from imfree.errors import ConfigError
from imfree.export.exporter import ExportConfig, export_artifact
from imfree.runtime.bench import BenchConfig, markdown_table, run_bench

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def export(tmp_path_factory, trained_artifacts, real_photos):
    """imfree-tiny-vit exported with an INT8 variant. Read only."""
    out = tmp_path_factory.mktemp("bench") / "export"
    return export_artifact(ExportConfig(artifact=trained_artifacts("imfree-tiny-vit"), out=out,
                                        int8=True, calibrate=real_photos,
                                        parity_images=real_photos, parity_batches=(1, 7))).folder


def test_bench_times_each_engine_and_batch_both_ways(export, real_photos, tmp_path):
    result = run_bench(BenchConfig(
        export_dir=export, out=tmp_path, engines=["ort-cpu", "ort-cpu-int8", "ort-cuda"],
        batches=[1, 4], images=real_photos, iters=2, warmup=1, e2e_files=8, decode_workers=1,
    ))

    timed = [(r.engine, r.batch, r.mode) for r in result.rows if r.batch]
    assert timed == [(e, b, m) for e in ("ort-cpu", "ort-cpu-int8") for b in (1, 4)
                     for m in ("engine", "end-to-end")]
    for row in result.rows:
        if row.batch:
            assert row.images_per_second > 0 and row.p50_ms <= row.p90_ms <= row.p99_ms
            assert row.peak_rss_mib > 10
    cuda = [r for r in result.rows if r.engine == "ort-cuda"]
    assert len(cuda) == 1 and cuda[0].note.startswith("not run: ")

    table = result.table_path.read_text()
    assert "| ort-cpu-int8 | int8 | 4 | end-to-end |" in table
    assert "CPU " in result.hardware and result.hardware in table
    assert result.plot_path.read_bytes().startswith(PNG_MAGIC)


def test_bench_refuses_an_unknown_engine(export, tmp_path):
    with pytest.raises(ConfigError, match="unknown engine.*openvino.*choose from: auto"):
        run_bench(BenchConfig(export_dir=export, out=tmp_path, engines=["openvino"]))


def test_markdown_table_has_one_line_per_row():
    from imfree.runtime.bench import BenchRow

    rows = [BenchRow("ort-cpu", "fp32", 8, "engine", 123.4, 60, 61, 70, 300),
            BenchRow("tensorrt", "fp16", 0, "-", note="not run: no GPU")]
    lines = markdown_table(rows, "CPU x", "RN50").splitlines()
    assert lines[-2] == "| ort-cpu | fp32 | 8 | engine | 123.4 | 60.0 | 61.0 | 70.0 | 300 |  |"
    assert lines[-1].startswith("| tensorrt | fp16 | - |") and "not run: no GPU" in lines[-1]


def test_bench_through_the_cli(export, tmp_path):
    result = CliRunner().invoke(app, ["bench", "--model", str(export), "--out", str(tmp_path),
                                      "--batch", "2", "--iters", "1"])
    assert result.exit_code == 0, result.output
    assert "| ort-cpu | fp32 | 2 | engine |" in result.output
    assert (tmp_path / "bench.md").is_file() and (tmp_path / "bench.png").is_file()
