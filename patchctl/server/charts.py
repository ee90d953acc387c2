"""Inline SVG charts made on the server for the registry browser (no chart library, no JS).

Each function returns a :class:`markupsafe.Markup` SVG string whose every
label went through :func:`html.escape`. Every mark carries its datum as
``data-label`` / ``data-value`` (the exact number the JSON twin holds), so a
test can check that the drawing shows the data: a bar's height (or a point's
``cy``) is the value scaled by the axis maximum, nothing else.
"""

from __future__ import annotations

import math
from html import escape
from typing import Any

from markupsafe import Markup

WIDTH = 640
HEIGHT = 220
PAD_L, PAD_R, PAD_T, PAD_B = 56, 12, 14, 46


def _num(x: float) -> str:
    """A value as shown on an axis or in a tooltip."""
    if x == 0:
        return "0"
    if abs(x) >= 1e4 or abs(x) < 1e-3:
        return f"{x:.3g}"
    return f"{x:.4g}"


def _f(x: float) -> str:
    """A coordinate."""
    return f"{x:.2f}"


def _axis(top: float, label: str) -> list[str]:
    """The y axis (0..top) with three gridlines, and its label."""
    h = HEIGHT - PAD_T - PAD_B
    out = []
    for i in range(3):
        v = top * i / 2
        y = PAD_T + h - h * i / 2
        out.append(f'<line class="grid" x1="{PAD_L}" x2="{WIDTH - PAD_R}" y1="{_f(y)}" y2="{_f(y)}"/>')
        out.append(f'<text class="tick" x="{PAD_L - 4}" y="{_f(y + 4)}" text-anchor="end">{escape(_num(v))}</text>')
    out.append(f'<text class="axis-label" x="12" y="{PAD_T + h / 2:.0f}" text-anchor="middle" '
               f'transform="rotate(-90 12 {PAD_T + h / 2:.0f})">{escape(label)}</text>')
    return out


