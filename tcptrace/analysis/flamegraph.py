"""Flame graph of leaked sockets: folded stacks, and a self-contained interactive HTML page.

Each flagged socket still open at the end of the run contributes its stack,
rooted at its process name, weighted by 1 (`count`) or by its age in seconds
(`socket-seconds`: a socket leaked an hour ago weighs more than one leaked a
minute ago). The folded file is the usual `frame;frame;frame weight` format read
by flamegraph.pl, speedscope and inferno. The HTML page embeds the tree as JSON
and draws it with its own small SVG renderer (no network, no CDN), with
click-to-zoom, search, and hover details. `#zoom=NAME&search=TEXT` in the URL
zooms and searches on load (used by the headless browser test, handy for links).
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

import pandas as pd

from tcptrace.analysis.names import frames_of, site_key
from tcptrace.errors import UsageError
from tcptrace.fileio import prepare_output_dir, write_atomic
from tcptrace.report.loader import Report

Weight = Literal["count", "socket-seconds"]
WEIGHTS: Final[tuple[Weight, ...]] = ("count", "socket-seconds")
ROOT_NAME: Final = "all"


@dataclass
class FlameNode:
    name: str
    value: float = 0.0
    children: dict[str, FlameNode] = field(default_factory=dict)

    def add(self, path: tuple[str, ...], weight: float) -> None:
        node = self
        node.value += weight
        for name in path:
            child = node.children.get(name)
            if child is None:
                child = node.children[name] = FlameNode(name)
            child.value += weight
            node = child

    def count(self) -> int:
        """Number of nodes, this one included."""
        return 1 + sum(c.count() for c in self.children.values())

    def to_json(self) -> dict[str, Any]:
        node: dict[str, Any] = {"n": self.name, "v": self.value}
        if self.children:
            node["c"] = [self.children[k].to_json() for k in sorted(self.children)]
        return node


@dataclass(frozen=True)
class FlameFiles:
    html: Path
    folded: Path
    stacks: int  # distinct folded stacks
    total: float  # sum of weights


def _clean_frame(name: str) -> str:
    # ';' separates frames and a newline separates records in the folded format.
    cleaned = name.replace(";", ":").replace("\r", " ").replace("\n", " ").strip()
    return cleaned or "[empty]"


def leaked_stacks(report: Report, weight: Weight = "count") -> dict[tuple[str, ...], float]:
    """{(process, frame, ..., frame): weight} over flagged open sockets, outermost first."""
    if weight not in WEIGHTS:
        raise UsageError(f"unknown flame graph weight {weight!r}", hint="count or socket-seconds")
    frame = report.open_sockets
    leaked = frame[frame["leak"].fillna(False).to_numpy(dtype=bool)]
    stacks: dict[tuple[str, ...], float] = {}
    for comm, stack, status, age in zip(
        leaked["comm"], leaked["stack"], leaked["stack_status"], leaked["age_s"], strict=True
    ):
        key = site_key(str(stack), str(status))
        frames = frames_of(key) or (key,)
        path = (_clean_frame(str(comm)), *(_clean_frame(f) for f in frames))
        value = 1.0 if weight == "count" else 0.0 if pd.isna(age) else float(age)
        stacks[path] = stacks.get(path, 0.0) + value
    return stacks


def _format_weight(value: float) -> str:
    if float(value).is_integer():
        return str(int(value))
    return f"{value:.3f}".rstrip("0").rstrip(".")


def folded_text(stacks: dict[tuple[str, ...], float]) -> str:
    lines = [f"{';'.join(path)} {_format_weight(v)}" for path, v in sorted(stacks.items())]
    return "".join(line + "\n" for line in lines)


def build_tree(stacks: dict[tuple[str, ...], float]) -> FlameNode:
    root = FlameNode(ROOT_NAME)
    for path, value in stacks.items():
        root.add(path, value)
    return root


def flamegraph_paths(target: Path) -> tuple[Path, Path]:
    """(html, folded): FILE itself, and FILE with its suffix replaced by .folded."""
    if target.suffix == ".folded":
        raise UsageError(
            f"--flamegraph {target}: name the HTML file; the folded stacks are written next to"
            " it with the suffix .folded"
        )
    return target, target.with_suffix(".folded")


def write_flamegraph(
    report: Report, target: Path, weight: Weight = "count", title: str = ""
) -> FlameFiles:
    html_path, folded_path = flamegraph_paths(target)
    if html_path.is_dir():
        raise UsageError(f"--flamegraph {html_path} is a directory; give a file name")
    if not html_path.parent.exists():
        prepare_output_dir(html_path.parent, force=True)  # like --plots: create it
    stacks = leaked_stacks(report, weight)
    tree = build_tree(stacks)
    unit = "sockets" if weight == "count" else "socket-seconds"
    subtitle = (
        f"{_format_weight(tree.value)} {unit} in {len(stacks)} stacks; leaked (flagged) sockets"
        f" still open at the end of the run; report {report.directory}"
    )
    write_atomic(folded_path, folded_text(stacks).encode("utf-8"))
    page = render_html(tree, title or "tcptrace: leaked sockets", subtitle, unit)
    write_atomic(html_path, page.encode("utf-8"))
    return FlameFiles(html_path, folded_path, len(stacks), tree.value)


def _json_for_script(data: object) -> str:
    # Inside <script>, "</script>" or "<!--" in a frame name would end or confuse the
    # element: escape every "<" (and the two JS line terminators JSON allows raw).
    text = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return text.replace("<", "\\u003c").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def render_html(tree: FlameNode, title: str, subtitle: str, unit: str) -> str:
    data = {"tree": tree.to_json(), "unit": unit}
    return (
        _PAGE.replace("@TITLE@", html.escape(title))
        .replace("@SUBTITLE@", html.escape(subtitle))
        .replace("@DATA@", _json_for_script(data))
    )


_PAGE: Final = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>@TITLE@</title>
<style>
  body { margin: 0; font: 13px/1.4 system-ui, sans-serif; color: #222; background: #fafafa; }
  header { padding: 10px 14px 6px; }
  h1 { font-size: 17px; margin: 0 0 2px; }
  #subtitle { color: #555; margin: 0 0 8px; }
  #controls { display: flex; gap: 8px; align-items: center; }
  #search { width: 260px; padding: 3px 6px; }
  #matched { color: #7a1fa2; }
  #details { padding: 4px 14px; min-height: 1.4em; font-family: monospace; white-space: pre; }
  #chart { padding: 0 14px 14px; }
  svg { display: block; width: 100%; }
  .frame rect { stroke: #fafafa; stroke-width: 0.5; cursor: pointer; }
  .frame text { font: 12px monospace; fill: #111; pointer-events: none; }
  .frame.dim rect { opacity: 0.45; }
  .frame.match rect { fill: #d05ce3 !important; }
  #empty { padding: 40px 14px; font-size: 15px; color: #555; }
</style>
</head>
<body>
<header>
  <h1>@TITLE@</h1>
  <p id="subtitle">@SUBTITLE@</p>
  <div id="controls">
    <input id="search" type="search" placeholder="search frames (substring)">
    <button id="reset" type="button">Reset zoom</button>
    <span id="matched"></span>
  </div>
</header>
<div id="details">hover a frame for details; click to zoom</div>
<div id="chart"></div>
<script id="flame-data" type="application/json">@DATA@</script>
<script>
"use strict";
(function () {
  const DATA = JSON.parse(document.getElementById("flame-data").textContent);
  const ROW = 18, SVGNS = "http://www.w3.org/2000/svg";
  const chart = document.getElementById("chart");
  const details = document.getElementById("details");
  const searchBox = document.getElementById("search");
  const matched = document.getElementById("matched");
  const unit = DATA.unit;
  let zoomed = null, term = "";

  // Parent links and depth, once.
  let maxDepth = 0;
  (function link(node, parent, depth) {
    node.parent = parent; node.depth = depth; node.c = node.c || [];
    if (depth > maxDepth) maxDepth = depth;
    node.c.forEach(function (child) { link(child, node, depth + 1); });
  })(DATA.tree, null, 0);

  function hash(text) {
    let h = 2166136261;
    for (let i = 0; i < text.length; i++) { h ^= text.charCodeAt(i); h = Math.imul(h, 16777619); }
    return h >>> 0;
  }
  function color(node) {
    if (node.depth === 0) return "#c8c8c8";
    if (node.n.charAt(0) === "[") return "#b0b0b0";
    if (node.depth === 1) return "hsl(210, 45%, 72%)";
    const h = hash(node.n);
    const hue = 8 + h % 44, saturation = 70 + (h >> 8) % 25, light = 58 + (h >> 16) % 12;
    return "hsl(" + hue + ", " + saturation + "%, " + light + "%)";
  }
  // Drawn labels show "f (file.go:12)"; the tooltip keeps the full path.
  function shortName(n) { return n.replace(/ \\((?:[^()]*\\/)?([^()\\/]*)\\)$/, " ($1)"); }
  function fmt(v) { return Number.isInteger(v) ? String(v) : v.toFixed(2); }
  function pct(v) { return (100 * v / DATA.tree.v).toFixed(1) + "%"; }
  function ancestorOf(a, b) {
    for (let n = b; n; n = n.parent) if (n === a) return true;
    return false;
  }

  const measure = document.createElement("canvas").getContext("2d");
  measure.font = "12px monospace";
  const charWidth = measure.measureText("mmmmmmmmmm").width / 10 || 7.2;

  function render() {
    chart.textContent = "";
    if (!DATA.tree.v) {
      const empty = document.createElement("div");
      empty.id = "empty";
      empty.textContent = "No leaked sockets: nothing to draw.";
      chart.appendChild(empty);
      return;
    }
    const width = Math.max(chart.clientWidth - 28, 300);
    const height = (maxDepth + 1) * ROW;
    const svg = document.createElementNS(SVGNS, "svg");
    svg.setAttribute("viewBox", "0 0 " + width + " " + height);
    svg.setAttribute("height", height);
    svg.setAttribute("id", "flame");
    const focus = zoomed || DATA.tree;
    let matchedValue = 0;
    // The focus spans the full width, its descendants scale with it; its ancestors are
    // drawn full width too, dimmed, so a click on one of them zooms back out.
    function draw(node, x, w, inFocus, scale, underMatch) {
      if (w < 0.3) return;
      const isMatch = term !== "" && node.n.toLowerCase().indexOf(term) >= 0;
      if (isMatch && inFocus && !underMatch) matchedValue += node.v;
      const g = document.createElementNS(SVGNS, "g");
      g.setAttribute("class", "frame" + (inFocus ? "" : " dim") + (isMatch ? " match" : ""));
      g.setAttribute("data-name", node.n);
      g.setAttribute("data-value", node.v);
      const y = height - (node.depth + 1) * ROW;
      const rect = document.createElementNS(SVGNS, "rect");
      rect.setAttribute("x", x.toFixed(2)); rect.setAttribute("y", y);
      rect.setAttribute("width", w.toFixed(2)); rect.setAttribute("height", ROW - 1);
      rect.setAttribute("fill", color(node));
      const title = document.createElementNS(SVGNS, "title");
      const info = node.n + " (" + fmt(node.v) + " " + unit + ", " + pct(node.v) + ")";
      title.textContent = info;
      g.appendChild(title); g.appendChild(rect);
      const chars = Math.floor((w - 6) / charWidth);
      if (chars >= 3) {
        const text = document.createElementNS(SVGNS, "text");
        text.setAttribute("x", (x + 3).toFixed(2)); text.setAttribute("y", y + ROW - 5);
        const label = shortName(node.n);
        text.textContent = label.length <= chars ? label : label.slice(0, chars - 2) + "..";
        g.appendChild(text);
      }
      g.addEventListener("mouseover", function () { details.textContent = info; });
      g.addEventListener("click", function () {
        zoomed = node === DATA.tree ? null : node;
        render();
      });
      svg.appendChild(g);
      const below = underMatch || (isMatch && inFocus);
      if (inFocus) {
        let cx = x;
        node.c.forEach(function (child) {
          draw(child, cx, child.v * scale, true, scale, below);
          cx += child.v * scale;
        });
      } else {
        node.c.forEach(function (child) {
          if (child === focus) draw(child, 0, width, true, width / focus.v, false);
          else if (ancestorOf(child, focus)) draw(child, 0, width, false, 0, false);
        });
      }
    }
    draw(DATA.tree, 0, width, focus === DATA.tree, width / DATA.tree.v, false);
    chart.appendChild(svg);
    matched.textContent = term
      ? "matched: " + fmt(matchedValue) + " " + unit + " (" + pct(matchedValue) + ")"
      : "";
  }

  function find(node, name) {
    if (node.n === name) return node;
    for (const child of node.c) { const hit = find(child, name); if (hit) return hit; }
    return null;
  }
  const params = new URLSearchParams(location.hash.slice(1));
  if (params.get("zoom")) zoomed = find(DATA.tree, params.get("zoom"));
  if (params.get("search")) {
    term = params.get("search").toLowerCase();
    searchBox.value = params.get("search");
  }

  searchBox.addEventListener("input", function () {
    term = searchBox.value.toLowerCase();
    render();
  });
  document.getElementById("reset").addEventListener("click", function () {
    zoomed = null;
    render();
  });
  window.addEventListener("resize", render);
  render();
})();
</script>
</body>
</html>
"""
