"""The workload programs: they build, set up exactly the sockets they claim, and stop by themselves.

No root needed: socket states are read from /proc/<pid>/fd and /proc/<pid>/net/tcp{,6}.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tcptrace.errors import TcptraceError
from tcptrace.workloads import build as wl
from tcptrace.workloads.build import (
    PROGRAMS,
    RunningWorkload,
    WorkloadBuildError,
    WorkloadStartError,
    build,
    start,
)

# Function names the kernel tests assert on in stack traces.
STACK_NAMES: dict[str, tuple[str, ...]] = {
    "leakydemo": ("main.leakyDial", "main.properDial", "main.handleLeaky", "main.serveLeaky"),
    "accept_server": ("accept_one", "serve_forever"),
    "dialer": ("dial_one", "dial_all", "close_held"),
    "failconnect": ("connect_refused",),
    "churn": ("churn_connect", "churn_accept"),
    "busy": ("burn_cpu",),
}

TCP_STATES = {
    "01": "ESTABLISHED",
    "02": "SYN_SENT",
    "03": "SYN_RECV",
    "04": "FIN_WAIT1",
    "05": "FIN_WAIT2",
    "06": "TIME_WAIT",
    "07": "CLOSE",
    "08": "CLOSE_WAIT",
    "09": "LAST_ACK",
    "0A": "LISTEN",
    "0B": "CLOSING",
}


@dataclass(frozen=True)
class Sock:
    fd: int
    state: str  # a TCP_STATES value, or "UNHASHED" for a socket in no TCP table (CLOSED)
    local_port: int
    remote_port: int


def process_sockets(pid: int) -> list[Sock]:
    """The TCP sockets the process holds fds for, with their states."""
    inode_fd: dict[int, int] = {}
    fd_dir = f"/proc/{pid}/fd"
    for name in os.listdir(fd_dir):
        try:
            target = os.readlink(f"{fd_dir}/{name}")
        except FileNotFoundError:
            continue
        m = re.fullmatch(r"socket:\[(\d+)\]", target)
        if m:
            inode_fd[int(m.group(1))] = int(name)
    table: dict[int, tuple[str, int, int]] = {}
    for proto in ("tcp", "tcp6"):
        try:
            text = Path(f"/proc/{pid}/net/{proto}").read_text()
        except FileNotFoundError:
            continue
        for line in text.splitlines()[1:]:
            f = line.split()
            inode = int(f[9])
            if inode:
                lport = int(f[1].rsplit(":", 1)[1], 16)
                rport = int(f[2].rsplit(":", 1)[1], 16)
                table[inode] = (TCP_STATES[f[3]], lport, rport)
    socks = []
    for inode, fd in inode_fd.items():
        state, lport, rport = table.get(inode, ("UNHASHED", 0, 0))
        socks.append(Sock(fd, state, lport, rport))
    return sorted(socks, key=lambda s: s.fd)


def conns(pid: int) -> list[Sock]:
    """Non-listening TCP sockets of `pid`."""
    return [s for s in process_sockets(pid) if s.state != "LISTEN"]


# Generous: a sock_diag dump slows with every socket on the host (78k TIME_WAIT
# sockets of a soak made these time out at 5 s); a passing check returns at once.
def wait_for(what: str, check: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def children_of(pid: int) -> list[int]:
    kids: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError):
            kids += [int(x) for x in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
    return kids


def exits_by_itself(w: RunningWorkload, started: float, hold: float, slack: float = 3.0) -> None:
    """The process ends on its own, with status 0, not before `hold` and soon after it."""
    rc = w.wait(timeout=max(0.0, started + hold + slack - time.monotonic()))
    elapsed = time.monotonic() - started
    assert rc == 0, w.stderr_text()
    assert elapsed >= hold * 0.9, f"exited after {elapsed:.2f}s, before its {hold}s hold"


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


FAMILIES = [
    pytest.param(False, id="ipv4"),
    pytest.param(
        True,
        id="ipv6",
        marks=pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback (::1) here"),
    ),
]


@pytest.fixture(autouse=True, scope="module")
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Build into a fresh cache so the tests exercise a real, cold build."""
    root = tmp_path_factory.mktemp("tcptrace-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TCPTRACE_CACHE", str(root))
        yield root


# ---------------------------------------------------------------- build


def _nm_names(binary: Path) -> set[str]:
    out = subprocess.run(["nm", str(binary)], capture_output=True, text=True, check=True).stdout
    return {line.split()[-1] for line in out.splitlines() if line.strip()}


