"""The pure parts of benchmarks/churn: rates, statistics, output parsing, tables."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import math
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from benchmarks import benchlib as bl

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "churn"


def load_script() -> ModuleType:
    """benchmarks/churn has no .py suffix: load it as a module (nothing runs at import)."""
    loader = importlib.machinery.SourceFileLoader("bench_churn_script", str(SCRIPT))
    spec = importlib.util.spec_from_loader("bench_churn_script", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    loader.exec_module(module)
    return module


# -- arguments -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "rate"),
    [
        ("1000", 1000.0),
        ("1k", 1000.0),
        ("5K/s", 5000.0),
        ("20k/s", 20000.0),
        ("1.5k", 1500.0),
        ("2M", 2e6),
        ("max", 0.0),
        ("0", 0.0),
        ("unthrottled", 0.0),
        (" 750 /s ", 750.0),
    ],
)
def test_parse_rate(text: str, rate: float) -> None:
    assert bl.parse_rate(text) == rate


@pytest.mark.parametrize("text", ["", "fast", "-5", "1kk", "5 k s"])
def test_parse_rate_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        bl.parse_rate(text)


def test_parse_rates_and_labels() -> None:
    rates = bl.parse_rates("1k,5k,20k,max")
    assert rates == [1000.0, 5000.0, 20000.0, 0.0]
    assert [bl.rate_label(r) for r in rates] == ["1k/s", "5k/s", "20k/s", "max"]
    assert bl.rate_label(500) == "500/s"
    assert bl.rate_label(1500) == "1.5k/s"
    with pytest.raises(ValueError):
        bl.parse_rates(" , ")


def test_parse_variants() -> None:
    assert bl.parse_variants("all") == [
        "untraced", "tcptrace", "tcplife", "ss", "prototype", "prototype_accept"
    ]  # fmt: skip
    assert bl.parse_variants("e,f") == ["prototype", "prototype_accept"]
    assert bl.parse_variants("a,b") == ["untraced", "tcptrace"]
    assert bl.parse_variants("tcplife, a ,a") == ["tcplife", "untraced"]
    with pytest.raises(ValueError, match="unknown variant"):
        bl.parse_variants("a,perf")
    with pytest.raises(ValueError):
        bl.parse_variants(",")


@pytest.mark.parametrize(
    ("total", "per", "shares"),
    [
        (100_000, 200_000, [100_000]),
        (100_000, 19_928, [16_668, 16_668, 16_666, 16_666, 16_666, 16_666]),
        (10, 4, [4, 4, 2]),
        (11, 100, [10]),
        (2, 2, [2]),
    ],
)
def test_split_sockets(total: int, per: int, shares: list[int]) -> None:
    got = bl.split_sockets(total, per)
    assert got == shares
    assert all(s % 2 == 0 and 2 <= s <= per for s in got)
    assert sum(got) == total - total % 2


def test_split_sockets_rejects() -> None:
    with pytest.raises(ValueError):
        bl.split_sockets(1, 10)
    with pytest.raises(ValueError):
        bl.split_sockets(10, 1)


def test_run_order_rotates_so_every_variant_leads_once() -> None:
    variants = ["untraced", "tcptrace", "tcplife", "ss"]
    orders = [bl.run_order(variants, i) for i in range(4)]
    assert orders[0] == variants
    assert orders[1] == ["tcptrace", "tcplife", "ss", "untraced"]
    assert {o[0] for o in orders} == set(variants)
    assert all(sorted(o) == sorted(variants) for o in orders)
    assert bl.run_order(variants, 4) == variants
    assert bl.run_order([], 3) == []


# -- statistics ------------------------------------------------------------------


def test_median_skips_missing_values() -> None:
    assert bl.median([3, 1, 2]) == 2
    assert bl.median([4.0, 1.0, 3.0, 2.0]) == 2.5
    assert bl.median([None, 5, None]) == 5
    assert bl.median([float("nan"), 1, 3]) == 2
    assert bl.median([]) is None
    assert bl.median([None]) is None


def test_ratio_and_spread() -> None:
    assert bl.ratio(95.0, 100.0) == pytest.approx(0.95)
    assert bl.ratio(None, 100.0) is None
    assert bl.ratio(95.0, None) is None
    assert bl.ratio(95.0, 0.0) is None
    assert bl.spread_pct([90, 100, 110]) == pytest.approx(20.0)
    assert bl.spread_pct([100]) == 0.0
    assert bl.spread_pct([]) is None


def test_linear_slope() -> None:
    assert bl.linear_slope([0, 1, 2, 3], [10, 12, 14, 16]) == pytest.approx(2.0)
    assert bl.linear_slope([0, 1, 2], [5, 5, 5]) == pytest.approx(0.0)
    assert bl.linear_slope([1, 1], [1, 2]) is None
    assert bl.linear_slope([1], [1]) is None
    assert bl.linear_slope([1, 2], [1]) is None


def test_host_busy_cores() -> None:
    assert bl.host_busy_cores((100, 1000), (150, 1100), 2) == pytest.approx(1.0)
    assert bl.host_busy_cores((100, 1000), (100, 1000), 2) is None


# -- parsing tool output ---------------------------------------------------------

DONE = (
    'DONE {"connections":89861,"accepted":89861,"failed":0,"seconds":3.000,'
    '"rate":29953.5,"last_error":"","pid":31532}'
)


def test_parse_tagged() -> None:
    done = bl.parse_tagged(DONE, "DONE")
    assert done is not None
    assert done["connections"] == 89861
    assert done["rate"] == pytest.approx(29953.5)
    assert bl.parse_tagged(DONE, "READY") is None
    assert bl.parse_tagged("DONE not json", "DONE") is None
    assert bl.parse_tagged("DONE [1, 2]", "DONE") is None
    assert bl.parse_tagged("DONEX {}", "DONE") is None


def test_parse_attach_seconds() -> None:
    line = "probes attached in 0.68s; threshold 30s; Ctrl-C to stop and write the report"
    assert bl.parse_attach_seconds(line) == pytest.approx(0.68)
    assert bl.parse_attach_seconds("probes attached in 12s") == 12.0
    assert bl.parse_attach_seconds("compiling and loading BPF programs...") is None


TCPTRACE_OUTPUT = """\
tcptrace 0.1.0: tracing pid(s) 31843 (churn); probe set tracepoint (auto: ...)
compiling and loading BPF programs...
probes attached in 0.68s; threshold 30s; Ctrl-C to stop and write the report
2026-11-28T01:48:23Z  no leaked sockets flagged (open >= 30s, listeners excluded)

