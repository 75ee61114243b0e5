"""One socket-lifecycle workload, traced by one or more probe sets at once, and its truth.

Used by tests/kernel/test_probes_kernel.py (the probe set named by TCPTRACE_PROBES)
and tests/vm/ (the kprobe and tracepoint sets tracing the very same processes, so
their reports can be compared row for row: same sock addresses, pids, fds, ports).

The workload, all on loopback, every process gated so its first socket is born
under the probes:
  server   accept_server: one listener, accepts 3 connections, closes nothing
  holder   dialer --count 2: two connections kept open (ESTABLISHED both ends)
  closer   dialer --count 1 --close-after-ready: closes its end, so the server's
           accepted socket sits in CLOSE_WAIT and the client's dies (FIN_WAIT2 ->
           timewait sock, the full sock destroyed)
  refused  failconnect --count 1: connect() refused, the fd kept on a CLOSED socket
What each process printed (fds, ports) is the truth the reports must match.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from tcptrace.launch import GatedProcess
from tcptrace.report import load_report
from tcptrace.tracer import StopFlag, TraceOptions, TraceResult, run_trace
from tcptrace.workloads.build import build

# A bcc compile takes ~26 s under TCG (scripts/vm-test), and two sets compile at once.
ATTACH_TIMEOUT_S = 300.0
LINE_TIMEOUT_S = 30.0
ROLES = ("server", "holder", "closer", "refused")


def free_port() -> int:
    """A loopback port free right now (the server binds it a moment later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LineReader:
    """Every stdout line of a process, read on a thread so the pipe never fills."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self.ended = False
        self._cond = threading.Condition()
        self._proc = proc
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self.ended = True  # EOF: the process is gone, no line will come
            self._cond.notify_all()

    def line_with(self, text: str, timeout: float) -> str:
        """The first line containing `text`, waiting for it."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines:
                    if text in line:
                        return line
                left = deadline - time.monotonic()
                if left <= 0 or self.ended:
                    raise AssertionError(
                        f"pid {self._proc.pid}: no line with {text!r} in {timeout}s "
                        f"(exit {self._proc.poll()}):\n" + "\n".join(self.lines)
                    )
                self._cond.wait(min(left, 0.2))

    def tagged(self, tag: str, timeout: float = LINE_TIMEOUT_S) -> dict[str, Any]:
        """The JSON of the first `TAG {json}` line, waiting for it."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines:
                    if line.startswith(tag + " "):
                        value = json.loads(line[len(tag) + 1 :])
                        assert isinstance(value, dict)
                        return value
                left = deadline - time.monotonic()
                if left <= 0 or self.ended:
                    raise AssertionError(
                        f"pid {self._proc.pid}: no {tag} line in {timeout}s "
                        f"(exit {self._proc.poll()}); got {self.lines}"
                    )
                self._cond.wait(min(left, 0.2))


@dataclass
class Truth:
    """What the workload itself reported."""

    pids: dict[str, int]
    port: int
    listen_fd: int
    accepted_fds: list[int]
    accepted_peer_ports: list[int]
    holder_fds: list[int]
    holder_ports: list[int]
    closer_fds: list[int]
    closer_ports: list[int]
    refused_fd: int
    refused_port: int


@dataclass
class Run:
    truth: Truth
    results: dict[str, TraceResult] = field(default_factory=dict)
    logs: dict[str, str] = field(default_factory=dict)


def _argvs(port: int) -> dict[str, list[str]]:
    return {
        "server": [
            str(build("accept_server")),
            "--port",
            str(port),
            "--count",
            "3",
            "--hold",
            "120",
        ],
        "holder": [str(build("dialer")), "--port", str(port), "--count", "2", "--hold", "120"],
        "closer": [
            str(build("dialer")),
            "--port",
            str(port),
            "--count",
            "1",
            "--close-after-ready",
            "--hold",
            "120",
        ],
        "refused": [str(build("failconnect")), "--count", "1", "--hold", "120"],
    }


def _drive(procs: dict[str, GatedProcess]) -> Truth:
    """Release the gated workload in order and collect what it reports."""
    readers = {role: LineReader(p.proc) for role, p in procs.items()}
    # One at a time, so the server listens before anyone dials.
    procs["server"].release()
    server = readers["server"].tagged("READY")
    procs["holder"].release()
    holder = readers["holder"].tagged("READY")
    procs["closer"].release()
    closer = readers["closer"].tagged("READY")
    readers["closer"].tagged("CLOSED")
    procs["refused"].release()
    refused = readers["refused"].tagged("READY")
    accepted = readers["server"].tagged("ACCEPTED")
    truth = Truth(
        pids={role: p.pid for role, p in procs.items()},
        port=int(server["port"]),
        listen_fd=int(server["listen_fd"]),
        accepted_fds=[int(x) for x in accepted["fds"]],
        accepted_peer_ports=[int(x) for x in accepted["peer_ports"]],
        holder_fds=[int(x) for x in holder["fds"]],
        holder_ports=[int(x) for x in holder["local_ports"]],
        closer_fds=[int(x) for x in closer["fds"]],
        closer_ports=[int(x) for x in closer["local_ports"]],
        refused_fd=int(refused["fd"]),
        refused_port=int(refused["port"]),
    )
    return truth


def trace_lifecycle(out_dir: Path, probe_sets: Sequence[str], threshold_s: float = 1.0) -> Run:
    """Run the workload once, traced by each probe set in `probe_sets` at once."""
    port = free_port()
    argvs = _argvs(port)
    procs = {role: GatedProcess(argvs[role], stdout=subprocess.PIPE) for role in ROLES}
    stops = {ps: StopFlag() for ps in probe_sets}
    attached = {ps: threading.Event() for ps in probe_sets}
    errors: dict[str, BaseException] = {}
    # Read only after the tracer thread ended (or failed to attach).
    logs = {ps: io.StringIO() for ps in probe_sets}
    results: dict[str, TraceResult] = {}

    def tracer(ps: str) -> None:
        try:
            results[ps] = run_trace(
                TraceOptions(
                    pids=tuple(p.pid for p in procs.values()),
                    output_dir=out_dir / f"report-{ps}",
                    threshold_s=threshold_s,
                    probes=ps,
                    summary_interval_s=3600,
                    poll_interval_s=0.05,
                    scan_interval_s=0.5,
                    on_attached=attached[ps].set,
                ),
                out=logs[ps],
                stop=stops[ps],
            )
        except BaseException as exc:
            errors[ps] = exc
            attached[ps].set()

    threads = [threading.Thread(target=tracer, args=(ps,), daemon=True) for ps in probe_sets]
    try:
        # One tracer at a time up to attach: bcc (LLVM) compiles are not safe in two
        # threads of one process at once (it aborts). The workload is still gated,
        # so both see everything from its first socket on.
        for ps, t in zip(probe_sets, threads, strict=True):
            t.start()
            if not attached[ps].wait(ATTACH_TIMEOUT_S) or ps in errors:
                raise AssertionError(
                    f"{ps} tracer did not attach: {errors.get(ps)!r}\n{logs[ps].getvalue()}"
                )
        truth = _drive(procs)
        # Past the threshold, and time for the closer's FIN handshake and the
        # destroy of its socket (softirq), and for a scan of the kernel map.
        time.sleep(threshold_s + 1.5)
        for ps in probe_sets:
            stops[ps].set("test finished")
        for t in threads:
            t.join(120)
        for ps in probe_sets:
            if ps in errors or ps not in results:
                raise AssertionError(
                    f"{ps} tracer failed: {errors.get(ps)!r}\n{logs[ps].getvalue()}"
                )
        return Run(truth, results, {ps: log.getvalue() for ps, log in logs.items()})
    finally:
        for stop in stops.values():
            stop.set("test cleanup")
        for t in threads:
            if t.is_alive():
                t.join(60)
        for p in procs.values():
            p.stop()


@dataclass
class CliRun:
    truth: Truth
    reports: dict[str, Path]
    outputs: dict[str, str]


def trace_lifecycle_cli(out_dir: Path, probe_sets: Sequence[str]) -> CliRun:
    """Run the workload once, traced by one `tcptrace` CLI process per probe set.

    Separate processes, as users run it, and so that the two tracers share no bcc
    state (bcc's per-pid symbol caches are class-wide, and two LLVM compiles in one
    process abort). Each tracer is stopped with SIGINT, as by Ctrl-C.
    """
    port = free_port()
    argvs = _argvs(port)
    procs = {role: GatedProcess(argvs[role], stdout=subprocess.PIPE) for role in ROLES}
    tracers: dict[str, subprocess.Popen[str]] = {}
    readers: dict[str, LineReader] = {}
    try:
        pid_args = [a for p in procs.values() for a in ("--pid", str(p.pid))]
        for ps in probe_sets:
            tracers[ps] = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tcptrace.cli",
                    *pid_args,
                    "--probes",
                    ps,
                    "--threshold",
                    "1s",
                    "--interval",
                    "1h",
                    "--output",
                    str(out_dir / ps),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            readers[ps] = LineReader(tracers[ps])
        for ps in probe_sets:
            readers[ps].line_with("probes attached", ATTACH_TIMEOUT_S)
        truth = _drive(procs)
        time.sleep(2.5)  # past the 1 s threshold; the closer's socket is destroyed
        outputs: dict[str, str] = {}
        for tracer in tracers.values():
            tracer.send_signal(signal.SIGINT)
        for ps, tracer in tracers.items():
            rc = tracer.wait(180)
            outputs[ps] = "\n".join(readers[ps].lines)
            assert rc == 0, f"tcptrace --probes {ps} exited {rc}:\n{outputs[ps]}"
        return CliRun(truth, {ps: out_dir / ps for ps in probe_sets}, outputs)
    finally:
        for tracer in tracers.values():
            if tracer.poll() is None:
                tracer.kill()
                tracer.wait()
        for p in procs.values():
            p.stop()


# Columns that must agree between probe sets: everything but timing.
COMPARED = (
    "pid",
    "tid",
    "comm",
    "fd",
    "family",
    "laddr",
    "lport",
    "raddr",
    "rport",
    "direction",
    "stack",
    "stack_status",
    "final_state",
    "fd_closed_by_app",
    "close_cause",
    "untracked",
)


def report_rows(result: TraceResult | Path) -> list[dict[str, Any]]:
    """The report's connections table (every socket, open or closed) joined with the
    open_sockets table's state and leak verdict, as plain sorted rows."""
    report = load_report(result if isinstance(result, Path) else result.output_dir)
    conns = report.connections
    open_rows = report.open_sockets
    open_by_key = {
        (int(r["pid"]), _opt_int(r["fd"]), int(r["lport"]), int(r["rport"]), str(r["direction"])): r
        for r in open_rows.to_dict("records")
    }
    rows: list[dict[str, Any]] = []
    for r in conns.to_dict("records"):
        row = {c: _plain(r[c]) for c in COMPARED}
        key = (row["pid"], row["fd"], row["lport"], row["rport"], row["direction"])
        o = open_by_key.get(key)
        row["open_state"] = None if o is None else str(o["state"])
        row["leak"] = None if o is None else bool(o["leak"])
        row["leak_class"] = None if o is None else str(o["leak_class"])
        rows.append(row)
    return sorted(rows, key=lambda r: (r["pid"], r["direction"], r["fd"] or -1, r["lport"]))


def _opt_int(value: object) -> int | None:
    plain = _plain(value)
    return None if plain is None else int(plain)


def _plain(value: Any) -> Any:
    """pandas scalars (and NA) to plain Python values, for equality and messages."""
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, float) and value != value:  # NaN
        return None
    if hasattr(value, "item"):
        return value.item()
    return value


