from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from tcptrace.events import Direction, TcpState
from tcptrace.report.summary import (
    FAILED_STACK_KEY,
    UNKNOWN_STACK_KEY,
    render_losses,
    render_summary,
    summarize_call_sites,
    top_frames,
)
from tcptrace.sockets import CloseCause, Connection, LeakClass, StackStatus
from tests.unit.connection_factory import NOW, make_connection

THRESHOLD = 30.0
LOSSES = {"events_dropped": 0, "map_full": 0, "ustack_failed": 0}

LEAKY = ("_start", "__libc_start_main", "main", "main.serve", "main.leakyHandler", "__connect")
POOL = ("_start", "main", "pool.Get", "pool.dial", "connect")

_keys = iter(range(1, 1_000_000))


def make_conn(**overrides: Any) -> Connection:
    return make_connection(**{"key": next(_keys), "stack": LEAKY, **overrides})


def aged(seconds: float, **overrides: Any) -> Connection:
    return make_conn(opened_at=NOW - seconds, first_seen=NOW - seconds, **overrides)


def test_groups_only_flagged_sockets_by_stack() -> None:
    conns = [
        aged(100, state=TcpState.CLOSE_WAIT, pid=1),
        aged(40, state=TcpState.CLOSE_WAIT, pid=2),
        aged(500, stack=POOL),
        aged(5),  # too young
        aged(900, state=TcpState.LISTEN, direction=Direction.LISTEN),  # listener
        aged(900, closed_at=NOW - 1, close_cause=CloseCause.APP),  # closed
        aged(900, untracked=True),  # ledger was full: never judged
    ]
    sites = summarize_call_sites(conns, NOW, THRESHOLD)
    assert [(s.key, s.count) for s in sites] == [(";".join(LEAKY), 2), (";".join(POOL), 1)]
    leaky = sites[0]
    assert leaky.oldest_age_s == pytest.approx(100)
    assert leaky.oldest_is_lower_bound is False
    assert leaky.states == Counter({TcpState.CLOSE_WAIT: 2})
    assert leaky.leak_classes == Counter({LeakClass.CLOSE_WAIT: 2})
    assert leaky.pids == (1, 2)
    assert leaky.top_frames == ("main.leakyHandler", "main.serve", "main")
    assert sites[1].top_frames == ("pool.dial", "pool.Get", "main")


def test_order_is_count_then_oldest() -> None:
    stack_a, stack_b, stack_c = ("a", "x"), ("b", "x"), ("c", "x")
    conns = [
        aged(50, stack=stack_a),
        aged(900, stack=stack_b),
        aged(60, stack=stack_c),
        aged(61, stack=stack_c),
    ]
    keys = [s.key for s in summarize_call_sites(conns, NOW, THRESHOLD)]
    assert keys == ["c;x", "b;x", "a;x"]


def test_unknown_and_failed_stacks_get_placeholder_groups() -> None:
    conns = [
        make_conn(
            opened_at=None,
            first_seen=NOW - 300,
            direction=Direction.PREEXISTING,
            stack=(),
            stack_status=StackStatus.UNKNOWN,
            pid=7,
        ),
        make_conn(
            opened_at=None,
            first_seen=NOW - 200,
            direction=Direction.PREEXISTING,
            stack=(),
            stack_status=StackStatus.UNKNOWN,
            pid=8,
        ),
        aged(45, stack=(), stack_status=StackStatus.FAILED),
    ]
    sites = summarize_call_sites(conns, NOW, THRESHOLD)
    assert [(s.key, s.count) for s in sites] == [(UNKNOWN_STACK_KEY, 2), (FAILED_STACK_KEY, 1)]
    assert sites[0].oldest_is_lower_bound is True
    assert sites[0].top_frames == ()
    assert sites[0].pids == (7, 8)


def test_top_frames_falls_back_to_raw_frames_when_all_noise() -> None:
    assert top_frames(("0x7f01", "0x7f02", "[unknown]")) == ("[unknown]", "0x7f02", "0x7f01")
    assert top_frames(("main.main", "net.(*Dialer).Dial", "syscall.connect")) == ("main.main",)
    assert top_frames(("f+0x10 (/bin/app)", "__libc_connect+0x3 (/lib/libc.so.6)")) == (
        "f+0x10 (/bin/app)",
    )


def test_render_summary_lists_sites_and_always_losses() -> None:
    conns = [
        aged(125, state=TcpState.CLOSE_WAIT),
        aged(40, state=TcpState.ESTABLISHED),
        aged(70, stack=POOL, pid=300, comm="worker"),
    ]
    sites = summarize_call_sites(conns, NOW, THRESHOLD)
    text = render_summary(sites, LOSSES, NOW, THRESHOLD)
    lines = text.splitlines()
    assert lines[0] == (
        "2023-11-14T22:15:00Z  3 flagged sockets at 2 call sites (open >= 30s, listeners excluded)"
    )
    assert "#1  2 sockets, oldest 2m05s, pids 100 (app)" in text
    assert "states: CLOSE_WAIT=1 ESTABLISHED=1" in text
    assert "    at main.leakyHandler" in text
    assert "__connect" not in text  # the libc wrapper is noise
    assert text.index("#1") < text.index("#2")
    assert lines[-1] == "losses: events_dropped=0 map_full=0 ustack_failed=0"
    assert all(len(line) <= 100 for line in lines)


def test_render_with_nothing_flagged_says_so_and_shows_losses() -> None:
    text = render_summary([], LOSSES, NOW, THRESHOLD)
    assert "no leaked sockets flagged" in text
    assert "losses: events_dropped=0 map_full=0 ustack_failed=0" in text


def test_render_warns_when_events_were_lost() -> None:
    text = render_summary([], {"events_dropped": 3, "map_full": 0}, NOW, THRESHOLD)
    assert "losses: events_dropped=3 map_full=0" in text
    assert "may be incomplete" in text


def test_render_placeholders_and_lower_bound_age() -> None:
    conn = make_conn(
        opened_at=None,
        first_seen=NOW - 3600,
        direction=Direction.PREEXISTING,
        stack=(),
        stack_status=StackStatus.UNKNOWN,
    )
    text = render_summary(summarize_call_sites([conn], NOW, THRESHOLD), LOSSES, NOW, THRESHOLD)
    assert "oldest >=1h00m" in text
    assert UNKNOWN_STACK_KEY in text


def test_render_clips_to_width() -> None:
    long_frame = "pkg." + "x" * 300
    sites = summarize_call_sites([aged(100, stack=("main", long_frame))], NOW, THRESHOLD)
    text = render_summary(sites, LOSSES, NOW, THRESHOLD, width=60)
    assert all(len(line) <= 60 for line in text.splitlines())
    assert "..." in text


def test_render_losses_without_counters_is_explicit() -> None:
    assert render_losses({}).startswith("losses: ")
    assert "unknown" in render_losses({})
