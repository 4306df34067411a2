"""Per-channel activation magnitude ("outlier channel" picture), its weight counterpart (per input
channel max |W| of a block) and a token x channel heat map."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import matplotlib
import numpy as np
import torch
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from orthoopt.diagnostics.plots._figure import color, finish, new_figure, style
from orthoopt.errors import InvalidInputError

SIZE = (10.0, 6.0)
"""Figure size of both plots in inches: 1000 x 600 px at 100 dpi."""

HEATMAP_LEVELS = 16
"""Colours of the heat map's (logarithmic) scale; few levels read well and keep the PNG small."""


def _vector(label: str, v) -> np.ndarray:
    a = np.asarray(v.detach().to(torch.float64) if isinstance(v, torch.Tensor) else v, dtype=np.float64)
    if a.ndim != 1 or a.size == 0:
        raise InvalidInputError(f"channel magnitudes of {label!r} must be a non-empty 1-D sequence, got shape {a.shape}")
    return a


def plot_channel_magnitudes(
    series: Mapping[str, torch.Tensor | Sequence[float]],
    module_name: str | None = None,
    log_y: bool = False,
    title: str | None = None,
    save: str | os.PathLike | None = None,
    ylabel: str = "max |x|",
) -> Figure:
    """Per-channel ``max_t |x|`` of one linear layer's input, one panel per series, shared axes.

    series:      ``{label: [channels] magnitudes}`` (e.g. ``channel_max_abs(X)`` or the
                 ``channel_max_abs`` list of :func:`orthoopt.diagnostics.activation_stats`), e.g.
                 ``{"identity": ..., "hadamard": ...}``. Series may differ in length.
    module_name: the linear layer whose input was captured (shown in the title).
    log_y:       logarithmic magnitude axis (default linear, where outlier channels stand out).
    save:        path stem; writes ``<save>.png`` and ``<save>.svg``.
    ylabel:      label of the magnitude axes (e.g. ``"max |W|"`` for :func:`plot_weight_channels`).
    """
    if not series:
        raise InvalidInputError("plot_channel_magnitudes needs at least one series")
    data = {label: _vector(label, v) for label, v in series.items()}
    with style():
        fig = new_figure(*SIZE)
        axes = fig.subplots(len(data), 1, sharex=True, sharey=True, squeeze=False)[:, 0]
        for i, (ax, (label, v)) in enumerate(zip(axes, data.items())):
            ratio = v.max() / np.median(v) if np.median(v) > 0 else float("inf")
            ax.stairs(v, np.arange(v.size + 1), fill=True, color=color(i), label=label)
            ax.set_title(f"{label}: max {v.max():.3g}, max / median channel {ratio:.1f}", loc="left", fontsize=11)
            ax.set_ylabel(ylabel)
            ax.grid(axis="x", visible=False)
            if log_y:
                ax.set_yscale("log")
        axes[-1].set_xlim(0, max(v.size for v in data.values()))
        axes[-1].set_xlabel("input channel index")
        name = f" of {module_name}" if module_name else ""
        fig.suptitle(title or f"Per-channel input magnitude{name} (max over tokens, activation units)")
    return finish(fig, save)


def weight_channel_max(W: torch.Tensor) -> torch.Tensor:
    """``max_r |W[r, c]|`` per input channel ``c`` of a weight ``W`` of shape ``[out, in]``: ``[in]``."""
    if not isinstance(W, torch.Tensor) or W.ndim != 2 or W.numel() == 0:
        raise InvalidInputError(f"a weight must be a non-empty 2-D [out, in] tensor, got {getattr(W, 'shape', type(W))}")
    return W.detach().abs().amax(dim=0)


def plot_weight_channels(
    weights: Mapping[str, torch.Tensor],
    block_name: str | None = None,
    log_y: bool = False,
    title: str | None = None,
    save: str | os.PathLike | None = None,
) -> Figure:
    """The weight-outlier picture: per input channel ``c`` of one block, ``max_r |W[r, c]|``, one panel
    per series (the same layout as :func:`plot_channel_magnitudes`). A column far above the others
    is an input channel that sets the quantization scale of every row it meets (OptRot's motivation).

    weights: ``{label: W}``, ``W`` of shape ``[out, in]`` (the same block as stored or rotated).
    """
    if not weights:
        raise InvalidInputError("plot_weight_channels needs at least one series")
    series = {label: weight_channel_max(W) for label, W in weights.items()}
    name = f" of {block_name}" if block_name else ""
    return plot_channel_magnitudes(
        series, log_y=log_y, save=save, ylabel="max |W|",
        title=title or f"Per-input-channel weight magnitude{name} (max over output rows)")


def plot_activation_heatmap(
    series: Mapping[str, torch.Tensor],
    module_name: str | None = None,
    max_tokens: int = 256,
    title: str | None = None,
    save: str | os.PathLike | None = None,
) -> Figure:
    """Heat maps of ``|X|`` (tokens x channels) of one linear layer's input, one panel per series.

    series:     ``{label: X}`` with ``X`` of shape ``[tokens, channels]``; only the first
                ``max_tokens`` tokens are drawn. All panels share one logarithmic colour scale of
                :data:`HEATMAP_LEVELS` colours from ``max|x| / 10**4`` to ``max|x|``.
    save:       path stem; writes ``<save>.png`` and ``<save>.svg``.
    """
    if not series:
        raise InvalidInputError("plot_activation_heatmap needs at least one series")
    if max_tokens < 1:
        raise InvalidInputError(f"max_tokens must be >= 1, got {max_tokens}")
    data = {}
    for label, X in series.items():
        if not isinstance(X, torch.Tensor) or X.ndim != 2 or X.numel() == 0:
            raise InvalidInputError(f"activations {label!r} must be a non-empty 2-D [tokens, channels] tensor")
        data[label] = X[:max_tokens].detach().to(torch.float64).abs().numpy()
    hi = max(a.max() for a in data.values())
    positive = [a[a > 0].min() for a in data.values() if (a > 0).any()]
    if hi <= 0 or not positive:
        raise InvalidInputError("activations are all zero; nothing to draw")
    lo = max(min(positive), hi * 1e-4)
    norm = LogNorm(vmin=lo, vmax=hi, clip=True)
    cmap = matplotlib.colormaps["viridis"].resampled(HEATMAP_LEVELS)
    with style():
        fig = new_figure(*SIZE)
        axes = fig.subplots(len(data), 1, sharex=True, squeeze=False)[:, 0]
        for ax, (label, a) in zip(axes, data.items()):
            im = ax.imshow(a, aspect="auto", interpolation="nearest", norm=norm, cmap=cmap,
                           extent=(0, a.shape[1], a.shape[0], 0))
            ax.set_title(label, fontsize=11)
            ax.set_ylabel("token")
            ax.grid(False)
        axes[-1].set_xlabel("input channel index")
        fig.colorbar(im, ax=list(axes), label="|x| (activation units, log)")
        name = f" of {module_name}" if module_name else ""
        fig.suptitle(title or f"Input magnitude{name}, first {max_tokens} tokens")
    return finish(fig, save)
