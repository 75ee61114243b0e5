"""Pure helpers of benchmarks/churn: parsing tool output, statistics, tables.

Nothing here starts a process or needs root, so tests/unit/test_bench_*.py test it
directly. benchmarks/churn does the orchestration (processes, probes, timing).
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

# Variant keys in the order of issue 6, with the labels shown in tables.
VARIANTS: dict[str, str] = {
    "untraced": "(a) untraced",
    "tcptrace": "(b) tcptrace --pid",
    "tcplife": "(c) tcplife-bpfcc -p",
    "ss": "(d) ss -tanp every 1s",
    # The floor: the issue's own prototype probes (benchmarks/prototype.py), no user space.
    "prototype": "(e) prototype: ledger, stack at connect",
    "prototype_accept": "(f) prototype + stack at accept",
}
TOOLS_WITH_A_PROCESS = ("tcptrace", "tcplife", "prototype", "prototype_accept")

_RATE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmM]?)\s*(?:/s)?\s*$")
_ATTACH_RE = re.compile(r"probes attached in (\d+(?:\.\d+)?)\s*s")
_LOST_RE = re.compile(r"Possibly lost (\d+) samples")
_KV_RE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)=(-?\d+)")


# -- arguments -----------------------------------------------------------------


def parse_rate(text: str) -> float:
    """Connections/s: "1000", "1k", "5k/s", "1.5M"; "max", "0" or "unthrottled" give 0."""
    t = text.strip().lower()
    if t in ("max", "unthrottled", "full", "0"):
        return 0.0
    m = _RATE_RE.match(t)
    if not m:
        raise ValueError(f"bad rate {text!r} (use e.g. 1000, 5k, 20k/s or max)")
    value = float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6}[m.group(2).lower()]
    if value < 0:
        raise ValueError(f"bad rate {text!r}")
    return value


def parse_rates(text: str) -> list[float]:
    rates = [parse_rate(part) for part in text.split(",") if part.strip()]
    if not rates:
        raise ValueError("no rates given")
    return rates


def rate_label(rate: float) -> str:
    """Table label of a target rate: "max" for unthrottled, "20k/s", "1.5k/s", "500/s"."""
    if rate <= 0:
        return "max"
    if rate >= 1000:
        k = rate / 1000
        return f"{k:g}k/s"
    return f"{rate:g}/s"


def parse_variants(text: str) -> list[str]:
    """Comma-separated variant keys or letters: "a,b", "untraced,tcptrace", "all"."""
    letters = dict(zip("abcdef", VARIANTS, strict=True))
    if text.strip().lower() == "all":
        return list(VARIANTS)
    out: list[str] = []
    for part in text.split(","):
        key = part.strip().lower()
        if not key:
            continue
        key = letters.get(key, key)
        if key not in VARIANTS:
            raise ValueError(
                f"unknown variant {part!r}: one of {','.join(letters)} or {', '.join(VARIANTS)}"
            )
        if key not in out:
            out.append(key)
    if not out:
        raise ValueError("no variants given")
    return out


def run_order(variants: Sequence[str], run_index: int) -> list[str]:
    """Variants in the order of run `run_index`: rotated each run, so no variant is
    always first (or always right after a tracer detached)."""
    if not variants:
        return []
    k = run_index % len(variants)
    return [*variants[k:], *variants[:k]]


def split_sockets(total: int, per_process: int) -> list[int]:
    """Split `total` held sockets into as few even shares of at most `per_process`
    as possible, as equal as possible (each connection is two sockets)."""
    if total < 2 or per_process < 2:
        raise ValueError("need at least 2 sockets per process and in total")
    pairs = total // 2
    per = per_process // 2
    n = -(-pairs // per)  # ceil
    base, extra = divmod(pairs, n)
    return [2 * (base + (1 if i < extra else 0)) for i in range(n)]


# -- statistics ----------------------------------------------------------------


def median(values: Iterable[float | int | None]) -> float | None:
    """Median of the values that are not None (None when there are none)."""
    present = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return statistics.median(present) if present else None


def ratio(value: float | None, base: float | None) -> float | None:
    if value is None or base is None or base == 0:
        return None
    return value / base


def spread_pct(values: Iterable[float | int | None]) -> float | None:
    """(max - min) / median, in percent: how far apart the runs of one cell are."""
    present = [float(v) for v in values if v is not None]
    mid = median(present)
    if not present or not mid:
        return None
    return (max(present) - min(present)) / mid * 100.0


def linear_slope(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Least-squares slope of ys over xs (None with fewer than two distinct xs)."""
    if len(xs) != len(ys) or len(xs) < 2:
        return None
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return None
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx


