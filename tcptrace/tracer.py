"""One trace: attach, follow the targets, print summaries, write the report.

Glue between the capture (probes.py, bcc), the ledger (pure), the start-up
snapshot (snapshot.py, pyroute2) and the report writers. The loop polls the
ring buffer on a timer (no per-record wakeups) and scans the kernel ledger
map in batches.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Final, TextIO, TypeVar

import numpy as np

from tcptrace import __version__
from tcptrace.clock import MonotonicClock
from tcptrace.errors import PermissionProblem, TraceInternalError, UsageError
from tcptrace.events import ACTIVITY_STATS, RECORD_DTYPE, RawSocketRecord, RecordKind, SocketRecord
from tcptrace.history import ConnectionHistory, use_system_allocator
from tcptrace.ledger import Ledger
from tcptrace.report import (
    SCHEMA_VERSION,
    RunMeta,
    TimelineRecorder,
    render_summary,
    summarize_call_sites,
)
from tcptrace.report.schema import connections_frame
from tcptrace.rescue import fallback_bases, write_report_or_rescue  # issue 7: report rescue
from tcptrace.sockets import Connection
from tcptrace.startup import (  # issue 7: checks, interruptible compile, targets
    NotAttached,
    Progress,
    correct_states_from_diag,
    fd_counts,
    preflight,
    surviving_targets,
)
from tcptrace.system import (
    CAP_SYS_PTRACE,
    has_capability,
    is_alive,
    kernel_release,
    nofile_limit,
    open_fd_count,
)
from tcptrace.tick import TraceTick

if TYPE_CHECKING:
    from tcptrace.probes import CaptureConfig


@dataclass(frozen=True)
class TraceOptions:
    pids: tuple[int, ...]
    output_dir: Path
    threshold_s: float = 30.0
    duration_s: float | None = None
    probes: str = "auto"
    follow_forks: bool = False
    summary_interval_s: float = 10.0
    sample_interval_s: float = 1.0  # timeline table: open sockets per call site
    poll_interval_s: float = 0.1
    scan_interval_s: float = 1.0
    preexisting_interval_s: float = 5.0
    kernel_stacks: bool = False
    force: bool = False
    quiet: bool = False
    # Test hook: called once the probes are attached (before the loop).
    on_attached: Callable[[], None] | None = field(default=None, compare=False)
    # issue 7: called once per scan (live view); kernel map sizes (None: defaults),
    # shrunk by tests to provoke overload.
    on_tick: Callable[[TraceTick], None] | None = field(default=None, compare=False)
    max_sockets: int | None = None
    max_stacks: int | None = None
    ringbuf_pages: int | None = None


@dataclass(frozen=True)
class TraceResult:
    output_dir: Path
    open_sockets: tuple[Connection, ...]
    connections_seen: int
    losses: dict[str, int]
    probe_set: str
    stop_reason: str


class StopFlag:
    """Set by SIGINT/SIGTERM, by --duration, or by the exit of every target."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.reason = ""

    def set(self, reason: str) -> None:
        if not self.event.is_set():
            self.reason = reason
            self.event.set()

    def is_set(self) -> bool:
        return self.event.is_set()


@contextmanager
def _signals_stop(flag: StopFlag) -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _frame: FrameType | None) -> None:
        flag.set(signal.Signals(signum).name)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def tell(out: TextIO, message: str) -> None:
    """One line to the user. issue 7: a closed terminal or pipe (SIGHUP, `| head`) must
    not cost the report: the line is dropped and the trace goes on."""
    with suppress(OSError, ValueError):
        print(message, file=out, flush=True)


