import csv
import json

import numpy as np
import pytest

from imfree.errors import ConfigError
from imfree.runtime.writers import Row, open_writer, partial_path

CLASSES = ["cat", "dog", "wine glass"]
ROWS = [
    Row(
        path="a.jpg",
        status="ok",
        labels=["dog"],
        top_k=[("dog", 0.9), ("cat", 0.0000123)],
        scores=np.array([0.0000123, 0.9, 0.05], dtype=np.float32),
    ),
    Row(path="b.jpg", status="error", error="truncated image"),
]


def test_csv_rows_appear_only_on_close(tmp_path):
    out = tmp_path / "tags.csv"
    writer = open_writer(out, CLASSES, all_scores=True)

    writer.write_rows(ROWS)

    assert not out.exists()
    assert partial_path(out) == tmp_path / ".tags.csv.partial"
    assert len(partial_path(out).read_text().splitlines()) == 3  # flushed after the batch
    writer.close()
    assert out.exists() and not partial_path(out).exists()

    with open(out, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == [
        "path", "status", "labels", "top_k", "error",
        "score:cat", "score:dog", "score:wine glass",
    ]  # fmt: skip
    assert rows[0]["labels"] == "dog"
    assert rows[0]["top_k"] == "dog:0.9;cat:1.23e-05"
    assert float(rows[0]["score:wine glass"]) == pytest.approx(0.05)
    assert rows[1] == {
        "path": "b.jpg", "status": "error", "labels": "", "top_k": "",
        "error": "truncated image", "score:cat": "", "score:dog": "", "score:wine glass": "",
    }  # fmt: skip


def test_jsonl_rows(tmp_path):
    out = tmp_path / "out" / "tags.jsonl"  # the folder is created
    with open_writer(out, CLASSES, all_scores=True) as writer:
        writer.write_rows(ROWS[:1])
        writer.write_rows(ROWS[1:])
        assert not out.exists()

    first, second = [json.loads(line) for line in out.read_text().splitlines()]
    assert first["labels"] == ["dog"]
    assert first["top_k"] == [{"label": "dog", "score": 0.9}, {"label": "cat", "score": 1.23e-05}]
    assert first["scores"]["wine glass"] == pytest.approx(0.05)
    assert first["error"] is None
    assert second == {
        "path": "b.jpg", "status": "error", "labels": [], "top_k": [],
        "error": "truncated image", "scores": None,
    }  # fmt: skip


def test_without_all_scores_there_are_no_score_columns(tmp_path):
    with open_writer(tmp_path / "t.csv", CLASSES, all_scores=False) as writer:
        writer.write_rows(ROWS)
    header = (tmp_path / "t.csv").read_text().splitlines()[0]
    assert header == "path,status,labels,top_k,error"


def test_an_exception_keeps_the_partial_file_and_says_where(tmp_path, caplog):
    out = tmp_path / "tags.jsonl"
    with pytest.raises(RuntimeError), open_writer(out, CLASSES, all_scores=False) as writer:
        writer.write_rows(ROWS)
        raise RuntimeError("engine crashed")

    assert not out.exists()
    assert len(partial_path(out).read_text().splitlines()) == 2
    assert str(partial_path(out)) in caplog.text


def test_an_earlier_output_is_replaced_whole(tmp_path):
    out = tmp_path / "tags.csv"
    out.write_text("old\n")
    writer = open_writer(out, CLASSES, all_scores=False)
    writer.write_rows(ROWS)
    assert out.read_text() == "old\n"  # untouched until the new one is complete
    writer.close()
    assert out.read_text().startswith("path,status")


def test_unknown_suffix_lists_the_choices(tmp_path):
    with pytest.raises(ConfigError, match=r"suffixes \.csv, \.jsonl, \.parquet"):
        open_writer(tmp_path / "tags.xlsx", CLASSES, all_scores=False)
    assert list(tmp_path.iterdir()) == []


def test_parquet_holds_the_same_rows_as_jsonl(tmp_path):
    parquet = pytest.importorskip("pyarrow.parquet", reason="Parquet output needs pyarrow")
    out = tmp_path / "tags.parquet"
    with open_writer(out, CLASSES, all_scores=True) as writer:
        writer.write_rows(ROWS)
        assert not out.exists()

    rows = parquet.read_table(out).to_pylist()
    assert not partial_path(out).exists()
    assert [r["path"] for r in rows] == ["a.jpg", "b.jpg"]
    assert rows[0]["labels"] == ["dog"] and rows[0]["error"] is None
    assert rows[0]["top_k"][0] == {"label": "dog", "score": pytest.approx(0.9)}
    assert rows[0]["score:wine glass"] == pytest.approx(0.05)
    assert rows[1]["status"] == "error" and rows[1]["error"] == "truncated image"
    assert rows[1]["score:cat"] is None and rows[1]["top_k"] == []


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_resume_keeps_whole_rows_and_drops_a_cut_one(tmp_path, suffix):
    if suffix == ".parquet":
        pytest.importorskip("pyarrow", reason="Parquet output needs pyarrow")
    out = tmp_path / f"tags{suffix}"
    writer = open_writer(out, CLASSES, all_scores=True)
    writer.write_rows(ROWS)
    writer.abort()
    whole = partial_path(out).read_bytes()
    partial_path(out).write_bytes(whole + whole[-40:-5])  # a kill in mid-row

    resumed = open_writer(out, CLASSES, all_scores=True, resume=True)

    assert resumed.done == {"a.jpg", "b.jpg"} and resumed.rows_resumed == 2
    assert partial_path(out).read_bytes() == whole
    resumed.write_rows([Row(path="c.jpg", status="error", error="empty file")])
    resumed.close()
    uninterrupted = tmp_path / f"whole{suffix}"
    with open_writer(uninterrupted, CLASSES, all_scores=True) as writer:
        writer.write_rows(ROWS + [Row(path="c.jpg", status="error", error="empty file")])
    if suffix == ".parquet":
        import pyarrow.parquet as parquet

        assert parquet.read_table(out).equals(parquet.read_table(uninterrupted))
    else:
        assert out.read_bytes() == uninterrupted.read_bytes()


def test_resume_from_a_finished_output_appends_to_a_copy(tmp_path):
    out = tmp_path / "tags.csv"
    with open_writer(out, CLASSES, all_scores=False) as writer:
        writer.write_rows(ROWS[:1])

    resumed = open_writer(out, CLASSES, all_scores=False, resume=True)
    resumed.write_rows(ROWS[1:])
    assert len(out.read_text().splitlines()) == 2  # the finished file is untouched so far
    resumed.close()

    assert [line.split(",")[0] for line in out.read_text().splitlines()] == [
        "path", "a.jpg", "b.jpg"]


def test_a_path_with_a_newline_survives_resume(tmp_path):
    out = tmp_path / "tags.csv"
    odd = Row(path="two\nlines \u2028.jpg", status="error", error="empty file")
    writer = open_writer(out, CLASSES, all_scores=False)
    writer.write_rows([odd])
    writer.abort()

    assert open_writer(out, CLASSES, all_scores=False, resume=True).done == {odd.path}


def test_a_partial_file_is_not_overwritten_without_resume(tmp_path):
    out = tmp_path / "tags.jsonl"
    writer = open_writer(out, CLASSES, all_scores=False)
    writer.write_rows(ROWS)
    writer.abort()

    with pytest.raises(ConfigError, match="add --resume to continue it"):
        open_writer(out, CLASSES, all_scores=False)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_resume_with_other_columns_is_refused(tmp_path, suffix):
    out = tmp_path / f"tags{suffix}"
    writer = open_writer(out, CLASSES, all_scores=True)
    writer.write_rows(ROWS)
    writer.abort()

    with pytest.raises(ConfigError, match="resume with the same options"):
        open_writer(out, CLASSES, all_scores=False, resume=True)
