"""Small SVG charts the stages write beside their CSVs, declared as DVC image plots.

`dvc plots show` renders CSV plots with Vega loaded from a CDN, so offline they are blank; an SVG file is drawn by
the browser itself. Pure: values in, SVG text out (`write_svg` writes it atomically). Legends sit above the plot
area, never over a line.
"""

from __future__ import annotations

import html
import math
from pathlib import Path

COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]
FONT = 'font-family="sans-serif"'


def _num(x: float) -> str:
    if x == 0 or 1e-3 <= abs(x) < 1e5:
        return f"{x:.4g}"
    return f"{x:.2e}"


def _text(x: float, y: float, text: str, size: int = 11, anchor: str = "start", fill: str = "#222") -> str:
    return (
        f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" {FONT} text-anchor="{anchor}" fill="{fill}">'
        f"{html.escape(text)}</text>"
    )


def bar_chart(rows: list[tuple[str, float]], title: str, value_label: str, width: int = 640) -> str:
    """Horizontal bars, one per (label, value) row, in the given order, each with its value written beside it."""
    label_w = min(260, 12 + 7 * max((len(label) for label, _ in rows), default=4))
    top, row_h, bottom, right = 30, 22, 30, 60
    height = top + row_h * max(len(rows), 1) + bottom
    peak = max((v for _, v in rows), default=0) or 1
    span = width - label_w - right
    parts = [_text(8, 18, title, 13)]
    for i, (label, value) in enumerate(rows):
        y = top + i * row_h
        bar = span * max(value, 0) / peak
        parts.append(_text(label_w - 6, y + 15, label, anchor="end"))
        parts.append(f'<rect x="{label_w}" y="{y + 3}" width="{bar:.1f}" height="{row_h - 6}" fill="{COLOURS[0]}"/>')
        parts.append(_text(label_w + bar + 4, y + 15, _num(value)))
    parts.append(_text(label_w + span / 2, height - 8, value_label, anchor="middle"))
    return _svg(width, height, parts)


def line_chart(
    series: dict[str, list[tuple[float, float]]], title: str, x_label: str, width: int = 640, height: int = 300
) -> str:
    """Lines (with dots when they have few points) of (x, y) series; the legend is a row above the plot area."""
    points = [p for values in series.values() for p in values if math.isfinite(p[1])]
    left, right, top, bottom = 64, 20, 46, 40
    parts = [_text(8, 18, title, 13)]
    x = left
    for k, name in enumerate(series):  # the legend: a row of coloured swatches and names between title and plot
        colour = COLOURS[k % len(COLOURS)]
        parts.append(f'<rect x="{x}" y="27" width="12" height="4" fill="{colour}"/>')
        parts.append(_text(x + 16, 33, name))
        x += 16 + 7 * len(name) + 20
    if not points:
        parts.append(_text(left, top + 20, "no data"))
        return _svg(width, height, parts)
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + abs(y0) * 0.01 + 1e-9)
    plot_w, plot_h = width - left - right, height - top - bottom

    def xy(px: float, py: float) -> tuple[float, float]:
        return left + (px - x0) / (x1 - x0) * plot_w, top + (1 - (py - y0) / (y1 - y0)) * plot_h

    parts.append(f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#999"/>')
    parts += [
        _text(left - 4, top + 10, _num(y1), anchor="end"),
        _text(left - 4, top + plot_h, _num(y0), anchor="end"),
        _text(left, height - bottom + 14, _num(x0)),
        _text(left + plot_w, height - bottom + 14, _num(x1), anchor="end"),
        _text(left + plot_w / 2, height - 6, x_label, anchor="middle"),
    ]
    for k, values in enumerate(series.values()):
        colour = COLOURS[k % len(COLOURS)]
        coords = [xy(*p) for p in values if math.isfinite(p[1])]
        line = " ".join(f"{a:.1f},{b:.1f}" for a, b in coords)
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{line}"/>')
        if len(coords) <= 60:
            parts += [f'<circle cx="{a:.1f}" cy="{b:.1f}" r="2.5" fill="{colour}"/>' for a, b in coords]
    return _svg(width, height, parts)


def _svg(width: int, height: int, parts: list[str]) -> str:
    body = "".join(parts)
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}">'
        f'<rect width="100%" height="100%" fill="white"/>{body}</svg>\n'
    )


def write_svg(path: Path, svg: str) -> None:
    """Write `svg` to `path` atomically (a reader never sees half a chart)."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(svg, encoding="utf-8")
    partial.replace(path)
