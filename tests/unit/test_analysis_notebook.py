"""examples/leak-analysis.ipynb runs top to bottom (here on demo-shaped synthetic reports;
tests/kernel/test_analysis_kernel.py runs it on a real demo trace)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import nbclient
import nbformat
import pytest

from tests.unit.analysis_data import write_demo_report

NOTEBOOK = Path(__file__).resolve().parents[2] / "examples" / "leak-analysis.ipynb"


def execute_notebook(before: Path, after: Path, workdir: Path, fixed_site: str) -> Any:
    """Run every cell in a fresh kernel; returns the executed notebook (raises on error)."""
    notebook = nbformat.read(NOTEBOOK, as_version=4)  # type: ignore[no-untyped-call]
    env = {
        "TCPTRACE_REPORT": str(before),
        "TCPTRACE_REPORT_AFTER": str(after),
        "TCPTRACE_FIXED_SITE": fixed_site,
        "MPLBACKEND": "Agg",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel inherits this process's environment
    try:
        client = nbclient.NotebookClient(
            notebook,
            timeout=300,
            kernel_name="python3",
            resources={"metadata": {"path": str(workdir)}},
        )
        client.execute()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return notebook


def outputs_text(notebook: Any) -> str:
    parts = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            parts.append(output.get("text", ""))
            parts.append(output.get("data", {}).get("text/plain", ""))
    return "\n".join(parts)


def has_image(notebook: Any) -> bool:
    return any(
        "image/png" in output.get("data", {})
        for cell in notebook.cells
        for output in cell.get("outputs", [])
    )


def test_notebook_runs_on_synthetic_reports(tmp_path: Path) -> None:
    before = write_demo_report(tmp_path / "before")
    after = write_demo_report(tmp_path / "after", build=1, fixed=True)
    executed = execute_notebook(before, after, tmp_path, "main.leakyDial")
    text = outputs_text(executed)
    assert "main.leakyDial: fixed (flagged 20 -> 0)" in text
    assert "main.serveLeaky" in text  # the worst site is listed
    assert has_image(executed)  # the timeline plot was drawn


def test_notebook_fails_when_the_site_still_leaks(tmp_path: Path) -> None:
    before = write_demo_report(tmp_path / "before")
    same = write_demo_report(tmp_path / "same", build=1)
    with pytest.raises(nbclient.exceptions.CellExecutionError, match="still leaks"):
        execute_notebook(before, same, tmp_path, "main.leakyDial")
