"""`tcptrace report` and `tcptrace diff` through the CLI: output, files, and bad input.

Every bad input must give exactly one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner, Result

from tcptrace.cli import main
from tcptrace.errors import ReportError
from tests.unit.analysis_data import write_demo_report


def invoke(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


@pytest.fixture
def report_dir(tmp_path: Path) -> Path:
    return write_demo_report(tmp_path / "before")


def test_report_text(report_dir: Path) -> None:
    result = invoke("report", str(report_dir), "--top", "2")
    assert result.exit_code == 0, result.output
    assert "call sites, worst first (top 2 of 5)" in result.stdout
    assert "losses: events_lost=0 stacks_failed=0" in result.stdout
    assert result.stderr == ""


def test_report_json_lists_written_files(report_dir: Path, tmp_path: Path) -> None:
    flame = tmp_path / "out" / "flame.html"
    plots = tmp_path / "plots"
    result = invoke(
        "report", str(report_dir), "--format", "json", "--flamegraph", str(flame),
        "--weight", "socket-seconds", "--plots", str(plots),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)  # nothing but JSON on stdout
    assert data["totals"]["flagged"] == 71
    assert data["written"]["flamegraph"] == [str(flame), str(flame.with_suffix(".folded"))]
    assert sorted(Path(p).name for p in data["written"]["plots"]) == [
        "age_histogram.png",
        "open_over_time.png",
        "state_mix.png",
    ]
    assert flame.is_file() and (plots / "state_mix.png").is_file()
    weights = [float(line.rsplit(" ", 1)[1]) for line in flame.with_suffix(".folded").open()]
    assert sum(weights) > 71  # socket-seconds, not counts: every leak is older than 2 s


def test_diff(report_dir: Path, tmp_path: Path) -> None:
    after = write_demo_report(tmp_path / "after", build=1, fixed=True)
    result = invoke("diff", str(report_dir), str(after))
    assert result.exit_code == 0, result.output
    fixed = [line for line in result.stdout.splitlines() if line.startswith("fixed")]
    assert len(fixed) == 1 and "main.leakyDial" in fixed[0]
    data = json.loads(invoke("diff", str(report_dir), str(after), "--format", "json").stdout)
    assert [s["status"] for s in data["sites"]].count("fixed") == 1


# -- bad input -------------------------------------------------------------------------------


def truncate_parquet(d: Path) -> None:
    path = d / "open_sockets.parquet"
    path.write_bytes(path.read_bytes()[:200])


def foreign_parquet(d: Path) -> None:
    pq.write_table(pa.table({"x": [1, 2, 3]}), d / "connections.parquet")


def csv_missing_column(d: Path) -> None:
    (d / "connections.parquet").unlink()
    frame = pd.read_csv(d / "connections.csv", dtype=str, keep_default_na=False)
    frame.drop(columns=["stack"]).to_csv(d / "connections.csv", index=False)


def timeline_csv_missing_column(d: Path) -> None:
    (d / "timeline.parquet").unlink()
    frame = pd.read_csv(d / "timeline.csv", dtype=str, keep_default_na=False)
    frame.drop(columns=["open_count"]).to_csv(d / "timeline.csv", index=False)


def unknown_version(d: Path) -> None:
    meta = json.loads((d / "meta.json").read_text())
    meta["schema_version"] = 99
    (d / "meta.json").write_text(json.dumps(meta))


def parquet_unknown_version(d: Path) -> None:
    path = d / "timeline.parquet"
    table = pq.read_table(path)
    metadata = dict(table.schema.metadata)
    metadata[b"tcptrace.schema_version"] = b"0"
    pq.write_table(table.replace_schema_metadata(metadata), path)


def not_json_meta(d: Path) -> None:
    (d / "meta.json").write_text("{")


BAD_INPUTS: dict[str, tuple[Callable[[Path], None], str]] = {
    "truncated parquet": (truncate_parquet, "is not a readable Parquet file"),
    "foreign parquet": (foreign_parquet, "is not a tcptrace Parquet file"),
    "csv missing a column": (csv_missing_column, "connections.csv is missing column 'stack'"),
    "timeline csv missing a column": (
        timeline_csv_missing_column,
        "timeline.csv is missing column 'open_count'",
    ),
    "unknown schema version": (unknown_version, "report schema version 99 is newer"),
    "parquet unknown version": (parquet_unknown_version, "unknown report schema version 0"),
    "meta.json not json": (not_json_meta, "is not valid JSON"),
}


def assert_one_line_error(result: Result, expected: str) -> None:
    assert result.exit_code == ReportError.exit_code, result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("tcptrace: error: ")
    assert expected in lines[0]
    assert "Traceback" not in result.stderr
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit)


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_report_bad_input(report_dir: Path, case: str) -> None:
    damage, expected = BAD_INPUTS[case]
    damage(report_dir)
    assert_one_line_error(invoke("report", str(report_dir)), expected)


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_diff_bad_input_on_either_side(report_dir: Path, tmp_path: Path, case: str) -> None:
    good = write_demo_report(tmp_path / "good")
    damage, expected = BAD_INPUTS[case]
    damage(report_dir)
    assert_one_line_error(invoke("diff", str(good), str(report_dir)), expected)
    assert_one_line_error(invoke("diff", str(report_dir), str(good)), expected)


def test_missing_directory(tmp_path: Path) -> None:
    assert_one_line_error(invoke("report", str(tmp_path / "nope")), "does not exist")
    good = write_demo_report(tmp_path / "good")
    assert_one_line_error(invoke("diff", str(good), str(tmp_path / "nope")), "does not exist")


def test_directory_that_is_no_report(tmp_path: Path) -> None:
    assert_one_line_error(invoke("report", str(tmp_path)), "is not a tcptrace report")


def test_bad_output_paths_are_usage_errors(report_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    result = invoke("report", str(report_dir), "--plots", str(tmp_path / "file"))
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        f"tcptrace: error: --plots {tmp_path / 'file'} exists and is not a directory"
    ]
    result = invoke("report", str(report_dir), "--flamegraph", str(tmp_path / "x.folded"))
    assert result.exit_code == 2 and "suffix .folded" in result.stderr


def test_real_entry_point_exit_code(report_dir: Path) -> None:
    truncate_parquet(report_dir)
    done = subprocess.run(
        [sys.executable, "-m", "tcptrace.cli", "report", str(report_dir)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == ReportError.exit_code
    assert done.stdout == ""
    assert len(done.stderr.splitlines()) == 1 and "Traceback" not in done.stderr
