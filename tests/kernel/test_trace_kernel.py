"""The product, on the real kernel: real processes, real sockets, real BPF, real reports.

Each test starts real workloads (Go, C, Python), traces them with the tracer
the CLI uses, and checks the report files it wrote, loaded back with the public
loader.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from tcptrace.report import load_report
from tcptrace.workloads.build import build, start
from tests.kernel.harness import Traced

pytestmark = pytest.mark.usefixtures("root")


def _bin(name: str) -> str:
    return str(build(name))


def _stacks_with(frame: str, stacks: pd.Series) -> int:
    return int(stacks.str.contains(frame, regex=False).sum())


def _zero_losses(meta: dict[str, object], full_churn_of: int = 0) -> None:
    """No loss counter is nonzero; under full churn of `full_churn_of` sockets, only
    the two losses the kernel causes there, bounded and accounted for."""
    losses = meta["losses"]
    assert isinstance(losses, dict)
    nonzero = {k: v for k, v in losses.items() if v}
    if full_churn_of:
        # A softirq can fire a probe on a CPU where the same probe is already
        # running; the kernel skips it and counts it. The rescue programs redo most
        # of those (94-98% at full churn); what is left is counted, and bounded:
        # without the rescue this test saw up to 602 skips.
        assert nonzero.pop("probe_recursion_misses", 0) <= full_churn_of // 100
        # On 2 busy cores the kernel sometimes hands a socket's address to a new
        # socket with no tcp_destroy_sock seen before (also without tcptrace:
        # benchmarks/address_reuse.py --hog, ~200-300 per million connections).
        # tcptrace closes the old record at the reuse and counts it; every one
        # must reach the ledger.
        reused = nonzero.pop("sk_reused", 0)
        replaced = nonzero.pop("sockets_replaced", 0)
        assert reused <= full_churn_of // 100, (reused, full_churn_of)
        assert replaced == reused, (replaced, reused)
    assert nonzero == {}, nonzero


@pytest.fixture
def leaky_server() -> Iterator[int]:
    """An untraced Go server that never closes accepted connections."""
    with start("leakydemo", "server", "--listen", "127.0.0.1:0", "--hold", "120s") as srv:
        yield int(srv.ready["port"])


def test_go_client_leaks_found_with_the_leaking_function(tmp_path: Path, leaky_server: int) -> None:
    leak, ok = 12, 8
    argv = [
        _bin("leakydemo"),
        "client",
        "--addr",
        f"127.0.0.1:{leaky_server}",
        "--leak",
        str(leak),
        "--ok",
        str(ok),
        "--hold",
        "60s",
    ]
    with Traced([argv], tmp_path / "r", threshold_s=0.5) as t:
        client = t.release(0)
        t.wait_line(0, "READY")
        time.sleep(0.8)  # past the threshold
        result = t.stop()
    report = load_report(result.output_dir)
    opened = report.open_sockets[report.open_sockets.pid == client.pid]
    assert len(opened) == leak
    assert set(opened.direction) == {"connect"}
    assert set(opened.state) == {"ESTABLISHED"}
    assert opened.leak.all() and set(opened.leak_class) == {"established"}
    assert _stacks_with("main.leakyDial", opened["stack"]) == leak
    assert set(opened.comm) == {"leakydemo"}
    assert set(opened.rport) == {leaky_server}
    assert opened.fd.notna().all() and opened.fd.is_unique
    # The properly closed ones are in the history, closed by the app, and not open.
    conns = report.connections[report.connections.pid == client.pid]
    proper = conns[conns["stack"].str.contains("main.properDial", regex=False)]
    assert len(proper) == ok
    assert proper.closed_at.notna().all() and proper.fd_closed_by_app.all()
    assert _stacks_with("main.properDial", opened["stack"]) == 0
    # File and line of the call site, from the Go binary's DWARF.
    assert opened["stack"].str.contains(r"main\.leakyDial \(.*leakydemo\.go:\d+\)").all()
    _zero_losses(report.meta)


def test_c_server_null_accept_close_wait_attributed_to_server_despite_busy_cpu(
    tmp_path: Path,
) -> None:
    count = 25
    argv = [_bin("accept_server"), "--port", "0", "--count", str(count), "--hold", "60"]
    with start("busy", "--seconds", "60") as busy, Traced([argv], tmp_path / "r", 0.3) as t:
        server = t.release(0)
        port = int(t.wait_line(0, "READY")["port"])
        # The dialer (untraced) closes each connection at once: the server,
        # which never closes, is left with CLOSE_WAIT sockets.
        with start(
            "dialer", "--port", str(port), "--count", str(count), "--close", "--hold", "30"
        ) as dialer:
            accepted = t.wait_line(0, "ACCEPTED")
            time.sleep(0.6)
            result = t.stop()
            dialer_pid = dialer.pid
        busy_pid = busy.pid
    report = load_report(result.output_dir)
    opened = report.open_sockets
    accepted_socks = opened[opened.direction == "accept"]
    assert len(accepted_socks) == count
    assert set(accepted_socks.pid) == {server.pid}
    assert set(accepted_socks.comm) == {"accept_server"}
    assert set(accepted_socks.state) == {"CLOSE_WAIT"}
    assert set(accepted_socks.leak_class) == {"close_wait"} and accepted_socks.leak.all()
    assert sorted(accepted_socks.fd.astype(int)) == sorted(accepted["fds"])
    assert sorted(accepted_socks.rport.astype(int)) == sorted(accepted["peer_ports"])
    assert _stacks_with("accept_one", accepted_socks["stack"]) == count
    assert _stacks_with("serve_forever", accepted_socks["stack"]) == count
    # Neither the dialer nor the busy process is in the ledger.
    assert not set(report.connections.pid) & {dialer_pid, busy_pid}
    listeners = opened[opened.direction == "listen"]
    assert len(listeners) == 1 and not listeners.leak.any()
    _zero_losses(report.meta)


def test_thousands_of_short_connections_all_accounted_no_leaks(tmp_path: Path) -> None:
    n, ports = 5000, 4
    argv = [_bin("churn"), "--connections", str(n), "--ports", str(ports), "--seconds", "60"]
    with Traced([argv], tmp_path / "r", threshold_s=0.2) as t:
        churn = t.release(0)
        done = t.wait_line(0, "DONE", timeout=90)
        time.sleep(0.5)
        result = t.stop()
    assert done["connections"] == n and done["accepted"] == n
    report = load_report(result.output_dir)
    conns = report.connections[report.connections.pid == churn.pid]
    closed = conns[conns.closed_at.notna()]
    assert (closed.direction == "connect").sum() == n
    assert (closed.direction == "accept").sum() == n
    assert closed.fd_closed_by_app.all()
    assert _stacks_with("churn_connect", closed[closed.direction == "connect"]["stack"]) == n
    assert _stacks_with("churn_accept", closed[closed.direction == "accept"]["stack"]) == n
    # churn exits when done: its listeners close too, and nothing is left open.
    assert (closed.direction == "listen").sum() == ports
    assert report.open_sockets.empty
    _zero_losses(report.meta, full_churn_of=2 * n)
    activity = report.meta["extra"]["activity"]
    assert activity["connections_closed"] == 2 * n + ports


def test_ipv6_connect_and_accept(tmp_path: Path) -> None:
    count = 4
    server_argv = [
        _bin("accept_server"),
        "--port",
        "0",
        "--ipv6",
        "--count",
        str(count),
        "--hold",
        "60",
    ]
    with Traced([server_argv], tmp_path / "r", threshold_s=0.2) as t:
        server = t.release(0)
        port = int(t.wait_line(0, "READY")["port"])
        with start("dialer", "--port", str(port), "--ipv6", "--count", str(count), "--hold", "30"):
            t.wait_line(0, "ACCEPTED")
            time.sleep(0.4)
            result = t.stop()
    opened = load_report(result.output_dir).open_sockets
    acc = opened[(opened.pid == server.pid) & (opened.direction == "accept")]
    assert len(acc) == count
    assert set(acc.family) == {"ipv6"}
    assert set(acc.laddr) == {"::1"} and set(acc.raddr) == {"::1"}
    assert set(acc.lport.astype(int)) == {port}
    assert set(acc.state) == {"ESTABLISHED"}


V4_MAPPED_CLIENT = r"""
import json, socket, sys, time
ls = socket.socket(socket.AF_INET6)
ls.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
ls.bind(("::", 0)); ls.listen(8)
port = ls.getsockname()[1]
def mapped_connect():
    c = socket.socket(socket.AF_INET6)
    c.connect(("::ffff:127.0.0.1", port))
    return c
