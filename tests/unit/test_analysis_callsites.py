"""analyze(): per call site numbers, growth, time to RLIMIT_NOFILE; text and JSON output."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tcptrace.analysis import analyze, sites_frame
from tcptrace.analysis.callsites import Analysis, SiteStats, slope_per_min
from tcptrace.analysis.render import render_json, render_text, to_json_dict
from tcptrace.events import TcpState
from tcptrace.report import TABLES, load_report, write_report
from tcptrace.report.summary import UNKNOWN_STACK_KEY
from tests.unit.analysis_data import CLIENT, RLIMIT, SERVER, write_demo_report
from tests.unit.test_report_io import make_conn, run_meta

NOW = 1_700_000_100.0


@pytest.fixture
def demo(tmp_path: Path) -> Analysis:
    return analyze(load_report(write_demo_report(tmp_path / "r")))


def by_label(analysis: Analysis, prefix: str) -> SiteStats:
    (site,) = [s for s in analysis.sites if s.label.startswith(prefix)]
    return site


def test_per_site_counts(demo: Analysis) -> None:
    accept = by_label(demo, "main.serveLeaky")
    assert (accept.opened, accept.closed, accept.still_open, accept.flagged) == (50, 0, 50, 50)
    assert accept.leak_classes == {"close_wait": 30, "established": 20}
    assert accept.states == {"CLOSE_WAIT": 30, "ESTABLISHED": 20}
    assert accept.pids == (SERVER,)
    assert accept.label == "main.serveLeaky (leakydemo.go:160)"  # short file:line

    leaky = by_label(demo, "main.leakyDial")
    assert (leaky.opened, leaky.closed, leaky.still_open, leaky.flagged) == (20, 0, 20, 20)
    assert leaky.oldest_age_s == pytest.approx(5.5)
    assert leaky.leak_rate == 1.0

    proper = by_label(demo, "main.properDial")
    assert (proper.opened, proper.closed, proper.still_open, proper.flagged) == (30, 30, 0, 0)
    assert proper.oldest_age_s is None and proper.leak_rate == 0.0

    pre = by_label(demo, UNKNOWN_STACK_KEY)
    assert (pre.opened, pre.preexisting, pre.flagged) == (0, 1, 1)
    assert pre.oldest_is_lower_bound and pre.frames == ()

    listener = by_label(demo, "main.runServer")
    assert (listener.still_open, listener.flagged) == (1, 0)


def test_sites_are_worst_first(demo: Analysis) -> None:
    labels = [s.label.split(" ")[0] for s in demo.sites]
    assert labels[:2] == ["main.serveLeaky", "main.leakyDial"]
    assert labels[-1] == "main.properDial"  # nothing open, nothing flagged
    assert (demo.flagged, demo.still_open, demo.seen) == (71, 72, 102)


def test_endpoints_and_ports_hide_ephemeral_ports(demo: Analysis) -> None:
    assert demo.remote_endpoints == (
        ("127.0.0.1:*", 50),  # accepted: each has its own ephemeral remote port
        ("127.0.0.1:40000", 20),
        ("[::1]:6379", 1),
    )
    assert demo.local_ports == (("40000", 50), ("*", 20), ("5555", 1))


def test_slope_per_min() -> None:
    assert slope_per_min([0, 1, 2, 3], [0, 2, 4, 6]) == pytest.approx(120.0)
    assert slope_per_min([0, 60], [10, 5]) == pytest.approx(-5.0)
    assert slope_per_min([5.0], [1]) is None
    assert slope_per_min([1.0, 1.0], [1, 9]) is None


def linear_report(tmp_path: Path, fds_end: int | None, per_s: int = 2) -> Analysis:
    """One call site of one pid growing by `per_s` sockets a second for 10 s."""
    conns = [make_conn(key=i, opened_at=NOW - 100) for i in range(per_s * 10)]
    timeline = [
        {
            "t": NOW - 10 + i,
            "pid": 100,
            "comm": "app",
            "call_site": "main;handler;connect",
            "open_count": per_s * i,
            "flagged_count": 0,
            "oldest_age_s": None,
        }
        for i in range(11)
    ]
    extra: dict[str, Any] = {
        "rlimit_nofile": {"100": RLIMIT, "200": None},
        "fd_count": {"start": {"100": 4}, "end": {"100": fds_end}},
        "timeline_sample_times": [NOW - 10 + i for i in range(11)],
    }
    out = tmp_path / "linear"
    write_report(out, conns, NOW, 30.0, run_meta(pids=(100,), extra=extra), timeline=timeline)
    return analyze(load_report(out))


def test_growth_and_time_to_rlimit(tmp_path: Path) -> None:
    analysis = linear_report(tmp_path, fds_end=124)
    (site,) = analysis.sites
    assert site.growth_per_min == pytest.approx(120.0)
    assert site.rlimit is not None
    assert site.rlimit.seconds_left == pytest.approx((RLIMIT - 124) / 2.0)  # 450 s
    assert (site.rlimit.pid, site.rlimit.limit, site.rlimit.fds_in_use) == (100, RLIMIT, 124)
    assert not site.rlimit.fds_is_lower_bound
    (proc,) = analysis.processes
    assert (proc.fds_start, proc.fds_end, proc.rlimit_nofile) == (4, 124, RLIMIT)
    assert proc.rlimit is not None and proc.rlimit.seconds_left == pytest.approx(450.0)
    text = render_text(analysis)
    assert "time to RLIMIT_NOFILE: ~7m30s for pid 100 (124 of 1024 fds in use" in text
    assert "+120.0" in text


def test_time_to_rlimit_without_fd_count_is_an_upper_bound(tmp_path: Path) -> None:
    analysis = linear_report(tmp_path, fds_end=None)
    (site,) = analysis.sites
    assert site.rlimit is not None and site.rlimit.fds_is_lower_bound
    assert site.rlimit.fds_in_use == 20  # its open sockets stand in for the fd count
    assert site.rlimit.seconds_left == pytest.approx((RLIMIT - 20) / 2.0)
    assert "time to RLIMIT_NOFILE: <=8m22s for pid 100 (>=20 of 1024" in render_text(analysis)


def test_no_estimate_when_shrinking_or_limit_unknown(tmp_path: Path) -> None:
    analysis = linear_report(tmp_path, fds_end=124, per_s=0)
    assert analysis.sites[0].growth_per_min == 0.0
    assert analysis.sites[0].rlimit is None
    assert "time to RLIMIT_NOFILE" not in render_text(analysis)


def test_text_report_sections(demo: Analysis) -> None:
    text = render_text(demo, top=3)
    assert "call sites, worst first (top 3 of 5)" in text
    assert "#1 main.serveLeaky (leakydemo.go:160)" in text
    assert "classes: close_wait=30 established=20" in text
    assert f"pid {CLIENT} (leakydemo): 21 open, 21 flagged; fds 4 -> 25; RLIMIT_NOFILE 1024" in text
    assert "leaked sockets by remote endpoint: 127.0.0.1:* (50), 127.0.0.1:40000 (20)" in text
    assert "main.properDial" not in text  # beyond --top 3
    assert text.rstrip().endswith("losses: events_lost=0 stacks_failed=0")


def test_losses_are_always_shown(tmp_path: Path) -> None:
    lossy = analyze(load_report(write_demo_report(tmp_path / "a", losses={"events_lost": 7})))
    assert "events_lost=7  (nonzero: results may be incomplete)" in render_text(lossy)
    assert to_json_dict(lossy)["losses_nonzero"] is True
    silent = analyze(load_report(write_demo_report(tmp_path / "b", losses={})))
    assert "no loss counters were collected; completeness unknown" in render_text(silent)
    assert to_json_dict(silent)["losses_collected"] is False


def test_empty_report_says_so(tmp_path: Path) -> None:
    write_report(tmp_path, [], NOW, 30.0, run_meta())
    analysis = analyze(load_report(tmp_path))
    text = render_text(analysis)
    assert "call sites: none (no TCP sockets were seen)" in text
    assert "fewer than 2 timeline samples" in text
    assert "losses: events_dropped=0 ustack_failed=2  (nonzero" in text


def test_json_is_strict_and_complete(demo: Analysis) -> None:
    data = json.loads(render_json(demo))  # allow_nan=False inside: NaN would raise
    assert data["totals"] == {
        "seen": 102,
        "still_open": 72,
        "flagged": 71,
        "call_sites": 5,
        "timeline_samples": 7,
        "untracked_open": 0,
    }
    first = data["call_sites"][0]
    assert first["label"].startswith("main.serveLeaky")
    assert first["leak_rate"] == 1.0
    assert first["rlimit"]["limit"] == RLIMIT
    assert data["losses"] == {"events_lost": 0, "stacks_failed": 0}
    proper = next(s for s in data["call_sites"] if s["label"].startswith("main.properDial"))
    assert proper["oldest_age_s"] is None
    assert len(to_json_dict(demo, top=2)["call_sites"]) == 2


def test_sites_frame_is_typed(demo: Analysis) -> None:
    frame = sites_frame(demo)
    assert frame["flagged"].tolist()[:2] == [50, 20]
    assert str(frame["flagged"].dtype) == "Int64"
    assert str(frame["growth_per_min"].dtype) == "Float64"


def test_untracked_sockets_are_noted(tmp_path: Path) -> None:
    conns = [make_conn(key=1, untracked=True), make_conn(key=2, state=TcpState.CLOSE_WAIT)]
    write_report(tmp_path, conns, NOW, 30.0, run_meta())
    analysis = analyze(load_report(tmp_path))
    assert analysis.untracked_open == 1 and analysis.flagged == 1
    assert "1 open sockets were untracked" in render_text(analysis)


def step_rows(dense: bool) -> list[dict[str, object]]:
    """10 sockets of one call site opened at the sixth of 11 samples; nothing before."""
    return [
        {
            "t": NOW - 10 + i,
            "pid": 100,
            "comm": "app",
            "call_site": "main;handler;connect",
            "open_count": 10 if i >= 5 else 0,
            "flagged_count": 0,
            "oldest_age_s": None if i < 5 else float(i - 5),
        }
        for i in range(11)
        if dense or i >= 5
    ]


def test_sparse_timeline_grows_from_the_samples_where_nothing_was_open(tmp_path: Path) -> None:
    # Version 2: samples with nothing open have no row; meta.json lists every sample
    # time, and they count as 0, as the dense grid of version 1 said explicitly.
    conns = [make_conn(key=i, opened_at=NOW - 5) for i in range(10)]
    times = [NOW - 10 + i for i in range(11)]
    extra = {"timeline_sample_times": times}
    out = tmp_path / "v2"
    write_report(out, conns, NOW, 30.0, run_meta(extra=extra), timeline=step_rows(dense=False))
    sparse = analyze(load_report(out))
    expected = slope_per_min(range(11), [10 if i >= 5 else 0 for i in range(11)])
    assert expected is not None and expected > 0
    assert sparse.sites[0].growth_per_min == pytest.approx(expected)
    assert sparse.timeline_samples == 11
    # Without the sample times, the same rows would read as flat (0/min): a version 2
    # timeline then gives no growth at all rather than a wrong one.
    meta = json.loads((out / "meta.json").read_text())
    del meta["extra"]["timeline_sample_times"]
    (out / "meta.json").write_text(json.dumps(meta))
    assert analyze(load_report(out)).sites[0].growth_per_min is None


def test_version_1_report_with_a_dense_timeline_reads_the_same(tmp_path: Path) -> None:
    conns = [make_conn(key=i, opened_at=NOW - 5) for i in range(10)]
    out = tmp_path / "v1"
    write_report(out, conns, NOW, 30.0, run_meta(), timeline=step_rows(dense=True))
    meta = json.loads((out / "meta.json").read_text())
    meta["schema_version"] = 1
    (out / "meta.json").write_text(json.dumps(meta))
    for table in TABLES:  # as version 1 wrote them
        (out / f"{table}.parquet").unlink()
    dense = analyze(load_report(out))
    expected = slope_per_min(range(11), [10 if i >= 5 else 0 for i in range(11)])
    assert dense.sites[0].growth_per_min == pytest.approx(expected)
    assert dense.timeline_samples == 11
