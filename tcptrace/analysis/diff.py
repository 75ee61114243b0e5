"""`tcptrace diff BEFORE AFTER`: per call site, what changed between two reports.

Call sites are matched by `names.match_key` (symbol names only: no addresses,
offsets, file:line or compiler clone suffixes), so a rebuilt or relocated binary
still lines up. Sites that collapse to the same key in one report are summed.

Leak rate = flagged / sockets seen at the site (opened while tracing plus
preexisting): the share of the site's sockets that ended the run as leaks. It
compares runs of different lengths and loads better than raw counts.

Status of a site, from the flagged counts:
  fixed     flagged before, none after, and the site still opened sockets after
  gone      flagged before, the site opened nothing after (not exercised: unproven)
  new       flagged after, not seen before
  worse / better / same   by the leak rate (flagged count when a rate is missing)
  clean     no flagged socket in either run
"""

from __future__ import annotations

import json
import math
import textwrap
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

import pandas as pd

from tcptrace.analysis.callsites import Analysis, SiteStats
from tcptrace.analysis.names import match_key, site_label
from tcptrace.analysis.render import _clean
from tcptrace.report.summary import render_losses

JSON_FORMAT_VERSION: Final = 1
# Leak rates closer than this are "same": sampling noise, not a change.
RATE_TOLERANCE: Final = 0.01


@dataclass(frozen=True)
class SiteSide:
    opened: int
    preexisting: int
    closed: int
    still_open: int
    flagged: int
    growth_per_min: float | None

    @property
    def seen(self) -> int:
        return self.opened + self.preexisting

    @property
    def leak_rate(self) -> float | None:
        return self.flagged / self.seen if self.seen else None


@dataclass(frozen=True)
class SiteDelta:
    key: str  # the match key
    label: str
    before: SiteSide | None
    after: SiteSide | None
    status: str

    def change(self, attribute: str) -> float | None:
        a = getattr(self.before, attribute, None) if self.before else 0
        b = getattr(self.after, attribute, None) if self.after else 0
        if a is None or b is None:
            return None
        return float(b - a)


@dataclass(frozen=True)
class ReportDiff:
    before: Analysis
    after: Analysis
    sites: tuple[SiteDelta, ...]  # regressions first, then improvements, then the rest

    def by_status(self, status: str) -> tuple[SiteDelta, ...]:
        return tuple(s for s in self.sites if s.status == status)


def _merge(sites: Iterable[SiteStats]) -> dict[str, tuple[str, SiteSide]]:
    merged: dict[str, tuple[str, SiteSide]] = {}
    for site in sites:
        key = match_key(site.key)
        side = SiteSide(
            site.opened,
            site.preexisting,
            site.closed,
            site.still_open,
            site.flagged,
            site.growth_per_min,
        )
        if key in merged:
            label, old = merged[key]
            growth = (
                None
                if old.growth_per_min is None and side.growth_per_min is None
                else (old.growth_per_min or 0.0) + (side.growth_per_min or 0.0)
            )
            side = SiteSide(
                old.opened + side.opened,
                old.preexisting + side.preexisting,
                old.closed + side.closed,
                old.still_open + side.still_open,
                old.flagged + side.flagged,
                growth,
            )
            merged[key] = (label, side)
        else:
            merged[key] = (site_label(key), side)
    return merged


def _status(before: SiteSide | None, after: SiteSide | None) -> str:
    flagged_before = before.flagged if before else 0
    flagged_after = after.flagged if after else 0
    if flagged_before == 0 and flagged_after == 0:
        return "clean"
    if before is None or (flagged_before == 0 and before.seen == 0):
        return "new"
    if flagged_after == 0:
        return "fixed" if after is not None and after.seen > 0 else "gone"
    rate_before, rate_after = before.leak_rate, after.leak_rate if after else None
    if rate_before is not None and rate_after is not None:
        if rate_after > rate_before + RATE_TOLERANCE:
            return "worse"
        if rate_after < rate_before - RATE_TOLERANCE:
            return "better"
        return "same"
    if flagged_after > flagged_before:
        return "worse"
    return "better" if flagged_after < flagged_before else "same"


_ORDER: Final = {"worse": 0, "new": 1, "same": 2, "better": 3, "fixed": 4, "gone": 5, "clean": 6}


def diff_analyses(before: Analysis, after: Analysis) -> ReportDiff:
    a, b = _merge(before.sites), _merge(after.sites)
    deltas = []
    for key in a.keys() | b.keys():
        label = (a.get(key) or b[key])[0]
        side_a, side_b = (a[key][1] if key in a else None), (b[key][1] if key in b else None)
        deltas.append(SiteDelta(key, label, side_a, side_b, _status(side_a, side_b)))

    def flagged(delta: SiteDelta) -> int:
        return max(
            delta.before.flagged if delta.before else 0, delta.after.flagged if delta.after else 0
        )

    deltas.sort(key=lambda d: (_ORDER[d.status], -flagged(d), d.label, d.key))
    return ReportDiff(before, after, tuple(deltas))


