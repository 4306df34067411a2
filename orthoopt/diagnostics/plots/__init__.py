"""Matplotlib diagnostics. Each function returns a ``Figure`` and, with ``save=path_stem``, writes
``<path_stem>.png`` and ``<path_stem>.svg`` atomically. Sizes are fixed (see each module's ``SIZE``,
in inches at :data:`DPI` dots per inch)."""

from orthoopt.diagnostics.plots._figure import DPI, save_figure
from orthoopt.diagnostics.plots.channels import (
    plot_activation_heatmap,
    plot_channel_magnitudes,
    plot_weight_channels,
    weight_channel_max,
)
from orthoopt.diagnostics.plots.histogram import plot_weight_histogram
from orthoopt.diagnostics.plots.layer_bars import plot_layer_bars
from orthoopt.diagnostics.plots.solve_curve import plot_solve_history

__all__ = [
    "DPI",
    "plot_activation_heatmap",
    "plot_channel_magnitudes",
    "plot_layer_bars",
    "plot_solve_history",
    "plot_weight_channels",
    "plot_weight_histogram",
    "save_figure",
    "weight_channel_max",
]
