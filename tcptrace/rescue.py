"""Never lose a report to the disk it was meant for (issue 7).

Start-up already refuses a report directory it cannot write (fileio.probe_writable),
but a disk can fill up during an hour of tracing. When writing the report fails
at the end, the data is still in memory: it is written, whole, to a fallback
directory instead (first $TCPTRACE_FALLBACK_DIR if set, else /var/tmp, which
survives a reboot, then the temp dir), the user is told where, and the CLI exits
with ReportRescued (11). The broken attempt's files are removed from the
original directory, so it holds no half report. Only when no fallback works is
the report lost, and the error says so.

The connections history may have been streamed to part files in the original
directory during the trace (tcptrace.history); the fallback re-homes them, with
the rows still in memory, through ConnectionHistory.copy_to.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import pandas as pd

from tcptrace.errors import ReportError
from tcptrace.fileio import _give_to_invoking_user
from tcptrace.history import ConnectionHistory
from tcptrace.report import (
    DEFAULT_WRITERS,
    ReportPaths,
    RunMeta,
    write_report,
)
from tcptrace.sockets import Connection

FALLBACK_ENV = "TCPTRACE_FALLBACK_DIR"
# Files a report consists of; a failed attempt's are removed from the original dir.
_REPORT_STEMS = ("open_sockets", "connections", "timeline")


def fallback_bases() -> list[Path]:
    """Where a rescued report may go, in order of preference."""
    configured = os.environ.get(FALLBACK_ENV)
    if configured:
        return [Path(configured)]
    bases: list[Path] = []
    for candidate in (Path("/var/tmp"), Path(tempfile.gettempdir())):
        if candidate not in bases:
            bases.append(candidate)
    return bases


def write_report_or_rescue(
    out_dir: Path,
    connections: Sequence[Connection],
    now: float,
    threshold_s: float,
    meta: RunMeta,
    *,
    timeline: pd.DataFrame | Sequence[Mapping[str, object]] = (),
    history: ConnectionHistory | None = None,
    warn: Callable[[str], None],
) -> ReportPaths:
    """write_report to `out_dir`, or, if that fails, to a fallback directory.

    `warn` receives one line when the fallback is used. Raises ReportError only
    if the report could be written nowhere.
    """
    try:
        return write_report(
            out_dir, connections, now, threshold_s, meta, timeline=timeline, history=history
        )
    except (ReportError, OSError) as exc:
        first = exc
    reason = _one_line(first)
    warn(f"tcptrace: could not write the report to {out_dir}: {reason}; saving it elsewhere")
    tried: list[str] = []
    for base in fallback_bases():
        try:
            directory = Path(tempfile.mkdtemp(prefix=f"{out_dir.name}.rescued.", dir=base))
        except OSError as exc:
            tried.append(f"{base}: {exc.strerror or exc}")
            continue
        _give_to_invoking_user(directory)
        notes: dict[str, object] = {"requested_dir": str(out_dir), "reason": reason}
        rescued_meta = dataclasses.replace(meta, extra={**meta.extra, "rescued": notes})
        rescued = _RescuedHistory(history, directory, notes) if history is not None else None
        try:
            paths = write_report(
                directory,
                connections,
                now,
                threshold_s,
                rescued_meta,
                timeline=timeline,
                history=rescued,
            )
        except (ReportError, OSError) as exc:
            tried.append(f"{directory}: {_one_line(exc)}")
            _remove_tree_quietly(directory)
            continue
        _remove_failed_attempt(out_dir, since=meta.started_at, streamed=rescued is not None)
        return paths
    raise ReportError(
        f"the report could not be written to {out_dir} ({reason}) nor to a fallback"
        f" directory ({'; '.join(tried) or 'none configured'}); only the summary above is left",
        f"free some space or set {FALLBACK_ENV}, then trace again",
    )


class _RescuedHistory:
    """A ConnectionHistory written whole into a fallback directory (write_report's
    StreamedTable): the rows it streamed and buffered, then the final ones."""

    def __init__(self, original: ConnectionHistory, directory: Path, notes: dict[str, object]):
        self._original = original
        self._directory = directory
        self._notes = notes
        self.rows = original.rows

    def finish(self, last: pd.DataFrame) -> list[Path]:
        written, rows = self._original.copy_to(self._directory, last)
        self._notes["connections_rows_counted_before_failure"] = self.rows
        self._notes["connections_rows_written"] = rows
        self.rows = rows
        return written


def _remove_failed_attempt(out_dir: Path, since: float, streamed: bool) -> None:
    """Delete what the failed attempt wrote in `out_dir` (never older files)."""
    names = [f"{stem}{w.suffix}" for stem in _REPORT_STEMS for w in DEFAULT_WRITERS]
    names.append("meta.json")
    if streamed:
        names += ["connections.csv.part", "connections.parquet.part"]
    for name in names:
        path = out_dir / name
        try:
            if path.stat().st_mtime >= since:
                path.unlink()
        except OSError:
            continue


def _remove_tree_quietly(directory: Path) -> None:
    for child in sorted(directory.glob("**/*"), reverse=True):
        with contextlib.suppress(OSError):
            child.rmdir() if child.is_dir() else child.unlink()
    with contextlib.suppress(OSError):
        directory.rmdir()


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
