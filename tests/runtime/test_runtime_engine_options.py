"""onnxruntime engine options for tagging runs: padded short batches, no spinning,
batches split across threads, signals while a batch runs."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest

from imfree.runtime import engines
from imfree.runtime.bundle import read_manifest

HEIGHT, WIDTH = 32, 48  # the tiny export of conftest.py


def _images(count: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (count, HEIGHT, WIDTH, 3), dtype=np.uint8)


class _ShapeLog:
    """Stands in front of an onnxruntime session and records each input's shape."""

    def __init__(self, session):
        self._session = session
        self.shapes: list[tuple[int, ...]] = []

    def run(self, outputs, feeds, options=None):
        self.shapes += [value.shape for value in feeds.values()]
        return self._session.run(outputs, feeds, options)


def test_a_short_batch_is_padded_but_returns_exactly_its_rows(export_dir):
    manifest = read_manifest(export_dir)
    plain = engines.open_engine(export_dir, manifest, "ort-cpu")
    padded = engines.open_engine(export_dir, manifest, "ort-cpu", pad_to=8)
    padded._session = log = _ShapeLog(padded._session)
    images = _images(3)

    padded.run(_images(8, seed=3))  # a full batch first: its plan is the one to reuse
    outputs = padded.run(images)

    assert log.shapes == [(8, HEIGHT, WIDTH, 3)] * 2  # onnxruntime saw full batches only
    expected = plain.run(images)
    assert outputs.keys() == expected.keys()
    for name in expected:
        assert outputs[name].shape[0] == 3
        np.testing.assert_allclose(outputs[name], expected[name], rtol=1e-6)


def test_a_run_smaller_than_one_batch_is_not_padded(export_dir):
    # Seven images tagged with --batch 256 must not cost 256 images of work.
    engine = engines.open_engine(export_dir, read_manifest(export_dir), "ort-cpu", pad_to=8)
    engine._session = log = _ShapeLog(engine._session)

    outputs = engine.run(_images(3))

    assert log.shapes == [(3, HEIGHT, WIDTH, 3)]
    assert outputs["scores"].shape == (3, 4)


def test_a_batch_of_a_quarter_or_less_is_not_padded(export_dir):
    # Its memory fits in what the full batches took; padding would waste engine time.
    engine = engines.open_engine(export_dir, read_manifest(export_dir), "ort-cpu", pad_to=8)
    engine._session = log = _ShapeLog(engine._session)

    engine.run(_images(8))
    outputs = engine.run(_images(2))
    engine.run(_images(3))

    assert log.shapes == [(8, HEIGHT, WIDTH, 3), (2, HEIGHT, WIDTH, 3), (8, HEIGHT, WIDTH, 3)]
    assert outputs["scores"].shape == (2, 4)


@pytest.mark.parametrize("count", [8, 11])
def test_full_and_larger_batches_run_as_they_are(export_dir, count):
    engine = engines.open_engine(export_dir, read_manifest(export_dir), "ort-cpu", pad_to=8)
    engine._session = log = _ShapeLog(engine._session)

    outputs = engine.run(_images(count))

    assert log.shapes == [(count, HEIGHT, WIDTH, 3)]
    assert outputs["scores"].shape == (count, 4)


def test_padding_does_not_change_a_row_whatever_its_neighbours(export_dir):
    # The padding rows are black images; a real row's scores must not depend on them.
    engine = engines.open_engine(export_dir, read_manifest(export_dir), "auto", pad_to=16)
    images = _images(5, seed=1)
    others = _images(4, seed=4)
    engine.run(_images(16, seed=2))

    # Each image beside four others: five rows, padded to 16 as the five together are.
    beside_others = [engine.run(np.concatenate([images[i : i + 1], others]))["scores"][:1]
                     for i in range(5)]

    np.testing.assert_allclose(engine.run(images)["scores"], np.concatenate(beside_others),
                               rtol=1e-6)


def _spinning_entry(engine) -> str | None:
    options = engine._session.get_session_options()
    try:
        return options.get_session_config_entry("session.intra_op.allow_spinning")
    except RuntimeError:  # not set: onnxruntime's default, spinning
        return None


