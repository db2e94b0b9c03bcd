"""Stopping a run cleanly on Ctrl-C or SIGTERM.

The first signal asks the run to stop after the batch in flight, so its rows
are written and the run can be resumed; a second one stops at once (the rows
written so far are still kept).
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

logger = logging.getLogger(__name__)

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """Set by the first SIGINT or SIGTERM; the loop checks it between batches."""

    def __init__(self) -> None:
        self.signal: signal.Signals | None = None

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def handle(self, number: int, frame: FrameType | None) -> None:
        if self.signal is not None:
            # Asked twice: the user does not want to wait for the batch.
            raise KeyboardInterrupt
        self.signal = signal.Signals(number)
        logger.warning(
            "%s: finishing the batch in flight, then stopping (again to stop at once)",
            self.signal.name,
        )


@contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """A StopRequest set by SIGINT or SIGTERM while the block runs.

    Signal handlers can only be set from the main thread; elsewhere (a library
    caller's worker thread) the request is never set and signals act as before.
    """
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    previous = {number: signal.getsignal(number) for number in _STOP_SIGNALS}
    for number in _STOP_SIGNALS:
        signal.signal(number, request.handle)
    try:
        yield request
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
