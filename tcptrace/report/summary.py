"""The terminal summary: flagged sockets grouped by the call site that opened them."""

from __future__ import annotations

import datetime as dt
import re
import textwrap
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from tcptrace.durations import format_duration
from tcptrace.events import TcpState
from tcptrace.sockets import Connection, LeakClass, StackStatus, classify, is_leak

UNKNOWN_STACK_KEY: Final = "[preexisting: stack unknown]"
FAILED_STACK_KEY: Final = "[stack not captured]"
EMPTY_STACK_KEY: Final = "[empty stack]"
MAX_FRAMES: Final = 4

# Frames that say *how* a socket was opened, not *who* opened it: libc syscall
# wrappers, Go's runtime/syscall/net internals. Skipped when picking the frames
# to show; the full stack is still in the report files.
_NOISE_NAMES: Final = frozenset(
    {"[unknown]", "syscall", "connect", "accept", "accept4", "socket", "listen"}
    | {"_start", "start_thread", "clone", "clone3"}  # process and thread entry points
)
_NOISE_PREFIXES: Final = (
    "__",  # __libc_connect, __GI___connect, __connect, __sys_...
    "syscall.",
    "runtime.",
    "runtime/",  # runtime/internal/syscall.Syscall6
    "internal/poll.",
    "internal/syscall",
    "net.",  # Go's net package; net/http.* (a "/" not a ".") is kept
)
# An unsymbolized address: "0x7f3a..." or a long bare hex run with a digit (not "dead" or "f").
_HEX_ADDRESS: Final = re.compile(r"0x[0-9a-f]+|(?=[0-9a-f]*\d)[0-9a-f]{8,}", re.IGNORECASE)


@dataclass(frozen=True)
class CallSiteSummary:
    """Flagged open sockets sharing one call site (one folded stack)."""

    key: str  # folded stack, or a bracketed placeholder when there is no stack
    stack: tuple[str, ...]  # outermost caller first; empty for placeholders
    stack_status: StackStatus
    count: int
    oldest_age_s: float
    oldest_is_lower_bound: bool  # the oldest socket predates tracing
    states: Counter[TcpState]
    leak_classes: Counter[LeakClass]
    pids: tuple[int, ...]
    comms: tuple[str, ...]
    top_frames: tuple[str, ...]  # innermost meaningful frames, innermost first


def _frame_name(frame: str) -> str:
    # "func+0x1a (/lib/libc.so.6)" or "main.f (main.go:42)": match on the symbol alone.
    return frame.split(" ", 1)[0].split("+", 1)[0]


def is_noise_frame(frame: str) -> bool:
    name = _frame_name(frame)
    if not name or name in _NOISE_NAMES or _HEX_ADDRESS.fullmatch(name):
        return True
    return name.startswith(_NOISE_PREFIXES)


def top_frames(stack: Sequence[str], limit: int = MAX_FRAMES) -> tuple[str, ...]:
    """Up to `limit` innermost frames worth reading; all-noise stacks keep their raw tail."""
    innermost_first = list(reversed(stack))
    meaningful = [f for f in innermost_first if not is_noise_frame(f)]
    return tuple((meaningful or innermost_first)[:limit])


def group_key(conn: Connection) -> str:
    if conn.stack_status is StackStatus.UNKNOWN:
        return UNKNOWN_STACK_KEY
    if conn.stack_status is StackStatus.FAILED:
        return FAILED_STACK_KEY
    return conn.folded_stack or EMPTY_STACK_KEY


def summarize_call_sites(
    connections: Iterable[Connection], now: float, threshold_s: float
) -> list[CallSiteSummary]:
    """Flagged open sockets grouped by call site, worst first (count, then oldest)."""
    groups: dict[str, list[Connection]] = {}
    for conn in connections:
        if is_leak(conn, now, threshold_s):
            groups.setdefault(group_key(conn), []).append(conn)

    summaries = [_summarize(key, members, now) for key, members in groups.items()]
    summaries.sort(key=lambda s: (-s.count, -s.oldest_age_s, s.key))
    return summaries


