"""Memory per traced process is given back when the process exits (issue 7).

bcc keeps a native symbol cache per pid it ever symbolized (about 0.5 MB each)
for the life of the tracer. The soak (--follow-forks over a service that starts
a process every few seconds) grew ~470 MB/h until Capture.forget_process freed
it at each exit. Checked here on the real Capture with real processes.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from tcptrace.probes import Capture, CaptureConfig
from tcptrace.workloads.build import build

pytestmark = pytest.mark.usefixtures("root")


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _libc_address(pid: int) -> int:
    """An address in libc's text of `pid`, once the dynamic loader has mapped it."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
            if "libc.so" in line and " r-xp " in line:
                return int(line.split("-", 1)[0], 16) + 0x1000
        time.sleep(0.005)
    raise AssertionError(f"no libc text mapping in pid {pid}")


def test_symbol_caches_of_exited_processes_are_freed() -> None:
    import bcc

    dialer = str(build("dialer"))
    with Capture(CaptureConfig(pids=(os.getpid(),))) as cap:
        def one_process() -> None:
            proc = subprocess.Popen([dialer, "--port", "1", "--count", "0", "--hold", "30"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                name, _module = cap.symbolize(_libc_address(proc.pid), proc.pid)
                assert name != "[unknown]"  # a real lookup: the cache was really built
                assert proc.pid in bcc.BPF._sym_caches
            finally:
                proc.kill()
                proc.wait()
            cap.forget_process(proc.pid)
            assert proc.pid not in bcc.BPF._sym_caches

        for _ in range(10):  # warm up allocator arenas and bcc's own caches
            one_process()
        before = _rss_mb()
        for _ in range(60):
            one_process()
        grown = _rss_mb() - before
    # Without the free: ~0.5 MB per process, ~30 MB here.
    assert grown < 8, f"RSS grew {grown:.1f} MB over 60 processes"
