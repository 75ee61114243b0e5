"""Offline analysis of report directories: per call site statistics, growth, time to
RLIMIT_NOFILE, flame graphs, plots and diffs. Reads reports only (no bcc, no root)."""

from tcptrace.analysis.callsites import (
    Analysis,
    ProcessStats,
    RlimitEstimate,
    SiteStats,
    analyze,
    sites_frame,
    timeline_grid,
)
from tcptrace.analysis.diff import ReportDiff, SiteDelta, diff_analyses, diff_frame
from tcptrace.analysis.names import match_key, normalize_frame

__all__ = [
    "Analysis",
    "ProcessStats",
    "ReportDiff",
    "RlimitEstimate",
    "SiteDelta",
    "SiteStats",
    "analyze",
    "diff_analyses",
    "diff_frame",
    "match_key",
    "normalize_frame",
    "sites_frame",
    "timeline_grid",
]
