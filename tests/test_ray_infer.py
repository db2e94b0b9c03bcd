"""`imfree infer --ray`: a local Ray instance of 2 CPUs gives the local run's rows, in shards.

One local Ray instance serves the whole module (it takes about 10 s to start),
without the dashboard and with usage statistics off; each run in this process
joins it, and the killed driver connects to it by its address.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from imfree.errors import ConfigError, EngineUnavailable
from imfree.runtime.infer import InferConfig, run_inference
from imfree.runtime.ray_infer import (
    RayConfig,
    _placement,
    import_ray,
    ray_session,
    run_ray_inference,
)
from imfree.runtime.ray_shards import SHARDS_MANIFEST, plan_shards, read_shards

pytest.importorskip("ray.data", reason="Ray Data is an optional extra: pip install 'imfree[ray]'")
pq = pytest.importorskip("pyarrow.parquet", reason="Parquet output needs pyarrow")

REPO = Path(__file__).resolve().parents[1]
BATCH = 32
SHARD_ROWS = 64
GENERATED = 240
BAD_FILES = {"empty.jpg": "empty file", "notes.png": "not an image", "folder.jpg": "directory"}


@pytest.fixture(scope="module")
def ray_instance():
    """A local Ray instance with 2 CPUs for the module; its address for other drivers."""
    ray = import_ray()
    with ray_session(ray, RayConfig(cpus=2)):
        # Ray names the machine's own address; the same port answers on loopback.
        port = ray.get_runtime_context().gcs_address.rpartition(":")[2]
        yield f"127.0.0.1:{port}"


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory, trained_artifacts) -> Path:
    from imfree.export.exporter import ExportConfig, export_artifact

    out = tmp_path_factory.mktemp("ray-export") / "export"
    export_artifact(ExportConfig(artifact=trained_artifacts("imfree-tiny-rn"), out=out))
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory, real_photos) -> Path:
    """The real photos, 240 small images made from them (JPEG, PNG, grey, RGBA), bad files."""
    folder = tmp_path_factory.mktemp("ray-images") / "images"
    shutil.copytree(real_photos, folder, ignore=shutil.ignore_patterns("*.csv", "*.md"))
    photos = sorted(folder.glob("*.jpg"))
    made = folder / "made"
    made.mkdir()
    for index in range(GENERATED):
        with Image.open(photos[index % len(photos)]) as photo:
            image = photo.convert("RGB").resize((40 + index % 37, 30 + index % 23))
        image = image.rotate(index * 11, expand=True)
        if index % 7 == 0:
            image.convert("L").save(made / f"{index:03d}.png")
        elif index % 11 == 0:
            image.convert("RGBA").save(made / f"{index:03d}.png")
        else:
            image.save(made / f"{index:03d}.jpg", quality=70 + index % 25)

    bad = folder / "bad"
    bad.mkdir()
    (bad / "empty.jpg").write_bytes(b"")
    (bad / "notes.png").write_text("not an image at all")
    (bad / "folder.jpg").mkdir()
    return folder


@pytest.fixture(scope="module")
def local_table(tmp_path_factory, images, export_dir):
    """The rows of a local run over the same folder, as Parquet."""
    out = tmp_path_factory.mktemp("ray-local") / "tags.parquet"
    run_inference(_config(images, export_dir, out, decode_workers=1))
    return pq.read_table(out)


@pytest.fixture(scope="module")
def ray_out(tmp_path_factory, ray_instance, images, export_dir) -> Path:
    """The shards of one Ray run over the folder. Read only: copy it to change it."""
    out = tmp_path_factory.mktemp("ray-run") / "tags"
    summary = run_ray_inference(_config(images, export_dir, out), RayConfig(shard_rows=SHARD_ROWS))
    assert summary.stopped_by is None and summary.images_skipped == 0
    return out


def _config(images: Path | list[Path], export_dir: Path, out: Path, **overrides) -> InferConfig:
    values = dict(inputs=images if isinstance(images, list) else [images],
                  export_dir=export_dir, out=out, batch_size=BATCH, engine="ort-cpu",
                  progress=False)
    values.update(overrides)
    return InferConfig(**values)


def test_ray_rows_equal_the_local_rows(ray_out, local_table):
    table = read_shards(ray_out)

    assert table.num_rows == len(local_table) > GENERATED
    assert table.schema == local_table.schema
    assert table.to_pylist() == local_table.to_pylist()  # paths, labels, top-k, scores, errors


def test_the_folder_is_shards_of_whole_batches_and_a_manifest(ray_out, local_table):
    manifest = json.loads((ray_out / SHARDS_MANIFEST).read_text())
    shards = sorted(ray_out.glob("shard-*.parquet"))

    assert manifest["complete"] is True
    assert [s["file"] for s in manifest["shards"]] == [p.name for p in shards]
    assert len(shards) == -(-len(local_table) // SHARD_ROWS)
    assert [pq.read_metadata(p).num_rows for p in shards[:-1]] == [SHARD_ROWS] * (len(shards) - 1)
    # Parquet readers skip the manifest, so the folder reads as the same table.
    assert pq.read_table(ray_out).to_pylist() == local_table.to_pylist()


def test_bad_files_are_error_rows(ray_out):
    rows = {Path(r["path"]).name: r for r in read_shards(ray_out).to_pylist()}

    for name, reason in BAD_FILES.items():
        assert rows[name]["status"] == "error"
        assert reason in rows[name]["error"]
        assert rows[name]["top_k"] == [] and rows[name]["labels"] == []
    assert sum(r["status"] == "ok" for r in rows.values()) == len(rows) - len(BAD_FILES)


def test_every_option_of_the_rows_matches_too(tmp_path, ray_instance, images, real_photos,
                                              export_dir):
    # Two inputs, a first batch of bad files only, every score, another top-k and threshold.
    options = dict(batch_size=3, all_scores=True, top_k=3, threshold=0.1)
    inputs = [images / "bad", real_photos]
    run_inference(_config(inputs, export_dir, tmp_path / "local.parquet", decode_workers=1,
                          **options))

    run_ray_inference(_config(inputs, export_dir, tmp_path / "ray", **options),
                      RayConfig(shard_rows=6))

    table = read_shards(tmp_path / "ray")
    assert table.to_pylist() == pq.read_table(tmp_path / "local.parquet").to_pylist()
    assert table.column("status").to_pylist()[:3] == ["error"] * 3


def test_a_lost_shard_is_tagged_again_on_resume(tmp_path, ray_out, images, export_dir,
                                                local_table):
    out = tmp_path / "tags"
    shutil.copytree(ray_out, out)
    (out / "shard-00001.parquet").unlink()
    (out / ".shard-00002.parquet.999.tmp").write_bytes(b"a shard cut short by a kill")

    summary = run_ray_inference(_config(images, export_dir, out, resume=True),
                                RayConfig(shard_rows=SHARD_ROWS))

    assert summary.images_skipped == len(local_table) - SHARD_ROWS
    assert summary.images_ok + summary.images_failed == SHARD_ROWS
    assert not list(out.glob(".*.tmp"))
    assert read_shards(out).to_pylist() == local_table.to_pylist()


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_same_rows(tmp_path, ray_instance, images, export_dir,
                                               local_table):
    out = tmp_path / "tags"
    # A second driver on the module's instance, killed outright once two shards are in.
    command = [sys.executable, "-m", "imfree.cli", "-q", "infer", str(images), "--model",
               str(export_dir), "--out", str(out), "--batch", str(BATCH), "--shard-rows",
               str(BATCH), "--engine", "ort-cpu", "--ray", ray_instance]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait_for_shards(out, 2, process)
    finally:
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=30)
    written = len(list(out.glob("shard-*.parquet")))
    assert 2 <= written < -(-len(local_table) // BATCH)

    summary = run_ray_inference(_config(images, export_dir, out, resume=True),
                                RayConfig(shard_rows=BATCH))

    assert summary.images_skipped == written * BATCH
    assert read_shards(out).to_pylist() == local_table.to_pylist()


def _wait_for_shards(out: Path, count: int, process: subprocess.Popen, limit: float = 120):
    deadline = time.monotonic() + limit
    while len(list(out.glob("shard-*.parquet"))) < count:
        if process.poll() is not None:
            pytest.fail(f"the run ended before {count} shards: {process.stderr.read()}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {count} shards in {out} after {limit:.0f} s")
        time.sleep(0.1)


def test_an_engine_that_cannot_open_is_a_one_line_error(tmp_path, ray_instance, real_photos,
                                                       export_dir):
    out = tmp_path / "tags"
    with pytest.raises(EngineUnavailable, match="holds no INT8 graph") as raised:
        run_ray_inference(_config(real_photos, export_dir, out, engine="ort-cpu-int8"),
                          RayConfig())
    assert type(raised.value) is EngineUnavailable  # the error itself, not Ray's wrapper

    # Nothing was tagged, so the same folder takes a corrected run without --resume.
    summary = run_ray_inference(_config(real_photos, export_dir, out), RayConfig())
    assert summary.images_ok == len(list(real_photos.glob("*.jpg")))


def test_a_finished_folder_is_not_overwritten_without_resume(tmp_path, ray_out, images,
                                                             export_dir):
    out = tmp_path / "tags"
    shutil.copytree(ray_out, out)

    with pytest.raises(ConfigError, match="add --resume"):
        run_ray_inference(_config(images, export_dir, out), RayConfig(shard_rows=SHARD_ROWS))


def test_resume_refuses_the_shards_of_another_run(tmp_path, ray_out, images, export_dir):
    out = tmp_path / "tags"
    shutil.copytree(ray_out, out)

    with pytest.raises(ConfigError, match="top_k"):
        run_ray_inference(_config(images, export_dir, out, resume=True, top_k=3),
                          RayConfig(shard_rows=SHARD_ROWS))
    with pytest.raises(ConfigError, match="inputs"):
        run_ray_inference(_config(images / "made", export_dir, out, resume=True),
                          RayConfig(shard_rows=SHARD_ROWS))


def test_a_resumed_finished_run_starts_no_cluster(tmp_path, ray_out, images, export_dir,
                                                  monkeypatch):
    out = tmp_path / "tags"
    shutil.copytree(ray_out, out)
    monkeypatch.setattr("imfree.runtime.ray_infer.ray_session", _no_ray)

    summary = run_ray_inference(_config(images, export_dir, out, resume=True),
                                RayConfig(shard_rows=SHARD_ROWS))

    assert summary.images_ok == 0 and summary.images_skipped == read_shards(out).num_rows


def test_an_empty_folder_gives_an_empty_table(tmp_path, export_dir, monkeypatch):
    (tmp_path / "none").mkdir()
    monkeypatch.setattr("imfree.runtime.ray_infer.ray_session", _no_ray)

    run_ray_inference(_config(tmp_path / "none", export_dir, tmp_path / "tags"), RayConfig())

    assert read_shards(tmp_path / "tags").num_rows == 0


def _no_ray(*args):
    raise AssertionError("Ray was joined for a run with nothing to tag")


def test_the_cli_runs_on_ray(tmp_path, ray_instance, real_photos, export_dir):
    from typer.testing import CliRunner

    from imfree.cli import _bare_ray_means_local, app

    args = ["infer", str(real_photos), "--model", str(export_dir), "--out",
            str(tmp_path / "tags"), "--ray"]
    result = CliRunner().invoke(app, _bare_ray_means_local(args))

    assert result.exit_code == 0, result.output
    assert f"{len(list(real_photos.glob('*.jpg')))} images tagged, 0 failed" in result.output
    assert read_shards(tmp_path / "tags").column("status").to_pylist() == ["ok"] * 7


def test_a_bare_ray_flag_means_a_local_instance():
    from imfree.cli import _bare_ray_means_local

    assert _bare_ray_means_local(["infer", "a", "--ray"]) == ["infer", "a", "--ray", "local"]
    assert _bare_ray_means_local(["infer", "--ray", "--resume", "a"])[2] == "local"
    assert _bare_ray_means_local(["infer", "a", "--ray", "auto"]) == ["infer", "a", "--ray",
                                                                      "auto"]


@pytest.mark.parametrize("address", ["images/", "photo.jpg", "nonsense"])
def test_an_input_taken_for_the_address_is_refused(tmp_path, export_dir, address):
    with pytest.raises(ConfigError, match="put --ray after the inputs"):
        run_ray_inference(_config(tmp_path, export_dir, tmp_path / "tags"),
                          RayConfig(address=address))


def test_a_csv_output_is_refused(tmp_path, export_dir):
    with pytest.raises(ConfigError, match="folder"):
        run_ray_inference(_config(tmp_path, export_dir, tmp_path / "tags.csv"), RayConfig())


def test_without_ray_the_error_names_the_extra_before_writing(tmp_path, export_dir,
                                                               monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)

    with pytest.raises(ConfigError, match=r"pip install 'imfree\[ray\]'"):
        run_ray_inference(_config(tmp_path, export_dir, tmp_path / "tags"), RayConfig())
    assert not (tmp_path / "tags").exists()
    assert os.environ["RAY_USAGE_STATS_ENABLED"] == "0"


def test_engines_take_the_gpus_or_a_share_of_the_cpus():
    two_cpus = _placement({"CPU": 2}, InferConfig([], Path("."), Path("o")), RayConfig())
    assert (two_cpus.engines, two_cpus.cpus_each, two_cpus.decode_cpus) == (1, 1, 1)

    cpus = _placement({"CPU": 16}, InferConfig([], Path("."), Path("o")), RayConfig())
    assert (cpus.engines, cpus.cpus_each, cpus.gpus_each, cpus.decode_cpus) == (4, 2, 0, 8)

    gpus = _placement({"CPU": 16, "GPU": 4}, InferConfig([], Path("."), Path("o")), RayConfig())
    assert (gpus.engines, gpus.gpus_each, gpus.decode_cpus) == (4, 1, 12)

    on_cpu = InferConfig([], Path("."), Path("o"), engine="ort-cpu")
    assert _placement({"CPU": 16, "GPU": 4}, on_cpu, RayConfig()).gpus_each == 0

    with pytest.raises(ConfigError, match="none to decode"):
        _placement({"CPU": 2}, InferConfig([], Path("."), Path("o")), RayConfig(engines=2))


def test_shards_hold_whole_batches():
    shards = plan_shards(100, batch_size=32, shard_rows=50)  # rounded up to 64

    assert [(s.first, s.rows) for s in shards] == [(0, 64), (64, 36)]
    assert [s.file for s in shards] == ["shard-00000.parquet", "shard-00001.parquet"]
    assert [(s.first, s.rows) for s in plan_shards(0, 32, 64)] == [(0, 0)]


# Regressions from the tester's report.


def _stop_after_batches(monkeypatch, count: int) -> None:
    """Send this process a real SIGINT once `count` batches have come back."""
    from imfree.runtime.ray_infer import _ShardRun

    take = _ShardRun._take
    seen = []

    def take_then_stop(self, shard, start, result):
        take(self, shard, start, result)
        seen.append(start)
        if len(seen) == count:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(_ShardRun, "_take", take_then_stop)


def test_a_stop_keeps_every_finished_row_and_resumes_to_the_same_rows(
        tmp_path, ray_instance, images, export_dir, local_table, monkeypatch):
    out = tmp_path / "tags"
    shard_rows = 3 * BATCH  # a stop after one batch leaves the first shard a third full
    _stop_after_batches(monkeypatch, 1)

    stopped = run_ray_inference(_config(images, export_dir, out),
                                RayConfig(shard_rows=shard_rows))

    kept = read_shards_kept(out)
    assert stopped.stopped_by == "SIGINT"
    assert stopped.images_ok + stopped.images_failed == len(kept) >= BATCH
    assert stopped.images_left == len(local_table) - len(kept)
    assert all(row in local_table.to_pylist() for row in kept)
    monkeypatch.undo()

    resumed = run_ray_inference(_config(images, export_dir, out, resume=True),
                                RayConfig(shard_rows=shard_rows))

    assert resumed.images_skipped == len(kept)
    assert resumed.images_ok + resumed.images_failed == len(local_table) - len(kept)
    assert read_shards(out).to_pylist() == local_table.to_pylist()
    assert pq.read_table(out).to_pylist() == local_table.to_pylist()  # in file-name order


def read_shards_kept(out: Path) -> list[dict]:
    """The rows of every shard file a stopped run wrote, in file-name order."""
    return [row for path in sorted(out.glob("shard-*.parquet"))
            for row in pq.read_table(path).to_pylist()]


class _FakeRay:
    """Just enough of Ray for a start-up that a signal interrupts."""

    def __init__(self, on_init):
        from types import SimpleNamespace

        self.on_init = on_init
        self.shutdowns = 0
        context = SimpleNamespace(enable_progress_bars=True)
        self.data = SimpleNamespace(DataContext=SimpleNamespace(get_current=lambda: context))

    def is_initialized(self):
        return False

    def init(self, **options):
        self.on_init()

    def shutdown(self):
        self.shutdowns += 1


def test_a_signal_while_ray_starts_shuts_it_down_and_says_so(tmp_path, real_photos, export_dir,
                                                             monkeypatch, caplog):
    fake = _FakeRay(lambda: os.kill(os.getpid(), signal.SIGINT))
    monkeypatch.setattr("imfree.runtime.ray_infer.import_ray", lambda: fake)
    out = tmp_path / "tags"

    summary = run_ray_inference(_config(real_photos, export_dir, out), RayConfig(cpus=2))

    assert fake.shutdowns == 1 and summary.stopped_by == "SIGINT"
    assert summary.images_left == len(list(real_photos.glob("*.jpg")))
    assert "--resume tags the" in caplog.text
    assert not list(out.glob("shard-*"))


def test_a_second_signal_while_ray_starts_still_shuts_it_down(tmp_path, real_photos, export_dir,
                                                              monkeypatch):
    def interrupted():
        raise KeyboardInterrupt

    fake = _FakeRay(interrupted)
    monkeypatch.setattr("imfree.runtime.ray_infer.import_ray", lambda: fake)

    summary = run_ray_inference(_config(real_photos, export_dir, tmp_path / "tags"),
                                RayConfig())

    assert fake.shutdowns == 1 and summary.stopped_by == "SIGINT"
    manifest = json.loads((tmp_path / "tags" / SHARDS_MANIFEST).read_text())
    assert not manifest["complete"]


def test_a_name_that_is_not_utf8_is_escaped_as_locally(tmp_path, ray_instance, real_photos,
                                                        export_dir):
    folder = tmp_path / "weird"
    folder.mkdir()
    photo = sorted(real_photos.glob("*.jpg"))[0]
    shutil.copy(photo, folder / os.fsdecode(b"caf\xe9.jpg"))
    shutil.copy(photo, folder / "plain.jpg")
    local = tmp_path / "local.parquet"
    run_inference(_config(folder, export_dir, local, decode_workers=1, all_scores=True))

    out = tmp_path / "tags"
    run_ray_inference(_config(folder, export_dir, out, all_scores=True), RayConfig())

    rows = read_shards(out).to_pylist()
    assert rows == pq.read_table(local).to_pylist()
    assert rows[0]["path"].endswith("caf\\xe9.jpg") and rows[0]["status"] == "ok"


def test_resume_refuses_a_foreign_file_and_another_engine(tmp_path, ray_out, images, export_dir):
    out = tmp_path / "tags"
    shutil.copytree(ray_out, out)

    with pytest.raises(ConfigError, match="engine"):
        run_ray_inference(_config(images, export_dir, out, resume=True, engine="auto"),
                          RayConfig(shard_rows=SHARD_ROWS))
    (out / "notes.txt").write_text("my notes")
    with pytest.raises(ConfigError, match="notes.txt"):
        run_ray_inference(_config(images, export_dir, out, resume=True),
                          RayConfig(shard_rows=SHARD_ROWS))


def test_an_output_under_a_file_is_one_error(tmp_path, real_photos, export_dir):
    (tmp_path / "afile").write_text("a file")
    with pytest.raises(ConfigError, match="cannot write the shard folder"):
        run_ray_inference(_config(real_photos, export_dir, tmp_path / "afile" / "x"),
                          RayConfig())


@pytest.mark.parametrize("options, ray_options, error", [
    (dict(engine="ort-cpu-int8"), {}, "holds no INT8 graph"),
    (dict(engine_threads=2), dict(cpus=2), "leaving none to decode"),
])
def test_what_is_known_before_ray_starts_is_checked_first(tmp_path, real_photos, export_dir,
                                                          monkeypatch, options, ray_options,
                                                          error):
    def no_start():
        raise AssertionError("Ray was started for a run that could not run")

    monkeypatch.setattr("imfree.runtime.ray_infer.import_ray", lambda: _FakeRay(no_start))
    with pytest.raises((ConfigError, EngineUnavailable), match=error):
        run_ray_inference(_config(real_photos, export_dir, tmp_path / "tags", **options),
                          RayConfig(**ray_options))
    assert not (tmp_path / "tags").exists()


def test_a_second_signal_mid_run_still_keeps_the_rows(tmp_path, ray_instance, images,
                                                      export_dir, local_table, monkeypatch):
    from imfree.runtime.ray_infer import _ShardRun

    take, seen = _ShardRun._take, []

    def take_then_interrupt(self, shard, start, result):
        take(self, shard, start, result)
        seen.append(start)
        if len(seen) == 2:
            raise KeyboardInterrupt  # what the second Ctrl-C raises

    monkeypatch.setattr(_ShardRun, "_take", take_then_interrupt)
    out = tmp_path / "tags"
    stopped = run_ray_inference(_config(images, export_dir, out),
                                RayConfig(shard_rows=3 * BATCH))
    monkeypatch.undo()

    assert stopped.stopped_by == "SIGINT" and len(read_shards_kept(out)) == 2 * BATCH
    run_ray_inference(_config(images, export_dir, out, resume=True),
                      RayConfig(shard_rows=3 * BATCH))
    assert read_shards(out).to_pylist() == local_table.to_pylist()


def test_a_cpu_engine_actor_splits_its_batches_across_its_threads(export_dir):
    from imfree.runtime.ray_infer import BatchScorer

    two = BatchScorer(str(export_dir), "ort-cpu", 2)
    one = BatchScorer(str(export_dir), "ort-cpu", 1)

    assert (two.engine._slices, one.engine._slices) == (2, 1)
