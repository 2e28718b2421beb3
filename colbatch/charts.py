"""Inline SVG charts for the HTML report: throughput, RSS and stage utilisation over a run.

Plain SVG (no JavaScript, no external files) so a saved report opens anywhere
and renders in a notebook; every label is HTML-escaped.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

# Small multiples: wide enough to read a trend, short enough for three to fit a notebook cell.
CHART_WIDTH, CHART_HEIGHT, PAD = 360, 110, 28


def line_chart(points: Sequence[tuple[float, float]], *, title: str, unit: str, color: str) -> str:
    """An SVG polyline of (x, y) points with the title and the y maximum as labels."""
    esc = html.escape
    if len(points) < 2:
        return (f"<svg width='{CHART_WIDTH}' height='{CHART_HEIGHT}' role='img'><text x='4' y='16' "
                f"font-size='12'>{esc(title)}: too few samples</text></svg>")
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    x0, x1 = min(xs), max(xs) or 1.0
    top = max(ys) or 1.0
    w, h = CHART_WIDTH - 2 * PAD, CHART_HEIGHT - 2 * PAD
    coords = " ".join(f"{PAD + (x - x0) / ((x1 - x0) or 1) * w:.1f},{PAD + h - y / top * h:.1f}" for x, y in points)
    return (f"<svg width='{CHART_WIDTH}' height='{CHART_HEIGHT}' role='img' aria-label='{esc(title)}'>"
            f"<text x='4' y='14' font-size='12'>{esc(title)} (max {top:,.0f} {esc(unit)})</text>"
            f"<polyline fill='none' stroke='{color}' stroke-width='1.5' points='{coords}'/>"
            f"<text x='{PAD}' y='{CHART_HEIGHT - 6}' font-size='10'>0 s</text>"
            f"<text x='{CHART_WIDTH - PAD - 30}' y='{CHART_HEIGHT - 6}' font-size='10'>{x1:.1f} s</text></svg>")


def bar_chart(shares: dict[str, float], *, title: str) -> str:
    """Horizontal SVG bars of each stage's busy share (0..1) of the wall time."""
    esc = html.escape
    row = 16
    height = 22 + row * max(1, len(shares))
    bars = []
    for i, (name, share) in enumerate(shares.items()):
        y = 20 + i * row
        width = max(0.0, min(1.0, share)) * (CHART_WIDTH - 170)
        bars.append(f"<text x='4' y='{y + 11}' font-size='11'>{esc(name[:24])}</text>"
                    f"<rect x='160' y='{y}' width='{width:.1f}' height='{row - 4}' fill='#1565c0'/>"
                    f"<text x='{164 + width:.1f}' y='{y + 11}' font-size='10'>{share:.0%}</text>")
    return (f"<svg width='{CHART_WIDTH}' height='{height}' role='img' aria-label='{esc(title)}'>"
            f"<text x='4' y='14' font-size='12'>{esc(title)}</text>{''.join(bars)}</svg>")


def report_charts(timeline: Sequence[dict[str, Any]], memory_samples: Sequence[tuple[float, int]],
                  busy_share: dict[str, float]) -> str:
    """The three report charts side by side: throughput and RSS over time, and stage utilisation."""
    rate = []
    for prev, cur in zip(timeline, timeline[1:]):
        dt = cur["t"] - prev["t"]
        if dt > 0:
            rate.append((cur["t"], (cur["rows"] - prev["rows"]) / dt))
    rss = [(t, v / 2**20) for t, v in memory_samples]
    return ("<div style='display:flex;flex-wrap:wrap;gap:8px'>"
            + line_chart(rate, title="throughput", unit="rows/s", color="#1565c0")
            + line_chart(rss, title="RSS", unit="MiB", color="#c62828")
            + bar_chart(busy_share, title="stage utilisation (busy share)") + "</div>")