def _summarize(key: str, members: list[Connection], now: float) -> CallSiteSummary:
    oldest = max(members, key=lambda c: c.age_s(now))
    placeholder = key in (UNKNOWN_STACK_KEY, FAILED_STACK_KEY, EMPTY_STACK_KEY)
    stack = () if placeholder else members[0].stack
    return CallSiteSummary(
        key=key,
        stack=stack,
        stack_status=members[0].stack_status,
        count=len(members),
        oldest_age_s=oldest.age_s(now),
        oldest_is_lower_bound=oldest.opened_at is None,
        states=Counter(c.state for c in members),
        leak_classes=Counter(classify(c) for c in members),
        pids=tuple(sorted({c.pid for c in members})),
        comms=tuple(sorted({c.comm for c in members})),
        top_frames=top_frames(stack),
    )


# -- rendering -------------------------------------------------------------------------------


def _clip(line: str, width: int) -> str:
    return line if len(line) <= width else line[: max(width - 3, 0)] + "..."


def short_frame(frame: str) -> str:
    """'main.f (/long/path/to/main.go:42)' -> 'main.f (main.go:42)' for the terminal."""
    name, sep, location = frame.partition(" (")
    if not sep:
        return frame
    return f"{name} ({location.rsplit('/', 1)[-1]}"


def _counts(counter: Mapping[str, int]) -> str:
    return " ".join(
        f"{name}={n}" for name, n in sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))
    )


def _pids(pids: Sequence[int], limit: int = 6) -> str:
    shown = " ".join(str(p) for p in pids[:limit])
    return shown + (f" +{len(pids) - limit} more" if len(pids) > limit else "")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def render_losses(losses: Mapping[str, int]) -> str:
    """Always a line: zero counters are printed too, so "nothing lost" is explicit."""
    if not losses:
        return "losses: no loss counters were collected; completeness unknown"
    line = "losses: " + " ".join(f"{name}={count}" for name, count in losses.items())
    if any(count > 0 for count in losses.values()):
        line += "  (nonzero: results may be incomplete)"
    return line


def _placeholder_note(summary: CallSiteSummary) -> str:
    if summary.key == UNKNOWN_STACK_KEY:
        return "opened before tracing began"
    if summary.key == FAILED_STACK_KEY:
        return "the kernel could not capture it (counted in losses)"
    return "the captured stack was empty"


def render_summary(
    summaries: Sequence[CallSiteSummary],
    losses: Mapping[str, int],
    now: float,
    threshold_s: float,
    width: int = 100,
) -> str:
    """Plain-text summary for the terminal; always ends with the loss counters."""
    stamp = dt.datetime.fromtimestamp(now, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    limit = format_duration(threshold_s)
    lines: list[str] = []
    total = sum(s.count for s in summaries)
    criterion = f"open >= {limit}, listeners excluded"
    if total == 0:
        lines.append(f"{stamp}  no leaked sockets flagged ({criterion})")
    else:
        lines.append(
            f"{stamp}  {_plural(total, 'flagged socket')}"
            f" at {_plural(len(summaries), 'call site')} ({criterion})"
        )
    for index, summary in enumerate(summaries, start=1):
        oldest = format_duration(summary.oldest_age_s)
        if summary.oldest_is_lower_bound:
            oldest = ">=" + oldest
        comms = ",".join(summary.comms)
        lines.append("")
        lines.append(
            f"#{index}  {_plural(summary.count, 'socket')}, oldest {oldest},"
            f" pids {_pids(summary.pids)} ({comms})"
        )
        states = _counts({s.name: n for s, n in summary.states.items()})
        classes = _counts({c.value: n for c, n in summary.leak_classes.items()})
        lines.append(f"    states: {states}   classes: {classes}")
        if summary.top_frames:
            lines.extend(f"    at {short_frame(frame)}" for frame in summary.top_frames)
        else:
            lines.append(f"    {summary.key} {_placeholder_note(summary)}")
    body = "\n".join(_clip(line, width) for line in lines)
    # Loss counters are wrapped, never clipped: each one must stay readable.
    wrapped = textwrap.fill(render_losses(losses), width=width, subsequent_indent="        ")
    return body + "\n\n" + wrapped + "\n"
