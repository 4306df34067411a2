"""The one orthogonality tolerance policy, and the write-back invariance tolerance.

Orthogonality of an ``[n, n]`` rotation ``R`` is measured as ``||R.T @ R - I||_F`` in float64
(:func:`orthogonality_error`). One level decides everywhere (solvers re-project above it, write-back
and ``solve``'s init refuse a rotation above it, plots draw it)::

    orthogonality_tolerance(n, dtype) = max(FLOOR[dtype], 8 * eps(dtype) * sqrt(n))

``FLOOR`` is ``1e-10`` for float64 and ``1e-5`` for float32 (the levels of ``docs/conventions.md``);
the second term is about 25 times the rounding floor of an exactly orthogonal matrix stored in that
dtype (``~0.3 eps sqrt(n)``: 1e-6 for float32 at n = 1024), so rounding alone never exceeds it. A
rotation that does not meet it was not made orthogonal in its dtype; ``reorthogonalize`` (polar
factor in float64) fixes it. Callers may pass an explicit ``tol``.

The logits of a rotated model must match the original's to :func:`invariance_tolerance` (relative
Frobenius error): 1e-6 for float64 models, 1e-4 for float32 ones (transformers' RMSNorm computes in
float32 whatever the model dtype), 1e-2 for float16/bfloat16.
"""

from __future__ import annotations

import math

import torch

from orthoopt.errors import InvalidInputError

FLOOR = {torch.float64: 1e-10, torch.float32: 1e-5}
"""n-independent part of :func:`orthogonality_tolerance`, by rotation dtype."""

INVARIANCE = {torch.float64: 1e-6, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}
"""Relative logits error a rotated model may show, by model parameter dtype."""


def orthogonality_tolerance(n: int, dtype: torch.dtype) -> float:
    """Largest accepted ``||R.T @ R - I||_F`` of an ``[n, n]`` rotation stored in ``dtype`` (float32/64):
    ``max(FLOOR[dtype], 8 * eps(dtype) * sqrt(n))``. ValueError for other dtypes."""
    if dtype not in FLOOR:
        raise InvalidInputError(f"rotations must be float32 or float64, got {dtype}")
    return max(FLOOR[dtype], 8.0 * torch.finfo(dtype).eps * math.sqrt(n))


def orthogonality_error(R: torch.Tensor) -> float:
    """``||R.T @ R - I||_F`` of a square ``R``, computed in float64 whatever its dtype."""
    n = R.shape[-1]
    R64 = R.detach().to(torch.float64)
    eye = torch.eye(n, dtype=torch.float64, device=R.device)
    return float(torch.linalg.matrix_norm(R64.T @ R64 - eye))


def check_orthogonal(R: torch.Tensor, name: str = "R", tol: float | None = None) -> float:
    """Return ``orthogonality_error(R)``; raise ValueError naming rotation ``name``, its error and the
    tolerance when it is not square floating point, not finite, or above ``tol`` (default
    :func:`orthogonality_tolerance` of its size and dtype)."""
    if not isinstance(R, torch.Tensor) or R.ndim != 2 or R.shape[0] != R.shape[1] or not R.is_floating_point():
        what = tuple(R.shape) if isinstance(R, torch.Tensor) else type(R).__name__
        raise InvalidInputError(f"rotation {name!r} must be a square floating-point [n, n] tensor, got {what}")
    if not bool(torch.isfinite(R).all()):
        raise InvalidInputError(f"rotation {name!r} has NaN or inf entries")
    err = orthogonality_error(R)
    limit = orthogonality_tolerance(R.shape[0], R.dtype) if tol is None else tol
    if not err <= limit:
        raise InvalidInputError(
            f"rotation {name!r} is not orthogonal: ||R.T R - I||_F = {err:.3e} > tolerance {limit:.3e} "
            f"([{R.shape[0]}, {R.shape[0]}] {str(R.dtype).removeprefix('torch.')}); "
            "orthoopt.manifold.reorthogonalize(R) gives the nearest orthogonal matrix"
        )
    return err


def invariance_tolerance(dtype: torch.dtype) -> float:
    """Relative logits error allowed after a write-back into a model with parameters of ``dtype``."""
    return INVARIANCE.get(dtype, 1e-4)
