"""SIGTERM and SIGHUP stop a running loop the way Ctrl-C does, but never in the middle of a git command.

While :func:`stop_on_signals` is active (it needs the main thread), SIGTERM and SIGHUP
raise :class:`Terminated` wherever the loop is: the command it is running is stopped
with its whole process group (see :mod:`lifecycle_agent.ralph.shell`), the run is
recorded as interrupted, and the process exits with status 128 + the signal number
(143 for SIGTERM). Inside :func:`deferred` (every git command) the signal waits until
the block ends, so git never leaves a half-written index or a stale ``index.lock``.
Further signals during the shutdown are ignored; SIGKILL still ends the process at once.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator, Optional

SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))  # no SIGHUP on Windows

_deferring = 0
_pending: Optional[int] = None
_stopping = False


class Terminated(SystemExit):
    """The loop got SIGTERM or SIGHUP; as an exit, its status is 128 + the signal number."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signum = signum
        self.name = signal.Signals(signum).name


def _handler(signum: int, frame: object) -> None:
    global _pending, _stopping
    if _stopping:
        return
    if _deferring:
        _pending = signum
        return
    _stopping = True
    raise Terminated(signum)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGTERM and SIGHUP raise :class:`Terminated` in the block (outside the main thread: no change)."""
    global _pending, _stopping
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _pending, _stopping = None, False
    previous = {sig: signal.signal(sig, _handler) for sig in SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """A block that SIGTERM and SIGHUP do not cut: a signal that arrives in it takes effect at its end."""
    global _deferring, _pending, _stopping
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
        if not _deferring and _pending is not None and not _stopping:
            signum, _pending = _pending, None
            _stopping = True
            raise Terminated(signum)
