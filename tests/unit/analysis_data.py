"""Reports shaped like the demo's, written by write_report from constructed Connections.

The client leaks `leak` connections from main.leakyDial and closes `ok` from
main.properDial; the server accepts all of them in main.serveLeaky and never
closes any, so the ones the client closed sit in CLOSE_WAIT. `build` shifts
line numbers and raw addresses, as a rebuilt binary would, so diff tests can
check that matching goes by symbol names.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from tcptrace.events import Direction, TcpState
from tcptrace.report import SCHEMA_VERSION, RunMeta, TimelineRecorder, write_report
from tcptrace.sockets import CloseCause, Connection, StackStatus

T0 = 1_700_000_000.0
CLIENT, SERVER = 4242, 4241
RLIMIT = 1024
SERVER_PORT = 40000


def _stacks(build: int) -> dict[str, tuple[str, ...]]:
    line = 190 + 7 * build  # an edit above the call moves every line number
    addr = 0x4A5B00 + 0x40 * build  # a rebuilt binary moves every address
    go_dial = (
        "net.(*Dialer).DialContext (/usr/lib/go/src/net/dial.go:500)",
        "net.(*sysDialer).dialSerial",
        "net.(*netFD).connect (/usr/lib/go/src/net/fd_unix.go:59)",
        "syscall.connect",
        f"0x{addr + 0x10:x}",
    )
    return {
        "leaky": (
            "runtime.main",
            f"main.main (/src/leakydemo.go:{line + 80})",
            f"main.runClient (/src/leakydemo.go:{line + 40})",
            f"main.leakyDial (/src/leakydemo.go:{line})",
            *go_dial,
        ),
        "proper": (
            "runtime.main",
            f"main.main (/src/leakydemo.go:{line + 80})",
            f"main.runClient (/src/leakydemo.go:{line + 42})",
            f"main.properDial (/src/leakydemo.go:{line + 12})",
            *go_dial,
        ),
        "accept": (
            "runtime.goexit",
            f"main.serveLeaky (/src/leakydemo.go:{line - 30})",
            "net.(*TCPListener).Accept",
            "internal/poll.(*FD).Accept",
            "syscall.accept4",
            f"0x{addr:x}",
            f"0x{addr + 0x8:x}",
        ),
        "listen": (
            "runtime.main",
            f"main.main (/src/leakydemo.go:{line + 75})",
            f"main.runServer (/src/leakydemo.go:{line - 50})",
            "net.Listen",
            "syscall.listen",
        ),
    }


def _conn(**fields: Any) -> Connection:
    base: dict[str, Any] = {
        "tid": fields["pid"],
        "comm": "leakydemo",
        "family": "ipv4",
        "laddr": "127.0.0.1",
        "raddr": "127.0.0.1",
        "stack_status": StackStatus.OK,
    }
    base.update(fields)
    return Connection(**base)


def demo_connections(
    leak: int, ok: int, build: int = 0, t0: float = T0, fixed: bool = False
) -> list[Connection]:
    """Final state of a demo-like run: client + server sockets, and a preexisting one.

    `fixed`: main.leakyDial still dials, but closes its connections after 1 s.
    """
    stacks = _stacks(build)
    conns: list[Connection] = [
        _conn(
            key=1,
            pid=SERVER,
            fd=3,
            lport=SERVER_PORT,
            raddr="0.0.0.0",
            rport=0,
            state=TcpState.LISTEN,
            direction=Direction.LISTEN,
            opened_at=t0,
            first_seen=t0,
            stack=stacks["listen"],
        ),
        _conn(
            key=-1,
            pid=CLIENT,
            fd=9,
            family="ipv6",
            laddr="::1",
            lport=5555,
            raddr="::1",
            rport=6379,
            state=TcpState.ESTABLISHED,
            direction=Direction.PREEXISTING,
            opened_at=None,
            first_seen=t0,
            stack=(),
            stack_status=StackStatus.UNKNOWN,
        ),
    ]
    key = 100
    for i in range(leak + ok):
        leaky_site = i < leak
        leaked = leaky_site and not fixed
        opened = t0 + 0.5 + 0.05 * i
        client_port = 50000 + i
        key += 2
        conns.append(
            _conn(
                key=key,
                pid=CLIENT,
                fd=10 + i,
                lport=client_port,
                rport=SERVER_PORT,
                state=TcpState.ESTABLISHED if leaked else TcpState.CLOSE,
                direction=Direction.CONNECT,
                opened_at=opened,
                first_seen=opened,
                stack=stacks["leaky" if leaky_site else "proper"],
                closed_at=None if leaked else opened + (1.0 if leaky_site else 0.01),
                fd_closed=not leaked,
                close_cause=CloseCause.NOT_CLOSED if leaked else CloseCause.APP,
            )
        )
        conns.append(
            _conn(
                key=key + 1,
                pid=SERVER,
                fd=100 + i,
                lport=SERVER_PORT,
                rport=client_port,
                state=TcpState.ESTABLISHED if leaked else TcpState.CLOSE_WAIT,
                direction=Direction.ACCEPT,
                opened_at=opened + 0.001,
                first_seen=opened + 0.001,
                stack=stacks["accept"],
            )
        )
    return conns


def replay_timeline(
    conns: list[Connection], t0: float, end: float, threshold_s: float, interval: float = 1.0
) -> TimelineRecorder:
    """A TimelineRecorder as the tracer would have sampled it during [t0, end]."""
    recorder = TimelineRecorder()
    t = t0
    times = []
    while t < end:
        times.append(t)
        t += interval
    times.append(end)
    for now in times:
        alive = [
            dataclasses.replace(c, closed_at=None)
            for c in conns
            if (c.opened_at if c.opened_at is not None else c.first_seen) <= now
            and (c.closed_at is None or c.closed_at > now)
        ]
        recorder.sample(now, alive, threshold_s)
    return recorder


def write_demo_report(
    out: Path,
    leak: int = 20,
    ok: int = 30,
    build: int = 0,
    duration: float = 6.0,
    threshold_s: float = 2.0,
    fds_end: dict[str, int | None] | None = None,
    losses: dict[str, int] | None = None,
    fixed: bool = False,
) -> Path:
    conns = demo_connections(leak, ok, build, fixed=fixed)
    end = T0 + duration
    timeline = replay_timeline(conns, T0, end, threshold_s)
    meta = RunMeta(
        tool_version="0.1.0",
        schema_version=SCHEMA_VERSION,
        host="testbox",
        kernel="6.1.0-test",
        probe_set="tracepoint",
        pids=(SERVER, CLIENT),
        threshold_s=threshold_s,
        started_at=T0,
        ended_at=end,
        losses=losses if losses is not None else {"events_lost": 0, "stacks_failed": 0},
        extra={
            "rlimit_nofile": {str(SERVER): RLIMIT, str(CLIENT): RLIMIT},
            "fd_count": {
                "start": {str(SERVER): 3, str(CLIENT): 4},
                "end": fds_end
                if fds_end is not None
                else {str(SERVER): 4 + leak + ok, str(CLIENT): 5 + leak},
            },
            "sample_interval_s": 1.0,
            "timeline_sample_times": timeline.sample_times(),
        },
    )
    write_report(out, conns, end, threshold_s, meta, timeline=timeline.frame())
    return out