def run_trace(options: TraceOptions, out: TextIO, stop: StopFlag | None = None) -> TraceResult:
    # Import here: the capture module needs bcc, and `tcptrace report` must not.
    from tcptrace import snapshot
    from tcptrace.probes import CaptureConfig, ProbeSet
    from tcptrace.stacks import StackSymbolizer

    stop = stop or StopFlag()

    def say(message: str) -> None:
        if not options.quiet:
            tell(out, message)

    fault = _injected_fault()  # issue 7: testing only, see _injected_fault
    if options.kernel_stacks and os.geteuid() != 0:
        # libbcc lists /proc/kallsyms only for euid 0: every kernel frame would be
        # "[unknown]", uncounted. Capabilities do not help (found by experiment).
        raise PermissionProblem(
            "--kernel-stacks needs uid 0: bcc reads the kernel's symbols only as root",
            "run it with sudo, or drop --kernel-stacks",
        )
    # issue 7: every check in order, each its own exit code; BTF read once, here.
    pre = preflight(options)
    infos, probe_set, why, out_dir = pre.infos, pre.probe_set, pre.why, pre.out_dir
    limits = {str(p): nofile_limit(p) for p in options.pids}
    fds_start = {str(p): open_fd_count(p) for p in options.pids}

    say(
        f"tcptrace {__version__}: tracing pid(s) "
        + ", ".join(f"{i.pid} ({i.comm})" for i in infos)
        + f"; probe set {probe_set} ({why})"
    )
    started_at = time.time()
    clock = MonotonicClock()
    config = CaptureConfig(
        pids=options.pids,
        probe_set=ProbeSet(probe_set),
        follow_forks=options.follow_forks,
        kernel_stacks=options.kernel_stacks,
    )
    config = _with_map_sizes(config, options)  # issue 7
    progress = Progress(enabled=not options.quiet)  # issue 7: compile progress on stderr
    with _signals_stop(stop), pre.start_capture(config, stop, progress) as cap:
        t_attached = time.time()
        if isinstance(cap, NotAttached):  # issue 7: stopped during start-up
            say(f"stopped before the probes were attached ({stop.reason})")
        else:
            say(
                f"probes attached in {t_attached - started_at:.2f}s; "
                f"threshold {options.threshold_s:g}s; Ctrl-C to stop and write the report"
            )
        symbolizer = StackSymbolizer(
            cap.stack_addresses,
            cap.symbolize,
            kernel_symbol=cap.kernel_symbol,
            on_unreadable=_unreadable_warner(_warner()),
        )
        closed: list[Connection] = []  # closed by the ledger, not yet in the history
        ledger = Ledger(clock, symbolizer, on_closed=closed.append)
        use_system_allocator()  # issue 7: flat memory over hours (see there)
        history = ConnectionHistory(out_dir)

        def consume() -> None:
            _consume(cap.drain_raw(), ledger, history)
            if len(closed) >= 10_000:
                history.append(connections_frame(closed, time.time()))
                closed.clear()

        unverified_warner = _unverified_warner(_warner())

        def final_pass() -> None:
            """Everything still in the ring buffer and the map, and who holds what now."""
            consume()
            ledger.reconcile(*cap.scan_raw())
            consume()
            _refresh_preexisting(ledger, options.pids, pre.watch.alive, unverified_warner)

        timeline = TimelineRecorder()
        failure: _Failure | None = None
        # issue 7: the loop boundary. A bug of ours below must not cost the report:
        # the probes are detached (leaving the with), the report is written from
        # what the ledger holds, and TraceInternalError names the traceback file.
        try:
            # After attach, so nothing is born unseen between snapshot and probes.
            # issue 7: a target that died (or whose pid was reused) since preflight is
            # left out here, not an error that would cost the report.
            alive = [p for p in options.pids if pre.watch.alive(p)]
            ledger.add_preexisting(
                snapshot.preexisting_connections(alive, time.time(), missing_ok=True)
            )
            # First timeline sample before the workload can move: growth counts from attach.
            timeline.sample(time.time(), ledger.open_sockets(), options.threshold_s)
            if options.on_attached is not None:
                options.on_attached()

            deadline = time.monotonic() + options.duration_s if options.duration_s else None
            next_scan = next_summary = next_pre = time.monotonic()
            next_summary += options.summary_interval_s
            next_pre += options.preexisting_interval_s
            next_sample = time.monotonic() + options.sample_interval_s
            live = set(options.pids)
            retired: set[int] = set()  # exited pids already dropped from the kernel's targets
            iterations = 0
            while not stop.is_set():
                stop.event.wait(options.poll_interval_s)
                consume()
                iterations += 1
                if fault is not None and iterations >= fault:
                    raise InjectedFault(f"injected after {iterations} trace-loop iterations")
                now_m = time.monotonic()
                if now_m >= next_scan:
                    ledger.reconcile(*cap.scan_raw())
                    # A scan of 100k sockets costs ~0.1 s: keep scans under ~5% of the time.
                    scan_cost = time.monotonic() - now_m
                    next_scan = now_m + max(options.scan_interval_s, 20 * scan_cost)
                    # issue 7: by start time, so a reused pid is not a live target
                    live = surviving_targets(live | ledger.pids(), pre.watch, ledger)
                    for pid in ledger.exited() - retired:  # issue 7: once per pid
                        cap.remove_target(pid)
                        cap.forget_process(pid)  # issue 7: bcc's per-pid symbol cache
                        retired.add(pid)
                    if not live:
                        stop.set("all traced processes exited")
                    if options.on_tick is not None:  # issue 7: live view
                        losses_now = _losses(ledger, cap.stats(), symbolizer.counters, history)
                        options.on_tick(
                            TraceTick(
                                time.time(),
                                ledger.open_sockets(),
                                losses_now,
                                options.threshold_s,
                                tuple(sorted(live)),
                            )
                        )
                if now_m >= next_pre:
                    _refresh_preexisting(ledger, options.pids, pre.watch.alive, unverified_warner)
                    next_pre = now_m + options.preexisting_interval_s
                if now_m >= next_sample:
                    timeline.sample(time.time(), ledger.open_sockets(), options.threshold_s)
                    next_sample = now_m + options.sample_interval_s
                if deadline is not None and now_m >= deadline:
                    stop.set(f"--duration {options.duration_s:g}s reached")
                if now_m >= next_summary and not options.quiet:
                    next_summary = now_m + options.summary_interval_s
                    say(
                        _summary(
                            ledger, cap.stats(), symbolizer.counters, history, options.threshold_s
                        )
                    )

            final_pass()
            final_stats = cap.stats()
            if final_stats.get("probe_recursion_misses"):  # issue 7: stale states, fixed once
                correct_states_from_diag(ledger, {*options.pids, *ledger.pids()}, pre.watch.alive)
            history.sync()  # issue 7: history_rows_unwritten is final from here on
            losses = _losses(ledger, final_stats, symbolizer.counters, history)
            activity = _activity(final_stats, ledger)
        except Exception as exc:
            failure = _Failure.of(exc)
            stop.set(f"internal error: {failure.summary}")
            # The final pass and each counter as far as they go: the bug may be in them.
            _best_effort(final_pass, None)
            final_stats = _best_effort(cap.stats, {})
            _best_effort(history.sync, None)
            losses = _best_effort(
                lambda: _losses(ledger, final_stats, symbolizer.counters, history), {}
            )
            activity = _best_effort(lambda: _activity(final_stats, ledger), {})

    stop_reason = f"internal error: {failure.summary}" if failure else stop.reason
    ended_at = time.time()
    opened = ledger.open_sockets()
    timeline.sample(ended_at, opened, options.threshold_s)  # the final sample, at stop
    fds_end = fd_counts(options.pids, pre.watch)  # issue 7: a reused pid's fds are not ours
    everything = closed + opened
    meta = RunMeta(
        tool_version=__version__,
        schema_version=SCHEMA_VERSION,
        host=socket.gethostname(),
        kernel=kernel_release(),
        probe_set=probe_set,
        pids=options.pids,
        threshold_s=options.threshold_s,
        started_at=started_at,
        ended_at=ended_at,
        losses=losses,
        extra={
            "probe_set_reason": why,
            "activity": activity,
            "stop_reason": stop_reason,
            "follow_forks": options.follow_forks,
            "rlimit_nofile": limits,
            "fd_count": {"start": fds_start, "end": fds_end},
            "sample_interval_s": options.sample_interval_s,
            "timeline_max_samples": timeline.max_samples,
            "timeline_sample_times": timeline.sample_times(),
            "attach_seconds": round(t_attached - started_at, 3),
        },
    )
    if history.write_error is not None:  # issue 7: the disk filled during the trace
        meta.extra["history_write_error"] = history.write_error
    if failure is not None:
        meta.extra["internal_error"] = {
            "error": failure.summary,
            "traceback_file": TRACEBACK_FILE,
        }
    say(f"stopped: {stop_reason}")
    say(
        render_summary(
            summarize_call_sites(opened, ended_at, options.threshold_s),
            losses,
            ended_at,
            options.threshold_s,
        )
    )
    warn = _warner()
    if history.unwritten:
        warn(
            f"tcptrace: {history.unwritten} rows of the connections history could not be"
            f" written to {out_dir} during the trace ({history.write_error}); tracing went on,"
            " they are counted as history_rows_unwritten"
        )
    # issue 7: summary first, so a report that cannot be written anywhere leaves it;
    # a failed write is retried in a fallback directory (the CLI exits 11 then).
    out_dir = write_report_or_rescue(
        out_dir,
        everything,
        ended_at,
        options.threshold_s,
        meta,
        timeline=timeline.frame(),
        history=history,
        warn=warn,
    ).directory
    say(f"report written to {out_dir}")
    if failure is not None:
        saved = _save_traceback(out_dir, failure)
        raise TraceInternalError(
            f"internal error during the trace ({failure.summary}); the report of what was"
            f" traced until then is in {out_dir}; "
            + (f"traceback in {saved}" if saved else "the traceback could not be saved"),
            "please report it with that file",
        ) from failure.exc
    return TraceResult(
        output_dir=out_dir,
        open_sockets=tuple(opened),
        connections_seen=history.rows or len(everything),
        losses=losses,
        probe_set=probe_set,
        stop_reason=stop.reason,
    )


