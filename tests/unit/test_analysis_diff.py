"""Matching call sites across runs by symbol names, and `diff` statuses and output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tcptrace.analysis import analyze, diff_analyses, diff_frame, match_key, normalize_frame
from tcptrace.analysis.diff import (
    ReportDiff,
    SiteDelta,
    SiteSide,
    _status,
    render_diff_json,
    render_diff_text,
)
from tcptrace.analysis.names import site_label
from tcptrace.report import load_report
from tcptrace.report.summary import FAILED_STACK_KEY, UNKNOWN_STACK_KEY
from tests.unit.analysis_data import write_demo_report


@pytest.mark.parametrize(
    ("frame", "expected"),
    [
        ("main.leakyDial (/src/leakydemo.go:190)", "main.leakyDial"),
        ("main.leakyDial", "main.leakyDial"),
        ("__libc_connect+0x1f", "__libc_connect"),
        ("tcp_connect+0x1a (/lib/x.so)", "tcp_connect"),
        ("handle_request.constprop.0", "handle_request"),
        ("worker.isra.2.cold", "worker"),
        (
            "net.(*Dialer).DialContext (/usr/lib/go/src/net/dial.go:500)",
            "net.(*Dialer).DialContext",
        ),
        ("0x7f3a12b4c5d6", "[unknown]"),
        ("7f3a12b4c5d6", "[unknown]"),
        ("[unknown]", "[unknown]"),
        ("deadbeef", "deadbeef"),  # no digit: could be a symbol, kept
        ("add", "add"),
    ],
)
def test_normalize_frame(frame: str, expected: str) -> None:
    assert normalize_frame(frame) == expected


def test_match_key_ignores_addresses_offsets_and_lines() -> None:
    build1 = "main (/a.c:10);serve+0x10;0x401000;0x401010;__connect+0x2"
    build2 = "main (/a.c:14);serve+0x30;0x7f0000;__connect+0x9"
    assert match_key(build1) == match_key(build2) == "main;serve;[unknown];__connect"
    assert match_key("main;serve;other") != match_key(build1)
    assert match_key(UNKNOWN_STACK_KEY) == UNKNOWN_STACK_KEY
    assert match_key(FAILED_STACK_KEY) == FAILED_STACK_KEY


def test_site_label_picks_the_innermost_meaningful_frame() -> None:
    key = "runtime.main;main.main (/x/m.go:9);main.dial (/x/m.go:20);net.Dial;syscall.connect"
    assert site_label(key) == "main.dial (m.go:20)"
    assert site_label(UNKNOWN_STACK_KEY) == UNKNOWN_STACK_KEY


def make_diff(tmp_path: Path, **after: object) -> ReportDiff:
    before = analyze(load_report(write_demo_report(tmp_path / "before")))
    later = analyze(load_report(write_demo_report(tmp_path / "after", build=1, **after)))  # type: ignore[arg-type]
    return diff_analyses(before, later)


def delta(diff: ReportDiff, name: str) -> SiteDelta:
    (found,) = [d for d in diff.sites if d.label.startswith(name)]
    return found


def test_fix_is_recognised_across_a_rebuild(tmp_path: Path) -> None:
    diff = make_diff(tmp_path, fixed=True)
    # build=1 moved every line number and address: without symbol matching, every
    # site would show up as both "gone" and "new".
    assert not diff.by_status("new")
    leaky = delta(diff, "main.leakyDial")
    assert leaky.status == "fixed"
    assert leaky.before is not None and leaky.after is not None
    assert (leaky.before.flagged, leaky.after.flagged) == (20, 0)
    assert (leaky.after.opened, leaky.after.closed) == (20, 20)
    assert leaky.change("still_open") == -20
    assert delta(diff, "main.serveLeaky").status == "same"  # the server still leaks all
    assert delta(diff, "main.properDial").status == "clean"
    assert leaky.key == match_key(leaky.key)  # keys are already normalized


def test_site_not_exercised_is_gone_not_fixed(tmp_path: Path) -> None:
    diff = make_diff(tmp_path, leak=0)
    leaky = delta(diff, "main.leakyDial")
    assert leaky.status == "gone" and leaky.after is None


def test_worse_better_and_new(tmp_path: Path) -> None:
    before = analyze(load_report(write_demo_report(tmp_path / "b", leak=5, ok=30)))
    after = analyze(load_report(write_demo_report(tmp_path / "a", leak=20, ok=5)))
    diff = diff_analyses(before, after)
    # leakyDial: 5 of 5 -> 20 of 20 is the same rate; the server's rate is 100% in both.
    assert delta(diff, "main.leakyDial").status == "same"
    reverse = diff_analyses(after, before)
    assert delta(reverse, "main.leakyDial").status == "same"

    empty = analyze(load_report(write_demo_report(tmp_path / "e", leak=0, ok=0)))
    grown = diff_analyses(empty, after)
    assert delta(grown, "main.leakyDial").status == "new"
    assert grown.sites[0].status in ("worse", "new")  # regressions are listed first


def test_rate_change_sets_worse_or_better(tmp_path: Path) -> None:
    half = analyze(load_report(write_demo_report(tmp_path / "h", leak=10, ok=0, fixed=False)))
    fixed_half = analyze(load_report(write_demo_report(tmp_path / "f", leak=10, ok=0, fixed=True)))
    # serveLeaky: every accepted socket leaks in both runs, so the rate does not move.
    assert delta(diff_analyses(half, fixed_half), "main.serveLeaky").status == "same"
    # leakyDial existed before with 0 of 10 leaked: a regression, not a new site.
    assert delta(diff_analyses(fixed_half, half), "main.leakyDial").status == "worse"


@pytest.mark.parametrize(
    ("before", "after", "status"),
    [
        ((10, 5), (10, 2), "better"),
        ((10, 2), (10, 5), "worse"),
        ((10, 5), (20, 10), "same"),  # twice the sockets, the same share leaks
        ((10, 5), (10, 0), "fixed"),
        ((10, 5), None, "gone"),
        (None, (10, 5), "new"),
        ((0, 0), (10, 5), "new"),
        ((10, 0), (10, 0), "clean"),
    ],
)
def test_status_rules(
    before: tuple[int, int] | None, after: tuple[int, int] | None, status: str
) -> None:
    def side(counts: tuple[int, int] | None) -> SiteSide | None:
        if counts is None:
            return None
        opened, flagged = counts
        return SiteSide(opened, 0, opened - flagged, flagged, flagged, None)

    assert _status(side(before), side(after)) == status


def test_text_and_json(tmp_path: Path) -> None:
    diff = make_diff(tmp_path, fixed=True)
    text = render_diff_text(diff)
    assert "flagged leaks: 71 -> 51" in text
    line = next(x for x in text.splitlines() if x.startswith("fixed"))
    assert "20->20" in line and "20->0" in line and "100%->0%" in line
    assert "main.leakyDial" in line
    assert "before losses: events_lost=0" in text and "after  losses:" in text
    data = json.loads(render_diff_json(diff))
    fixed = [s for s in data["sites"] if s["status"] == "fixed"]
    assert len(fixed) == 1 and fixed[0]["after"]["flagged"] == 0
    assert data["flagged"] == {"before": 71, "after": 51}


def test_diff_frame(tmp_path: Path) -> None:
    frame = diff_frame(make_diff(tmp_path, fixed=True))
    row = frame[frame["site"] == "main.leakyDial"].iloc[0]
    assert row["status"] == "fixed"
    assert (row["flagged_before"], row["flagged_after"]) == (20, 0)
    assert str(frame["flagged_before"].dtype) == "Int64"