# -- parsing tool output ---------------------------------------------------------


def parse_tagged(line: str, tag: str) -> dict[str, Any] | None:
    """The JSON object of a workload line ``TAG {json}``, or None if it is not one."""
    prefix = tag + " "
    if not line.startswith(prefix):
        return None
    try:
        value = json.loads(line[len(prefix) :])
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def parse_attach_seconds(line: str) -> float | None:
    """tcptrace's own attach time from its "probes attached in 0.68s; ..." line."""
    m = _ATTACH_RE.search(line)
    return float(m.group(1)) if m else None


def parse_loss_blocks(lines: Iterable[str]) -> list[dict[str, int]]:
    """Every "losses: k=v ..." block tcptrace printed, in order (the summary wraps the
    block over indented continuation lines; a note in parentheses may follow)."""
    blocks: list[dict[str, int]] = []
    current: dict[str, int] | None = None
    for raw in lines:
        line = raw.rstrip("\n")
        if line.lstrip().startswith("losses:"):
            current = {}
            blocks.append(current)
            text = line.split("losses:", 1)[1]
        elif current is not None and line.startswith((" ", "\t")) and line.strip():
            text = line
        else:
            current = None
            continue
        for key, value in _KV_RE.findall(text):
            current[key] = int(value)
    return blocks


def parse_proc_stat_cpu(text: str, clk_tck: int) -> float:
    """utime + stime, in seconds, from the text of /proc/PID/stat.

    The command name (field 2) is in parentheses and may hold spaces or ')', so
    the fields are counted after the last ')'."""
    after = text[text.rindex(")") + 2 :].split()
    # after[0] is field 3 (state); utime and stime are fields 14 and 15.
    return (int(after[11]) + int(after[12])) / clk_tck


def parse_status_kb(text: str, name: str = "VmRSS") -> int | None:
    """A "Name:   1234 kB" field of /proc/PID/status, in kB."""
    for line in text.splitlines():
        if line.startswith(name + ":"):
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                return int(parts[1])
    return None


def parse_host_cpu(text: str) -> tuple[int, int]:
    """(busy, total) jiffies from the "cpu " line of /proc/stat."""
    for line in text.splitlines():
        if line.startswith("cpu "):
            vals = [int(v) for v in line.split()[1:]]
            idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
            total = sum(vals[:8])  # guest time is already in user/nice
            return total - idle, total
    raise ValueError("no 'cpu ' line in /proc/stat text")


def host_busy_cores(before: tuple[int, int], after: tuple[int, int], ncpu: int) -> float | None:
    """Average number of busy CPUs between two parse_host_cpu readings."""
    dbusy, dtotal = after[0] - before[0], after[1] - before[1]
    if dtotal <= 0:
        return None
    return dbusy / dtotal * ncpu


def parse_tcplife(text: str) -> tuple[int, int]:
    """(events printed, samples reported lost) of tcplife-bpfcc output.

    Events are the lines after the "PID COMM ..." header; bcc reports perf-buffer
    overruns as "Possibly lost N samples" lines."""
    events = lost = 0
    seen_header = False
    for line in text.splitlines():
        m = _LOST_RE.search(line)
        if m:
            lost += int(m.group(1))
            continue
        if not seen_header:
            seen_header = line.split()[:2] == ["PID", "COMM"]
            continue
        if line.strip():
            events += 1
    return events, lost


def nonzero(counters: Mapping[str, int]) -> dict[str, int]:
    return {k: v for k, v in counters.items() if v}


def losses_text(counters: Mapping[str, int] | None) -> str:
    """ "0", or the nonzero counters, "events_dropped=3 deaths_lost=1"."""
    if counters is None:
        return "n/a"
    nz = nonzero(counters)
    return " ".join(f"{k}={v}" for k, v in nz.items()) if nz else "0"


# -- summaries and tables --------------------------------------------------------


def fmt_num(value: float | int | None, digits: int = 0, suffix: str = "") -> str:
    if value is None:
        return "n/a"
    if digits == 0:
        return f"{value:,.0f}{suffix}"
    return f"{value:,.{digits}f}{suffix}"