def _consume(raw: bytes, ledger: Ledger, history: ConnectionHistory) -> None:
    """Apply records in their order: deaths in bulk runs, the rare others one by one."""
    if not raw:
        return
    records = np.frombuffer(raw, dtype=RECORD_DTYPE)
    others = np.flatnonzero(records["kind"] != RecordKind.DEATH).tolist()
    start = 0
    for index in [*others, len(records)]:
        if index > start:
            history.append(ledger.apply_deaths(records[start:index]))
        if index < len(records):
            raw_record = RawSocketRecord.from_buffer_copy(records[index].tobytes())
            ledger.apply(SocketRecord.from_raw(raw_record))
        start = index + 1


def _refresh_preexisting(
    ledger: Ledger,
    pids: tuple[int, ...],
    is_target: Callable[[int], bool] = is_alive,
    on_unreadable: Callable[[int], None] | None = None,
) -> None:
    from tcptrace import snapshot

    if not ledger.has_preexisting():
        return  # a sock_diag dump of the whole host costs ~20 us per socket: skip it
    alive = tuple(p for p in pids if is_target(p))
    now = time.time()
    unreadable: set[int] = set()
    current = snapshot.preexisting_connections(alive, now, missing_ok=True, unreadable=unreadable)
    ledger.refresh_preexisting(current, now, unreadable)
    if on_unreadable is not None:
        for pid in sorted(unreadable):
            on_unreadable(pid)


