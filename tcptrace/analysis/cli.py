"""What `tcptrace report` and `tcptrace diff` do, minus click: load, analyze, write, render.

Returns the text to print, so the click commands stay thin and tests can call these
directly. Bad input surfaces as TcptraceError subclasses (ReportError from the loader,
UsageError for bad output paths), which the CLI maps to one line and an exit code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import cast

from tcptrace.analysis.callsites import analyze
from tcptrace.analysis.diff import diff_analyses, render_diff_json, render_diff_text
from tcptrace.analysis.flamegraph import Weight, write_flamegraph
from tcptrace.analysis.render import render_text, to_json_dict
from tcptrace.report.loader import load_report


def run_report(
    directory: Path,
    fmt: str = "text",
    flamegraph: Path | None = None,
    weight: str = "count",
    plots: Path | None = None,
    top: int = 10,
) -> str:
    report = load_report(directory)
    analysis = analyze(report)
    written: dict[str, list[str]] = {}
    if flamegraph is not None:
        files = write_flamegraph(report, flamegraph, cast(Weight, weight))
        written["flamegraph"] = [str(files.html), str(files.folded)]
    if plots is not None:
        from tcptrace.analysis.plots import write_plots  # matplotlib: only when asked

        written["plots"] = [str(p) for p in write_plots(report, analysis, plots, top or 8)]
    if fmt == "json":
        data = to_json_dict(analysis, top)
        data["written"] = written
        return json.dumps(data, indent=2, allow_nan=False) + "\n"
    text = render_text(analysis, top=top if top > 0 else len(analysis.sites))
    for kind, paths in written.items():
        text += f"{kind}: {', '.join(paths)}\n"
    return text


def run_diff(before: Path, after: Path, fmt: str = "text", top: int = 0) -> str:
    diff = diff_analyses(analyze(load_report(before)), analyze(load_report(after)))
    return render_diff_json(diff) if fmt == "json" else render_diff_text(diff, top)
