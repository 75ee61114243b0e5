"""Report files (CSV, Parquet, meta.json): schema, writing, loading, terminal summary."""

from tcptrace.report.loader import Report, load_report
from tcptrace.report.schema import (
    CONNECTIONS,
    META_FIELDS,
    OPEN_SOCKETS,
    SCHEMA_VERSION,
    TABLE_DESCRIPTIONS,
    TABLES,
    TIMELINE,
    Column,
    MetaField,
    conform,
    to_frame,
)
from tcptrace.report.summary import CallSiteSummary, render_summary, summarize_call_sites
from tcptrace.report.timeline import TimelineRecorder
from tcptrace.report.writers import (
    DEFAULT_WRITERS,
    CsvWriter,
    ParquetWriter,
    ReportPaths,
    RunMeta,
    TableWriter,
    write_report,
)

__all__ = [
    "CONNECTIONS",
    "DEFAULT_WRITERS",
    "META_FIELDS",
    "OPEN_SOCKETS",
    "SCHEMA_VERSION",
    "TABLES",
    "TABLE_DESCRIPTIONS",
    "TIMELINE",
    "CallSiteSummary",
    "Column",
    "CsvWriter",
    "MetaField",
    "ParquetWriter",
    "Report",
    "ReportPaths",
    "RunMeta",
    "TableWriter",
    "TimelineRecorder",
    "conform",
    "load_report",
    "render_summary",
    "summarize_call_sites",
    "to_frame",
    "write_report",
]