def _unverified_warner(warn: Callable[[str], None]) -> Callable[[int], None]:
    """Once per pid: its fds cannot be read any more, so its sockets from before the
    trace are kept as last seen (issue 7: not mistaken for closed)."""
    told: set[int] = set()

    def unreadable(pid: int) -> None:
        if pid in told:
            return
        told.add(pid)
        warn(
            f"tcptrace: pid {pid} ({_comm(pid)}) can no longer be inspected: reading its"
            f" /proc/{pid}/fd {_ptrace_denial()} (it became another user's or non-dumpable);"
            " its sockets from before the trace are kept as last seen, counted as"
            " preexisting_unverified"
        )

    return unreadable


def _losses(
    ledger: Ledger,
    kernel: Mapping[str, int],
    stacks: Mapping[str, int],
    history: ConnectionHistory,
) -> dict[str, int]:
    """Every loss counter of every layer, so a silent loss cannot look like 'no leaks'."""
    activity = {stat.name.lower() for stat in ACTIVITY_STATS}
    kernel_losses = {k: v for k, v in kernel.items() if k not in activity}
    return {**kernel_losses, **ledger.counters, **stacks, **history.losses}


def _activity(kernel: Mapping[str, int], ledger: Ledger) -> dict[str, int]:
    activity = {stat.name.lower() for stat in ACTIVITY_STATS}
    counts = {f"kernel_{k}": v for k, v in kernel.items() if k in activity}
    counts["connections_closed"] = ledger.closed_count
    counts["connections_open_at_end"] = len(ledger.open_sockets())
    counts.update(ledger.activity)
    return counts


def _summary(
    ledger: Ledger,
    kernel: Mapping[str, int],
    stacks: Mapping[str, int],
    history: ConnectionHistory,
    threshold_s: float,
) -> str:
    now = time.time()
    return render_summary(
        summarize_call_sites(ledger.open_sockets(), now, threshold_s),
        _losses(ledger, kernel, stacks, history),
        now,
        threshold_s,
    )


