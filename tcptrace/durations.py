"""Durations as users type them on the command line (`30s`, `1h30m`) and as we print them."""

from __future__ import annotations

import math
import re

from tcptrace.errors import UsageError

ACCEPTED_FORMS = "e.g. 500ms, 30s, 5m, 1h, 1h30m, 2.5s, or a bare number of seconds"

_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"
# "ms" must precede "m" in the alternation, or "500ms" would lex as 500m + "s".
_COMPONENT = re.compile(rf"\s*({_NUMBER})\s*(ms|s|m|h|d)\s*")
_BARE = re.compile(rf"\s*({_NUMBER})\s*")


def parse_duration(text: str, *, allow_zero: bool = False) -> float:
    """Seconds in `text`: `500ms`, `30s`, `5m`, `1h`, `1h30m`, `2.5s`, or a bare number.

    Raises UsageError naming the bad value and the accepted forms.
    """
    original = text
    text = text.strip().lower()
    if text.startswith("-"):
        raise UsageError(f"duration {original!r} is negative", hint=ACCEPTED_FORMS)
    if text.startswith("+"):
        text = text[1:]

    bare = _BARE.fullmatch(text)
    seconds = float(bare.group(1)) if bare is not None else _parse_components(text, original)

    if not math.isfinite(seconds):
        raise UsageError(f"duration {original!r} is too large", hint=ACCEPTED_FORMS)
    if seconds == 0 and not allow_zero:
        raise UsageError(f"duration {original!r} must be greater than zero", hint=ACCEPTED_FORMS)
    return seconds


def _parse_components(text: str, original: str) -> float:
    total = 0.0
    seen: set[str] = set()
    pos = 0
    while pos < len(text):
        match = _COMPONENT.match(text, pos)
        if match is None or match.end() == pos:
            raise UsageError(f"invalid duration {original!r}", hint=ACCEPTED_FORMS)
        number, unit = match.group(1), match.group(2)
        # "5m5m" is almost certainly a typo; refusing it beats guessing.
        if unit in seen:
            raise UsageError(
                f"invalid duration {original!r}: unit {unit!r} given twice", hint=ACCEPTED_FORMS
            )
        seen.add(unit)
        total += float(number) * _UNIT_SECONDS[unit]
        pos = match.end()
    if not seen:
        raise UsageError(f"invalid duration {original!r}", hint=ACCEPTED_FORMS)
    return total


def format_duration(seconds: float) -> str:
    """Short human form: `850ms`, `2.5s`, `45s`, `2m05s`, `1h30m`, `3d04h`."""
    if math.isnan(seconds):
        return "?"
    if seconds < 0:
        return "-" + format_duration(-seconds)
    if math.isinf(seconds):
        return "inf"
    if seconds < 1:
        millis = round(seconds * 1000)
        if millis == 0 and seconds > 0:
            return "<1ms"
        if millis < 1000:
            return f"{millis}ms"
    if seconds < 10:
        tenths = round(seconds * 10)
        if tenths < 100:
            return f"{tenths // 10}s" if tenths % 10 == 0 else f"{tenths / 10:.1f}s"
    # Round once, up front, so 59.7s becomes "1m00s" rather than "60s".
    total = round(seconds)
    if total < 60:
        return f"{total}s"
    if total < 3600:
        return f"{total // 60}m{total % 60:02d}s"
    minutes = round(seconds / 60)
    if minutes < 24 * 60:
        return f"{minutes // 60}h{minutes % 60:02d}m"
    hours = round(seconds / 3600)
    return f"{hours // 24}d{hours % 24:02d}h"
