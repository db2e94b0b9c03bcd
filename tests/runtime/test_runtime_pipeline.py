import io
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from imfree.errors import ConfigError
from imfree.runtime import pipeline
from imfree.runtime.images import decode_image
from imfree.runtime.pipeline import DecodeSettings, StageTimes, iter_batches
from imfree.runtime.sources import InputSpec, collect_inputs, list_images, read_paths_file


def _touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_list_images_walks_sorted_and_keeps_undecodable_entries(tmp_path):
    _touch(tmp_path / "b.JPG")
    _touch(tmp_path / "a.png")
    _touch(tmp_path / "notes.txt")
    _touch(tmp_path / "sub" / "deep" / "c.webp")
    _touch(tmp_path / "folder.jpg" / "inside.tiff")
    os.symlink(tmp_path / "gone.jpg", tmp_path / "broken.jpg")
    os.symlink("loop.gif", tmp_path / "loop.gif")

    found = [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)]

    assert found == [
        "a.png",
        "b.JPG",
        "broken.jpg",
        "folder.jpg",
        "folder.jpg/inside.tiff",
        "loop.gif",
        "sub/deep/c.webp",
    ]


def test_list_images_without_recursion(tmp_path):
    _touch(tmp_path / "top.jpeg")
    _touch(tmp_path / "sub" / "below.jpg")
    assert list_images(tmp_path, recursive=False) == [tmp_path / "top.jpeg"]


def test_list_images_takes_a_single_file_whatever_its_suffix(tmp_path):
    path = _touch(tmp_path / "photo.heic")
    assert list_images(path) == [path]


def test_list_images_does_not_follow_symlinked_folders(tmp_path):
    _touch(tmp_path / "real" / "a.jpg")
    os.symlink(tmp_path, tmp_path / "real" / "back")  # a cycle if followed
    assert list_images(tmp_path) == [tmp_path / "real" / "a.jpg"]


def test_list_images_missing_root(tmp_path):
    with pytest.raises(ConfigError, match=f"input path {tmp_path / 'nope'} does not exist"):
        list_images(tmp_path / "nope")


@pytest.fixture
def mixed_paths(tmp_path, photos) -> list[Path]:
    """Real photos with bad files between them, in a fixed order."""
    bad = {
        "empty.jpg": b"",
        "text.jpg": b"hello",
        "cut.jpg": photos[1].read_bytes()[:2000],
    }
    paths = []
    for index, photo in enumerate(photos):
        paths.append(Path(shutil.copy(photo, tmp_path / f"{index:02d}-{photo.name}")))
        if index < len(bad):
            name, data = list(bad.items())[index]
            paths.append(_touch(tmp_path / f"{index:02d}-{name}", data))
    return paths


@pytest.mark.parametrize(("batch_size", "workers"), [(1, 1), (3, 2), (64, 4)])
def test_batches_keep_input_order_and_count_failures(mixed_paths, batch_size, workers):
    settings = DecodeSettings(height=24, width=20)
    times = StageTimes()

    batches = list(iter_batches(mixed_paths, settings, batch_size, workers, times=times))

    assert [p for b in batches for p in b.paths] == mixed_paths
    assert all(len(b.paths) <= batch_size for b in batches)
    failures = [(p.name.split("-", 1)[1], reason) for b in batches for p, reason in b.failures]
    assert failures == [
        ("empty.jpg", "empty file"),
        ("text.jpg", "not an image"),
        ("cut.jpg", "truncated image"),
    ]
    for batch in batches:
        assert batch.images.shape == (len(batch.good_paths), 24, 20, 3)
        assert batch.good_paths == [p for p in batch.paths if p not in dict(batch.failures)]
    first_good = next(b for b in batches if b.good_paths)
    expected = decode_image(first_good.good_paths[0], 24, 20, draft=True)
    np.testing.assert_array_equal(first_good.images[0], expected)
    assert times.decode_seconds > 0