def fmt_ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub markdown table, columns padded to line up in a terminal; columns
    whose cells all look numeric are right-aligned."""
    cols = len(headers)
    for row in rows:
        if len(row) != cols:
            raise ValueError(f"row {row!r} has {len(row)} cells, expected {cols}")
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    numeric = [bool(rows) and all(_looks_numeric(r[i]) for r in rows) for i in range(cols)]

    def line(cells: Sequence[str]) -> str:
        out = []
        for i, cell in enumerate(cells):
            out.append(cell.rjust(widths[i]) if numeric[i] else cell.ljust(widths[i]))
        return "| " + " | ".join(out) + " |"

    sep = (
        "|"
        + "|".join(
            ("-" * (w + 1) + ":") if numeric[i] else ("-" * (w + 2)) for i, w in enumerate(widths)
        )
        + "|"
    )
    return "\n".join([line(headers), sep, *(line(r) for r in rows)])


_NUMERIC_RE = re.compile(r"^[-+]?[\d,]*\.?\d+\s*(%|x|s|ms|MB|kB|us|µs|/s)?$")


def _looks_numeric(cell: str) -> bool:
    return cell in ("n/a", "-") or bool(_NUMERIC_RE.match(cell.strip()))


def summarize_overhead(runs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One summary per (target rate, variant), in the order first seen.

    Each run is a dict with at least "rate_target", "variant", "ok" and "rate";
    optional fields are summarized by median when present. The ratio is the
    variant's median rate over the untraced median at the same target rate; the
    paired ratio is the median of per-round ratios (run i over untraced run i)."""
    cells: dict[tuple[float, str], list[Mapping[str, Any]]] = {}
    for run in runs:
        cells.setdefault((float(run["rate_target"]), str(run["variant"])), []).append(run)
    base: dict[float, dict[int, float]] = {}
    for (rate, variant), rs in cells.items():
        if variant == "untraced":
            base[rate] = {int(r["run"]): float(r["rate"]) for r in rs if r.get("ok")}
    out: list[dict[str, Any]] = []
    for (rate, variant), rs in cells.items():
        ok = [r for r in rs if r.get("ok")]
        rates = [float(r["rate"]) for r in ok]
        base_runs = base.get(rate, {})
        base_med = median(base_runs.values())
        paired = [
            float(r["rate"]) / base_runs[int(r["run"])] for r in ok if base_runs.get(int(r["run"]))
        ]
        summary: dict[str, Any] = {
            "rate_target": rate,
            "variant": variant,
            "runs": len(rs),
            "ok_runs": len(ok),
            "rate_median": median(rates),
            "rate_min": min(rates) if rates else None,
            "rate_max": max(rates) if rates else None,
            "spread_pct": spread_pct(rates),
            "ratio": ratio(median(rates), base_med),
            "ratio_paired": median(paired),
            "cpu_us_per_conn": median(r.get("cpu_us_per_conn") for r in ok),
            "expected_sockets": median(r.get("expected_sockets") for r in ok),
            "host_busy_cores": median(r.get("host_busy_cores") for r in ok),
            "other_cores": median(r.get("other_cores") for r in ok),
            "errors": [str(r.get("error")) for r in rs if not r.get("ok")],
        }
        tools = [r.get("tool") or {} for r in ok]
        for key in ("cpu_pct", "cpu_s", "seen", "seen_kernel", "rss_kb", "poll_ms", "lost"):
            summary[f"tool_{key}"] = median(t.get(key) for t in tools)
        seen_pct = [float(t["seen_pct"]) for t in tools if t.get("seen_pct") is not None]
        summary["tool_seen_pct"] = median(seen_pct)
        summary["tool_seen_pct_min"] = min(seen_pct) if seen_pct else None
        lost = [int(t["lost"]) for t in tools if t.get("lost") is not None]
        summary["tool_lost_max"] = max(lost) if lost else None
        loss_keys = sorted({k for t in tools for k in (t.get("losses") or {})})
        summary["tool_losses"] = (
            {
                k: int(median((t.get("losses") or {}).get(k, 0) for t in tools) or 0)
                for k in loss_keys
            }
            if loss_keys
            else None
        )
        summary["tool_losses_max"] = (
            {k: max(int((t.get("losses") or {}).get(k, 0)) for t in tools) for k in loss_keys}
            if loss_keys
            else None
        )
        out.append(summary)
    return out


