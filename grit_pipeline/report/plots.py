"""Small inline-SVG plots for the HTML report, drawn with matplotlib's SVG backend (no JS library).

Each function returns an `<svg>` element as text. Text stays text (`svg.fonttype: none`) so the page is
small and searchable; a fixed hash salt and no date metadata keep the output byte-identical across runs.
"""

from __future__ import annotations

import io
import re

import matplotlib
import numpy as np
from matplotlib.backends.backend_svg import FigureCanvasSVG
from matplotlib.figure import Figure

ACCENT = "#2563eb"
THRESHOLD = "#dc2626"
_STYLE = {
    "svg.fonttype": "none",
    "font.family": "sans-serif",
    "font.size": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.edgecolor": "#9ca3af",
    "axes.labelcolor": "#374151",
    "xtick.color": "#4b5563",
    "ytick.color": "#4b5563",
    "axes.grid": True,
    "axes.grid.axis": "y",
    "axes.titlesize": 8,
    "grid.color": "#e5e7eb",
    "grid.linewidth": 0.6,
}


def _to_svg(fig: Figure, name: str) -> str:
    buf = io.StringIO()
    with matplotlib.rc_context({"svg.hashsalt": f"grit-{name}"}):
        FigureCanvasSVG(fig).print_svg(buf, metadata={"Date": None, "Creator": None})
    svg = buf.getvalue()
    svg = svg[svg.index("<svg"):]
    svg = re.sub(r"\s*<metadata>.*?</metadata>", "", svg, flags=re.S)
    # Make ids unique per plot: several SVGs share one HTML document.
    svg = re.sub(r'id="([^"]+)"', rf'id="{name}-\1"', svg)
    svg = re.sub(r"url\(#([^)]+)\)", rf"url(#{name}-\1)", svg)
    svg = re.sub(r'xlink:href="#([^"]+)"', rf'xlink:href="#{name}-\1"', svg)
    # Scale with the card instead of a fixed size in points.
    svg = re.sub(r'<svg([^>]*?) width="[^"]+" height="[^"]+"', r'<svg\1 class="plot" data-plot="' + name + '"',
                 svg, count=1)
    return svg


def _figure() -> tuple[Figure, object]:
    with matplotlib.rc_context(_STYLE):
        fig = Figure(figsize=(4.6, 2.7))
        # fixed margins: constrained layout measures every tick label and costs most of a plot's time
        fig.subplots_adjust(left=0.15, right=0.975, bottom=0.17, top=0.9)
        ax = fig.add_subplot()
    return fig, ax


def _integer_axes(ax, values) -> None:
    """Whole-number ticks: counts on y, and the observed values on x when they are few."""
    ax.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    lo, hi = min(int(min(values)), 0), int(max(values))
    ax.set_xlim(lo - 0.7, hi + 0.7)
    if hi - lo <= 15:
        ax.set_xticks(range(lo, hi + 1))
    else:
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))


def _empty(ax, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color="#6b7280")
    ax.set_xticks([])
    ax.set_yticks([])


def score_histogram(counts: np.ndarray, edges: np.ndarray, total: int, above: int, threshold: float,
                    name: str = "scores") -> str:
    """Histogram of detector chunk-box scores (`counts` per bin of `edges`, already summed over shards) with
    the `select.min_score` threshold marked; `above` of the `total` scores are above it."""
    with matplotlib.rc_context(_STYLE):
        fig, ax = _figure()
        if total:
            ax.hist(edges[:-1], bins=edges, weights=counts, color=ACCENT, alpha=0.85)
            ax.axvline(threshold, color=THRESHOLD, linewidth=1.5)
            ax.set_title(f"red line: min_score {threshold:g}, {above / total:.0%} of {total:,} pairs above", loc="right",
                         color=THRESHOLD)
            ax.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
            ax.set_xlim(0, 1)
            ax.set_xlabel("chunk-box score (before threshold and NMS)")
            ax.set_ylabel("candidates")
        else:
            _empty(ax, "no detector candidates")
        return _to_svg(fig, name)


def count_bars(values: np.ndarray, freq: np.ndarray, xlabel: str, name: str, ylabel: str = "rows") -> str:
    """Bar chart of how many rows (`freq`) have 0, 1, 2, ... (`values`) of something (chunks, boxes, words)."""
    with matplotlib.rc_context(_STYLE):
        fig, ax = _figure()
        n = int(freq.sum())
        if n:
            ax.bar(values, freq, width=0.8, color=ACCENT, alpha=0.85)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            _integer_axes(ax, values)
            ax.set_title(f"mean {float((values * freq).sum()) / n:.2f} · n = {n:,}", loc="right", color="#374151")
        else:
            _empty(ax, "no rows")
        return _to_svg(fig, name)


def kept_fraction_curve(thresholds: np.ndarray, kept: np.ndarray, current: float, current_kept: float,
                        name: str = "kept") -> str:
    """Share of captions `select` would keep, as a function of `select.min_score`."""
    with matplotlib.rc_context(_STYLE):
        fig, ax = _figure()
        ax.plot(thresholds, kept, color=ACCENT, linewidth=1.8)
        ax.axvline(current, color=THRESHOLD, linewidth=1.2, linestyle="--")
        ax.plot([current], [current_kept], "o", color=THRESHOLD, markersize=4)
        ax.annotate(f"{current_kept:.1%} at {current:g}", (current, current_kept), textcoords="offset points",
                    xytext=(6, 6), color=THRESHOLD)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0, decimals=0))
        ax.set_xlabel("select.min_score")
        ax.set_ylabel("captions kept")
        return _to_svg(fig, name)