def test_a_batch_of_only_failures_has_an_empty_image_array(tmp_path):
    paths = [_touch(tmp_path / f"{i}.jpg", b"") for i in range(3)]

    (batch,) = iter_batches(paths, DecodeSettings(8, 8), batch_size=8, decode_workers=2)

    assert batch.images.shape == (0, 8, 8, 3) and batch.images.dtype == np.uint8
    assert len(batch.failures) == 3


def test_stopping_early_leaves_no_work_behind(mixed_paths):
    batches = iter_batches(mixed_paths * 20, DecodeSettings(16, 16), batch_size=2)
    next(batches)
    batches.close()  # must return promptly: queued decodes are cancelled


def record_and_fake(path: Path, decode: DecodeSettings) -> pipeline.Outcome:
    """A decoder that logs each path it is given (to the folder's log) and decodes nothing."""
    with open(path.parent / "decoded.log", "a") as log:
        log.write(f"{path.name}\n")
    return np.zeros((decode.height, decode.width, 3), np.uint8), None, 0.001


def crash_or_decode(path: Path, decode: DecodeSettings) -> pipeline.Outcome:
    """Kills its own worker on files named crash*, as a codec's segfault would."""
    if path.name.startswith("crash"):
        os.kill(os.getpid(), signal.SIGSEGV)
    return pipeline.decode_file(path, decode)


def numbered(path: Path, decode: DecodeSettings) -> pipeline.Outcome:
    """A decoder whose every pixel is the file's number, so each image shows its source;
    files numbered 4, 9, 14, ... fail."""
    number = int(path.stem)
    if number % 5 == 4:
        return None, "refused", 0.0
    return np.full((decode.height, decode.width, 3), number % 256, np.uint8), None, 0.0


def wrong_shape(path: Path, decode: DecodeSettings) -> pipeline.Outcome:
    """A decoder that hands back an image of the wrong size for files named odd*."""
    height = decode.height + 1 if path.name.startswith("odd") else decode.height
    return np.zeros((height, decode.width, 3), np.uint8), None, 0.0


def niceness(path: Path, decode: DecodeSettings) -> pipeline.Outcome:
    """A decoder whose pixels are the worker's niceness, then its scheduling policy."""
    image = np.zeros((decode.height, decode.width, 3), np.uint8)
    image[..., 0] = os.nice(0)
    image[..., 1] = os.sched_getscheduler(0) if hasattr(os, "sched_getscheduler") else 255
    return image, None, 0.0


def numbered_with_pid(path: Path, decode: DecodeSettings) -> pipeline.Outcome:
    """`numbered`, logging the worker's process id to the folder's pids.log."""
    with open(path.parent / "pids.log", "a") as log:
        log.write(f"{os.getpid()}\n")
    return numbered(path, decode)


def _exit_at_start(*args) -> None:
    """A worker initializer that exits, as a worker that cannot start would."""
    os._exit(3)


def test_each_batch_holds_its_own_images_while_slots_are_reused(tmp_path):
    # Twelve batches through two shared slots, some with failures between images:
    # every image must still be its own file's, in its batch's order.
    paths = [tmp_path / f"{i}.jpg" for i in range(36)]
    batches = list(iter_batches(paths, DecodeSettings(2, 3), batch_size=3, decode_workers=2,
                                prefetch=2, decoder=numbered))

    assert len(batches) == 12
    assert sum(len(batch.failures) for batch in batches) == 7
    for batch in batches:
        expected = [int(p.stem) for p in batch.good_paths]
        assert batch.images[:, 0, 0, 0].tolist() == expected
        assert (batch.images == batch.images[:, :1, :1, :1]).all()
    assert batches[0].images[0, 0, 0, 0] == 0  # a batch handed out is not overwritten later


def test_a_decoder_returning_the_wrong_shape_costs_only_that_row(tmp_path):
    paths = [tmp_path / "a.jpg", tmp_path / "odd.jpg", tmp_path / "b.jpg"]

    (batch,) = iter_batches(paths, DecodeSettings(4, 5), batch_size=3, decode_workers=1,
                            decoder=wrong_shape)

    assert batch.good_paths == [paths[0], paths[2]]
    assert batch.failures == [(paths[1], "decoder returned uint8 (5, 5, 3), not uint8 (4, 5, 3)")]


