"""Outlier statistics and matplotlib plots of weights and activations, before and after rotation.

- :mod:`~orthoopt.diagnostics.stats`: per-weight statistics (max |w|, incoherence, kurtosis, fourth
  power, outlier fraction, RTN error) and their per-layer aggregation.
- :mod:`~orthoopt.diagnostics.activations`: per-channel magnitude, per-token kurtosis, massive tokens.
- :mod:`~orthoopt.diagnostics.report`: a model's tables (stored weights, captured linear inputs).
- :mod:`~orthoopt.diagnostics.compare`: several model folders side by side, what ``orthoopt
  diagnose`` runs (``diagnose_models``).
- :mod:`~orthoopt.diagnostics.plots`: figures (PNG + SVG). See ``docs/diagnostics.md``.
"""

from orthoopt.diagnostics.activations import (
    activation_stats,
    channel_max_abs,
    massive_tokens,
    token_kurtosis,
)
from orthoopt.diagnostics.plots import (
    plot_activation_heatmap,
    plot_channel_magnitudes,
    plot_layer_bars,
    plot_solve_history,
    plot_weight_channels,
    plot_weight_histogram,
    save_figure,
)
from orthoopt.diagnostics.stats import (
    aggregate_blocks,
    aggregate_layers,
    block_stats,
    excess_kurtosis,
    group_of,
    incoherence,
    layer_of,
    outlier_fraction,
    rtn_error,
    weight_stats,
)

__all__ = [
    "activation_stats",
    "aggregate_blocks",
    "aggregate_layers",
    "block_stats",
    "channel_max_abs",
    "excess_kurtosis",
    "group_of",
    "incoherence",
    "layer_of",
    "massive_tokens",
    "outlier_fraction",
    "plot_activation_heatmap",
    "plot_channel_magnitudes",
    "plot_layer_bars",
    "plot_solve_history",
    "plot_weight_channels",
    "plot_weight_histogram",
    "rtn_error",
    "save_figure",
    "token_kurtosis",
    "weight_stats",
]
