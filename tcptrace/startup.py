"""Start-up of a trace, made safe to interrupt and quick to fail (issue 7).

Three things happen before the first event is traced, and each can go wrong
in front of a user on a production host:

1. Checks, in the order that tells the user the most (`preflight`): privileges,
   the targets (and their start times, so a reused pid is noticed later), the
   probe set, the kernel's BTF, then the report directory (created, then
   written to for real, because only a write sees a full file system). Each
   failure is a typed error with its own exit code; nothing is left behind (a
   report directory we created is removed again when start-up fails).
2. Compiling and loading the BPF programs, which takes bcc (clang) about a
   second here and several on a loaded host. It runs in a worker thread so the
   main thread can show a progress line and answer SIGINT/SIGTERM at once
   (`Preflight.start_capture`). A stop that arrives before or during the
   compile yields `NotAttached`, a capture that saw nothing: the tracer then
   writes a complete report (the sockets open before tracing, from the
   snapshot) with a loss counter that says the probes never ran.
Signals that arrive before the tracer installs its own handlers are caught by
tcptrace.interrupts.SignalLatch and handed to the trace's stop flag.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TextIO

import numpy as np

from tcptrace.btf import KernelOffsets, kernel_offsets
from tcptrace.events import RECORD_DTYPE, KernelStat
from tcptrace.fileio import prepare_output_dir, probe_writable
from tcptrace.system import (
    ProcessInfo,
    ProcessWatch,
    choose_probe_set,
    require_privileges,
    validate_targets,
)

if TYPE_CHECKING:
    from tcptrace.probes import Capture, CaptureConfig

# Loss counter of a trace stopped before its probes were attached: whatever the
# report holds came from the start-up snapshot, not from tracing.
NOT_ATTACHED_COUNTER = "probes_not_attached"


class StopLike(Protocol):
    """What start-up needs of the tracer's StopFlag (kept structural: no import cycle)."""

    def is_set(self) -> bool: ...

    def set(self, reason: str) -> None: ...


class OptionsLike(Protocol):
    @property
    def pids(self) -> tuple[int, ...]: ...

    @property
    def probes(self) -> str: ...

    @property
    def output_dir(self) -> Path: ...

    @property
    def force(self) -> bool: ...


# -- the progress line ----------------------------------------------------------


class Progress:
    """One line on stderr while something slow happens, so nobody thinks we hung.

    On a terminal the line is redrawn in place with the elapsed time; elsewhere
    (logs, pipes, tests) it is printed once at the start, every `still_every_s`
    while it lasts, and once at the end, so a log shows where the time went.
    """

    def __init__(
        self,
        stream: TextIO | None = None,
        enabled: bool = True,
        still_every_s: float = 5.0,
    ) -> None:
        self._stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self._tty = _isatty(self._stream)
        self._still_every_s = still_every_s
        self._what = ""
        self._t0 = 0.0
        self._next_still = 0.0

    def begin(self, what: str) -> None:
        self._what, self._t0 = what, time.monotonic()
        self._next_still = self._t0 + self._still_every_s
        if self._tty:
            self._draw(f"tcptrace: {what}... 0.0s")
        else:
            self._line(f"tcptrace: {what}...")

    def tick(self) -> None:
        elapsed = time.monotonic() - self._t0
        if self._tty:
            self._draw(f"tcptrace: {self._what}... {elapsed:.1f}s")
        elif time.monotonic() >= self._next_still:
            self._next_still += self._still_every_s
            self._line(f"tcptrace: still {self._what}... {elapsed:.0f}s")

    def end(self, outcome: str) -> float:
        """Finish the line with `outcome`, which may use {elapsed} (seconds, 2 decimals)."""
        elapsed = time.monotonic() - self._t0
        text = "tcptrace: " + outcome.format(elapsed=f"{elapsed:.2f}s")
        if self._tty:
            self._draw(text)
            self._write("\n")
        else:
            self._line(text)
        return elapsed

    @contextmanager
    def phase(self, what: str) -> Iterator[None]:
        """begin/end around a block; the outcome says how the block left."""
        self.begin(what)
        outcome = f"{what}: failed after {{elapsed}}"
        try:
            yield
            outcome = f"{what}: done in {{elapsed}}"
        finally:
            self.end(outcome)

    def _draw(self, text: str) -> None:
        self._write("\r\x1b[K" + text)

    def _line(self, text: str) -> None:
        self._write(text + "\n")

    def _write(self, text: str) -> None:
        if not self.enabled:
            return
        try:
            self._stream.write(text)
            self._stream.flush()
        except (OSError, ValueError):
            self.enabled = False  # stderr closed or a broken pipe: tracing goes on


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