def test_a_batch_size_beyond_the_paths_reserves_only_the_paths(tmp_path, monkeypatch):
    sizes = []
    real_raw_array = pipeline.multiprocessing.RawArray
    monkeypatch.setattr(pipeline.multiprocessing, "RawArray",
                        lambda kind, size: sizes.append(size) or real_raw_array(kind, size))

    paths = [tmp_path / f"{i}.jpg" for i in range(3)]
    list(iter_batches(paths, DecodeSettings(4, 5), batch_size=100_000, decoder=numbered))

    assert sizes == [3 * 4 * 5 * 3]  # one slot of three images, not 100,000


def test_a_chunk_longer_than_promised_is_refused(tmp_path):
    chunks = [[tmp_path / "1.jpg"], [tmp_path / f"{i}.jpg" for i in range(3)]]
    with pytest.raises(ValueError, match=r"a chunk of 3 paths is longer than max_chunk \(2\)"):
        list(pipeline.decode_batches(chunks, DecodeSettings(2, 2), 2, decoder=numbered))


def test_workers_decode_at_a_lower_priority(tmp_path):
    (batch,) = iter_batches([tmp_path / "1.jpg"], DecodeSettings(1, 1), batch_size=1,
                            decoder=niceness)

    assert batch.images[0, 0, 0, 0] == min(19, os.nice(0) + pipeline.WORKER_NICENESS)
    if hasattr(os, "SCHED_BATCH"):  # Linux: no wakeup preemption of the engine's threads
        assert batch.images[0, 0, 0, 1] == os.SCHED_BATCH


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="scheduling policies are Linux's")
def test_workers_of_an_idle_class_run_stay_idle():
    # As root, setting SCHED_BATCH would succeed and raise them above the user's choice.
    script = ("import os\n"
              "os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))\n"
              "from imfree.runtime import pipeline\n"
              "pipeline._lower_priority()\n"
              "print(os.sched_getscheduler(0))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          check=True)

    assert int(done.stdout) == os.SCHED_IDLE


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")
def test_ctrl_c_while_the_decoder_server_starts_does_not_kill_it(photos):
    # The server imports the decoder before it serves. Ctrl-C must be ignored from
    # the moment it is spawned, not only once those imports are done (read from
    # /proc straight after the start, long before they are), and a run must still
    # decode after Ctrl-C reached it.
    script = f"""
import os, signal
from multiprocessing import forkserver
from pathlib import Path
from imfree.runtime import pipeline
from imfree.runtime.decoder_server import start_decoder_server

if __name__ == "__main__":
    start_decoder_server()
    server = forkserver._forkserver._forkserver_pid
    status = Path(f"/proc/{{server}}/status").read_text()
    ignored = int(status.split("SigIgn:")[1].split()[0], 16)
    print("ignores SIGINT", bool(ignored >> (signal.SIGINT - 1) & 1))
    os.kill(server, signal.SIGINT)
    (batch,) = pipeline.iter_batches([Path({str(photos[0])!r})],
                                     pipeline.DecodeSettings(8, 8), batch_size=1)
    print("decoded", len(batch.good_paths))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)

    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["ignores SIGINT True", "decoded 1"]
    assert "Traceback" not in done.stderr


def test_a_ctrl_c_while_the_decoder_server_is_spawned_is_not_lost():
    # Ctrl-C is ignored while the server is spawned; one that comes meanwhile must
    # still reach this process afterwards (the command line spawns it first thing,
    # just when a user may change their mind).
    script = """
import os, signal
from multiprocessing import forkserver
from imfree.runtime.decoder_server import start_decoder_server

def spawn_during_a_ctrl_c(spawn=forkserver.ensure_running):
    os.kill(os.getpid(), signal.SIGINT)
    spawn()

if __name__ == "__main__":
    forkserver.ensure_running = spawn_during_a_ctrl_c
    try:
        start_decoder_server()
        for _ in range(1000):  # the handler runs between bytecodes
            pass
    except KeyboardInterrupt:
        print("interrupted")
    else:
        print("lost")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)

    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["interrupted"]


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads /proc (Linux)")
def test_the_decoder_server_starts_without_blas_threads():
    # numpy's OpenBLAS threads spin as it loads, on the core the server's imports
    # need; the server alone gets the setting, this process's environment is kept.
    script = """
import os, time
from multiprocessing import forkserver
from pathlib import Path
from imfree.runtime.decoder_server import start_decoder_server

if __name__ == "__main__":
    start_decoder_server()
    server = Path(f"/proc/{forkserver._forkserver._forkserver_pid}")
    deadline = time.monotonic() + 60
    while b"forkserver" not in (server / "cmdline").read_bytes():  # not yet executed
        assert time.monotonic() < deadline, "the server never started"
        time.sleep(0.01)
    environ = (server / "environ").read_bytes().split(b"\\0")
    print(b"OPENBLAS_NUM_THREADS=1" in environ, os.environ.get("OPENBLAS_NUM_THREADS"))
"""
    env = {name: value for name, value in os.environ.items() if name != "OPENBLAS_NUM_THREADS"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, env=env)

    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "None"]