# -- rendering -----------------------------------------------------------------------------------


def _num(value: float | None, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if float(value).is_integer():
        return f"{int(value):+d}" if signed else str(int(value))
    return f"{value:+.1f}" if signed else f"{value:.1f}"


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def _side(side: SiteSide | None, attribute: str) -> str:
    if side is None:
        return "-"
    value = getattr(side, attribute)
    return _rate(value) if attribute == "leak_rate" else _num(value)


def render_diff_text(diff: ReportDiff, top: int = 0, width: int = 120) -> str:
    lines = [
        f"tcptrace diff {diff.before.directory} -> {diff.after.directory}",
        "call sites matched by symbol names (addresses, offsets and file:line ignored)",
        f"flagged leaks: {diff.before.flagged} -> {diff.after.flagged};"
        f" still open: {diff.before.still_open} -> {diff.after.still_open}",
        "",
    ]
    counts = {s: len(diff.by_status(s)) for s in _ORDER}
    lines.append("sites: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n))
    lines.append("")
    header = (
        f"{'status':<7} {'opened':>13} {'still open':>13} {'flagged':>13} {'leak rate':>13}  site"
    )
    lines.append(header)
    shown = diff.sites[:top] if top > 0 else diff.sites
    for delta in shown:
        cells = []
        for attribute in ("opened", "still_open", "flagged", "leak_rate"):
            cells.append(f"{_side(delta.before, attribute)}->{_side(delta.after, attribute)}")
        lines.append(
            f"{delta.status:<7} {cells[0]:>13} {cells[1]:>13} {cells[2]:>13} {cells[3]:>13}"
            f"  {delta.label}"
        )
    if len(shown) < len(diff.sites):
        lines.append(f"... {len(diff.sites) - len(shown)} more sites (use --top 0 for all)")
    lines.append("")
    lines.append(
        "status: fixed = flagged before, none after although the site still opened sockets;"
    )
    lines.append(
        "        gone = the site opened nothing after (not exercised, so not proven fixed)"
    )
    body = "\n".join(line if len(line) <= width else line[: width - 3] + "..." for line in lines)
    # Loss counters are wrapped, never clipped: each one must stay readable.
    losses = [
        textwrap.fill(
            f"{name} {render_losses(a.losses)}", width=max(width, 40), subsequent_indent="    "
        )
        for name, a in (("before", diff.before), ("after ", diff.after))
    ]
    return body + "\n\n" + "\n".join(losses) + "\n"


def _side_json(side: SiteSide | None) -> dict[str, Any] | None:
    if side is None:
        return None
    return {
        "opened": side.opened,
        "preexisting": side.preexisting,
        "closed": side.closed,
        "still_open": side.still_open,
        "flagged": side.flagged,
        "leak_rate": side.leak_rate,
        "growth_per_min": side.growth_per_min,
    }


def diff_to_json_dict(diff: ReportDiff) -> dict[str, Any]:
    out = {
        "format_version": JSON_FORMAT_VERSION,
        "before": diff.before.directory,
        "after": diff.after.directory,
        "flagged": {"before": diff.before.flagged, "after": diff.after.flagged},
        "sites": [
            {
                "key": d.key,
                "label": d.label,
                "status": d.status,
                "before": _side_json(d.before),
                "after": _side_json(d.after),
            }
            for d in diff.sites
        ],
        "losses": {"before": diff.before.losses, "after": diff.after.losses},
    }
    cleaned: dict[str, Any] = _clean(out)
    return cleaned


def render_diff_json(diff: ReportDiff) -> str:
    return json.dumps(diff_to_json_dict(diff), indent=2, allow_nan=False) + "\n"


def diff_frame(diff: ReportDiff) -> pd.DataFrame:
    """One row per matched call site (for notebooks)."""
    rows = []
    for d in diff.sites:
        row: dict[str, Any] = {"status": d.status, "site": d.label}
        for name, side in (("before", d.before), ("after", d.after)):
            for attribute in ("opened", "still_open", "flagged", "leak_rate"):
                value = getattr(side, attribute) if side is not None else None
                row[f"{attribute}_{name}"] = value
        row["key"] = d.key
        rows.append(row)
    columns = (
        ["status", "site"]
        + [
            f"{a}_{n}"
            for a in ("opened", "still_open", "flagged", "leak_rate")
            for n in ("before", "after")
        ]
        + ["key"]
    )
    frame = pd.DataFrame(rows, columns=columns)
    for column in columns[2:-1]:
        frame[column] = frame[column].astype("Float64" if "rate" in column else "Int64")
    return frame