def check_truth(rows: list[dict[str, Any]], truth: Truth, probe_set: str) -> None:
    """Every socket of the workload is in the report, exactly as the workload saw it."""
    pids = truth.pids
    by_pid: dict[int, list[dict[str, Any]]] = {}
    for r in rows:
        by_pid.setdefault(int(r["pid"]), []).append(r)
    where = f"[{probe_set}]"

    server = by_pid.get(pids["server"], [])
    listeners = [r for r in server if r["direction"] == "listen"]
    assert len(listeners) == 1, (where, server)
    lst = listeners[0]
    assert (lst["fd"], lst["lport"], lst["open_state"], lst["leak_class"]) == (
        truth.listen_fd,
        truth.port,
        "LISTEN",
        "listener",
    ), (where, lst)
    accepted = sorted((r for r in server if r["direction"] == "accept"), key=lambda r: r["fd"])
    assert [r["fd"] for r in accepted] == sorted(truth.accepted_fds), (where, accepted)
    assert sorted(r["rport"] for r in accepted) == sorted(truth.accepted_peer_ports), where
    assert all(r["lport"] == truth.port and r["raddr"] == "127.0.0.1" for r in accepted), where
    assert all("accept_one" in (r["stack"] or "") for r in accepted), (where, accepted)
    assert all(r["tid"] == pids["server"] and r["comm"] == "accept_server" for r in server), where
    states = {r["rport"]: r["open_state"] for r in accepted}
    for p in truth.holder_ports:
        assert states[p] == "ESTABLISHED", (where, accepted)
    (closer_port,) = truth.closer_ports
    assert states[closer_port] == "CLOSE_WAIT", (where, accepted)
    assert {r["leak_class"] for r in accepted if r["rport"] == closer_port} == {"close_wait"}

    holder = by_pid.get(pids["holder"], [])
    assert sorted(r["fd"] for r in holder) == sorted(truth.holder_fds), (where, holder)
    for r in holder:
        assert r["direction"] == "connect" and r["open_state"] == "ESTABLISHED", (where, r)
        assert r["lport"] in truth.holder_ports and r["rport"] == truth.port, (where, r)
        assert r["laddr"] == r["raddr"] == "127.0.0.1", (where, r)
        assert "dial_one" in (r["stack"] or "") and r["stack_status"] == "ok", (where, r)
        assert not r["fd_closed_by_app"], (where, r)

    closer = by_pid.get(pids["closer"], [])
    assert len(closer) == 1, (where, closer)
    c = closer[0]
    # Closed by the app and destroyed by the kernel (the timewait sock took over).
    assert (c["fd"], c["direction"], c["lport"], c["rport"]) == (
        truth.closer_fds[0],
        "connect",
        closer_port,
        truth.port,
    ), (where, c)
    assert c["fd_closed_by_app"], (where, c)
    if c["open_state"] is None:
        # Destroyed: the FIN's ACK came after close() orphaned it (timewait took over).
        assert c["close_cause"] == "app" and c["final_state"] == "CLOSE", (where, c)
    else:
        # The ACK came inside close(), before the orphaning (seen under emulation):
        # the kernel keeps an orphaned FIN_WAIT2 socket until tcp_fin_timeout.
        assert (c["open_state"], c["leak_class"]) == ("FIN_WAIT2", "orphan"), (where, c)
    assert "dial_one" in (c["stack"] or ""), (where, c)

    refused = by_pid.get(pids["refused"], [])
    assert len(refused) == 1, (where, refused)
    f = refused[0]
    # connect() refused: TCP is CLOSED, the fd is still held: the fd leak class.
    assert (f["fd"], f["direction"], f["rport"], f["open_state"]) == (
        truth.refused_fd,
        "connect",
        truth.refused_port,
        "CLOSE",
    ), (where, f)
    assert f["leak_class"] == "fd_on_closed_socket" and not f["fd_closed_by_app"], (where, f)
    assert "connect_refused" in (f["stack"] or ""), (where, f)

    assert set(by_pid) <= set(pids.values()), (where, sorted(by_pid))
    assert len(rows) == 1 + 3 + 2 + 1 + 1, (where, rows)


def kernel_config() -> dict[str, str] | None:
    """The running kernel's build config (/proc/config.gz or /boot/config-*), if found:
    an independent statement of what the kernel supports."""
    import gzip

    release = os.uname().release
    try:
        text = gzip.decompress(Path("/proc/config.gz").read_bytes()).decode()
    except OSError:
        try:
            text = Path(f"/boot/config-{release}").read_text()
        except OSError:
            return None
    out: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("CONFIG_") and "=" in line:
            key, value = line.split("=", 1)
            out[key] = value
    return out
