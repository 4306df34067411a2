"""Randomized Hadamard rotations (the QuaRot / SpinQuant initialization)."""

from __future__ import annotations

import math

import torch

from .construct import hadamard_matrix


def random_signs(n: int, seed: int = 0) -> torch.Tensor:
    """``n`` float64 signs ±1, drawn from ``torch.Generator().manual_seed(seed)`` (reproducible on any device)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n,), generator=gen).to(torch.float64) * 2 - 1


def random_hadamard(n: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The orthogonal ``[n, n]`` matrix ``R = D @ H / sqrt(n)``, ``H = hadamard_matrix(n)`` (QuaRot's form).

    ``D = diag(random_signs(n, seed))`` multiplies the *rows* of ``H``: ``R[i, :] = d_i H[i, :] / sqrt(n)``.
    Acting as ``x -> x @ R`` (docs/conventions.md), each input coordinate ``i`` is multiplied by ``d_i``
    and then the result is Hadamard-transformed. The signs go *before* the mixing on purpose: signs
    after it (``H @ D``) would only flip whole output channels, which no sign-symmetric quantizer
    (per-channel weights, per-token activations) can see, so every seed would quantize alike.
    Computed in float64, then cast to ``dtype``. Raises ``ValueError`` if ``n`` is not a supported
    Hadamard order (see :func:`is_hadamard_size`).
    """
    h = hadamard_matrix(n, dtype=torch.float64)
    return (h * (random_signs(h.shape[0], seed) / math.sqrt(h.shape[0]))[:, None]).to(dtype)
