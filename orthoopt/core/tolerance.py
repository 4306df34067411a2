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

The logits ``z`` of a rotated model must match the original's ``z0`` (on the same token ids) to

    ||z - z0||_F <= rtol * ||z0||_F + atol * sqrt(numel),     (rtol, atol) = INVARIANCE[model dtype]

(:func:`invariance_ok`; :func:`invariance_tolerance` is ``rtol``): float64 models ``rtol = 1e-6``,
float32 ``1e-4`` (transformers' RMSNorm computes in float32 whatever the model dtype). float16 and
bfloat16 are derived from the unit roundoff ``u = 2^-p`` of a ``p``-bit significand (bfloat16:
``p = 8``, ``u = 2^-8 = 3.9e-3``; float16: ``p = 11``, ``u = 2^-11 = 4.9e-4``): the write-back rounds
every weight once more (relative error at most ``u``), and the rotated model rounds its activations in
another basis than the original, so the two bf16 forwards differ by independent roundings at every
rounded intermediate. Measured with ``rotate --method hadamard`` (2 x 32 random token ids): 5.7 u
(bfloat16) and 8.3 u (float16) on the planted Llama (8 layers), 5.8 u and 7.6 u on SmolLM2-135M (30
layers). ``rtol = 16 u`` (bfloat16 ``2^-4 = 0.0625``, float16 ``2^-7 = 7.8e-3``) leaves a factor 2 or
more above them, while a wrong write-back (a rotation on the wrong side, a missing one) moves the
logits by O(1). ``atol = u`` (one rounding of a unit logit, per element RMS; ``eps / 2`` for float32 /
float64) only matters for logits near zero.
"""

from __future__ import annotations

import math

import torch

from orthoopt.errors import InvalidInputError

FLOOR = {torch.float64: 1e-10, torch.float32: 1e-5}
"""n-independent part of :func:`orthogonality_tolerance`, by rotation dtype."""

def unit_roundoff(dtype: torch.dtype) -> float:
    """``u = eps / 2 = 2^-p`` of a floating dtype with a ``p``-bit significand (bfloat16 ``2^-8``)."""
    return torch.finfo(dtype).eps / 2


INVARIANCE_ULPS = 16
"""float16 / bfloat16 ``rtol`` in units of the unit roundoff (module doc: 2x the measured 5.7-8.3 u)."""

INVARIANCE = {torch.float64: (1e-6, unit_roundoff(torch.float64)), torch.float32: (1e-4, unit_roundoff(torch.float32)),
              **{dt: (INVARIANCE_ULPS * unit_roundoff(dt), unit_roundoff(dt)) for dt in (torch.float16, torch.bfloat16)}}
"""``(rtol, atol)`` of the logits after a write-back, by model parameter dtype (module doc)."""


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
    """``rtol``: the relative logits error allowed after a write-back into a model with parameters of
    ``dtype`` (:data:`INVARIANCE`; float32's for other dtypes)."""
    return INVARIANCE.get(dtype, INVARIANCE[torch.float32])[0]


def invariance_ok(logits: torch.Tensor, reference: torch.Tensor, dtype: torch.dtype,
                  rtol: float | None = None) -> bool:
    """``||logits - reference||_F <= rtol * ||reference||_F + atol * sqrt(numel)`` in float64, with
    ``(rtol, atol)`` of :data:`INVARIANCE` for model dtype ``dtype`` (``rtol`` given: that one)."""
    default_rtol, atol = INVARIANCE.get(dtype, INVARIANCE[torch.float32])
    rtol = default_rtol if rtol is None else rtol
    a, b = logits.detach().double(), reference.detach().double()
    return float((a - b).norm()) <= rtol * float(b.norm()) + atol * math.sqrt(b.numel())