@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_build_every_program(name: str, _private_cache: Path) -> None:
    binary = build(name)
    assert binary.is_file() and os.access(binary, os.X_OK)
    assert binary.name == name
    assert binary.is_relative_to(_private_cache / "workloads")
    assert binary.read_bytes()[:4] == b"\x7fELF"
    # Reused, not rebuilt, when the sources are unchanged.
    mtime = binary.stat().st_mtime_ns
    assert build(name) == binary
    assert binary.stat().st_mtime_ns == mtime
    # Symbols and DWARF are kept (no -s -w, no strip) and the sources kept for DWARF paths.
    if shutil.which("nm"):
        names = _nm_names(binary)
        for fn in STACK_NAMES[name]:
            assert fn in names, f"{fn} missing from {binary}"
    if shutil.which("readelf"):
        sections = subprocess.run(
            ["readelf", "-S", "--wide", str(binary)], capture_output=True, text=True, check=True
        ).stdout
        assert ".debug_info" in sections and ".debug_line" in sections
    src = binary.parent / f"{name}-src" / PROGRAMS[name].sources[0]
    assert src.is_file()


@pytest.mark.skipif(not shutil.which("objdump"), reason="objdump (binutils) not installed")
@pytest.mark.parametrize("name", sorted(n for n, p in PROGRAMS.items() if p.lang == "c"))
def test_c_functions_keep_frame_pointers(name: str) -> None:
    binary = build(name)
    for fn in STACK_NAMES[name]:
        out = subprocess.run(
            ["objdump", "-d", f"--disassemble={fn}", str(binary)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        # "push %rbp; mov %rsp,%rbp" (possibly shrink-wrapped past an early return).
        insns = [line.split("\t")[-1].split() for line in out.split(f"<{fn}>:", 1)[1].splitlines()]
        pairs = list(itertools.pairwise(insns))
        assert (["push", "%rbp"], ["mov", "%rsp,%rbp"]) in pairs, (fn, out)


def test_build_into_out_dir_rebuilds_on_stale_key(tmp_path: Path) -> None:
    binary = build("busy", out_dir=tmp_path)
    assert binary == tmp_path / "busy"
    key = (tmp_path / "busy.key").read_text().strip()
    assert len(key) == 64
    assert build("busy", out_dir=tmp_path) == binary
    (tmp_path / "busy.key").write_text("stale\n")
    binary.write_bytes(b"not a program")
    assert build("busy", out_dir=tmp_path) == binary
    assert binary.read_bytes()[:4] == b"\x7fELF"
    assert (tmp_path / "busy.key").read_text().strip() == key


def test_build_unknown_name() -> None:
    with pytest.raises(WorkloadBuildError) as ei:
        build("nosuchprogram")
    assert isinstance(ei.value, TcptraceError)
    assert "leakydemo" in ei.value.hint


def test_build_error_carries_compiler_stderr(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = tmp_path / "fakecc"
    fake.write_text("#!/bin/sh\necho 'dialer.c:1: error: boom from the compiler' >&2\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    with pytest.raises(WorkloadBuildError) as ei:
        build("dialer", out_dir=tmp_path / "out")
    assert "boom from the compiler" in ei.value.stderr
    assert "boom from the compiler" in str(ei.value)
    assert "exit 3" in str(ei.value)
    assert not (tmp_path / "out" / "dialer").exists()


def test_build_without_c_compiler_gives_a_hint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = tmp_path / "empty-path"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.delenv("CC", raising=False)
    with pytest.raises(WorkloadBuildError) as ei:
        build("churn", out_dir=tmp_path / "out")
    assert "gcc" in ei.value.hint


def test_cache_root_follows_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TCPTRACE_CACHE", str(tmp_path / "c"))
    assert wl.cache_root() == tmp_path / "c" / "workloads"
    monkeypatch.delenv("TCPTRACE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert wl.cache_root() == tmp_path / "x" / "tcptrace" / "workloads"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert wl.cache_root() == Path.home() / ".cache" / "tcptrace" / "workloads"


def test_line_reader_hands_out_tagged_lines_in_any_order() -> None:
    reader = wl._LineReader(io.StringIO('READY {"a":1}\nDONE {"n":2}\nCLOSED {"c":3}\n'))
    deadline = time.monotonic() + 5
    assert reader.take("CLOSED", deadline) == 'CLOSED {"c":3}'
    assert reader.take("READY", deadline) == 'READY {"a":1}'
    assert reader.take("DONE", deadline) == 'DONE {"n":2}'
    assert reader.take("DONE", deadline) is None  # EOF, each line is handed out once
    assert reader.join(5)
    assert reader.snapshot() == ['READY {"a":1}', 'DONE {"n":2}', 'CLOSED {"c":3}']


# ---------------------------------------------------------------- leakydemo


@pytest.mark.parametrize("ipv6", FAMILIES)
def test_leakydemo_client_leaks_exactly_n_and_server_ends_in_close_wait(ipv6: bool) -> None:
    listen = "[::1]:0" if ipv6 else "127.0.0.1:0"
    # Long enough for a few sock_diag dumps, which take ~2 s on a host with 80k sockets.
    server_hold, client_hold = 8.0, 4.0
    t_server = time.monotonic()
    with start("leakydemo", "server", "--listen", listen, "--hold", f"{server_hold}s") as server:
        assert server.ready["pid"] == server.pid
        port = server.ready["port"]
        assert port > 0
        assert server.ready["addr"] == (f"[::1]:{port}" if ipv6 else f"127.0.0.1:{port}")
        assert [s.local_port for s in process_sockets(server.pid) if s.state == "LISTEN"] == [port]

        t_client = time.monotonic()
        with start(
            "leakydemo", "client", "--addr", server.ready["addr"], "--leak", "3", "--ok", "2",
            "--hold", f"{client_hold}s",
        ) as client:  # fmt: skip
            leaked = set(client.ready["leaked_local_ports"])
            ok = set(client.ready["ok_local_ports"])
            assert client.ready["leaked"] == 3 and len(leaked) == 3
            assert client.ready["ok"] == 2 and len(ok) == 2
            held = conns(client.pid)
            assert [s.state for s in held] == ["ESTABLISHED"] * 3
            assert {s.local_port for s in held} == leaked
            assert {s.remote_port for s in held} == {port}
            assert children_of(client.pid) == []

            # Server side: the leaked ones are ESTABLISHED, the closed ones sit in CLOSE_WAIT.
            def server_view() -> dict[int, str]:
                return {s.remote_port: s.state for s in conns(server.pid)}

            want = {p: "ESTABLISHED" for p in leaked} | {p: "CLOSE_WAIT" for p in ok}
            wait_for("server sockets 3 ESTABLISHED + 2 CLOSE_WAIT", lambda: server_view() == want)
            exits_by_itself(client, t_client, client_hold)

        # The client is gone: all five accepted sockets stay open on the server, in CLOSE_WAIT.
        wait_for(
            "all server sockets in CLOSE_WAIT",
            lambda: server_view() == {p: "CLOSE_WAIT" for p in leaked | ok},
        )
        assert children_of(server.pid) == []
        exits_by_itself(server, t_server, server_hold)


def test_leakydemo_close_leaked_after_and_sigterm() -> None:
    with start("leakydemo", "server", "--listen", "127.0.0.1:0", "--hold", "5s") as server:
        with start(
            "leakydemo", "client", "--addr", server.ready["addr"], "--leak", "2", "--ok", "0",
            "--hold", "30s", "--close-leaked-after", "300ms",
        ) as client:  # fmt: skip
            assert len(conns(client.pid)) == 2
            closed = client.wait_line("CLOSED", timeout=5)
            assert closed == {"pid": client.pid, "closed": 2}
            assert conns(client.pid) == []
            t0 = time.monotonic()
            assert client.stop() == 0  # SIGTERM: prompt, clean exit
            assert time.monotonic() - t0 < 2.0
        t0 = time.monotonic()
        assert server.stop() == 0
        assert time.monotonic() - t0 < 2.0


@pytest.mark.parametrize(
    "args",
    [
        ["server", "--listen", "10.0.0.1:0"],
        ["client", "--addr", "192.0.2.1:80", "--leak", "1"],
        ["client", "--addr", "localhost:80", "--leak", "1"],
        ["server", "--listen", "127.0.0.1:0", "--hold", "11m"],
        ["client", "--addr", "127.0.0.1:1", "--leak", "10001"],
    ],
)
def test_leakydemo_refuses_non_loopback_and_unbounded(args: list[str]) -> None:
    res = subprocess.run([str(build("leakydemo")), *args], capture_output=True, timeout=10)
    assert res.returncode == 2
    assert b"READY" not in res.stdout


# ---------------------------------------------------------------- accept_server + dialer


@pytest.mark.parametrize("ipv6", FAMILIES)
def test_accept_server_keeps_accepted_fds_and_dialer_closes_on_usr1(ipv6: bool) -> None:
    fam = ["--ipv6"] if ipv6 else []
    hold = 6.0  # through a few sock_diag dumps (~2 s each with 80k sockets on the host)
    t0 = time.monotonic()
    with start("accept_server", "--port", "0", "--count", "3", "--hold", str(hold), *fam) as srv:
        port = srv.ready["port"]
        assert srv.ready["family"] == ("ipv6" if ipv6 else "ipv4")
        assert srv.ready["count"] == 3
        with start("dialer", "--port", str(port), "--count", "3", "--hold", "10", *fam) as dialer:
            assert dialer.ready["closed"] is False
            local_ports = dialer.ready["local_ports"]
            assert len(set(local_ports)) == 3
            held = conns(dialer.pid)
            assert [s.fd for s in held] == dialer.ready["fds"]
            assert all(s.state == "ESTABLISHED" and s.remote_port == port for s in held)

            acc = srv.wait_line("ACCEPTED", timeout=5)
            assert acc["accepted"] == 3
            assert sorted(acc["peer_ports"]) == sorted(local_ports)
            socks = {s.fd: s for s in conns(srv.pid)}
            assert sorted(socks) == sorted(acc["fds"])
            assert {s.state for s in socks.values()} == {"ESTABLISHED"}

            # The test decides when the peer closes: SIGUSR1.
            os.kill(dialer.pid, signal.SIGUSR1)
            assert dialer.wait_line("CLOSED", timeout=5)["closed"] == 3
            assert conns(dialer.pid) == []
            wait_for(
                "accepted sockets in CLOSE_WAIT",
                lambda: [s.state for s in conns(srv.pid)] == ["CLOSE_WAIT"] * 3,
            )
            assert dialer.stop() == 0
        exits_by_itself(srv, t0, hold)


def test_dialer_close_modes() -> None:
    with start("accept_server", "--port", "0", "--count", "4", "--hold", "6") as srv:
        port = str(srv.ready["port"])
        t0 = time.monotonic()
        with start("dialer", "--port", port, "--count", "2", "--close", "--hold", "0.5") as d1:
            assert d1.ready["closed"] is True
            assert d1.ready["fds"] == []
            assert conns(d1.pid) == []
            exits_by_itself(d1, t0, 0.5)
        t0 = time.monotonic()
        with start(
            "dialer", "--port", port, "--count", "2", "--close-after-ready", "--hold", "0.5",
            "--delay-ms", "50",
        ) as d2:  # fmt: skip
            assert len(d2.ready["fds"]) == 2
            assert d2.wait_line("CLOSED", timeout=5)["closed"] == 2
            assert time.monotonic() - t0 >= 0.05  # the dials were spaced out
            exits_by_itself(d2, t0, 0.5)
        assert srv.wait_line("ACCEPTED", timeout=5)["accepted"] == 4
        wait_for(
            "4 CLOSE_WAIT sockets on the server",
            lambda: [s.state for s in conns(srv.pid)] == ["CLOSE_WAIT"] * 4,
        )


def test_dialer_fails_without_listener_and_start_cleans_up() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free_port = s.getsockname()[1]
    with pytest.raises(WorkloadStartError) as ei:
        start("dialer", "--port", str(free_port), "--count", "1")
    assert "Connection refused" in ei.value.stderr
    assert ei.value.pid is not None
    assert not Path(f"/proc/{ei.value.pid}").exists()


def test_start_times_out_and_kills_the_process() -> None:
    with start("accept_server", "--port", "0", "--count", "5", "--hold", "10") as srv:
        t0 = time.monotonic()
        with pytest.raises(WorkloadStartError) as ei:
            # READY comes only after 3 dials 1 s apart: later than the timeout.
            start(
                "dialer", "--port", str(srv.ready["port"]), "--count", "3", "--delay-ms", "1000",
                timeout=0.5,
            )  # fmt: skip
        assert time.monotonic() - t0 < 3.0
        assert "no READY line" in str(ei.value)
        assert ei.value.pid is not None
        assert not Path(f"/proc/{ei.value.pid}").exists()


# ---------------------------------------------------------------- failconnect


@pytest.mark.parametrize("ipv6", FAMILIES)
def test_failconnect_keeps_a_socket_fd_that_never_connected(ipv6: bool) -> None:
    hold = 4.0  # alive through a sock_diag dump even on a host with many sockets
    t0 = time.monotonic()
    fam = ["--ipv6"] if ipv6 else []
    with start("failconnect", "--hold", str(hold), *fam) as fc:
        r = fc.ready
        assert r["errno"] == 111 and r["error"] == "ECONNREFUSED"
        assert r["fds"] == [r["fd"]]
        fd_link = os.readlink(f"/proc/{fc.pid}/fd/{r['fd']}")
        assert re.fullmatch(r"socket:\[\d+\]", fd_link)
        # A TCP socket (SOCK_STREAM) whose connect failed: open fd, in no TCP table (CLOSED).
        [sock] = [s for s in process_sockets(fc.pid) if s.fd == r["fd"]]
        assert sock.state == "UNHASHED"
        fdinfo = Path(f"/proc/{fc.pid}/fdinfo/{r['fd']}").read_text()
        assert "flags:" in fdinfo
        # Really nothing listens on that port.
        with (
            socket.socket(socket.AF_INET6 if ipv6 else socket.AF_INET) as s,
            pytest.raises(ConnectionRefusedError),
        ):
            s.connect(("::1" if ipv6 else "127.0.0.1", r["port"]))
        exits_by_itself(fc, t0, hold)


# ---------------------------------------------------------------- churn


@pytest.mark.parametrize("rst", [False, True], ids=["fin", "rst"])
def test_churn_completes_n_connections(rst: bool) -> None:
    args = ["--connections", "2000", "--ports", "4", "--seconds", "30"]
    with start("churn", *args, *(["--rst"] if rst else [])) as ch:
        assert len(ch.ready["ports"]) == 4
        assert ch.ready["connections"] == 2000 and ch.ready["rst"] is rst
        done = ch.wait_line("DONE", timeout=30)
        assert done["connections"] == 2000
        assert done["accepted"] == 2000
        assert done["failed"] == 0
        assert done["seconds"] > 0
        # "seconds" is printed to the millisecond: compare the time, not the rate.
        assert 2000 / done["rate"] == pytest.approx(done["seconds"], abs=0.0011)
        assert ch.wait(timeout=5) == 0


def test_churn_paces_itself_with_rate() -> None:
    with start("churn", "--connections", "300", "--rate", "1000/s", "--threads", "2") as ch:
        done = ch.wait_line("DONE", timeout=10)
        assert done["connections"] == 300
        assert 0.28 <= done["seconds"] < 1.5
        assert done["rate"] <= 1100
        assert ch.wait(timeout=5) == 0


def test_churn_stops_on_seconds_and_on_sigterm() -> None:
    t0 = time.monotonic()
    with start("churn", "--seconds", "0.5", "--rate", "200") as ch:
        done = ch.wait_line("DONE", timeout=5)
        assert 0.45 <= done["seconds"] <= 1.0
        assert 80 <= done["connections"] <= 110
        assert ch.wait(timeout=5) == 0
    assert time.monotonic() - t0 < 3.0
    with start("churn", "--seconds", "60", "--rate", "100", "--threads", "2") as ch:
        time.sleep(0.3)
        assert len(children_of(ch.pid)) == 0
        t0 = time.monotonic()
        assert ch.stop() == 0
        assert time.monotonic() - t0 < 2.0
        done_lines = [line for line in ch.lines if line.startswith("DONE ")]
        assert len(done_lines) == 1


# ---------------------------------------------------------------- busy


def test_busy_burns_pinned_cpu_and_exits() -> None:
    cpu = max(os.sched_getaffinity(0))
    hold = 1.0
    t0 = time.monotonic()
    with start("busy", "--seconds", str(hold), "--cpu", str(cpu)) as b:
        assert b.ready["cpu"] == cpu
        status = Path(f"/proc/{b.pid}/status").read_text()
        assert re.search(rf"^Cpus_allowed_list:\s+{cpu}$", status, re.M)
        ticks0 = int(Path(f"/proc/{b.pid}/stat").read_text().rsplit(")", 1)[1].split()[11])
        time.sleep(0.5)
        ticks1 = int(Path(f"/proc/{b.pid}/stat").read_text().rsplit(")", 1)[1].split()[11])
        hz = os.sysconf("SC_CLK_TCK")
        assert (ticks1 - ticks0) / hz >= 0.15  # user CPU time while we slept 0.5 s
        done = b.wait_line("DONE", timeout=hold + 3)
        assert done["iterations"] > 0
        exits_by_itself(b, t0, hold)


# ---------------------------------------------------------------- limits


@pytest.mark.parametrize(
    ("name", "args"),
    [
        ("accept_server", ["--port", "0", "--hold", "601"]),
        ("dialer", ["--port", "1", "--hold", "11m"]),
        ("failconnect", ["--hold", "700s"]),
        ("busy", ["--seconds", "601"]),
        ("churn", ["--seconds", "601"]),
        ("churn", ["--ports", "65"]),
        ("dialer", ["--port", "1", "--count", "10001"]),
    ],
)
def test_c_programs_enforce_limits(name: str, args: list[str]) -> None:
    res = subprocess.run([str(build(name)), *args], capture_output=True, timeout=10)
    assert res.returncode == 2, res.stderr
    assert b"READY" not in res.stdout
