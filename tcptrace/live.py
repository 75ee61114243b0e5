"""`tcptrace --pid PID --live`: a top-like screen of open sockets per call site (issue 7).

Driven by the tracer's `on_tick` hook (one TraceTick per scan, about once a
second). Pure parts (`LiveModel`, `render`) turn ticks into a rich renderable and
are tested from recorded ticks; `LiveView` owns the terminal: the alternate
screen (so the shell's scrollback is left as it was), the keyboard (q stops the
trace; Ctrl-C is a SIGINT and stops it too), and restoring both on every exit.
The report is written by the tracer as in any trace. Lines printed while the
screen is up (the tracer's on `LiveView.stdout`, warnings on stderr) would go
with the alternate screen: they are kept and printed, in order, once it is gone
(warnings are also shown on the screen meanwhile).
"""

from __future__ import annotations

import contextlib
import io
import os
import select
import statistics
import sys
import termios
import threading
import time
import tty
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final, TextIO

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from tcptrace.durations import format_duration
from tcptrace.events import TcpState
from tcptrace.report.summary import group_key, short_frame, top_frames
from tcptrace.sockets import Connection, is_leak
from tcptrace.tick import TraceTick

GROWTH_WINDOW_S = 60.0  # growth is per minute, over the last minute (or what there is of it)
MIN_GROWTH_SPAN_S = 5.0  # below this a rate is noise: shown as "..."
HISTORY_S = 600.0


@dataclass(frozen=True)
class SiteRow:
    """One call site on the screen."""

    key: str
    label: str  # innermost meaningful frames, short
    pids: tuple[int, ...]
    comms: tuple[str, ...]
    open_count: int
    flagged: int
    oldest_s: float
    median_s: float
    states: Counter[str]
    growth_per_min: float | None  # None until MIN_GROWTH_SPAN_S of history
    since_first: int  # open now minus open when the site was first seen


@dataclass
class LiveModel:
    """Per call site counts over time, so growth can be shown (pure: no I/O)."""

    started: float = field(default_factory=time.time)
    _history: dict[str, deque[tuple[float, int]]] = field(default_factory=dict)
    _first: dict[str, int] = field(default_factory=dict)

    def rows(self, tick: TraceTick) -> list[SiteRow]:
        groups: dict[str, list[Connection]] = {}
        for conn in tick.open_sockets:
            groups.setdefault(group_key(conn), []).append(conn)
        # Sites that emptied still need a 0 sample, or their growth would freeze.
        for key in self._history:
            groups.setdefault(key, [])
        rows = []
        for key, members in groups.items():
            history = self._history.setdefault(key, deque())
            history.append((tick.now, len(members)))
            while history and history[0][0] < tick.now - HISTORY_S:
                history.popleft()
            first = self._first.setdefault(key, len(members))
            if not members:
                continue
            ages = [c.age_s(tick.now) for c in members]
            stack = members[0].stack
            frames = top_frames(stack, limit=2)
            label = " < ".join(short_frame(f) for f in frames) if frames else key
            rows.append(
                SiteRow(
                    key=key,
                    label=label,
                    pids=tuple(sorted({c.pid for c in members})),
                    comms=tuple(sorted({c.comm for c in members})),
                    open_count=len(members),
                    flagged=sum(is_leak(c, tick.now, tick.threshold_s) for c in members),
                    oldest_s=max(ages),
                    median_s=statistics.median(ages),
                    states=Counter(c.state.name for c in members),
                    growth_per_min=_growth(history, tick.now),
                    since_first=len(members) - first,
                )
            )
        rows.sort(key=lambda r: (-r.flagged, -r.open_count, r.label))
        return rows


def _growth(history: deque[tuple[float, int]], now: float) -> float | None:
    window = [(t, n) for t, n in history if t >= now - GROWTH_WINDOW_S]
    if len(window) < 2:
        return None
    (t0, n0), (t1, n1) = window[0], window[-1]
    if t1 - t0 < MIN_GROWTH_SPAN_S:
        return None
    return (n1 - n0) / (t1 - t0) * 60.0


def _states(states: Counter[str]) -> str:
    order = {s.name: s.value for s in TcpState}
    ranked = sorted(states.items(), key=lambda kv: (-kv[1], order.get(kv[0], 99)))
    return " ".join(f"{name} {n}" for name, n in ranked)


def _rate(value: float | None) -> Text:
    if value is None:
        return Text("...", style="dim")
    if abs(value) < 0.05:
        return Text("0/min")
    return Text(f"{value:+.1f}/min", style="bold red" if value > 0 else "green")