def _top(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    top = max(finite, default=0.0)
    return top if top > 0 else 1.0


def bars(items: list[tuple[str, float]], *, y_label: str, title: str, css: str = "bar") -> Markup:
    """A bar chart of ``(label, value)``; non-finite or negative values are drawn as empty bars."""
    n = max(len(items), 1)
    top = _top([v for _, v in items])
    h = HEIGHT - PAD_T - PAD_B
    slot = (WIDTH - PAD_L - PAD_R) / n
    bw = max(1.0, slot * 0.8)
    parts = [f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" role="img" viewBox="0 0 {WIDTH} {HEIGHT}" '
             f'width="{WIDTH}" height="{HEIGHT}" data-top="{top!r}"><title>{escape(title)}</title>', *_axis(top, y_label)]
    every = max(1, math.ceil(n / 24))  # at most ~24 x labels
    for i, (label, value) in enumerate(items):
        v = value if math.isfinite(value) and value > 0 else 0.0
        bh = h * v / top
        x = PAD_L + i * slot + (slot - bw) / 2
        parts.append(
            f'<rect class="{css}" x="{_f(x)}" y="{_f(PAD_T + h - bh)}" width="{_f(bw)}" height="{_f(bh)}" '
            f'data-label="{escape(label)}" data-value="{value!r}"><title>{escape(label)}: {escape(_num(value))}'
            f'</title></rect>')
        if i % every == 0:
            cx = x + bw / 2
            parts.append(f'<text class="tick" x="{_f(cx)}" y="{HEIGHT - PAD_B + 12}" text-anchor="end" '
                         f'transform="rotate(-35 {_f(cx)} {HEIGHT - PAD_B + 12})">{escape(label[-18:])}</text>')
    parts.append("</svg>")
    return Markup("".join(parts))


def grouped_bars(groups: list[tuple[str, list[tuple[str, float | None]]]], *, series: list[str], y_label: str,
                 title: str) -> Markup:
    """Bars per group (a suite), one per series (base, alone, merged); ``None`` draws nothing."""
    n = max(len(groups), 1)
    values = [v for _, row in groups for _, v in row if v is not None]
    top = _top(values)
    h = HEIGHT - PAD_T - PAD_B
    slot = (WIDTH - PAD_L - PAD_R) / n
    bw = slot * 0.8 / max(len(series), 1)
    parts = [f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" role="img" viewBox="0 0 {WIDTH} {HEIGHT}" '
             f'width="{WIDTH}" height="{HEIGHT}" data-top="{top!r}"><title>{escape(title)}</title>', *_axis(top, y_label)]
    for gi, (glabel, row) in enumerate(groups):
        x0 = PAD_L + gi * slot + slot * 0.1
        for si, (sname, value) in enumerate(row):
            if value is None:
                continue
            v = value if math.isfinite(value) and value > 0 else 0.0
            bh = h * v / top
            k = series.index(sname) if sname in series else si
            parts.append(
                f'<rect class="bar s{k}" x="{_f(x0 + si * bw)}" y="{_f(PAD_T + h - bh)}" width="{_f(bw * 0.92)}" '
                f'height="{_f(bh)}" data-label="{escape(glabel)}" data-series="{escape(sname)}" '
                f'data-value="{value!r}"><title>{escape(glabel)} · {escape(sname)}: {escape(_num(value))}</title></rect>')
        cx = x0 + slot * 0.4
        parts.append(f'<text class="tick" x="{_f(cx)}" y="{HEIGHT - PAD_B + 14}" text-anchor="middle">'
                     f'{escape(glabel[-28:])}</text>')
    for si, sname in enumerate(series):  # legend
        lx = PAD_L + 8 + si * 120
        parts.append(f'<rect class="bar s{si} legend" x="{lx}" y="{HEIGHT - 16}" width="10" height="10"/>'
                     f'<text class="tick" x="{lx + 14}" y="{HEIGHT - 7}">{escape(sname)}</text>')
    parts.append("</svg>")
    return Markup("".join(parts))


def curve(points: list[tuple[float, float]], chosen: float | None, *, x_label: str, y_label: str,
          title: str) -> Markup:
    """Score vs coefficient: a line through ``(x, y)`` sorted by x, a dot per point, the chosen x ringed."""
    pts = sorted((x, y) for x, y in points if math.isfinite(x) and math.isfinite(y))
    h = HEIGHT - PAD_T - PAD_B
    w = WIDTH - PAD_L - PAD_R
    xs = [x for x, _ in pts] or [0.0, 1.0]
    x_lo, x_hi = min(xs), max(xs)
    if x_hi == x_lo:
        x_lo, x_hi = x_lo - 0.5, x_hi + 0.5
    margin = (x_hi - x_lo) * 0.04  # keeps the end points (and the chosen ring) inside the frame
    x_lo, x_hi = x_lo - margin, x_hi + margin
    top = _top([y for _, y in pts])

    def sx(x: float) -> float:
        return PAD_L + w * (x - x_lo) / (x_hi - x_lo)

    def sy(y: float) -> float:
        return PAD_T + h - h * max(y, 0.0) / top

    parts = [f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" role="img" viewBox="0 0 {WIDTH} {HEIGHT}" '
             f'width="{WIDTH}" height="{HEIGHT}" data-top="{top!r}" data-x-lo="{x_lo!r}" data-x-hi="{x_hi!r}">'
             f'<title>{escape(title)}</title>', *_axis(top, y_label)]
    if pts:
        parts.append('<polyline class="line" points="' + " ".join(f"{_f(sx(x))},{_f(sy(y))}" for x, y in pts) + '"/>')
    for x, y in pts:
        is_chosen = chosen is not None and x == chosen
        cls = "point chosen" if is_chosen else "point"
        parts.append(f'<circle class="{cls}" cx="{_f(sx(x))}" cy="{_f(sy(y))}" r="{6 if is_chosen else 3.5}" '
                     f'data-x="{x!r}" data-value="{y!r}"><title>{escape(x_label)}={escape(_num(x))}: '
                     f'{escape(_num(y))}{" (chosen)" if is_chosen else ""}</title></circle>')
        parts.append(f'<text class="tick" x="{_f(sx(x))}" y="{HEIGHT - PAD_B + 14}" text-anchor="middle">'
                     f'{escape(_num(x))}</text>')
    parts.append(f'<text class="axis-label" x="{PAD_L + w / 2:.0f}" y="{HEIGHT - 8}" text-anchor="middle">'
                 f'{escape(x_label)}</text></svg>')
    return Markup("".join(parts))


def lineage(parents: list[dict[str, Any]], this: dict[str, Any], children: list[dict[str, Any]]) -> Markup:
    """Three columns of linked nodes — parents → this → children — with recipe labels on the edges.

    A node is ``{"label", "href" (or None), "edge" (the recipe label of the edge into/out of this)}``.
    """
    rows = max(len(parents), len(children), 1)
    node_h, gap = 34, 16
    height = rows * (node_h + gap) + gap + 16
    col_w, width = 190, 960
    xs = (10, (width - col_w) / 2, width - col_w - 10)

    def ys(k: int) -> list[float]:
        total = k * node_h + (k - 1) * gap
        start = (height - total) / 2
        return [start + i * (node_h + gap) for i in range(k)]

    parts = [f'<svg class="lineage" xmlns="http://www.w3.org/2000/svg" role="img" viewBox="0 0 {width} {height:.0f}" '
             f'width="{width}" height="{height:.0f}"><title>lineage</title>']
    ty = ys(1)[0]

    def node(n: dict[str, Any], x: float, y: float, role: str) -> str:
        label = escape(n["label"][:34])
        box = (f'<rect class="node {role}" x="{_f(x)}" y="{_f(y)}" width="{col_w}" height="{node_h}" rx="6"/>'
               f'<text class="node-label" x="{_f(x + col_w / 2)}" y="{_f(y + node_h / 2 + 4)}" '
               f'text-anchor="middle">{label}</text>')
        if n.get("href"):
            return (f'<a class="node-link {role}" href="{escape(n["href"])}" data-role="{role}">'
                    f'<title>{escape(n["label"])}</title>{box}</a>')
        return f'<g class="{role}" data-role="{role}">{box}</g>'

    def edge(x1: float, y1: float, x2: float, y2: float, label: str, at_start: bool) -> str:
        # the label sits above the edge next to the outer node, so labels of sibling edges never overlap
        lx, ly, anchor = (x1 + 6, y1 - 6, "start") if at_start else (x2 - 10, y2 - 6, "end")
        return (f'<line class="edge" x1="{_f(x1)}" y1="{_f(y1)}" x2="{_f(x2)}" y2="{_f(y2)}"/>'
                f'<polygon class="arrow" points="{_f(x2)},{_f(y2)} {_f(x2 - 7)},{_f(y2 - 4)} {_f(x2 - 7)},{_f(y2 + 4)}"/>'
                + (f'<text class="edge-label" x="{_f(lx)}" y="{_f(ly)}" text-anchor="{anchor}">'
                   f'{escape(label if len(label) <= 30 else label[:29] + "…")}'
                   f'<title>{escape(label)}</title></text>' if label else ""))

    for p, y in zip(parents, ys(len(parents)), strict=True):
        parts.append(edge(xs[0] + col_w, y + node_h / 2, xs[1], ty + node_h / 2, p.get("edge") or "", True))
    for c, y in zip(children, ys(len(children)), strict=True):
        parts.append(edge(xs[1] + col_w, ty + node_h / 2, xs[2], y + node_h / 2, c.get("edge") or "", False))
    for p, y in zip(parents, ys(len(parents)), strict=True):
        parts.append(node(p, xs[0], y, "parent"))
    parts.append(node(this, xs[1], ty, "this"))
    for c, y in zip(children, ys(len(children)), strict=True):
        parts.append(node(c, xs[2], y, "child"))
    parts.append("</svg>")
    return Markup("".join(parts))


__all__ = ["bars", "curve", "grouped_bars", "lineage"]