losses: events_dropped=0 map_full=0 ustack_failed=0 kstack_failed=0 accept_unresolved=0
        fd_unresolved=0 sk_reused=0 targets_full=0 records_undecodable=0

2026-11-28T01:48:27Z  no leaked sockets flagged (open >= 30s, listeners excluded)

losses: events_dropped=160921 map_full=0 ustack_failed=0 kstack_failed=0 accept_unresolved=0
        fd_unresolved=0 sk_reused=0 targets_full=0 records_undecodable=0 probe_recursion_misses=0
        births_recovered_from_death=18242 births_recovered_from_scan=0 deaths_lost=12899
        sockets_untracked=0 sockets_replaced=0 stacks_unsymbolized=0  (nonzero: results may be
        incomplete)

stopped: all traced processes exited
report written to /tmp/tt1
"""


def test_parse_loss_blocks_follows_wrapped_lines() -> None:
    blocks = bl.parse_loss_blocks(TCPTRACE_OUTPUT.splitlines())
    assert len(blocks) == 2
    assert blocks[0]["events_dropped"] == 0
    assert blocks[0]["records_undecodable"] == 0
    assert "deaths_lost" not in blocks[0]
    last = blocks[-1]
    assert last["events_dropped"] == 160921
    assert last["deaths_lost"] == 12899
    assert last["stacks_unsymbolized"] == 0
    assert len(last) == 16  # the "(nonzero: results may be incomplete)" note adds nothing
    assert bl.nonzero(last) == {
        "events_dropped": 160921,
        "births_recovered_from_death": 18242,
        "deaths_lost": 12899,
    }


def test_parse_loss_blocks_none() -> None:
    assert bl.parse_loss_blocks(["stopped: x", "  indented=3 but no block"]) == []


def test_parse_proc_stat_cpu_with_awkward_comm() -> None:
    # comm may contain spaces and ')': fields are counted from the last ')'.
    fields = ["S", "1", "2", "3", "0", "-1", "4194560", "10", "0", "0", "0", "250", "50"]
    text = "1234 (we ird) name) " + " ".join(fields) + " 0 0 20 0 3 0 100 0 0\n"
    assert bl.parse_proc_stat_cpu(text, 100) == pytest.approx(3.0)


def test_parse_proc_stat_cpu_of_this_process() -> None:
    text = Path("/proc/self/stat").read_text()
    assert bl.parse_proc_stat_cpu(text, 100) >= 0


def test_parse_status_kb() -> None:
    text = "Name:\tpython3\nVmHWM:\t  20480 kB\nVmRSS:\t   10240 kB\nThreads:\t1\n"
    assert bl.parse_status_kb(text) == 10240
    assert bl.parse_status_kb(text, "VmHWM") == 20480
    assert bl.parse_status_kb(text, "VmSwap") is None
    assert bl.parse_status_kb("VmRSS:\n") is None


def test_parse_host_cpu() -> None:
    text = "cpu  100 5 50 1000 20 1 2 3 7 0\ncpu0 50 2 25 500 10 0 1 1 0 0\n"
    busy, total = bl.parse_host_cpu(text)
    assert total == 100 + 5 + 50 + 1000 + 20 + 1 + 2 + 3
    assert busy == total - 1000 - 20
    with pytest.raises(ValueError):
        bl.parse_host_cpu("intr 1 2 3\n")


TCPLIFE_OUTPUT = """\
PID   COMM       LADDR           LPORT RADDR           RPORT TX_KB RX_KB MS
31843 churn      127.0.0.1       51234 127.0.0.1       41593     0     0 0.05
Possibly lost 17 samples
31843 churn      127.0.0.1       41593 127.0.0.1       51234     0     0 0.06
Possibly lost 3 samples