def render_losses(losses: Mapping[str, int]) -> Text:
    nonzero = {k: v for k, v in losses.items() if v}
    if not losses:
        return Text("losses: none collected (completeness unknown)", style="yellow")
    if not nonzero:
        return Text(f"losses: none ({len(losses)} counters, all 0)", style="green")
    text = Text("losses: ", style="bold")
    for i, (name, count) in enumerate(sorted(nonzero.items())):
        if i:
            text.append("  ")
        text.append(f"{name}={count}", style="bold red")
    text.append("  (results may be incomplete)", style="red")
    return text


def render(
    tick: TraceTick,
    rows: Sequence[SiteRow],
    started: float,
    targets: str,
    max_rows: int = 30,
    stopping: str = "",
    notes: Sequence[str] = (),
) -> RenderableType:
    """The whole screen for one tick."""
    total_open = sum(r.open_count for r in rows)
    total_flagged = sum(r.flagged for r in rows)
    elapsed = format_duration(max(tick.now - started, 0.0))
    head = Text()
    head.append("tcptrace live", style="bold")
    head.append(f"  {targets}  threshold {format_duration(tick.threshold_s)}  up {elapsed}")
    head.append(f"  open {total_open}  flagged ")
    head.append(str(total_flagged), style="bold red" if total_flagged else "green")
    if len(tick.live_pids) == 0:
        head.append("  (no target left)", style="yellow")
    hint = Text(
        stopping or "q or Ctrl-C: stop and write the report",
        style="bold yellow" if stopping else "dim",
    )

    table = Table(expand=True, show_edge=False, pad_edge=False)
    table.add_column(
        "call site (innermost first)", overflow="ellipsis", no_wrap=True, ratio=3, min_width=20
    )
    table.add_column("pid", overflow="ellipsis", no_wrap=True)
    table.add_column("open", justify="right")
    table.add_column("flagged", justify="right")
    table.add_column("oldest", justify="right")
    table.add_column("median", justify="right")
    table.add_column("growth", justify="right")
    table.add_column("states", overflow="ellipsis", no_wrap=True, ratio=2, min_width=14)
    for row in rows[:max_rows]:
        pids = " ".join(str(p) for p in row.pids[:3]) + (" +" if len(row.pids) > 3 else "")
        # Text, never str: rich would read "[...]" in a frame or a path as markup.
        table.add_row(
            Text(row.label),
            Text(pids),
            Text(str(row.open_count)),
            Text(str(row.flagged), style="bold red" if row.flagged else ""),
            Text(format_duration(row.oldest_s)),
            Text(format_duration(row.median_s)),
            _rate(row.growth_per_min),
            Text(_states(row.states)),
        )
    parts: list[RenderableType] = [head, hint, Text(""), table]
    if len(rows) > max_rows:
        parts.append(Text(f"... {len(rows) - max_rows} more call sites", style="dim"))
    if not rows:
        parts.append(Text("no open sockets", style="dim"))
    parts += [Text(""), render_losses(tick.losses)]
    # Warnings printed during the trace; shown again once the screen is gone.
    parts += [Text(note, style="yellow", no_wrap=True, overflow="ellipsis") for note in notes]
    return Group(*parts)


MAX_NOTES: Final = 3  # warnings shown on the screen, the latest


class _Held(io.TextIOBase):
    """Writes to `target`, except while the live screen is up: then they are kept by
    the view, in order with the other held stream's, and written once it is gone."""

    def __init__(self, view: LiveView, target: TextIO) -> None:
        super().__init__()
        self._view = view
        self.target = target

    def writable(self) -> bool:
        return True

    def write(self, text: str, /) -> int:
        if not self._view.holding:
            return self.target.write(text)
        self._view.hold(self, text)
        return len(text)

    def flush(self) -> None:
        if not self._view.holding:
            self.target.flush()

    def isatty(self) -> bool:
        return self.target.isatty()

    def fileno(self) -> int:
        return self.target.fileno()


