"""SIGINT/SIGTERM/SIGHUP from tcptrace's first line on: remembered, then handed to the
trace (issue 7).

The console script enters through `tcptrace.entry`, which installs a
`SignalLatch` before importing anything else of ours: the CLI, then the tracer,
pull in click, pandas, numpy and bcc, most of a second during which Python's
default handlers would print a KeyboardInterrupt traceback (SIGINT) or die
without a word (SIGTERM). The latch only remembers the signal. The trace command
forwards it to its stop flag (a stop requested before attaching still writes a
report); any other command gives the default handlers back, and exits at once if
a signal already came.

Stdlib only, and nothing else imported here: this module must load in microseconds.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

# SIGHUP too: a trace whose terminal went away (ssh dropped) still writes its report.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# Shell convention: 128 + signal number.
EXIT_STATUS = {"SIGINT": 130, "SIGTERM": 143, "SIGHUP": 129}


class SignalLatch:
    """Handlers for STOP_SIGNALS that remember the first signal and forward later ones."""

    _active: SignalLatch | None = None

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._forward: Callable[[str], None] | None = None
        self._old: dict[signal.Signals, Any] = {}

    @classmethod
    def active(cls) -> SignalLatch | None:
        """The latch installed in this process, if any."""
        return cls._active

    def install(self) -> SignalLatch:
        """Take over STOP_SIGNALS (main thread only: Python allows no other)."""
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handler) for s in STOP_SIGNALS}
            SignalLatch._active = self
        return self

    def _handler(self, signum: int, _frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.signal_name is None:
            self.signal_name = name
        if self._forward is not None:
            self._forward(name)

    def forward_to(self, callback: Callable[[str], None]) -> None:
        """From now on hand signals to `callback`, starting with one already received."""
        self._forward = callback
        if self.signal_name is not None:
            callback(self.signal_name)

    def restore(self) -> str | None:
        """Give the previous handlers back; returns the signal received meanwhile, if any."""
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old = {}
        self._forward = None
        if SignalLatch._active is self:
            SignalLatch._active = None
        return self.signal_name
