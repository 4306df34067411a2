"""Grouped per-layer bars of weight statistics, one series per model / rotation."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from orthoopt.diagnostics.plots._figure import (
    auto_scale,
    color,
    finish,
    new_figure,
    style,
)
from orthoopt.errors import InvalidInputError

SIZE = (10.0, 7.0)
"""Figure size in inches: 1000 x 700 px at 100 dpi."""

METRICS = {
    "incoherence_mean": (r"Incoherence $\mu = \max|w|\,\sqrt{n}\,/\,\|W\|_F$ (mean over the layer's blocks; 1 = flat)",
                         r"$\mu$ (unitless)"),
    "incoherence_max": (r"Incoherence $\mu = \max|w|\,\sqrt{n}\,/\,\|W\|_F$ (max over the layer's blocks; 1 = flat)",
                        r"$\mu$ (unitless)"),
    "excess_kurtosis_mean": ("Excess kurtosis of the entries (mean over blocks; 0 = Gaussian)", "kurtosis (unitless)"),
    "excess_kurtosis_max": ("Excess kurtosis of the entries (max over blocks; 0 = Gaussian)", "kurtosis (unitless)"),
    "max_abs": ("Largest weight magnitude", "max |w| (weight units)"),
    "fourth_power_sum": (r"Fourth-power sum $\sum w^4$ (OptRot objective)", r"$\sum w^4$ (weight units$^4$)"),
    "outlier_fraction": ("Fraction of entries beyond k standard deviations", "fraction (unitless)"),
    "rtn_error": (r"RTN relative error $\|W - Q(W)\|_F\,/\,\|W\|_F$ (symmetric, per output channel)",
                  "error (unitless)"),
    "channel_max_ratio": ("Outlier channels: largest / median per-channel max |x| (max over the layer's inputs)",
                          "ratio (unitless)"),
    "token_kurtosis_mean": ("Per-token excess kurtosis across channels (mean over tokens and inputs)",
                            "kurtosis (unitless)"),
    "massive_count": ("Massive-activation tokens (max over the layer's inputs)", "tokens (count)"),
}
"""``metric: (panel title, y-axis label)`` for the per-layer rows of
:func:`orthoopt.diagnostics.aggregate_layers` and
:func:`orthoopt.diagnostics.report.aggregate_activation_layers`."""


def group_label(group: str) -> str:
    """Short tick label: ``"layers.3"`` -> ``"3"``, ``"embed_tokens"`` -> ``"embed"``, else the last name part."""
    if group.startswith("layers."):
        return group[len("layers."):]
    last = group.rsplit(".", 1)[-1]
    return "embed" if last == "embed_tokens" else last


def plot_layer_bars(
    series: Mapping[str, Sequence[Mapping]],
    metrics: Sequence[str] = ("incoherence_mean", "excess_kurtosis_mean"),
    title: str | None = None,
    save: str | os.PathLike | None = None,
    metric_labels: Mapping[str, tuple[str, str]] | None = None,
) -> Figure:
    """Grouped bars of per-layer statistics: one panel per metric, one bar colour per series.

    series:  ``{label: layer table}``, a layer table being the list of rows of
             :func:`orthoopt.diagnostics.aggregate_layers` (keys ``group`` and the metrics), e.g.
             ``{"identity": ..., "hadamard": ..., "optrot": ...}``. Groups are shown in the order of
             the first series; a group missing from a series, or a None value, leaves a gap.
    metrics: row keys to plot, one panel each (top to bottom).
    metric_labels: ``{metric: (panel title, y-axis label)}`` overriding :data:`METRICS`; a metric in
             neither is titled by its key.
    save:    path stem; writes ``<save>.png`` and ``<save>.svg``.

    The y axis turns logarithmic (or symmetric-log for kurtosis below 0) when values span more than
    a factor 30 (see :func:`orthoopt.diagnostics.plots._figure.auto_scale`).
    """
    if not series:
        raise InvalidInputError("plot_layer_bars needs at least one series")
    if not metrics:
        raise InvalidInputError("plot_layer_bars needs at least one metric")
    groups: list[str] = []
    for rows in series.values():
        for row in rows:
            if row["group"] not in groups:
                groups.append(row["group"])
    labels = list(series)
    x = np.arange(len(groups))
    width = 0.8 / len(labels)
    with style():
        fig = new_figure(*SIZE)
        axes = fig.subplots(len(metrics), 1, sharex=True, squeeze=False)[:, 0]
        for ax, metric in zip(axes, metrics):
            every = []
            for i, label in enumerate(labels):
                by_group = {row["group"]: row for row in series[label]}
                if any(metric not in r for r in by_group.values()):
                    raise InvalidInputError(f"series {label!r} has no metric {metric!r}")
                vals = [by_group[g][metric] if g in by_group else None for g in groups]
                vals = np.array([np.nan if v is None else v for v in vals], float)
                every.extend(vals)
                ax.bar(x + (i - (len(labels) - 1) / 2) * width, vals, width, label=label, color=color(i))
            if auto_scale(ax, every) != "log":
                ax.axhline(0.0, color="black", linewidth=0.8)
            panel_title, ylabel = {**METRICS, **(metric_labels or {})}.get(metric, (metric, metric))
            ax.set_title(panel_title, fontsize=11, loc="left")
            ax.set_ylabel(ylabel)
            ax.grid(axis="x", visible=False)
        handles, names = axes[0].get_legend_handles_labels()
        fig.legend(handles, names, loc="outside lower center", ncols=len(labels))
        axes[-1].set_xticks(x, [group_label(g) for g in groups])
        axes[-1].set_xlabel("decoder layer")
        fig.suptitle(title or "Per-layer weight statistics")
    return finish(fig, save)
