"""Call-site keys, short labels, and the address-free form used to match sites across runs.

Two runs of the same program rarely agree on addresses (ASLR, a rebuilt binary)
or on line numbers (any edit above the call). They agree on symbol names. So
`match_key` reduces a folded stack to its symbols:

1. each frame loses its location suffix `" (file:line)"` and any `+0x1f` offset;
2. compiler clone suffixes (`.constprop.0`, `.isra.0`, `.part.1`, `.cold`, `.llvm.123`)
   are dropped, since they come and go with optimisation decisions;
3. a frame that is only an address (`0x7f3a...`) or `[unknown]` becomes `[unknown]`,
   and a run of such frames collapses into one, since how many unresolvable frames
   a stack walk yields differs between builds;
4. placeholders (`[preexisting: stack unknown]`, ...) are kept as they are.

Sites whose stacks differ only in what the rules remove are merged (their counts add).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Final

from tcptrace.report.summary import (
    EMPTY_STACK_KEY,
    FAILED_STACK_KEY,
    UNKNOWN_STACK_KEY,
    top_frames,
)

PLACEHOLDERS: Final = frozenset({UNKNOWN_STACK_KEY, FAILED_STACK_KEY, EMPTY_STACK_KEY})
UNKNOWN_FRAME: Final = "[unknown]"

_LOCATION: Final = re.compile(r"\s+\([^()]*\)$")
_OFFSET: Final = re.compile(r"\+0x[0-9a-fA-F]+$")
_CLONE_SUFFIX: Final = re.compile(r"(?:\.(?:constprop|isra|part|cold|llvm|lto_priv)(?:\.\d+)?)+$")
_ADDRESS: Final = re.compile(r"(?:0x)?[0-9a-fA-F]+")


def site_key(stack: str, stack_status: str) -> str:
    """The call-site key of a row: its folded stack, or a placeholder (as summary.group_key)."""
    if stack_status == "unknown":
        return UNKNOWN_STACK_KEY
    if stack_status == "failed":
        return FAILED_STACK_KEY
    return stack or EMPTY_STACK_KEY


def frames_of(key: str) -> tuple[str, ...]:
    """Frames of a call-site key, outermost first; a placeholder has none."""
    if key in PLACEHOLDERS or not key:
        return ()
    return tuple(key.split(";"))


def normalize_frame(frame: str) -> str:
    name = _LOCATION.sub("", frame.strip())
    name = _OFFSET.sub("", name)
    name = _CLONE_SUFFIX.sub("", name)
    if not name or name == UNKNOWN_FRAME or _is_address(name):
        return UNKNOWN_FRAME
    return name


def _is_address(name: str) -> bool:
    # "0x..." always; a bare hex run only when long and containing a digit, so short
    # symbols made of hex letters ("add", "feed") are not mistaken for addresses.
    if name.startswith("0x"):
        return _ADDRESS.fullmatch(name) is not None
    return (
        len(name) >= 8 and _ADDRESS.fullmatch(name) is not None and any(c.isdigit() for c in name)
    )


def match_key(key: str) -> str:
    """`key` reduced to symbol names (see the module docstring for the rules)."""
    if key in PLACEHOLDERS:
        return key
    out: list[str] = []
    for frame in frames_of(key):
        name = normalize_frame(frame)
        if name == UNKNOWN_FRAME and out and out[-1] == UNKNOWN_FRAME:
            continue
        out.append(name)
    return ";".join(out) if out else EMPTY_STACK_KEY


def short_location(frame: str) -> str:
    """`main.f (/long/path/main.go:42)` -> `main.f (main.go:42)`."""
    match = _LOCATION.search(frame)
    if match is None:
        return frame
    location = match.group(0).strip()[1:-1]
    return f"{frame[: match.start()]} ({location.rsplit('/', 1)[-1]})"


def site_label(key: str, frames: Sequence[str] | None = None) -> str:
    """A one-line name for a call site: its innermost frame worth reading."""
    if key in PLACEHOLDERS:
        return key
    stack = tuple(frames) if frames is not None else frames_of(key)
    picked = top_frames(stack, 1)
    return short_location(picked[0]) if picked else key