def test_decoding_runs_at_most_prefetch_batches_ahead(tmp_path):
    paths = [tmp_path / f"{i:02d}.jpg" for i in range(20)]
    batches = iter_batches(paths, DecodeSettings(4, 4), batch_size=2, decode_workers=2,
                           prefetch=2, decoder=record_and_fake)

    first = next(batches)
    log = tmp_path / "decoded.log"
    deadline = time.monotonic() + 20  # the workers run at low priority on a busy machine
    while len(log.read_text().split()) < 6 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # time enough to run further ahead, if they could

    assert first.paths == paths[:2]
    assert len(log.read_text().split()) == 6  # this batch and two more
    assert [p for b in batches for p in b.paths] == paths[2:]


def test_decoding_starts_before_the_first_batch_is_asked_for(tmp_path):
    # The workers decode while the caller does something else first (opens its engine).
    paths = [tmp_path / f"{i:02d}.jpg" for i in range(6)]
    batches = iter_batches(paths, DecodeSettings(4, 4), batch_size=2, decode_workers=2,
                           prefetch=2, decoder=record_and_fake)

    log = tmp_path / "decoded.log"
    deadline = time.monotonic() + 20
    while (not log.exists() or len(log.read_text().split()) < 4) and time.monotonic() < deadline:
        time.sleep(0.05)

    assert sorted(log.read_text().split()) == [path.name for path in paths[:4]]
    assert [p for b in batches for p in b.paths] == paths


def test_a_crashed_worker_costs_one_row_and_is_replaced(tmp_path, photos):
    paths = [Path(shutil.copy(photos[0], tmp_path / f"{i}.jpg")) for i in range(4)]
    paths.insert(2, _touch(tmp_path / "crash.jpg"))
    times = StageTimes()

    batches = list(iter_batches(paths, DecodeSettings(8, 8), batch_size=5, decode_workers=1,
                                times=times, decoder=crash_or_decode))

    (batch,) = batches
    assert batch.failures == [
        (paths[2], "decoder crashed (killed by SIGSEGV; worker replaced)")
    ]
    assert batch.good_paths == paths[:2] + paths[3:]  # the one worker came back
    assert times.workers_replaced == 1


def test_paths_file_and_stdin_keep_their_order(tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text("b.jpg\n\na.png\nb.jpg\nsub/c.gif\n")

    assert read_paths_file(str(listing)) == [Path("b.jpg"), Path("a.png"), Path("b.jpg"),
                                             Path("sub/c.gif")]
    spec = InputSpec(paths_file="-")
    assert collect_inputs(spec, io.StringIO("z.jpg\na.jpg\nz.jpg\n")) == [Path("z.jpg"),
                                                                          Path("a.jpg")]


def test_include_and_exclude_globs(tmp_path):
    for name in ("a.jpg", "b.png", "raw/c.jpg", "raw/d.cr2", "keep/e.JPG"):
        _touch(tmp_path / name)

    def names(**options):
        return [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path, **options)]

    assert names(exclude=["raw/*"]) == ["a.jpg", "b.png", "keep/e.JPG"]
    assert names(include=["*.cr2", "*.png"]) == ["b.png", "raw/d.cr2"]
    assert names(include=["raw/*"], exclude=["*.jpg"]) == ["raw/d.cr2"]


