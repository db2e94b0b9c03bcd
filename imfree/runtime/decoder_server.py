"""Starting the process decode workers are forked from, without loading the decoder here.

This module imports nothing heavy, so the command line can start the server
first thing: the server then imports numpy and Pillow on another core while
this process imports onnxruntime and loads the export.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.forkserver
import multiprocessing.resource_tracker
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

# The module every worker needs; the server imports it once, before any worker forks.
DECODER_MODULE = "imfree.runtime.pipeline"


def start_decoder_server() -> None:
    """Start, in the background, the process decode workers are forked from.

    It imports the decoder before any worker is asked for, so each worker starts
    with it loaded. Called before the engine loads, that start overlaps the
    engine's instead of delaying the first batch; calling it again does nothing.
    """
    multiprocessing.get_context("forkserver").set_forkserver_preload([DECODER_MODULE])

    # The server ignores Ctrl-C only once its imports are done; a Ctrl-C during them
    # killed it, and the run ended in a traceback. An ignored signal stays ignored
    # across fork and exec, so it is ignored here while the server is spawned. It is
    # blocked too: Linux keeps a blocked signal pending even while it is ignored, so
    # a Ctrl-C in those milliseconds reaches this process afterwards, not lost. The
    # resource tracker starts first, outside that window: its own start unblocks
    # Ctrl-C, which would drop one held until then.
    multiprocessing.resource_tracker.ensure_running()
    in_main_thread = threading.current_thread() is threading.main_thread()
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if in_main_thread else None
    try:
        with _single_threaded_blas():
            multiprocessing.forkserver.ensure_running()
    finally:
        if in_main_thread:
            signal.signal(signal.SIGINT, signal.SIG_DFL if previous is None else previous)
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


@contextmanager
def _single_threaded_blas() -> Iterator[None]:
    # numpy's OpenBLAS starts a thread per core as it loads, and each spins for about
    # 0.1 s of a core before it sleeps: in the server, that spin took the core its
    # imports ran on, and delayed the first batch. Workers never multiply matrices.
    # The server reads its environment once, as it is spawned, so only it is changed.
    name = "OPENBLAS_NUM_THREADS"
    previous = os.environ.get(name)
    os.environ[name] = "1"
    try:
        yield
    finally:
        if previous is None:
            del os.environ[name]
        else:
            os.environ[name] = previous
