from __future__ import annotations

from typing import Any

import pandas as pd
import pytest

from tcptrace.events import Direction, TcpState
from tcptrace.report import schema
from tcptrace.report.schema import (
    CONNECTIONS,
    OPEN_SOCKETS,
    TABLES,
    conform,
    connections_frame,
    open_sockets_frame,
    to_frame,
)
from tcptrace.sockets import CloseCause, Connection, StackStatus
from tests.unit.connection_factory import NOW, make_connection

NULLABLE = {"Int64", "Float64", "boolean", "string", "datetime64[ns, UTC]"}


def make_conn(**overrides: Any) -> Connection:
    return make_connection(**overrides)


def test_required_columns_in_order() -> None:
    assert [c.name for c in OPEN_SOCKETS] == [
        "pid", "tid", "comm", "fd", "family", "laddr", "lport", "raddr", "rport", "state",
        "direction", "opened_at", "first_seen", "age_s", "age_is_lower_bound", "leak",
        "leak_class", "untracked", "stack", "stack_status", "bytes_sent", "bytes_received",
    ]  # fmt: skip
    assert [c.name for c in CONNECTIONS] == [
        "pid", "tid", "comm", "fd", "family", "laddr", "lport", "raddr", "rport", "direction",
        "opened_at", "first_seen", "closed_at", "duration_s", "final_state", "fd_closed_by_app",
        "close_cause", "untracked", "stack", "stack_status", "bytes_sent", "bytes_received",
    ]  # fmt: skip


@pytest.mark.parametrize("table", sorted(TABLES))
def test_every_column_is_nullable_and_described(table: str) -> None:
    cols = TABLES[table]
    assert len({c.name for c in cols}) == len(cols)
    for c in cols:
        assert c.dtype in NULLABLE, c
        assert c.description


@pytest.mark.parametrize("table", sorted(TABLES))
def test_empty_frame_has_declared_dtypes(table: str) -> None:
    frame = to_frame(table, [])
    assert list(frame.columns) == [c.name for c in TABLES[table]]
    assert {k: str(v) for k, v in frame.dtypes.items()} == schema.dtypes(table)


def test_open_socket_row_values() -> None:
    preexisting = make_conn(
        key=-5,
        fd=-1,
        opened_at=None,
        first_seen=NOW - 40.0,
        direction=Direction.PREEXISTING,
        state=TcpState.CLOSE_WAIT,
        stack=(),
        stack_status=StackStatus.UNKNOWN,
        bytes_sent=12,
    )
    listener = make_conn(key=2, state=TcpState.LISTEN, direction=Direction.LISTEN)
    young = make_conn(key=3, opened_at=NOW - 1.0, first_seen=NOW - 1.0)
    closed = make_conn(key=4, closed_at=NOW - 5.0, close_cause=CloseCause.APP, fd_closed=True)
    frame = open_sockets_frame([preexisting, listener, young, closed], NOW, 30.0)

    assert len(frame) == 3  # the closed one is not an open socket
    first = frame.iloc[0]
    assert first["fd"] is pd.NA
    assert pd.isna(first["opened_at"])
    assert first["first_seen"] == pd.Timestamp(NOW - 40.0, unit="s", tz="UTC")
    assert first["age_s"] == pytest.approx(40.0)
    assert bool(first["age_is_lower_bound"]) is True
    assert bool(first["leak"]) is True
    assert first["leak_class"] == "close_wait"
    assert first["state"] == "CLOSE_WAIT"
    assert first["direction"] == "preexisting"
    assert first["stack"] == ""
    assert first["stack_status"] == "unknown"
    assert first["bytes_sent"] == 12
    assert first["bytes_received"] is pd.NA

    assert frame["leak"].tolist() == [True, False, False]  # listener and young not flagged
    assert frame["leak_class"].tolist() == ["close_wait", "listener", "established"]
    assert frame.iloc[2]["stack"] == "main;handler;connect"
    assert frame["untracked"].tolist() == [False, False, False]


def test_untracked_socket_is_shown_but_not_flagged() -> None:
    frame = open_sockets_frame([make_conn(state=TcpState.CLOSE_WAIT, untracked=True)], NOW, 30.0)
    assert frame["untracked"].tolist() == [True]
    assert frame["leak"].tolist() == [False]


def test_connection_row_values() -> None:
    closed = make_conn(
        closed_at=NOW - 10.0,
        state=TcpState.CLOSE,
        fd_closed=True,
        close_cause=CloseCause.EXIT,
    )
    still_open = make_conn(key=2)
    frame = connections_frame([closed, still_open], NOW)
    assert frame["duration_s"].tolist() == pytest.approx([50.0, 60.0])
    assert frame["final_state"].tolist() == ["CLOSE", "ESTABLISHED"]
    assert frame["close_cause"].tolist() == ["exit", ""]
    assert frame["fd_closed_by_app"].tolist() == [True, False]
    assert frame.iloc[0]["closed_at"] == pd.Timestamp(NOW - 10.0, unit="s", tz="UTC")
    assert pd.isna(frame.iloc[1]["closed_at"])


def test_timestamps_rounded_to_microseconds() -> None:
    frame = connections_frame([make_conn(opened_at=1_700_000_000.123456)], NOW)
    assert frame.iloc[0]["opened_at"].value == 1_700_000_000_123_456_000


def test_to_frame_rejects_missing_or_extra_keys() -> None:
    row = schema.connection_row(make_conn(), NOW)
    del row["stack"]
    with pytest.raises(ValueError, match="missing \\['stack'\\]"):
        to_frame("connections", [row])
    with pytest.raises(ValueError, match="unknown report table"):
        to_frame("nope", [])


def test_conform_reorders_drops_extras_and_names_missing() -> None:
    frame = connections_frame([make_conn()], NOW)
    shuffled = frame[list(reversed(frame.columns))].assign(extra=1)
    back = conform("connections", shuffled)
    pd.testing.assert_frame_equal(back, frame)
    with pytest.raises(KeyError, match="rport"):
        conform("connections", frame.drop(columns=["rport"]))
