"""The live view's model and screen from recorded ticks (issue 7), without a terminal."""

from __future__ import annotations

import io
import sys

import pytest
from rich.console import Console

from tcptrace.events import Direction, TcpState
from tcptrace.live import LiveModel, LiveView, render, render_losses
from tcptrace.sockets import Connection, StackStatus
from tcptrace.tick import TraceTick
from tests.unit.connection_factory import make_connection

T0 = 1_700_000_000.0
LEAK = ("main", "serve_forever (server.c:40)", "accept_one (server.c:20)", "accept")
OK = ("main", "client_loop", "dial_ok")


def conn(key: int, stack: tuple[str, ...], opened: float, state: TcpState) -> Connection:
    return Connection(
        key=key,
        pid=4242,
        tid=4242,
        comm="server",
        fd=key,
        family="ipv4",
        laddr="127.0.0.1",
        lport=8080,
        raddr="127.0.0.1",
        rport=50000 + key,
        state=state,
        direction=Direction.ACCEPT,
        opened_at=opened,
        first_seen=opened,
        stack=stack,
        stack_status=StackStatus.OK,
    )


def tick(now: float, conns: list[Connection], losses: dict[str, int] | None = None) -> TraceTick:
    return TraceTick(now, conns, losses or {"events_dropped": 0}, 30.0, (4242,))


def test_rows_group_by_call_site_with_growth() -> None:
    model = LiveModel(started=T0)
    leaks: list[Connection] = []
    rows = []
    for second in range(0, 61, 1):
        # One more leaked socket every 2 s, and one short-lived socket always open.
        if second % 2 == 0:
            leaks.append(conn(len(leaks) + 1, LEAK, T0 + second, TcpState.CLOSE_WAIT))
        ok = conn(10_000 + second, OK, T0 + second, TcpState.ESTABLISHED)
        rows = model.rows(tick(T0 + second, [*leaks, ok]))
    leak_row, ok_row = rows[0], rows[1]
    assert leak_row.label.startswith("accept_one (server.c:20)")  # innermost meaningful first
    assert leak_row.open_count == 31 and leak_row.flagged == 16  # open >= 30s
    assert leak_row.oldest_s == 60 and leak_row.median_s == 30
    assert leak_row.states == {"CLOSE_WAIT": 31}
    assert leak_row.growth_per_min is not None and abs(leak_row.growth_per_min - 30.0) < 1.5
    assert leak_row.since_first == 30
    assert ok_row.open_count == 1 and ok_row.flagged == 0
    assert ok_row.growth_per_min is not None and abs(ok_row.growth_per_min) < 0.1


def test_no_growth_shown_before_enough_history() -> None:
    model = LiveModel(started=T0)
    rows = model.rows(tick(T0, [conn(1, LEAK, T0, TcpState.ESTABLISHED)]))
    assert rows[0].growth_per_min is None
    rows = model.rows(tick(T0 + 2, [conn(1, LEAK, T0, TcpState.ESTABLISHED)]))
    assert rows[0].growth_per_min is None  # 2 s of history is noise


def test_screen_shows_sites_counts_states_and_losses() -> None:
    model = LiveModel(started=T0)
    socks = [conn(i, LEAK, T0, TcpState.CLOSE_WAIT) for i in range(5)]
    t = tick(T0 + 45, socks, {"events_dropped": 7, "map_full": 0})
    rows = model.rows(t)
    console = Console(file=io.StringIO(), width=160, record=True, color_system=None)
    console.print(render(t, rows, T0, "pids 4242"))
    text = console.export_text()
    assert "tcptrace live" in text and "pids 4242" in text and "threshold 30s" in text
    assert "accept_one (server.c:20)" in text
    assert "CLOSE_WAIT 5" in text
    assert "events_dropped=7" in text and "map_full" not in text  # zeros not shouted
    assert "q or Ctrl-C" in text


def test_losses_line() -> None:
    assert "all 0" in render_losses({"a": 0, "b": 0}).plain
    assert render_losses({"a": 3}).plain.startswith("losses: a=3")
    assert "unknown" in render_losses({}).plain


def test_brackets_in_frames_are_shown_not_read_as_markup() -> None:
    model = LiveModel(started=T0)
    odd = ("main", "[bold]evil[/bold] (x.c:1)")
    preexisting = make_connection(
        key=-1,
        pid=4242,
        tid=4242,
        comm="server",
        fd=3,
        laddr="0.0.0.0",
        lport=8080,
        raddr="",
        rport=0,
        state=TcpState.LISTEN,
        direction=Direction.PREEXISTING,
        opened_at=None,
        first_seen=T0,
        stack=(),
        stack_status=StackStatus.UNKNOWN,
    )
    t = tick(T0 + 5, [conn(1, odd, T0, TcpState.ESTABLISHED), preexisting])
    console = Console(file=io.StringIO(), width=160, record=True, color_system=None)
    console.print(render(t, model.rows(t), T0, "pids 4242"))
    text = console.export_text()
    assert "[bold]evil[/bold] (x.c:1)" in text
    assert "[preexisting: stack unknown]" in text


def test_lines_written_under_the_screen_are_printed_after_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    terminal, err = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # rich draws into `terminal` as into a tty
    view = LiveView(lambda _why: None, lambda: False, "pids 4242", stream=terminal, keys=False)
    socks = [conn(1, LEAK, T0, TcpState.ESTABLISHED)]
    with view:
        print("tracing pid(s) 4242", file=view.stdout, flush=True)  # no screen yet: at once
        print("tcptrace: compiling...", file=sys.stderr, flush=True)
        assert terminal.getvalue() == "tracing pid(s) 4242\n"
        assert err.getvalue() == "tcptrace: compiling...\n"
        view.tick(tick(T0, socks))  # the screen is up
        assert "tcptrace live" in terminal.getvalue()
        print("stopped: q pressed", file=view.stdout, flush=True)
        print("tcptrace: could not write the report", file=sys.stderr, flush=True)
        print("report written to /r", file=view.stdout, flush=True)
        assert "stopped" not in terminal.getvalue() and "could not" not in err.getvalue()
        drawn = len(terminal.getvalue())
        view.tick(tick(T0 + 1, socks))  # the warning is on the screen meanwhile
        assert "tcptrace: could not write the report" in terminal.getvalue()[drawn:]
    assert sys.stderr is err  # given back
    assert terminal.getvalue().endswith("stopped: q pressed\nreport written to /r\n")
    assert err.getvalue() == "tcptrace: compiling...\ntcptrace: could not write the report\n"
    assert view.errors == 0


def test_warnings_under_the_screen_are_shown_on_it() -> None:
    model = LiveModel(started=T0)
    t = tick(T0 + 5, [conn(1, LEAK, T0, TcpState.ESTABLISHED)])
    console = Console(file=io.StringIO(), width=160, record=True, color_system=None)
    notes = ["tcptrace: cannot symbolize pid 77 (worker): reading its /proc/77/root needs"]
    console.print(render(t, model.rows(t), T0, "pids 4242", notes=notes))
    assert console.export_text().rstrip().endswith(notes[0])