# -- a capture that never attached ----------------------------------------------


class NotAttached:
    """Stands in for a Capture when a stop came before the probes were attached.

    It sees nothing and says so through one loss counter. If the compile was
    already running, `close()` waits for it and unloads what it loaded, so a
    stopped start-up leaves no program behind even while tcptrace keeps running
    (the kernel would also unload it when tcptrace exits: every attachment is
    held by a file descriptor).
    """

    def __init__(self, pending: _CompileJob | None = None) -> None:
        self._pending = pending

    # The Capture interface the tracer uses, empty.
    def drain_raw(self) -> bytes:
        return b""

    def drain(self, handler: Callable[[Any], None]) -> None:
        return None

    def scan(self) -> list[Any]:
        return []

    def scan_raw(self) -> tuple[np.ndarray, bool]:
        return np.empty(0, dtype=RECORD_DTYPE), True

    def forget(self, sks: Iterable[int]) -> None:
        return None

    def add_target(self, pid: int) -> None:
        return None

    def remove_target(self, pid: int) -> None:
        return None

    def forget_process(self, pid: int) -> None:
        return None

    def stack_addresses(self, stack_id: int) -> list[int]:
        return []

    def symbolize(self, addr: int, pid: int) -> tuple[str, str]:
        return "[unknown]", ""

    def kernel_symbol(self, addr: int) -> str:
        return "[unknown]"

    def stats(self) -> dict[str, int]:
        counts = {stat.name.lower(): 0 for stat in KernelStat}
        counts.update(records_undecodable=0, probe_recursion_misses=0)
        counts[NOT_ATTACHED_COUNTER] = 1
        return counts

    def program_stats(self) -> list[Any]:
        return []

    def close(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.abandon()

    def __enter__(self) -> NotAttached:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class _CompileJob:
    """Capture(config) in a worker thread: bcc's compile is a long C call, and a
    main thread stuck in it could not show progress or answer a signal."""

    build: Callable[[], Capture]
    done: threading.Event = field(default_factory=threading.Event)
    capture: Capture | None = None
    error: BaseException | None = None
    thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="tcptrace-bpf-compile", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.capture = self.build()
        except BaseException as exc:  # handed to the main thread
            self.error = exc
        finally:
            self.done.set()

    def abandon(self) -> None:
        """The trace stopped during the compile: wait for it, then unload it."""
        self.done.wait()
        if self.capture is not None:
            self.capture.close()


# -- preflight --------------------------------------------------------------------


@dataclass
class Preflight:
    """Everything checked before a trace starts; see `preflight`."""

    infos: list[ProcessInfo]
    probe_set: str
    why: str
    offsets: KernelOffsets
    out_dir: Path
    watch: ProcessWatch
    created: tuple[Path, ...] = ()  # directories preflight made, deepest first

    def discard_output_dir(self) -> None:
        """Remove the report directories preflight created, while they are empty."""
        for directory in self.created:
            try:
                directory.rmdir()
            except OSError:
                return  # not empty, or not ours any more: leave it and its parents

    def start_capture(
        self,
        config: CaptureConfig,
        stop: StopLike,
        progress: Progress,
    ) -> Capture | NotAttached:
        """Compile, load and attach, showing progress and honouring `stop` at once.

        Returns NotAttached when `stop` is set before the probes are attached.
        Errors of the compile (KernelSupportError...) are raised here, after the
        report directory preflight created is removed again.
        """
        from tcptrace.probes import Capture

        if stop.is_set():
            return NotAttached()
        job = _CompileJob(lambda: Capture(config, self.offsets))
        progress.begin("compiling and loading BPF programs")
        job.start()
        while not job.done.wait(0.1):
            progress.tick()
            if stop.is_set():
                progress.end("stop requested after {elapsed} of compiling; writing the report")
                return NotAttached(job)
        if job.error is not None:
            progress.end("compiling and loading BPF programs failed after {elapsed}")
            self.discard_output_dir()
            raise job.error
        progress.end("BPF programs compiled, loaded and attached in {elapsed}")
        # Even if a stop came in the last instant this is a real capture: the
        # tracer's loop will not run, and its final pass drains what arrived.
        assert job.capture is not None
        return job.capture


def _missing_dirs(path: Path) -> tuple[Path, ...]:
    """`path` and its missing parents, deepest first (what mkdir -p would create)."""
    path = path.expanduser()
    return tuple(p for p in (path, *path.parents) if not p.exists())


def preflight(options: OptionsLike) -> Preflight:
    """Run every start-up check, in order, and prepare the report directory.

    Order: privileges (3), targets (4, kernel thread 7), probe set (5), BTF (8),
    report directory: not empty (9), not writable (6), full (10). Typed errors
    with those exit codes; the report directory is created last, so a failed
    check leaves nothing behind.
    """
    require_privileges()
    infos = validate_targets(options.pids)
    watch = ProcessWatch({i.pid: i.start_time for i in infos})
    probe_set, why = choose_probe_set(options.probes)
    offsets = kernel_offsets()  # reads BTF: a kernel without it fails here, before any file
    created = _missing_dirs(Path(options.output_dir))
    out_dir = prepare_output_dir(options.output_dir, options.force)
    pre = Preflight(
        infos=infos,
        probe_set=probe_set,
        why=why,
        offsets=offsets,
        out_dir=out_dir,
        watch=watch,
        created=created,
    )
    try:
        probe_writable(out_dir)
    except BaseException:
        pre.discard_output_dir()
        raise
    return pre


# -- targets ----------------------------------------------------------------------


class LedgerLike(Protocol):
    def exited(self) -> set[int]: ...

    def process_exited(self, pid: int, ts_ns: int) -> None: ...


def surviving_targets(
    candidates: Iterable[int], watch: ProcessWatch, ledger: LedgerLike
) -> set[int]:
    """The candidates that are still the processes we started tracing.

    A pid that is gone, or now belongs to another process (reused), is not a
    target any more. The kernel already stopped tracing it (its exit deletes it
    from the target map); if its exit record never reached us (a full ring
    buffer), its ledger is closed here, as closed by exit, instead of lingering.
    """
    alive: set[int] = set()
    exited = ledger.exited()
    for pid in candidates:
        if watch.alive(pid):
            alive.add(pid)
        elif pid not in exited:
            ledger.process_exited(pid, time.monotonic_ns())
    return alive


def fd_counts(pids: Iterable[int], watch: ProcessWatch) -> dict[str, int | None]:
    """Open fds per target, None for one that is gone or whose pid was reused."""
    from tcptrace.system import open_fd_count

    return {str(p): open_fd_count(p) if watch.alive(p) else None for p in pids}


class StateLedger(Protocol):
    def correct_states(self, current: Iterable[Any]) -> int: ...


def correct_states_from_diag(
    ledger: StateLedger, pids: Iterable[int], is_target: Callable[[int], bool]
) -> int:
    """One sock_diag dump of the targets' sockets, to fix states the kernel missed.

    Costs a dump of every TCP socket on the host (~20 us each), so the tracer
    does it once, at the end, and only when the kernel counted missed runs.
    """
    from tcptrace import snapshot

    alive = tuple(p for p in pids if is_target(p))
    if not alive:
        return 0
    current = snapshot.preexisting_connections(alive, time.time(), missing_ok=True)
    return ledger.correct_states(current)