def overhead_table(summaries: Sequence[Mapping[str, Any]]) -> str:
    headers = [
        "rate",
        "variant",
        "runs",
        "conn/s (median)",
        "vs (a)",
        "paired",
        "spread",
        "churn CPU/conn",
        "tool CPU",
        "seen / expected",
        "losses (worst run)",
        "other load",
    ]
    rows = []
    for s in summaries:
        variant = str(s["variant"])
        tool_cpu = "-"
        if variant in TOOLS_WITH_A_PROCESS:
            tool_cpu = fmt_num(s.get("tool_cpu_pct"), 1, "%")
        elif variant == "ss":
            tool_cpu = fmt_num(s.get("tool_poll_ms"), 0, " ms/poll")
        losses = "-"
        if variant == "tcptrace":
            losses = losses_text(s.get("tool_losses_max"))
        elif variant == "tcplife":
            lost = s.get("tool_lost_max")
            losses = "n/a" if lost is None else f"lost_samples={lost}" if lost else "0"
        base = variant == "untraced" and s.get("ratio")
        rows.append(
            [
                rate_label(float(s["rate_target"])),
                VARIANTS.get(variant, variant),
                f"{s['ok_runs']}/{s['runs']}",
                fmt_num(s.get("rate_median")),
                "1.000" if base else fmt_ratio(s.get("ratio")),
                "-" if variant == "untraced" else fmt_ratio(s.get("ratio_paired")),
                fmt_num(s.get("spread_pct"), 1, "%"),
                fmt_num(s.get("cpu_us_per_conn"), 1, " us"),
                tool_cpu,
                _seen_text(s),
                losses,
                fmt_num(s.get("other_cores"), 2),
            ]
        )
    return markdown_table(headers, rows)


def _seen_text(s: Mapping[str, Any]) -> str:
    """Median share of the expected sockets the tool saw, and the worst run's."""
    variant = s["variant"]
    if variant in ("tcptrace", "tcplife"):
        pct, worst = s.get("tool_seen_pct"), s.get("tool_seen_pct_min")
        if pct is None:
            return "n/a"
        text = f"{pct:.1f}%"
        if worst is not None and round(worst, 1) != round(pct, 1):
            text += f" (worst {worst:.1f}%)"
        return text
    if variant == "ss":
        seen = s.get("tool_seen")
        return "n/a" if seen is None else f"<= {seen:,.0f} per poll"
    return "-"


# -- in-kernel cost per program (--bpf-stats) -------------------------------------


def bpf_cost_table(runs: Sequence[Mapping[str, Any]]) -> str:
    """Medians over the runs of each (rate, variant) with BPF programs (tcptrace and the
    prototypes): per program, runs per connection, ns per run and ns per connection,
    and the sum over programs."""
    by_cell: dict[tuple[float, str], list[Mapping[str, Any]]] = {}
    for run in runs:
        if run.get("ok") and run.get("bpf_cost"):
            key = (float(run["rate_target"]), str(run["variant"]))
            by_cell.setdefault(key, []).append(run["bpf_cost"])
    headers = ["rate", "variant", "program", "runs", "runs/conn", "ns/run", "ns/conn"]
    rows: list[list[str]] = []
    order = list(VARIANTS)
    for rate, variant in sorted(
        by_cell, key=lambda k: (k[0] == 0, k[0], order.index(k[1]) if k[1] in order else 99)
    ):
        costs = by_cell[(rate, variant)]
        label = VARIANTS.get(variant, variant)
        names = sorted({name for cost in costs for name in cost})
        total: list[float] = [sum(c["ns_per_conn"] for c in cost.values()) for cost in costs]
        for name in names:
            values = [cost[name] for cost in costs if name in cost]
            rows.append(
                [
                    rate_label(rate),
                    label,
                    name,
                    str(len(values)),
                    fmt_num(median(v["runs_per_conn"] for v in values), 2),
                    fmt_num(median(v["ns_per_run"] for v in values)),
                    fmt_num(median(v["ns_per_conn"] for v in values)),
                ]
            )
        rows.append(
            [rate_label(rate), label, "**all programs**", str(len(costs)), "", "",
             fmt_num(median(total))]
        )  # fmt: skip
    return markdown_table(headers, rows) if rows else ""
