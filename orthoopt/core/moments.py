"""Kurtosis: the one definition every layer uses.

**Convention (stated once here):** ``kurtosis`` is Pearson's, ``m4 / m2**2`` with the moments
``m_k = mean((x - c)**k)`` along a dimension, ``c`` the mean (``center=True``, the textbook
definition) or 0 (``center=False``, spread about zero, what a zero-anchored quantization grid sees).
Gaussian data gives 3, uniform data 1.8, a vector of equal magnitudes 1 (the minimum).
``excess kurtosis`` is ``kurtosis - 3`` (0 for Gaussian data, ``scipy.stats.kurtosis(bias=True)``).
The KurTail objective uses ``kurtosis(center=False)`` per token; diagnostics report the excess
kurtosis (``center=True``) of weight entries and of tokens.
"""

from __future__ import annotations

import torch


def moments(x: torch.Tensor, dim: int = -1, center: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(m2, m4)`` of ``x`` along ``dim`` (the dimension is reduced); see the module convention."""
    if center:
        x = x - x.mean(dim=dim, keepdim=True)
    x2 = x.square()
    return x2.mean(dim=dim), x2.square().mean(dim=dim)


def kurtosis(x: torch.Tensor, dim: int = -1, center: bool = True) -> torch.Tensor:
    """Pearson kurtosis ``m4 / m2**2`` of ``x`` along ``dim`` (module convention). Differentiable.
    A slice with zero spread gives 0 (its fourth moment is 0 as well); callers that must refuse
    such slices test ``moments(...)[0] > 0``."""
    m2, m4 = moments(x, dim, center)
    return m4 / m2.square().clamp_min(torch.finfo(x.dtype).tiny)
