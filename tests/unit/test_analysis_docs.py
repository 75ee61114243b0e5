"""docs/report-format.md is generated from the schema; this keeps the two in sync."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from tcptrace.report import META_FIELDS, TABLE_DESCRIPTIONS, TABLES, RunMeta
from tcptrace.report.docs import render_markdown
from tcptrace.report.writers import meta_dict

DOC = Path(__file__).resolve().parents[2] / "docs" / "report-format.md"


def test_doc_matches_schema() -> None:
    assert DOC.read_text(encoding="utf-8") == render_markdown(), (
        "docs/report-format.md is stale: run"
        " `.venv/bin/python -m tcptrace.report.docs > docs/report-format.md`"
    )


def test_every_table_and_column_is_documented() -> None:
    text = render_markdown()
    assert set(TABLE_DESCRIPTIONS) == set(TABLES)
    for table, cols in TABLES.items():
        assert f"## Table `{table}`" in text
        for col in cols:
            assert (
                f"| `{col.name}` | `{col.dtype}` | {col.description.replace('|', chr(92) + '|')} |"
                in text
            )


def test_every_meta_key_is_documented() -> None:
    meta = RunMeta(
        tool_version="0", schema_version=1, host="h", kernel="k", probe_set="p", pids=(1,),
        threshold_s=1.0, started_at=0.0, ended_at=1.0, losses={},
    )  # fmt: skip
    written = set(meta_dict(meta, [], {}, 1.0))
    documented = {m.name for m in META_FIELDS}
    assert written == {name for name in documented if "." not in name}
    assert {f.name for f in dataclasses.fields(RunMeta)} <= documented
    # The extra keys the analysis reads (tracer.py writes them).
    assert {"extra.rlimit_nofile", "extra.fd_count", "extra.sample_interval_s"} <= documented