def test_spinning_is_switched_off_on_request(export_dir):
    manifest = read_manifest(export_dir)

    quiet = engines.open_engine(export_dir, manifest, "ort-cpu", spinning=False)
    default = engines.open_engine(export_dir, manifest, "ort-cpu")

    assert _spinning_entry(quiet) == "0"
    assert _spinning_entry(default) is None


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("count", [1, 2, 5, 8, 11])
def test_a_split_batch_gives_the_rows_of_one_run_in_order(export_dir, threads, count):
    manifest = read_manifest(export_dir)
    whole = engines.open_engine(export_dir, manifest, "ort-cpu", intra_threads=threads)
    split = engines.open_engine(export_dir, manifest, "ort-cpu", intra_threads=threads,
                                split=True)
    images = _images(count, seed=count)

    expected, outputs = whole.run(images), split.run(images)
    split.close()

    assert outputs.keys() == expected.keys()
    for name in expected:
        assert outputs[name].shape == expected[name].shape
        np.testing.assert_allclose(outputs[name], expected[name], rtol=1e-5, atol=1e-6)


def test_a_split_batch_runs_as_single_threaded_slices_of_the_padded_batch(export_dir):
    engine = engines.open_engine(export_dir, read_manifest(export_dir), "ort-cpu",
                                 intra_threads=2, split=True, pad_to=8)
    engine._session = log = _ShapeLog(engine._session)

    engine.run(_images(8))
    engine.run(_images(5))  # padded to 8, then split
    engine.run(_images(1))  # one image: one run

    assert sorted(log.shapes) == [(1, HEIGHT, WIDTH, 3)] + [(4, HEIGHT, WIDTH, 3)] * 4
    options = log._session.get_session_options()
    assert options.intra_op_num_threads == 1
    engine.close()


@pytest.mark.parametrize("threads", [None, 1])
def test_split_needs_more_than_one_thread(export_dir, threads):
    engine = engines.open_engine(export_dir, read_manifest(export_dir), "ort-cpu",
                                 intra_threads=threads, split=True)
    engine._session = log = _ShapeLog(engine._session)

    engine.run(_images(4))

    assert log.shapes == [(4, HEIGHT, WIDTH, 3)]
    engine.close()


class _SlowSession:
    """Stands in for an onnxruntime session whose runs take `seconds`, or end early
    (with onnxruntime's error) once their RunOptions say terminate."""

    def __init__(self, session, seconds: float):
        self._session = session
        self._seconds = seconds
        self.terminated: list[bool] = []

    def run(self, outputs, feeds, options):
        deadline = time.monotonic() + self._seconds
        while time.monotonic() < deadline and not options.terminate:
            time.sleep(0.01)
        self.terminated.append(options.terminate)
        if options.terminate:
            raise RuntimeError("Exiting due to terminate flag being set to true.")
        return self._session.run(outputs, feeds)


@pytest.mark.parametrize("split", [False, True])
def test_a_signal_handler_runs_while_a_batch_is_in_the_engine(export_dir, split):
    # The first Ctrl-C's message must come at once, not when the batch ends.
    engine = engines.open_engine(export_dir, read_manifest(export_dir), "ort-cpu",
                                 intra_threads=2, split=split)
    engine._session = _SlowSession(engine._session, seconds=1.5)
    handled = []
    previous = signal.signal(signal.SIGUSR1, lambda *_: handled.append(time.monotonic()))
    threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGUSR1)).start()
    started = time.monotonic()
    try:
        outputs = engine.run(_images(4))
    finally:
        signal.signal(signal.SIGUSR1, previous)
        engine.close()

    assert outputs["scores"].shape == (4, 4)
    assert len(handled) == 1 and handled[0] - started < 0.8


def test_a_second_ctrl_c_ends_the_runs_in_flight(export_dir):
    engine = engines.open_engine(export_dir, read_manifest(export_dir), "ort-cpu",
                                 intra_threads=2, split=True)
    engine._session = slow = _SlowSession(engine._session, seconds=20)
    # Python's own Ctrl-C handler, which a test run started in the background lacks.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT)).start()
    started = time.monotonic()

    try:
        with pytest.raises(KeyboardInterrupt):
            engine.run(_images(4))
    finally:
        signal.signal(signal.SIGINT, previous)

    assert time.monotonic() - started < 5
    assert slow.terminated == [True, True]  # both slices were told to stop
    engine.close()


def test_a_closed_engine_says_so(export_dir):
    engine = engines.open_engine(export_dir, read_manifest(export_dir), "ort-cpu")
    engine.close()
    engine.close()  # twice is harmless

    with pytest.raises(RuntimeError, match="engine was closed"):
        engine.run(_images(1))
