"""PNG plots of a report (matplotlib, Agg backend: no display needed, works under sudo/ssh).

- open_over_time.png: open sockets over time for the top call sites (timeline table);
- age_histogram.png: ages of the sockets still open, stacked by leak class, with the
  threshold marked;
- state_mix.png: TCP states of the sockets still open, leaked vs not.

Each figure is also available as a function returning a matplotlib Figure, for notebooks.
An empty input still yields a figure that says so: a blank image would read as a bug.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Final

import numpy as np

from tcptrace.analysis.callsites import Analysis, timeline_grid
from tcptrace.analysis.names import site_label
from tcptrace.errors import UsageError
from tcptrace.fileio import write_atomic
from tcptrace.report.loader import Report

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PLOT_FILES: Final = ("open_over_time.png", "age_histogram.png", "state_mix.png")
MAX_LINES: Final = 8
# Fixed colors, so a class looks the same in every report: red for the definite leak.
_CLASS_COLORS: Final = {
    "close_wait": "#c0392b",
    "established": "#e67e22",
    "fd_on_closed_socket": "#8e44ad",
    "orphan": "#2980b9",
    "other": "#16a085",
    "listener": "#95a5a6",
}
_CLASS_ORDER: Final = tuple(_CLASS_COLORS)


def _figure(width: float = 10.0, height: float = 5.0) -> Figure:
    # Figure() directly, not pyplot: no global state, no GUI backend is ever selected.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _say_empty(fig: Figure, message: str) -> Figure:
    ax = fig.add_subplot()
    ax.text(0.5, 0.5, message, ha="center", va="center", fontsize=13, color="#555")
    ax.set_axis_off()
    return fig


def _shorten(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def open_over_time(report: Report, analysis: Analysis, top: int = MAX_LINES) -> Figure:
    fig = _figure()
    # Every sample, 0 where nothing was open: the table itself is sparse (schema 2).
    grid = timeline_grid(report, by="call_site")
    if len(grid.index) == 0:
        return _say_empty(fig, "no timeline samples in this report")
    if grid.empty:
        return _say_empty(fig, "no socket was open at any timeline sample")
    grid.index = (grid.index - grid.index[0]).total_seconds()
    # The analysis order (worst first) decides which sites get a line of their own.
    ordered = [s.key for s in analysis.sites if s.key in grid.columns]
    ordered += [c for c in grid.columns if c not in ordered]
    chosen, rest = ordered[: max(top, 1)], ordered[max(top, 1) :]
    ax = fig.add_subplot()
    for key in chosen:
        ax.plot(grid.index, grid[key], marker=".", linewidth=1.6, label=_shorten(site_label(key)))
    if rest:
        ax.plot(
            grid.index,
            grid[rest].sum(axis=1),
            color="#999",
            linestyle="--",
            label=f"{len(rest)} other call sites",
        )
    ax.set_title("Open sockets over time, per call site")
    ax.set_xlabel("seconds since the first sample")
    ax.set_ylabel("open sockets")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    return fig


def age_histogram(report: Report) -> Figure:
    fig = _figure()
    frame = report.open_sockets
    if frame.empty:
        return _say_empty(fig, "no sockets were open at the end of the run")
    ages = frame["age_s"].to_numpy(dtype=float, na_value=np.nan)
    classes = frame["leak_class"].astype(object).to_numpy()
    keep = ~np.isnan(ages)
    ages, classes = ages[keep], classes[keep]
    present = [c for c in _CLASS_ORDER if c in set(classes)]
    present += sorted(set(classes) - set(present))
    ax = fig.add_subplot()
    top = float(ages.max()) if len(ages) else 1.0
    bins = [float(b) for b in np.linspace(0.0, max(top, 1e-3) * 1.02, 31)]
    ax.hist(
        [ages[classes == c] for c in present],
        bins=bins,
        stacked=True,
        label=[str(c) for c in present],
        color=[_CLASS_COLORS.get(str(c), "#7f8c8d") for c in present],
    )
    threshold = report.threshold_s
    if np.isfinite(threshold):
        ax.axvline(threshold, color="#2c3e50", linestyle="--", label=f"threshold {threshold:g}s")
    ax.set_title("Age of the sockets still open at the end of the run")
    ax.set_xlabel("age (seconds; a lower bound for sockets opened before tracing)")
    ax.set_ylabel("sockets")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8, title="leak class", title_fontsize=8)
    return fig


def state_mix(report: Report) -> Figure:
    fig = _figure(9.0, 4.5)
    frame = report.open_sockets
    if frame.empty:
        return _say_empty(fig, "no sockets were open at the end of the run")
    leaked = frame["leak"].fillna(False).to_numpy(dtype=bool)
    states = frame["state"].astype(object).to_numpy()
    names = sorted(set(states), key=lambda s: (-int((states == s).sum()), str(s)))
    flagged = [int(((states == s) & leaked).sum()) for s in names]
    other = [int(((states == s) & ~leaked).sum()) for s in names]
    ax = fig.add_subplot()
    y = np.arange(len(names))
    ax.barh(y, flagged, color="#d35400", label="flagged as leak")
    ax.barh(y, other, left=flagged, color="#95a5a6", label="not flagged")
    for i, (a, b) in enumerate(zip(flagged, other, strict=True)):
        ax.text(a + b, i, f" {a + b}", va="center", fontsize=9)
    ax.set_yticks(y, [str(n) for n in names])
    ax.invert_yaxis()  # most common state on top
    ax.set_title("TCP states of the sockets still open at the end of the run")
    ax.set_xlabel("sockets")
    ax.set_xlim(0, max(a + b for a, b in zip(flagged, other, strict=True)) * 1.12)
    ax.legend(fontsize=8, loc="lower right")
    return fig


def write_plots(
    report: Report, analysis: Analysis, directory: Path, top: int = MAX_LINES
) -> Sequence[Path]:
    """Write the three PNGs into `directory` (created if missing); returns their paths."""
    if directory.exists() and not directory.is_dir():
        raise UsageError(f"--plots {directory} exists and is not a directory")
    from tcptrace.fileio import prepare_output_dir

    prepare_output_dir(directory, force=True)
    figures = (open_over_time(report, analysis, top), age_histogram(report), state_mix(report))
    written = []
    for name, fig in zip(PLOT_FILES, figures, strict=True):
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
        path = directory / name
        write_atomic(path, buffer.getvalue())
        written.append(path)
    return written