c = mapped_connect()
a, _ = ls.accept()
print("READY " + json.dumps({"port": port, "fd": c.fileno()}), flush=True)
time.sleep(30)
"""


def test_ipv4_mapped_ipv6(tmp_path: Path) -> None:
    with Traced([[sys.executable, "-c", V4_MAPPED_CLIENT]], tmp_path / "r", 0.2) as t:
        proc = t.release(0)
        ready = t.wait_line(0, "READY")
        time.sleep(0.3)
        result = t.stop()
    opened = load_report(result.output_dir).open_sockets
    mine = opened[(opened.pid == proc.pid) & (opened.direction == "connect")]
    assert len(mine) == 1
    row = mine.iloc[0]
    assert row.family == "ipv6" and int(row.fd) == ready["fd"]
    assert row.raddr in ("::ffff:127.0.0.1", "::ffff:7f00:1")
    assert int(row.rport) == ready["port"] and row.state == "ESTABLISHED"


def test_failed_connect_with_fd_still_open_is_fd_on_closed_socket(tmp_path: Path) -> None:
    with Traced([[_bin("failconnect"), "--hold", "60"]], tmp_path / "r", 0.3) as t:
        proc = t.release(0)
        ready = t.wait_line(0, "READY")
        time.sleep(0.5)
        result = t.stop()
    report = load_report(result.output_dir)
    opened = report.open_sockets[report.open_sockets.pid == proc.pid]
    assert len(opened) == 1
    row = opened.iloc[0]
    assert int(row.fd) == ready["fd"]
    assert row.state == "CLOSE" and row.leak_class == "fd_on_closed_socket" and row.leak
    assert "connect_refused" in row["stack"]


def test_process_exit_closes_its_sockets_and_ends_the_trace(tmp_path: Path) -> None:
    server_argv = [_bin("accept_server"), "--port", "0", "--count", "3", "--hold", "60"]
    with Traced([server_argv], tmp_path / "r", 0.2) as t:
        server = t.release(0)
        port = int(t.wait_line(0, "READY")["port"])
        with start("dialer", "--port", str(port), "--count", "3", "--hold", "30"):
            t.wait_line(0, "ACCEPTED")
            os.kill(server.pid, signal.SIGKILL)
            result = t.wait_for_stop(30)
    assert result.stop_reason == "all traced processes exited"
    report = load_report(result.output_dir)
    assert report.open_sockets.empty
    conns = report.connections[report.connections.pid == server.pid]
    assert len(conns) == 4  # listener + 3 accepted
    assert set(conns.close_cause) == {"exit"}
    assert conns.closed_at.notna().all()


def test_sockets_open_before_attach_are_preexisting(tmp_path: Path) -> None:
    with start("accept_server", "--port", "0", "--count", "3", "--hold", "60") as server:
        port = int(server.ready["port"])
        with start("dialer", "--port", str(port), "--count", "3", "--hold", "30"):
            accepted = server.wait_line("ACCEPTED")
            time.sleep(0.3)
            with Traced([], tmp_path / "r", 0.2, extra_pids=(server.pid,)) as t:
                time.sleep(0.5)
                result = t.stop()
    opened = load_report(result.output_dir).open_sockets
    mine = opened[opened.pid == server.pid]
    assert set(mine.direction) == {"preexisting"}
    assert set(mine.stack_status) == {"unknown"}
    assert mine.age_is_lower_bound.all()
    est = mine[mine.state == "ESTABLISHED"]
    assert sorted(est.fd.astype(int)) == sorted(accepted["fds"])
    assert (mine.state == "LISTEN").sum() == 1


FORKER = r"""
import json, os, socket, sys, time
ls = socket.socket(); ls.bind(("127.0.0.1", 0)); ls.listen(8)
port = ls.getsockname()[1]
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    c = socket.create_connection(("127.0.0.1", port))
    os.write(w, b"x")
    time.sleep(30)
    os._exit(0)
