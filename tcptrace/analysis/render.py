"""`tcptrace report` output: plain text for a person, JSON for machines.

Both always carry the loss counters: a report that lost events must never read
like a clean bill of health.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

from tcptrace.analysis.callsites import Analysis, RlimitEstimate, SiteStats
from tcptrace.analysis.names import short_location
from tcptrace.durations import format_duration
from tcptrace.report.summary import render_losses

JSON_FORMAT_VERSION = 1


def _stamp(epoch: float | None) -> str:
    if epoch is None:
        return "?"
    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _age(value: float | None, lower_bound: bool = False) -> str:
    if value is None:
        return "-"
    return (">=" if lower_bound else "") + format_duration(value)


def _growth(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:+.1f}"


def _counts(counter: Mapping[str, int]) -> str:
    return " ".join(f"{k}={v}" for k, v in counter.items()) or "-"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _rlimit_line(estimate: RlimitEstimate, qualifier: str = "") -> str:
    fds = f"{'>=' if estimate.fds_is_lower_bound else ''}{estimate.fds_in_use}"
    bound = "<=" if estimate.fds_is_lower_bound else "~"
    return (
        f"time to RLIMIT_NOFILE{qualifier}: {bound}{format_duration(estimate.seconds_left)}"
        f" for pid {estimate.pid} ({fds} of {estimate.limit} fds in use,"
        f" {estimate.growth_per_min:+.1f}/min, extrapolated)"
    )


def _clip(line: str, width: int) -> str:
    return line if width <= 0 or len(line) <= width else line[: max(width - 3, 0)] + "..."


def render_text(analysis: Analysis, top: int = 10, width: int = 120) -> str:
    meta = analysis.meta
    lines: list[str] = []
    lines.append(f"tcptrace report {analysis.directory}")
    duration = analysis.duration_s
    lines.append(
        f"run: {_stamp(analysis.started_at)}"
        f" for {format_duration(duration) if duration is not None else '?'}"
        f" on {meta.get('host', '?')} (kernel {meta.get('kernel', '?')},"
        f" probes {meta.get('probe_set', '?')}); leak threshold"
        f" {format_duration(analysis.threshold_s)}"
    )
    for proc in analysis.processes:
        limit = "unknown" if proc.rlimit_nofile is None else str(proc.rlimit_nofile)
        fds = f"{_opt(proc.fds_start)} -> {_opt(proc.fds_end)}"
        lines.append(
            f"pid {proc.pid} ({proc.comm or '?'}): {proc.still_open} open, {proc.flagged} flagged;"
            f" fds {fds}; RLIMIT_NOFILE {limit};"
            f" open sockets {_growth(proc.growth_per_min)}/min"
        )
        if proc.rlimit is not None:
            lines.append("    " + _rlimit_line(proc.rlimit))
    lines.append(
        f"totals: {analysis.seen} sockets seen, {analysis.still_open} still open,"
        f" {analysis.flagged} flagged as leaks at"
        f" {_plural(sum(1 for s in analysis.sites if s.flagged), 'call site')};"
        f" {analysis.timeline_samples} timeline samples"
    )
    if analysis.timeline_samples < 2:
        lines.append("note: fewer than 2 timeline samples, so no growth rates")
    if analysis.untracked_open:
        lines.append(
            f"note: {analysis.untracked_open} open sockets were untracked (kernel ledger full)"
            " and are never flagged"
        )

    shown = analysis.sites[:top] if top > 0 else ()
    lines.append("")
    if not analysis.sites:
        lines.append("call sites: none (no TCP sockets were seen)")
    else:
        more = len(analysis.sites) - len(shown)
        lines.append(
            "call sites, worst first"
            + (f" (top {len(shown)} of {len(analysis.sites)})" if more > 0 else "")
        )
        lines.append(
            f"{'#':>3} {'opened':>7} {'closed':>7} {'open':>6} {'flagged':>7}"
            f" {'oldest':>8} {'growth/min':>10}  site"
        )
        for index, site in enumerate(shown, start=1):
            opened = str(site.opened) + (f"+{site.preexisting}p" if site.preexisting else "")
            lines.append(
                f"{index:>3} {opened:>7} {site.closed:>7} {site.still_open:>6}"
                f" {site.flagged:>7} {_age(site.oldest_age_s, site.oldest_is_lower_bound):>8}"
                f" {_growth(site.growth_per_min):>10}  {site.label}"
            )
        if any(s.preexisting for s in shown):
            lines.append("    (+Np: N more sockets that were open before tracing began)")
        for index, site in enumerate(shown, start=1):
            if site.flagged == 0 and site.still_open == 0:
                continue
            lines.extend(_site_detail(index, site))

    lines.append("")
    lines.append(_top_line("leaked sockets by remote endpoint", analysis.remote_endpoints, top))
    lines.append(_top_line("leaked sockets by local port", analysis.local_ports, top))
    if any(name.endswith(":*") for name, _ in analysis.remote_endpoints) or any(
        name == "*" for name, _ in analysis.local_ports
    ):
        lines.append("    (* = ephemeral port: remote port of accepted, local port of connected)")
    body = "\n".join(_clip(line, width) for line in lines)
    # Loss counters are wrapped, never clipped: each one must stay readable.
    losses = textwrap.fill(
        render_losses(analysis.losses), width=max(width, 40), subsequent_indent="    "
    )
    return body + "\n\n" + losses + "\n"


def _opt(value: int | None) -> str:
    return "?" if value is None else str(value)


def _site_detail(index: int, site: SiteStats) -> list[str]:
    lines = ["", f"#{index} {site.label}"]
    lines.append(
        f"    pids {' '.join(map(str, site.pids))} ({','.join(site.comms)});"
        f" classes: {_counts(site.leak_classes)}; states: {_counts(site.states)}"
    )
    if site.rlimit is not None:
        lines.append("    " + _rlimit_line(site.rlimit, " at this site's rate"))
    if site.frames:
        lines.append("    stack, innermost first:")
        lines.extend(f"      {short_location(f)}" for f in reversed(site.frames))
    elif site.key.startswith("[preexisting"):
        lines.append("    opened before tracing began: no stack exists for these sockets")
    else:
        lines.append(f"    {site.key}")
    return lines


def _top_line(title: str, items: Sequence[tuple[Any, int]], top: int) -> str:
    if not items:
        return f"{title}: none"
    shown = items[: max(top, 1)]
    text = ", ".join(f"{name} ({count})" for name, count in shown)
    rest = len(items) - len(shown)
    return f"{title}: {text}" + (f", +{rest} more" if rest > 0 else "")


# -- JSON ---------------------------------------------------------------------------------------


def _clean(value: Any) -> Any:
    """NaN/inf -> null, tuples -> lists, recursively: strict JSON for any consumer."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def to_json_dict(analysis: Analysis, top: int = 0) -> dict[str, Any]:
    """Everything `render_text` shows, as plain data; `top` > 0 limits the lists."""
    sites = analysis.sites[:top] if top > 0 else analysis.sites

    def limit(items: Sequence[Any]) -> Sequence[Any]:
        return items[:top] if top > 0 else items

    out = {
        "format_version": JSON_FORMAT_VERSION,
        "report": analysis.directory,
        "schema_version": analysis.meta.get("schema_version"),
        "run": {
            key: analysis.meta.get(key)
            for key in ("host", "kernel", "probe_set", "pids", "started_at", "ended_at")
        }
        | {"duration_s": analysis.duration_s, "threshold_s": analysis.threshold_s},
        "totals": {
            "seen": analysis.seen,
            "still_open": analysis.still_open,
            "flagged": analysis.flagged,
            "call_sites": len(analysis.sites),
            "timeline_samples": analysis.timeline_samples,
            "untracked_open": analysis.untracked_open,
        },
        "processes": [dataclasses.asdict(p) for p in analysis.processes],
        "call_sites": [dataclasses.asdict(s) | {"leak_rate": s.leak_rate} for s in sites],
        "leaked_remote_endpoints": [
            {"endpoint": e, "count": n} for e, n in limit(analysis.remote_endpoints)
        ],
        "leaked_local_ports": [{"port": p, "count": n} for p, n in limit(analysis.local_ports)],
        "losses": analysis.losses,
        "losses_nonzero": any(v > 0 for v in analysis.losses.values()),
        "losses_collected": bool(analysis.losses),
    }
    cleaned: dict[str, Any] = _clean(out)
    return cleaned


def render_json(analysis: Analysis, top: int = 0) -> str:
    return json.dumps(to_json_dict(analysis, top), indent=2, allow_nan=False) + "\n"
