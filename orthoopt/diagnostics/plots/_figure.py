"""Shared figure set-up for the diagnostic plots: style, fixed sizes, Agg canvas, atomic saving.

Figures are built as ``matplotlib.figure.Figure`` objects on an explicit Agg canvas, so plotting never
touches pyplot's global state or the user's interactive backend (a notebook can still display the
returned figure). Sizes are fixed per plot in inches at :data:`DPI` dots per inch; the PNG is exactly
``width * DPI`` x ``height * DPI`` pixels (no tight bounding box).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from orthoopt.errors import InvalidInputError
from orthoopt.utils.atomic import atomic_path

DPI = 100
"""Dots per inch of saved PNGs (and of the figure itself)."""

STYLE = {
    "font.size": 11,
    "axes.titlesize": 12,
    "axes.labelsize": 11,
    "xtick.labelsize": 10,
    "ytick.labelsize": 10,
    "legend.fontsize": 10,
    "figure.titlesize": 13,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "svg.hashsalt": "orthoopt",  # stable SVG ids between runs
}
"""rcParams in force while a figure is built (all text >= 10 pt)."""

COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")
"""Series colours, in series order (matplotlib's tab10)."""

FORMATS = ("png", "svg")


def color(i: int) -> str:
    """Colour of the ``i``-th series."""
    return COLORS[i % len(COLORS)]


def new_figure(width: float, height: float) -> Figure:
    """A ``width`` x ``height`` inch figure (constrained layout) on its own Agg canvas.

    Call it inside ``matplotlib.rc_context(STYLE)`` so that text created later uses the style.
    """
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def style():
    """Context manager applying :data:`STYLE` while a figure is built."""
    return matplotlib.rc_context(STYLE)


def save_figure(fig: Figure, path_stem: str | os.PathLike, formats: tuple[str, ...] = FORMATS) -> list[Path]:
    """Save ``fig`` as ``<path_stem>.png`` and ``<path_stem>.svg`` (each written atomically).

    A ``.png`` / ``.svg`` suffix on ``path_stem`` is dropped. Returns the written paths.
    """
    stem = Path(path_stem)
    if stem.suffix.lower() in (".png", ".svg"):
        stem = stem.with_suffix("")
    written = []
    for fmt in formats:
        if fmt not in FORMATS:
            raise InvalidInputError(f"unsupported figure format {fmt!r}; choose from {FORMATS}")
        target = stem.with_name(f"{stem.name}.{fmt}")
        metadata = {"Date": None} if fmt == "svg" else {"Software": None}
        with style(), atomic_path(target) as tmp:
            fig.savefig(tmp, format=fmt, dpi=DPI, metadata=metadata)
        written.append(target)
    return written


def finish(fig: Figure, save: str | os.PathLike | None) -> Figure:
    """Save ``fig`` when ``save`` is a path stem; return ``fig``."""
    if save is not None:
        save_figure(fig, save)
    return fig


def auto_scale(ax, values, axis: str = "y") -> str:
    """Pick a scale for ``values`` on ``ax``'s ``axis`` and set it; returns its name.

    ``"log"`` when all values are positive and span more than a factor 30; ``"symlog"`` (linear
    within +-1) when some are <= 0 and the largest magnitude exceeds 30; else ``"linear"``.
    """
    vals = [float(v) for v in values if not math.isnan(v)]
    scale, kw = "linear", {}
    if vals:
        lo, hi = min(vals), max(vals)
        big = max(abs(lo), abs(hi))
        if lo > 0 and hi / lo > 30:
            scale = "log"
        elif lo <= 0 and big > 30:
            scale, kw = "symlog", {"linthresh": 1.0}
    (ax.set_yscale if axis == "y" else ax.set_xscale)(scale, **kw)
    return scale
