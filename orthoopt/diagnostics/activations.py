"""Outlier statistics of captured activations ``X`` of shape ``[tokens, channels]``.

``X`` is the input of one linear layer over a calibration text (rows are tokens in capture order; a
rotated model's inputs are already rotated, ``x @ R``, see ``docs/conventions.md``). Everything is
computed in float64 and returned as plain JSON-able dicts and lists.

Definitions:

- per-channel magnitude: ``max_t |X[t, c]|`` for each channel ``c``; the "outlier channel" picture.
  ``channel_max_ratio`` is the largest per-channel magnitude over their median (about 1-2 when no
  channel stands out).
- per-token kurtosis: the excess kurtosis ``m4 / m2**2 - 3`` of each token's row (across channels,
  central population moments, :mod:`orthoopt.core.moments`), summarised by mean / median / max over tokens. Constant rows (zero variance)
  are skipped and counted in ``constant_tokens``.
- massive activations (:func:`massive_tokens`; after Sun et al., 2024, "Massive Activations in Large Language Models"): a
  token is *massive* when its largest magnitude ``max_c |X[t, c]|`` exceeds
  ``threshold = max(ratio * median(|X|), min_abs)``, with the median over all entries of ``X``.
  Defaults ``ratio = 100`` and ``min_abs = 0``: Gaussian rows of a few thousand channels stay below
  ``10 * median``, so 100x singles out the rare tokens (often the first one) that carry a huge
  value in a few fixed channels. Sun et al. additionally ask for ``|x| > 100`` in real LLMs; pass
  ``min_abs=100`` for that. (DFRot's objective selects its up-weighted tokens by another rule, the
  peak's share of the token norm: ``orthoopt.objectives.peak_share_tokens``.)
"""

from __future__ import annotations

import numpy as np
import torch

from orthoopt.core.moments import moments
from orthoopt.diagnostics.stats import as_matrix
from orthoopt.errors import InvalidInputError

DEFAULT_MASSIVE_RATIO = 100.0
"""A token is massive when its max ``|x|`` exceeds this many times the median ``|x|`` of all entries."""

DEFAULT_TOP = 10
"""How many top channels / massive tokens :func:`activation_stats` lists."""


def _as_activations(X: torch.Tensor) -> torch.Tensor:
    X = as_matrix(X, "activations", "[tokens, channels]")
    if not torch.isfinite(X).all():
        raise InvalidInputError("activations contain NaN or infinite values")
    return X


def channel_max_abs(X: torch.Tensor) -> torch.Tensor:
    """``[channels]`` float64 tensor of ``max_t |X[t, c]|`` for ``X`` of shape ``[tokens, channels]``."""
    return _as_activations(X).abs().amax(dim=0)


def token_kurtosis(X: torch.Tensor) -> torch.Tensor:
    """``[tokens]`` float64 tensor of each row's excess kurtosis across channels; NaN for constant rows."""
    return _token_kurtosis(_as_activations(X))


def _token_kurtosis(X: torch.Tensor) -> torch.Tensor:
    m2, m4 = moments(X, dim=1, center=True)
    nan = torch.full_like(m2, float("nan"))
    return torch.where(m2 > 0, m4 / torch.where(m2 > 0, m2, 1.0).square() - 3.0, nan)


def massive_tokens(
    X: torch.Tensor,
    ratio: float = DEFAULT_MASSIVE_RATIO,
    min_abs: float = 0.0,
    top: int = DEFAULT_TOP,
) -> dict:
    """Tokens whose ``max_c |X[t, c]|`` exceeds ``max(ratio * median(|X|), min_abs)`` (module docstring).

    Returns ``{"ratio", "min_abs", "median_abs", "threshold", "count", "tokens"}`` where ``tokens``
    lists up to ``top`` massive tokens, largest first, as ``{"token": t, "channel": c, "max_abs": v}``
    (``t`` is the row index of ``X``, ``c`` the channel of the largest magnitude).
    """
    return _massive_tokens(_as_activations(X).abs(), ratio, min_abs, top)


def _massive_tokens(A: torch.Tensor, ratio: float, min_abs: float, top: int) -> dict:
    if not ratio > 0:
        raise InvalidInputError(f"massive-activation ratio must be positive, got {ratio}")
    if min_abs < 0:
        raise InvalidInputError(f"massive-activation min_abs must be >= 0, got {min_abs}")
    if top < 0:
        raise InvalidInputError(f"top must be >= 0, got {top}")
    median = float(np.median(A.numpy()))
    threshold = max(ratio * median, float(min_abs))
    row_max, row_arg = A.max(dim=1)
    idx = torch.nonzero(row_max > threshold).reshape(-1)
    order = idx[torch.argsort(row_max[idx], descending=True, stable=True)][:top]
    return {
        "ratio": float(ratio),
        "min_abs": float(min_abs),
        "median_abs": median,
        "threshold": threshold,
        "count": int(idx.numel()),
        "tokens": [
            {"token": int(t), "channel": int(row_arg[t]), "max_abs": float(row_max[t])} for t in order
        ],
    }


def activation_stats(
    X: torch.Tensor,
    massive_ratio: float = DEFAULT_MASSIVE_RATIO,
    massive_min_abs: float = 0.0,
    top: int = DEFAULT_TOP,
    per_channel: bool = True,
) -> dict:
    """All activation statistics of ``X`` (``[tokens, channels]``) as a JSON-able dict.

    Keys: ``tokens``, ``channels``, ``max_abs``, ``channel_max_ratio`` (None if the median channel
    magnitude is 0), ``top_channels`` (up to ``top`` of ``{"channel", "max_abs"}``, largest first),
    ``token_kurtosis`` (``{"mean", "median", "max"}``, None when every row is constant),
    ``constant_tokens``, ``massive`` (see :func:`massive_tokens`), and with ``per_channel`` the full
    list ``channel_max_abs``.
    """
    X = _as_activations(X)
    A = X.abs()
    cmax = A.amax(dim=0)
    median_cmax = float(np.median(cmax.numpy()))
    top_vals, top_idx = torch.topk(cmax, min(top, cmax.numel()))
    kurt = _token_kurtosis(X)
    finite = kurt[~torch.isnan(kurt)]
    summary = None
    if finite.numel():
        summary = {
            "mean": float(finite.mean()),
            "median": float(np.median(finite.numpy())),
            "max": float(finite.max()),
        }
    out = {
        "tokens": X.shape[0],
        "channels": X.shape[1],
        "max_abs": float(cmax.max()),
        "channel_max_ratio": float(cmax.max()) / median_cmax if median_cmax > 0 else None,
        "top_channels": [{"channel": int(i), "max_abs": float(v)} for v, i in zip(top_vals, top_idx)],
        "token_kurtosis": summary,
        "constant_tokens": int(X.shape[0] - finite.numel()),
        "massive": _massive_tokens(A, massive_ratio, massive_min_abs, top),
    }
    if per_channel:
        out["channel_max_abs"] = cmax.tolist()
    return out
