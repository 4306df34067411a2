"""Overlaid weight histograms (log count axis) of one block before and after rotation."""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np
import torch
from matplotlib.figure import Figure

from orthoopt.diagnostics.plots._figure import color, finish, new_figure, style
from orthoopt.diagnostics.stats import excess_kurtosis, incoherence
from orthoopt.errors import InvalidInputError

SIZE = (8.0, 5.0)
"""Figure size in inches: 800 x 500 px at 100 dpi."""


def plot_weight_histogram(
    weights: Mapping[str, torch.Tensor],
    block_name: str | None = None,
    bins: int = 241,
    title: str | None = None,
    save: str | os.PathLike | None = None,
) -> Figure:
    """Step histograms of the entries of one weight block, one per series, on a log count axis.

    weights:    ``{label: W}`` with each ``W`` 2-D (``[out, in]``, as stored or rotated: ``W @ R`` /
                ``R.T @ W``), e.g. ``{"identity": W, "hadamard": W @ H}``. All series share the
                same ``bins`` equal-width bins over ``[-max|w|, max|w|]`` (max over all series).
    block_name: shown in the title.
    save:       path stem; writes ``<save>.png`` and ``<save>.svg``.

    The legend gives each series' incoherence ``mu`` and excess kurtosis.
    """
    if not weights:
        raise InvalidInputError("plot_weight_histogram needs at least one weight")
    if bins < 2:
        raise InvalidInputError(f"bins must be >= 2, got {bins}")
    data = {}
    for label, W in weights.items():
        if not isinstance(W, torch.Tensor) or W.ndim != 2 or W.numel() == 0:
            raise InvalidInputError(f"weight {label!r} must be a non-empty 2-D tensor")
        data[label] = W.detach().to(torch.float64)
    top = max(W.abs().max().item() for W in data.values())
    top = top if top > 0 else 1.0
    edges = np.linspace(-top, top, bins + 1)
    with style():
        fig = new_figure(*SIZE)
        ax = fig.subplots()
        for i, (label, W) in enumerate(data.items()):
            counts, _ = np.histogram(W.numpy().ravel(), bins=edges)
            stats = f"$\\mu$={incoherence(W):.1f}, kurt={excess_kurtosis(W):.1f}"
            ax.stairs(counts, edges, label=f"{label} ({stats})", color=color(i), linewidth=1.6)
        ax.set_yscale("log")
        ax.set_ylim(bottom=0.7)
        ax.set_xlim(-top, top)
        ax.set_xlabel("weight value (unitless)")
        ax.set_ylabel("count of entries per bin (log)")
        ax.legend(loc="upper right")
        shape = "x".join(str(s) for s in next(iter(data.values())).shape)
        name = f" {block_name}" if block_name else ""
        ax.set_title(title or f"Weight histogram of{name} [{shape}]")
    return finish(fig, save)
