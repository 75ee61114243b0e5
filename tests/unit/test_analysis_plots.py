"""PNG plots: written, valid, not blank; an empty report still gets figures that say so."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from matplotlib.patches import Rectangle

from tcptrace.analysis import analyze
from tcptrace.analysis.plots import PLOT_FILES, age_histogram, open_over_time, write_plots
from tcptrace.errors import UsageError
from tcptrace.report import load_report, write_report
from tests.unit.analysis_data import write_demo_report
from tests.unit.test_report_io import run_meta


def distinct_colors(path: Path) -> int:
    from matplotlib.image import imread

    pixels = np.round(imread(path)[..., :3] * 255).astype(int).reshape(-1, 3)
    return len({tuple(p) for p in pixels})


def test_write_plots(tmp_path: Path) -> None:
    report = load_report(write_demo_report(tmp_path / "r"))
    paths = write_plots(report, analyze(report), tmp_path / "plots" / "nested")
    assert [p.name for p in paths] == list(PLOT_FILES)
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert distinct_colors(path) > 50, f"{path.name} looks blank"


def test_lines_follow_the_timeline(tmp_path: Path) -> None:
    report = load_report(write_demo_report(tmp_path / "r"))
    fig = open_over_time(report, analyze(report), top=2)
    (ax,) = fig.axes
    labels = [line.get_label() for line in ax.get_lines()]
    assert labels == [
        "main.serveLeaky (leakydemo.go:160)",
        "main.leakyDial (leakydemo.go:190)",
        "3 other call sites",
    ]
    serve = ax.get_lines()[0]
    assert np.asarray(serve.get_ydata())[-1] == 50  # the final sample: all 50 accepted, open
    assert np.asarray(serve.get_xdata())[-1] == pytest.approx(6.0)


def test_histogram_marks_the_threshold(tmp_path: Path) -> None:
    report = load_report(write_demo_report(tmp_path / "r", threshold_s=2.0))
    (ax,) = age_histogram(report).axes
    assert "threshold 2s" in [line.get_label() for line in ax.get_lines()]
    heights = sum(patch.get_height() for patch in ax.patches if isinstance(patch, Rectangle))
    assert heights == len(report.open_sockets)  # stacked layers add up: each socket once


def test_empty_report_gets_explanatory_figures(tmp_path: Path) -> None:
    write_report(tmp_path / "r", [], 1.0e9, 30.0, run_meta())
    report = load_report(tmp_path / "r")
    texts = [t.get_text() for t in open_over_time(report, analyze(report)).axes[0].texts]
    assert texts == ["no timeline samples in this report"]
    paths = write_plots(report, analyze(report), tmp_path / "plots")
    assert all(distinct_colors(p) > 2 for p in paths)  # the message is drawn


def test_plots_path_must_be_a_directory(tmp_path: Path) -> None:
    report = load_report(write_demo_report(tmp_path / "r"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="not a directory"):
        write_plots(report, analyze(report), tmp_path / "file")


def test_idle_samples_are_drawn_as_zeros(tmp_path: Path) -> None:
    # Sparse timeline (schema 2): nothing open at the first two samples and in a gap;
    # the line must start at the first sample and drop to 0, not cut across the gap.
    from tcptrace.report import TimelineRecorder
    from tests.unit.test_report_io import make_conn

    t0 = 1_700_000_000.0
    rec = TimelineRecorder()
    conn = make_conn(key=1, stack=("a",), opened_at=t0 + 2)
    for i, open_now in enumerate([[], [], [conn], [conn], [], [], [], [conn]]):
        rec.sample(t0 + i, open_now, 30.0)
    extra = {"timeline_sample_times": rec.sample_times()}
    write_report(tmp_path / "r", [], t0 + 7, 30.0, run_meta(extra=extra), timeline=rec.frame())
    report = load_report(tmp_path / "r")
    (ax,) = open_over_time(report, analyze(report)).axes
    (line,) = ax.get_lines()
    assert np.asarray(line.get_xdata()).tolist() == [0, 1, 2, 3, 4, 5, 6, 7]
    assert np.asarray(line.get_ydata()).tolist() == [0, 0, 1, 1, 0, 0, 0, 1]


def test_samples_with_nothing_open_say_so(tmp_path: Path) -> None:
    extra = {"timeline_sample_times": [1.0e9, 1.0e9 + 1]}
    write_report(tmp_path / "r", [], 1.0e9 + 1, 30.0, run_meta(extra=extra))
    report = load_report(tmp_path / "r")
    texts = [t.get_text() for t in open_over_time(report, analyze(report)).axes[0].texts]
    assert texts == ["no socket was open at any timeline sample"]
