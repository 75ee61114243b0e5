from __future__ import annotations

import pytest

from tcptrace.durations import format_duration, parse_duration
from tcptrace.errors import UsageError


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("500ms", 0.5),
        ("30s", 30.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1h30m", 5400.0),
        ("2.5s", 2.5),
        ("1m30s", 90.0),
        ("1h 30m", 5400.0),
        ("1h0m1s", 3601.0),
        ("1s500ms", 1.5),
        ("2d", 172800.0),
        ("45", 45.0),
        ("0.25", 0.25),
        (".5s", 0.5),
        ("  10s ", 10.0),
        ("10S", 10.0),
        ("+3s", 3.0),
    ],
)
def test_parse_accepts(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text",
    [
        "5x",
        "",
        "   ",
        "s",
        "ms",
        "1.2.3s",
        "5m5m",
        "1e3",
        "abc",
        "1h-5m",
        "nan",
        "inf",
        "5 5s",
        ".",
    ],
)
def test_parse_rejects_junk_naming_value_and_forms(text: str) -> None:
    with pytest.raises(UsageError) as info:
        parse_duration(text)
    message = str(info.value)
    assert repr(text) in message
    assert "500ms" in message and "1h30m" in message  # shows the accepted forms
    assert "\n" not in message
    assert info.value.exit_code == 2


@pytest.mark.parametrize("text", ["-5s", "-1", " -500ms"])
def test_parse_rejects_negative(text: str) -> None:
    with pytest.raises(UsageError, match="negative"):
        parse_duration(text)


@pytest.mark.parametrize("text", ["0", "0s", "0ms", "0h0m"])
def test_zero_rejected_unless_allowed(text: str) -> None:
    with pytest.raises(UsageError, match="greater than zero"):
        parse_duration(text)
    assert parse_duration(text, allow_zero=True) == 0.0


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.0, "0ms"),
        (0.0004, "<1ms"),
        (0.85, "850ms"),
        (0.9996, "1s"),
        (1.0, "1s"),
        (2.5, "2.5s"),
        (9.96, "10s"),
        (45.2, "45s"),
        (59.7, "1m00s"),
        (125.0, "2m05s"),
        (3599.6, "1h00m"),
        (5400.0, "1h30m"),
        (86400.0 + 4 * 3600, "1d04h"),
        (-125.0, "-2m05s"),
        (float("nan"), "?"),
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@pytest.mark.parametrize("seconds", [0.85, 2.5, 45.0, 125.0, 5400.0, 3 * 86400.0 + 3600])
def test_format_output_parses_back(seconds: float) -> None:
    assert parse_duration(format_duration(seconds)) == pytest.approx(seconds)
