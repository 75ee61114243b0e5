"""Helpers of the issue 7 tests: run the real `tcptrace` CLI as a user would.

Every helper cleans up after itself: CLI processes are killed in `finally`,
tmpfs mounts are unmounted, and BPF object ids of a tcptrace process can be
listed (from /proc/PID/fdinfo) and checked gone after it exits.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TCPTRACE = str(Path(sys.executable).with_name("tcptrace"))
BPFTOOL = "bpftool"


@dataclass
class Done:
    """A finished CLI run."""

    returncode: int
    stdout: str
    stderr: str

    def one_line_error(self) -> str:
        """The single stderr line of a refused run (fails the test if there are more)."""
        lines = [line for line in self.stderr.splitlines() if line.strip()]
        assert len(lines) == 1, f"expected one stderr line, got {self.stderr!r}"
        assert "Traceback" not in self.stderr
        return lines[0]


def run_cli(
    args: Sequence[str],
    env: Mapping[str, str] | None = None,
    timeout: float = 120,
    prefix: Sequence[str] = (),
) -> Done:
    proc = subprocess.run(
        [*prefix, TCPTRACE, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        stdin=subprocess.DEVNULL,
    )
    return Done(proc.returncode, proc.stdout, proc.stderr)


@dataclass
class CliTrace:
    """A running `tcptrace` CLI whose output lines can be waited for."""

    args: Sequence[str]
    env: Mapping[str, str] | None = None
    proc: subprocess.Popen[str] | None = None
    out: list[str] = field(default_factory=list)
    err: list[str] = field(default_factory=list)
    _cond: threading.Condition = field(default_factory=threading.Condition)
    _threads: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> CliTrace:
        self.proc = subprocess.Popen(
            [TCPTRACE, *self.args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            env={**os.environ, **(self.env or {})},
        )
        for stream, sink in ((self.proc.stdout, self.out), (self.proc.stderr, self.err)):
            thread = threading.Thread(target=self._read, args=(stream, sink), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def _read(self, stream: Any, sink: list[str]) -> None:
        for line in stream:
            with self._cond:
                sink.append(line.rstrip("\n"))
                self._cond.notify_all()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def wait_for(self, needle: str, timeout: float = 60, stream: str = "out") -> str:
        """Wait until a line of stdout ("out") or stderr ("err") contains `needle`."""
        lines = self.out if stream == "out" else self.err
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in lines:
                    if needle in line:
                        return line
                assert self.proc is not None
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise AssertionError(
                        f"no {needle!r} on std{stream} within {timeout}s (exit"
                        f" {self.proc.poll()}):\nstdout: {self.out}\nstderr: {self.err}"
                    )
                self._cond.wait(min(left, 0.2))

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 60) -> Done:
        assert self.proc is not None
        code = self.proc.wait(timeout)
        for thread in self._threads:
            thread.join(5)
        return Done(code, "\n".join(self.out), "\n".join(self.err))

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@contextlib.contextmanager
def tmpfs(path: Path, size: str, read_only: bool = False) -> Iterator[Path]:
    """A tmpfs of `size` mounted at `path` for the duration of the block."""
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size},mode=0755" + (",ro" if read_only else "")
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(directory: Path) -> None:
    """Write into `directory` until its file system says ENOSPC."""
    with contextlib.suppress(OSError), open(directory / "filler", "wb") as handle:
        while True:
            handle.write(b"\0" * 65536)
            handle.flush()


@dataclass(frozen=True)
class BpfIds:
    progs: frozenset[int]
    maps: frozenset[int]
    links: frozenset[int]

    def __bool__(self) -> bool:
        return bool(self.progs or self.maps or self.links)


def bpf_ids_of(pid: int) -> BpfIds:
    """BPF programs, maps and links a process holds, from its fdinfo."""
    found: dict[str, set[int]] = {"prog_id": set(), "map_id": set(), "link_id": set()}
    fd_dir = Path(f"/proc/{pid}/fdinfo")
    for entry in fd_dir.iterdir():
        try:
            text = entry.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            key, _, value = line.partition(":")
            if key in found:
                found[key].add(int(value.strip()))
    return BpfIds(
        frozenset(found["prog_id"]), frozenset(found["map_id"]), frozenset(found["link_id"])
    )


def bpf_ids_alive(ids: BpfIds) -> BpfIds:
    """Which of `ids` the kernel still has (bpftool show id N fails once freed)."""

    def alive(kind: str, ident: int) -> bool:
        return (
            subprocess.run(
                [BPFTOOL, kind, "show", "id", str(ident)], capture_output=True, check=False
            ).returncode
            == 0
        )

    return BpfIds(
        frozenset(i for i in ids.progs if alive("prog", i)),
        frozenset(i for i in ids.maps if alive("map", i)),
        frozenset(i for i in ids.links if alive("link", i)),
    )


def wait_bpf_gone(ids: BpfIds, timeout: float = 10) -> BpfIds:
    """Poll until none of `ids` exists (the kernel frees after an RCU grace period)."""
    deadline = time.monotonic() + timeout
    left = bpf_ids_alive(ids)
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = bpf_ids_alive(left)
    return left


def tracefs_probe_entries(pid: int) -> list[str]:
    """kprobe/uprobe events bcc would have created for `pid` (named ..._bcc_PID)."""
    found = []
    for name in ("kprobe_events", "uprobe_events"):
        path = Path("/sys/kernel/tracing") / name
        with contextlib.suppress(OSError):
            found += [line for line in path.read_text().splitlines() if f"bcc_{pid}" in line]
    events = Path("/sys/kernel/tracing/events")
    with contextlib.suppress(OSError):
        found += [p.name for p in events.iterdir() if f"bcc_{pid}" in p.name]
    return found


def meta_of(report_dir: Path) -> dict[str, Any]:
    value = json.loads((report_dir / "meta.json").read_text())
    assert isinstance(value, dict)
    return value


def kill_quietly(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