"""


def test_parse_tcplife() -> None:
    assert bl.parse_tcplife(TCPLIFE_OUTPUT) == (2, 20)
    assert bl.parse_tcplife("") == (0, 0)
    # Lines before the header (bcc warnings) are not events.
    assert bl.parse_tcplife("warning: x\nPID COMM LADDR\n1 a b\n") == (1, 0)


def test_losses_text() -> None:
    assert bl.losses_text({"a": 0, "b": 0}) == "0"
    assert bl.losses_text({"events_dropped": 3, "x": 0, "deaths_lost": 1}) == (
        "events_dropped=3 deaths_lost=1"
    )
    assert bl.losses_text(None) == "n/a"


# -- tables ------------------------------------------------------------------------


def test_markdown_table_aligns_numbers_right() -> None:
    text = bl.markdown_table(["name", "value"], [["alpha", "1,234"], ["b", "5.0 us"], ["c", "n/a"]])
    lines = text.splitlines()
    assert lines[0] == "| name  |  value |"
    assert lines[1] == "|-------|-------:|"
    assert lines[2] == "| alpha |  1,234 |"
    assert lines[3] == "| b     | 5.0 us |"
    assert lines[4] == "| c     |    n/a |"
    assert len({len(line) for line in lines}) == 1


def test_markdown_table_rejects_ragged_rows() -> None:
    with pytest.raises(ValueError):
        bl.markdown_table(["a", "b"], [["1"]])


def test_markdown_table_text_columns_left_aligned() -> None:
    text = bl.markdown_table(["x"], [["events_dropped=3"], ["0"]])
    assert text.splitlines()[1] == "|------------------|"


def _run(
    variant: str, run: int, rate: float, *, ok: bool = True, target: float = 0.0, **tool: Any
) -> dict[str, Any]:
    return {
        "variant": variant,
        "run": run,
        "rate_target": target,
        "ok": ok,
        "rate": rate,
        "expected_sockets": 2 * int(rate) + 8,
        "cpu_us_per_conn": 30.0,
        "host_busy_cores": 1.5,
        "other_cores": 0.5,
        "tool": tool,
        "error": "" if ok else "RuntimeError: boom",
    }


def _runs() -> list[dict[str, Any]]:
    return [
        _run("untraced", 1, 30000),
        _run(
            "tcptrace",
            1,
            28500,
            cpu_pct=10.0,
            seen=57008,
            seen_pct=100.0,
            losses={"events_dropped": 0},
        ),
        _run("untraced", 2, 32000),
        _run(
            "tcptrace",
            2,
            32000,
            cpu_pct=12.0,
            seen=53340,
            seen_pct=83.33,
            losses={"events_dropped": 9000, "deaths_lost": 2},
        ),
        _run("untraced", 3, 31000),
        _run("tcptrace", 3, 0, ok=False),
        _run("tcplife", 1, 21000, cpu_pct=40.0, seen=41000, seen_pct=97.6, lost=100),
        _run("ss", 1, 25000, poll_ms=90.0, seen=1200),
        _run("untraced", 1, 1000, target=1000.0),
        _run("tcptrace", 1, 1000, target=1000.0, cpu_pct=2.0, seen=2008, losses={}),
    ]


def test_summarize_overhead_medians_and_ratios() -> None:
    summaries = bl.summarize_overhead(_runs())
    by = {(s["rate_target"], s["variant"]): s for s in summaries}
    assert [(s["rate_target"], s["variant"]) for s in summaries][:4] == [
        (0.0, "untraced"),
        (0.0, "tcptrace"),
        (0.0, "tcplife"),
        (0.0, "ss"),
    ]
    base = by[(0.0, "untraced")]
    assert base["rate_median"] == 31000
    assert base["ratio"] == pytest.approx(1.0)
    tt = by[(0.0, "tcptrace")]
    assert (tt["runs"], tt["ok_runs"]) == (3, 2)
    assert tt["rate_median"] == pytest.approx(30250)
    assert tt["ratio"] == pytest.approx(30250 / 31000)
    # paired: run 1 28500/30000 = 0.95, run 2 32000/32000 = 1.0
    assert tt["ratio_paired"] == pytest.approx(0.975)
    assert tt["errors"] == ["RuntimeError: boom"]
    assert tt["tool_cpu_pct"] == pytest.approx(11.0)
    assert tt["tool_seen"] == pytest.approx(55174)
    assert tt["tool_seen_pct"] == pytest.approx(91.665)
    assert tt["tool_seen_pct_min"] == pytest.approx(83.33)
    assert tt["other_cores"] == pytest.approx(0.5)
    assert tt["tool_losses"] == {"deaths_lost": 1, "events_dropped": 4500}
    assert tt["tool_losses_max"] == {"deaths_lost": 2, "events_dropped": 9000}
    assert by[(0.0, "tcplife")]["ratio"] == pytest.approx(21000 / 31000)
    assert by[(1000.0, "tcptrace")]["ratio"] == pytest.approx(1.0)
    assert by[(1000.0, "tcptrace")]["tool_losses"] is None


def test_summarize_without_untraced_has_no_ratio() -> None:
    summaries = bl.summarize_overhead([_run("tcptrace", 1, 100)])
    assert summaries[0]["ratio"] is None
    assert summaries[0]["ratio_paired"] is None


def test_overhead_table() -> None:
    text = bl.overhead_table(bl.summarize_overhead(_runs()))
    lines = text.splitlines()
    assert lines[0].startswith("| rate | variant")
    assert len(lines) == 2 + 6
    assert len({len(line) for line in lines}) == 1
    row = {line.split("|")[2].strip() + "@" + line.split("|")[1].strip(): line for line in lines}
    tt = row["(b) tcptrace --pid@max"]
    assert "30,250" in tt
    assert f"{30250 / 31000:.3f}" in tt
    assert "2/3" in tt
    assert "|  0.975 |" in tt  # paired ratio
    assert "deaths_lost=2 events_dropped=9000" in tt  # the worst run's losses
    assert "91.7% (worst 83.3%)" in tt
    assert tt.endswith("|       0.50 |")  # other load, median of the runs
    assert "1.000" in row["(a) untraced@max"]
    assert "lost_samples=100" in row["(c) tcplife-bpfcc -p@max"]
    assert "90 ms/poll" in row["(d) ss -tanp every 1s@max"]
    assert "<= 1,200 per poll" in row["(d) ss -tanp every 1s@max"]
    assert "1k/s" in lines[-1]


def test_fmt_helpers() -> None:
    assert bl.fmt_num(None) == "n/a"
    assert bl.fmt_num(1234567) == "1,234,567"
    assert bl.fmt_num(1.234, 2, " s") == "1.23 s"
    assert bl.fmt_ratio(0.98765) == "0.988"
    assert bl.fmt_ratio(None) == "n/a"


# -- the script's own pure parts -------------------------------------------------


def test_script_quick_arguments() -> None:
    script = load_script()
    args = script.parse_args(["--quick"])
    assert args.runs == 1
    assert args.rate_list == [0.0, 5000.0]
    assert args.variant_list == list(bl.VARIANTS)
    assert args.modes == ["overhead", "hold", "soak"]
    assert args.seconds * len(args.rate_list) * 4 + args.soak_minutes * 60 < 40
    default = script.parse_args([])
    assert (default.runs, default.rate_list) == (5, [1000.0, 5000.0, 20000.0, 0.0])
    assert default.hold_sockets == 100_000
    assert default.soak_minutes == 10
    with pytest.raises(SystemExit):
        script.parse_args(["--modes", "bogus"])
    with pytest.raises(SystemExit):
        script.parse_args(["--soak-minutes", "11"])


def test_script_render_complete_results() -> None:
    script = load_script()
    runs = _runs()
    results: dict[str, Any] = {
        "environment": {
            "started": "2026-11-28 01:00:00 UTC",
            "command": "benchmarks/churn --quick",
            "host": "vm",
            "kernel": "6.18",
            "cpus": 2,
            "loadavg_start": "0.1 0.2 0.3",
            "loadavg_end": "1 1 1",
            "git": "abc123",
            "ports": 8,
            "seconds": 2.0,
        },
        "overhead_runs": runs,
        "overhead_summary": bl.summarize_overhead(runs),
        "hold": {
            "ok": True,
            "sockets_wanted": 100000,
            "sockets_held": 100000,
            "listeners": 8,
            "expected_open": 100008,
            "open_sockets_rows": 100008,
            "rss_kb_held": 200 * 1024,
            "rss_kb_peak_after_attach": 250 * 1024,
            "maxrss_kb": 260 * 1024,
            "stop_to_report_written_s": 4.5,
            "stop_to_exit_s": 4.7,
            "losses": {"events_dropped": 0},
            "holder_open_s": 3.1,
            "settle_s": 5.0,
        },
        "soak": {
            "meta_found": True,
            "rate_target": 20000.0,
            "seconds": 600.0,
            "rate": 19990.0,
            "connections": 11994000,
            "expected_sockets": 23988008,
            "seen": 23988008,
            "tracer_cpu_pct": 25.0,
            "rss_kb_warm": 180 * 1024,
            "rss_kb_end": 181 * 1024,
            "rss_growth_mb_per_min": 0.1,
            "warmup_s": 120.0,
            "losses": {"events_dropped": 0},
            "timeline": [
                {"t": float(t), "rss_kb": 180 * 1024, "cpu_s": t / 4, "losses": {}}
                for t in range(0, 600, 5)
            ],
        },
        "attach": {
            "n": 3,
            "wall_median_s": 1.2,
            "wall_max_s": 1.5,
            "reported_median_s": 0.7,
            "reported_max_s": 0.9,
        },
    }
    text = script.render(results)
    assert "### Churn" in text
    assert "| 100,000 + 8 " in text
    assert "100,008 (100.0%)" in text
    assert "23,988,008 / 23,988,008 (100.0%)" in text
    assert "1.20 s" in text
    assert "failed run (tcptrace at max): RuntimeError: boom" in text
    assert "worst run deaths_lost=2 events_dropped=9000" in text
    # the whole results dict is JSON-serializable as written by --json
    json.dumps(results)


def test_script_render_minimal_results() -> None:
    script = load_script()
    results = {
        "environment": {
            "started": "now",
            "command": "x",
            "host": "h",
            "kernel": "k",
            "cpus": 2,
            "loadavg_start": "0 0 0",
            "ports": 8,
            "seconds": 1.0,
        },
        "hold": {"ok": False, "error": "RuntimeError: no READY", "sockets_wanted": 10},
        "attach": {"n": 0},
    }
    text = script.render(results)
    assert "FAILED: RuntimeError: no READY" in text
    assert "### Churn" not in text
    assert not math.isnan(len(text))


def test_bpf_cost_per_program_and_total() -> None:
    script = load_script()
    before = {"set_state": (100, 10_000), "destroy": (0, 0)}
    after = {"set_state": (700, 70_000), "destroy": (200, 40_000), "idle": (5, 5)}
    cost = script.bpf_cost(before, after, connections=100)
    assert cost["set_state"] == {"runs_per_conn": 6.0, "ns_per_run": 100.0, "ns_per_conn": 600.0}
    assert cost["destroy"]["ns_per_conn"] == 400.0
    runs = [
        {"ok": True, "variant": "tcptrace", "rate_target": 0.0, "bpf_cost": cost},
        {"ok": True, "variant": "untraced", "rate_target": 0.0},
    ]
    table = bl.bpf_cost_table(runs)
    assert "| set_state" in table and "6.00" in table
    total_row = next(line for line in table.splitlines() if "all programs" in line)
    assert "1,000" in total_row  # 600 + 400 + 0.05 ns per connection
    assert bl.bpf_cost_table([{"ok": False}]) == ""
