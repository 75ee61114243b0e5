"""After tcptrace exits, by any path including SIGKILL, none of its BPF programs,
maps, links or probes is left in the kernel.

tcptrace attaches through file descriptors only (raw tracepoint links and perf
events holding the programs), so the kernel releases everything when the process
dies, whatever kills it. The test records the ids of every BPF object the real
CLI process holds (from /proc/PID/fdinfo), ends it, and asks the kernel
(`bpftool prog|map|link show id N`) for each of them again; tracefs must hold no
kprobe/uprobe event created for that pid.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kernel.trust import (
    BpfIds,
    CliTrace,
    bpf_ids_alive,
    bpf_ids_of,
    kill_quietly,
    tracefs_probe_entries,
    wait_bpf_gone,
)

pytestmark = pytest.mark.usefixtures("root")


@pytest.fixture
def target() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(["sleep", "300"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def _attached_ids(trace: CliTrace) -> BpfIds:
    trace.wait_for("probes attached")
    ids = bpf_ids_of(trace.pid)
    # What "ours" means: the programs, maps and raw tracepoint links of the probe set.
    assert len(ids.progs) >= 5 and len(ids.maps) >= 5 and ids.links, ids
    assert bpf_ids_alive(ids) == ids  # sanity: the kernel lists them while we run
    return ids


def _assert_clean(ids: BpfIds, pid: int) -> None:
    left = wait_bpf_gone(ids)
    assert not left, f"left in the kernel after tcptrace {pid} exited: {left}"
    assert tracefs_probe_entries(pid) == []


@pytest.mark.parametrize("how", ["SIGKILL", "SIGINT", "SIGTERM", "duration", "target-exit"])
def test_nothing_left_after_exit(
    tmp_path: Path, target: subprocess.Popen[bytes], how: str
) -> None:
    args = ["--pid", str(target.pid), "--output", str(tmp_path / "r")]
    if how == "duration":
        args += ["--duration", "3s"]
    with CliTrace(args) as trace:
        ids = _attached_ids(trace)
        if how in ("SIGKILL", "SIGINT", "SIGTERM"):
            trace.signal(getattr(signal, how))
        elif how == "target-exit":
            target.kill()
        done = trace.wait(60)
    expected = -signal.SIGKILL if how == "SIGKILL" else 0
    assert done.returncode == expected, done.stderr
    _assert_clean(ids, trace.pid)
    if how != "SIGKILL":
        assert (tmp_path / "r" / "meta.json").is_file()


def test_nothing_left_after_sigkill_during_the_compile(
    tmp_path: Path, target: subprocess.Popen[bytes]
) -> None:
    """Killed while bcc loads programs: whatever it had loaded goes too."""
    with CliTrace(["--pid", str(target.pid), "--output", str(tmp_path / "r")]) as trace:
        trace.wait_for("compiling and loading BPF programs...", stream="err")
        # Kill as soon as the first BPF object exists: mid-load.
        deadline = time.monotonic() + 30
        ids = bpf_ids_of(trace.pid)
        while not ids and time.monotonic() < deadline:
            ids = bpf_ids_of(trace.pid)
        kill_quietly(trace.pid)
        done = trace.wait(30)
    assert ids, "the compile never created a BPF object"
    assert done.returncode == -signal.SIGKILL
    _assert_clean(ids, trace.pid)
