"""What the tracer hands a live view once per scan (issue 7): plain data, no I/O.

Kept apart from tracer.py and live.py so that the tracer's hook stays one call
and the live view (rich) can be tested from recorded ticks without a kernel.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from tcptrace.sockets import Connection


@dataclass(frozen=True)
class TraceTick:
    now: float  # epoch seconds of the scan
    open_sockets: Sequence[Connection]  # the ledger's open sockets after the scan
    losses: Mapping[str, int]  # every loss counter, as the report shows them
    threshold_s: float
    live_pids: tuple[int, ...]  # targets still running (reused pids excluded)