def test_following_symlinks_walks_each_real_folder_once(tmp_path):
    _touch(tmp_path / "photos" / "a.jpg")
    _touch(tmp_path / "elsewhere" / "b.jpg")
    os.symlink(tmp_path / "elsewhere", tmp_path / "photos" / "linked")
    os.symlink(tmp_path / "photos", tmp_path / "photos" / "linked" / "back")  # a loop

    found = list_images(tmp_path / "photos", follow_symlinks=True)

    assert [p.relative_to(tmp_path).as_posix() for p in found] == [
        "photos/a.jpg", "photos/linked/b.jpg"]
    assert list_images(tmp_path / "photos") == [tmp_path / "photos" / "a.jpg"]


def test_no_inputs_at_all_is_a_config_error():
    with pytest.raises(ConfigError, match="no inputs: pass image files or folders"):
        collect_inputs(InputSpec())


def test_a_worker_killed_while_idle_breaks_nothing(tmp_path, caplog):
    # Pebble gives up a whole pool when a worker dies while none is busy; the
    # pipeline starts a new one and decodes the lost files again.
    paths = [tmp_path / f"{i}.jpg" for i in range(30)]
    batches = iter_batches(paths, DecodeSettings(2, 3), batch_size=3, decode_workers=2,
                           prefetch=2, decoder=numbered_with_pid)
    handed_out = [next(batches)]
    time.sleep(1.0)  # the two batches ahead are decoded: the workers wait, idle

    some_worker = int((tmp_path / "pids.log").read_text().split()[0])
    os.kill(some_worker, signal.SIGKILL)
    time.sleep(0.5)
    handed_out += list(batches)

    assert len(handed_out) == 10
    assert [p for batch in handed_out for p in batch.paths] == paths
    for batch in handed_out:
        assert [f for f, _ in batch.failures] == [p for p in batch.paths if int(p.stem) % 5 == 4]
        assert batch.images[:, 0, 0, 0].tolist() == [int(p.stem) for p in batch.good_paths]
    assert "decode worker pool broke" in caplog.text


def test_workers_that_cannot_start_are_an_error_that_says_why(tmp_path, monkeypatch):
    def pool_of_workers_that_exit(workers, shared, shape):
        return pipeline.ProcessPool(max_workers=workers, initializer=_exit_at_start,
                                    context=pipeline.multiprocessing.get_context("forkserver"))

    monkeypatch.setattr(pipeline, "_start_pool", pool_of_workers_that_exit)
    paths = [tmp_path / f"{i}.jpg" for i in range(6)]

    with pytest.raises(pipeline.DecodeWorkersFailed, match='if __name__ == "__main__"'):
        list(iter_batches(paths, DecodeSettings(2, 3), batch_size=3, decoder=numbered))


def _stat_fields(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux's")
def test_workers_die_with_the_forkserver_and_the_run_goes_on(tmp_path):
    # An orphaned worker would write into slots later batches reuse: it must not outlive
    # the forkserver, and a new pool (and server) takes over.
    paths = [tmp_path / f"{i}.jpg" for i in range(30)]
    batches = iter_batches(paths, DecodeSettings(2, 3), batch_size=3, decode_workers=2,
                           prefetch=2, decoder=numbered_with_pid)
    handed_out = [next(batches)]
    time.sleep(1.0)
    worker = int((tmp_path / "pids.log").read_text().split()[0])
    server = int(_stat_fields(worker)[1])

    os.kill(server, signal.SIGKILL)
    time.sleep(0.5)

    assert _stat_fields(worker)[:1] in ([], ["Z"])  # gone, or dead and not yet reaped
    handed_out += list(batches)
    assert [p for batch in handed_out for p in batch.paths] == paths
    for batch in handed_out:
        assert batch.images[:, 0, 0, 0].tolist() == [int(p.stem) for p in batch.good_paths]