os.read(r, 1)
a, _ = ls.accept()
print("READY " + json.dumps({"child": pid}), flush=True)
time.sleep(30)
"""


def test_follow_forks_attributes_the_child(tmp_path: Path) -> None:
    with Traced([[sys.executable, "-c", FORKER]], tmp_path / "r", 0.2, follow_forks=True) as t:
        parent = t.release(0)
        child = int(t.wait_line(0, "READY")["child"])
        time.sleep(0.3)
        result = t.stop()
        os.kill(child, signal.SIGKILL)
    opened = load_report(result.output_dir).open_sockets
    assert set(opened[opened.direction == "connect"].pid) == {child}
    assert set(opened[opened.direction == "accept"].pid) == {parent.pid}
    assert set(opened[opened.direction == "listen"].pid) == {parent.pid}


CLOSE_RANGER = r"""
import json, os, socket, struct, time
ls = socket.socket(); ls.bind(("127.0.0.1", 0)); ls.listen(8)
c = socket.create_connection(ls.getsockname())
a, _ = ls.accept()
# RST on close, so the kernel destroys it at once instead of lingering in FIN_WAIT2.
c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
fd = c.detach()
print("READY " + json.dumps({"fd": fd}), flush=True)
time.sleep(0.5)
os.closerange(fd, fd + 1)  # close_range(fd, fd, 0)
print("CLOSED {}", flush=True)
time.sleep(30)
"""


def test_close_range_is_seen_as_the_app_closing_its_fd(tmp_path: Path) -> None:
    with Traced([[sys.executable, "-c", CLOSE_RANGER]], tmp_path / "r", 0.2) as t:
        proc = t.release(0)
        fd = int(t.wait_line(0, "READY")["fd"])
        t.wait_line(0, "CLOSED")
        time.sleep(0.3)
        result = t.stop()
    report = load_report(result.output_dir)
    conns = report.connections[report.connections.pid == proc.pid]
    client = conns[(conns.direction == "connect") & (conns.fd == fd)]
    assert len(client) == 1
    row = client.iloc[0]
    assert row.close_cause == "app" and bool(row.fd_closed_by_app)
    assert not pd.isna(row.closed_at)


def test_kernel_stacks_are_appended_innermost_last(tmp_path: Path) -> None:
    argv = [_bin("failconnect"), "--hold", "60"]
    with Traced([argv], tmp_path / "r", 0.2, kernel_stacks=True) as t:
        proc = t.release(0)
        t.wait_line(0, "READY")
        time.sleep(0.3)
        result = t.stop()
    opened = load_report(result.output_dir).open_sockets
    (stack,) = opened[opened.pid == proc.pid]["stack"]
    frames = stack.split(";")
    kernel = [f for f in frames if f.startswith("[k] ")]
    assert kernel and frames[-len(kernel) :] == kernel  # kernel frames come last
    assert any("connect" in f for f in kernel), kernel
    assert "connect_refused" in stack
