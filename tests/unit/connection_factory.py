"""One Connection factory for the report tests: an open ESTABLISHED connect socket."""

from __future__ import annotations

from typing import Any

from tcptrace.events import Direction, TcpState
from tcptrace.sockets import Connection, StackStatus

NOW = 1_700_000_100.0


def make_connection(**overrides: Any) -> Connection:
    """Opened 60 s before NOW; override any field."""
    fields: dict[str, Any] = {
        "key": 1,
        "pid": 100,
        "tid": 101,
        "comm": "app",
        "fd": 7,
        "family": "ipv4",
        "laddr": "10.0.0.1",
        "lport": 40000,
        "raddr": "10.0.0.2",
        "rport": 443,
        "state": TcpState.ESTABLISHED,
        "direction": Direction.CONNECT,
        "opened_at": NOW - 60.0,
        "first_seen": NOW - 60.0,
        "stack": ("main", "handler", "connect"),
        "stack_status": StackStatus.OK,
    }
    fields.update(overrides)
    return Connection(**fields)