def _with_map_sizes(config: CaptureConfig, options: TraceOptions) -> CaptureConfig:
    """issue 7: TraceOptions' map sizes (tests shrink them to provoke overload)."""
    if options.max_sockets is not None:
        config = dataclasses.replace(config, max_sockets=options.max_sockets)
    if options.max_stacks is not None:
        config = dataclasses.replace(config, max_stacks=options.max_stacks)
    if options.ringbuf_pages is not None:
        config = dataclasses.replace(config, ringbuf_pages=options.ringbuf_pages)
    return config


def default_output_dir() -> Path:
    return Path(os.getcwd()) / time.strftime("tcptrace-report-%Y%m%d-%H%M%S")


# --- issue 7: the loop boundary -------------------------------------------------------

TRACEBACK_FILE = "internal-error.txt"  # in the report directory
FAULT_ENV = "TCPTRACE_INJECT_FAULT"


class InjectedFault(RuntimeError):
    """Raised by the trace loop when TCPTRACE_INJECT_FAULT asks for it (tests only)."""


def _injected_fault() -> int | None:
    """TCPTRACE_INJECT_FAULT=loop:N: raise InjectedFault after N loop iterations.

    Testing only (tests/kernel/test_trust_internal_error.py): it stands for a
    bug of ours in the trace loop, through the real CLI.
    """
    value = os.environ.get(FAULT_ENV, "")
    if not value:
        return None
    kind, _, count = value.partition(":")
    if kind != "loop" or not count.isdigit() or int(count) < 1:
        raise UsageError(f"{FAULT_ENV}={value!r} is not loop:N", f"unset {FAULT_ENV}")
    return int(count)


@dataclass(frozen=True)
class _Failure:
    exc: Exception
    summary: str  # "Type: first line of the message"
    text: str  # the full traceback

    @classmethod
    def of(cls, exc: Exception) -> _Failure:
        first = (str(exc).strip().splitlines() or [""])[0]
        summary = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
        return cls(exc, summary, "".join(traceback.format_exception(exc)))


T = TypeVar("T")


def _best_effort(make: Callable[[], T], default: T) -> T:
    try:
        return make()
    except Exception:
        return default


MAX_UNREADABLE_NAMED: Final = 5  # a forking service could make thousands: name a few


def _unreadable_warner(warn: Callable[[str], None]) -> Callable[[int], None]:
    """One line per traced process tcptrace may not read (the first few), naming it and
    the missing capability. Preflight checks the --pid targets; a --follow-forks child
    that became another user, or non-dumpable, is only found here."""
    seen = 0

    def unreadable(pid: int) -> None:
        nonlocal seen
        seen += 1
        if seen > MAX_UNREADABLE_NAMED + 1:
            return
        if seen > MAX_UNREADABLE_NAMED:
            warn(
                "tcptrace: more processes cannot be symbolized (not named any more);"
                " their stacks are counted as stacks_unreadable_process"
            )
            return
        warn(
            f"tcptrace: cannot symbolize pid {pid} ({_comm(pid)}): reading its"
            f" /proc/{pid}/root {_ptrace_denial()}"
            " (another user's or a non-dumpable process); its sockets are traced, its stacks"
            " are left as addresses and counted as stacks_unreadable_process"
        )

    return unreadable


def _ptrace_denial() -> str:
    """Why reading another process's /proc links was refused, for a warning."""
    if has_capability(CAP_SYS_PTRACE):
        return "is denied although tcptrace has CAP_SYS_PTRACE"
    return "needs CAP_SYS_PTRACE, which tcptrace lacks"


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def _warner() -> Callable[[str], None]:
    def warn(line: str) -> None:
        with suppress(OSError, ValueError):  # stderr may be gone (SIGHUP)
            print(line, file=sys.stderr, flush=True)

    return warn


def _save_traceback(report_dir: Path, failure: _Failure) -> Path | None:
    """The traceback next to the report, else in a fallback directory; None if nowhere."""
    from tcptrace.fileio import write_atomic

    text = f"tcptrace {__version__}: internal error during the trace\n\n{failure.text}"
    with suppress(Exception):
        path = report_dir / TRACEBACK_FILE
        write_atomic(path, text.encode("utf-8"))
        return path
    for base in fallback_bases():
        try:
            fd, name = tempfile.mkstemp(prefix="tcptrace-internal-error-", suffix=".txt", dir=base)
            with os.fdopen(fd, "w") as handle:  # mkstemp: mode 0600
                handle.write(text)
            return Path(name)
        except OSError:
            continue
    return None
