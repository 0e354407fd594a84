"""Ctrl-C and SIGTERM during a study as a request to stop at the next safe point.

Python raises KeyboardInterrupt wherever the main thread happens to be. Inside a destructor or a
library's cleanup it is printed as "Exception ignored" and dropped, and the study runs on as if never
interrupted. So while a study trains, the first signal only sets a flag; training checks it between
batches (``check``) and the study between trials. A second signal interrupts at once.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Iterator

_requested = False


def requested() -> bool:
    return _requested


def check() -> None:
    """Raise KeyboardInterrupt here if a stop was requested."""
    if _requested:
        raise KeyboardInterrupt


def sleep(seconds: float) -> None:
    """``time.sleep`` that ends early, raising KeyboardInterrupt, once a stop is requested."""
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        check()
        time.sleep(min(left, 0.2))
    check()


def _request_stop(signum, frame) -> None:
    global _requested
    if _requested:
        raise KeyboardInterrupt
    _requested = True


@contextlib.contextmanager
def deferred(signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)) -> Iterator[None]:
    """Within this block the first of ``signals`` sets the stop flag instead of raising."""
    global _requested
    if threading.current_thread() is not threading.main_thread():  # only the main thread receives signals
        yield
        return
    previous = {s: signal.signal(s, _request_stop) for s in signals}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if _request_stop not in previous.values():  # outermost block: a nested one leaves the request to it
            _requested = False