class LiveView:
    """The terminal side: use as a context manager around the trace, pass `tick`
    as TraceOptions.on_tick. Nothing is drawn until the first tick, so start-up
    messages and the compile progress line stay readable."""

    def __init__(
        self,
        request_stop: Callable[[str], None],
        stop_is_set: Callable[[], bool],
        targets: str,
        stream: TextIO | None = None,
        keys: bool = True,
    ) -> None:
        self._request_stop = request_stop
        self._stop_is_set = stop_is_set
        self._targets = targets
        self._stream = stream if stream is not None else sys.stdout
        self._keys = keys
        self._model = LiveModel()
        self._live: Live | None = None
        self._lock = threading.Lock()
        self._last: tuple[TraceTick, list[SiteRow]] | None = None
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None
        self._saved_tty: Any = None
        self.errors = 0
        # Lines written while the screen is up, kept for after it (lock-free: a
        # write may come from inside a draw, which holds self._lock).
        self.holding = False
        self._held: list[tuple[_Held, str]] = []
        self._partial = ""  # of a held stderr line
        self._notes: deque[str] = deque(maxlen=MAX_NOTES)
        self.stdout = _Held(self, self._stream)  # the tracer's `out`
        self._stderr: _Held | None = None

    # -- lifecycle ---------------------------------------------------------------
    def __enter__(self) -> LiveView:
        fd = self._stdin_tty()
        if self._keys and fd is not None:
            self._saved_tty = termios.tcgetattr(fd)
            # cbreak, not raw: keys arrive one by one, but Ctrl-C stays a SIGINT.
            tty.setcbreak(fd)
        self._stderr = _Held(self, sys.stderr)
        sys.stderr = self._stderr
        self._thread = threading.Thread(target=self._watch, name="tcptrace-live", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._closing.set()
        if self._thread is not None:
            self._thread.join(2.0)
        # The terminal may be gone (SIGHUP): restoring it then fails, and must not
        # turn a trace whose report is written into an error.
        try:
            with self._lock:
                if self._live is not None:
                    with contextlib.suppress(OSError):
                        self._live.stop()  # leaves the alternate screen, shows the cursor
                    self._live = None
        finally:
            self._release_held()
            fd = self._stdin_tty()
            if self._saved_tty is not None and fd is not None:
                with contextlib.suppress(OSError, termios.error):
                    termios.tcsetattr(fd, termios.TCSADRAIN, self._saved_tty)

    def hold(self, stream: _Held, text: str) -> None:
        self._held.append((stream, text))
        if stream is self._stderr:
            self._partial += text
            *lines, self._partial = self._partial.split("\n")
            self._notes.extend(line for line in lines if line.strip())

    def _release_held(self) -> None:
        """Stop holding, give stderr back, and print what was held, in order."""
        self.holding = False
        if self._stderr is not None and sys.stderr is self._stderr:
            sys.stderr = self._stderr.target
        held, self._held = self._held, []
        # The terminal may be gone (SIGHUP): the report is written all the same.
        for stream, text in held:
            with contextlib.suppress(OSError, ValueError):
                stream.target.write(text)
        for stream in {stream for stream, _ in held}:
            with contextlib.suppress(OSError, ValueError):
                stream.target.flush()

    def _stdin_tty(self) -> int | None:
        try:
            fd = sys.stdin.fileno()
        except (AttributeError, ValueError, OSError):
            return None
        return fd if os.isatty(fd) else None

    # -- the tracer's hook ----------------------------------------------------------
    def tick(self, tick: TraceTick) -> None:
        # A drawing problem must never cost the trace its report: count and go on.
        try:
            rows = self._model.rows(tick)
            with self._lock:
                self._last = (tick, rows)
                self._draw()
        except Exception:
            self.errors += 1

    def _draw(self, stopping: str = "") -> None:
        if self._last is None or self._closing.is_set():
            return
        tick, rows = self._last
        if self._live is None:
            # Follow the real terminal size as it changes (like top): an exported
            # COLUMNS/LINES would pin rich to a size the window may no longer have.
            environ = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
            console = Console(file=self._stream, _environ=environ)
            self._live = Live(
                console=console,
                screen=True,
                auto_refresh=False,
                redirect_stdout=False,
                redirect_stderr=False,
            )
            self.holding = True  # from here on, a line printed would vanish with the screen
            self._live.start()
        height = self._live.console.size.height
        notes = list(self._notes)
        screen = render(
            tick,
            rows,
            self._model.started,
            self._targets,
            max_rows=max(height - 8 - len(notes), 3),
            stopping=stopping,
            notes=notes,
        )
        self._live.update(screen, refresh=True)

    # -- keyboard and stop ----------------------------------------------------------
    def _watch(self) -> None:
        fd = self._stdin_tty() if self._keys else None
        announced = False
        while not self._closing.is_set():
            if not announced and self._stop_is_set():
                announced = True
                with self._lock:
                    try:
                        self._draw(stopping="stopping: writing the report...")
                    except Exception:
                        self.errors += 1
            if fd is None:
                self._closing.wait(0.2)
                continue
            try:
                ready, _, _ = select.select([fd], [], [], 0.2)
                data = os.read(fd, 64) if ready else b""
            except (OSError, ValueError):
                fd = None  # stdin went away: Ctrl-C still works
                continue
            if b"q" in data or b"Q" in data:
                self._request_stop("q pressed in the live view")
