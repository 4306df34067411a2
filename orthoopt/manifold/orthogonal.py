"""Points and tangent vectors of the orthogonal group O(n).

A rotation ``R`` is an ``[n, n]`` matrix with ``R.T @ R = I`` acting as ``x -> x @ R``
(``docs/conventions.md``). O(n) is the square Stiefel manifold, so geoopt's Stiefel classes apply;
the few formulas here are the square special cases written out exactly.

Tangent vectors at ``R`` are the ``[n, n]`` matrices ``R @ Omega`` (equivalently ``Omega' @ R``) with
``Omega`` skew-symmetric. Gradients are Euclidean gradients ``G = dL/dR`` of the same shape as ``R``.
"""

from __future__ import annotations

import torch

from orthoopt.core.tolerance import orthogonality_error as _orthogonality_error
from orthoopt.errors import InvalidInputError

def check_square(R: torch.Tensor, name: str = "R") -> int:
    """Return ``n`` for a 2-D ``[n, n]`` floating tensor; raise ValueError otherwise."""
    if not isinstance(R, torch.Tensor):
        raise InvalidInputError(f"{name} must be a torch.Tensor, got {type(R).__name__}")
    if R.ndim != 2 or R.shape[0] != R.shape[1]:
        raise InvalidInputError(f"{name} must be a square [n, n] matrix, got shape {tuple(R.shape)}")
    if not R.is_floating_point():
        raise InvalidInputError(f"{name} must be a floating-point tensor, got {R.dtype}")
    return R.shape[0]


def random_orthogonal(
    n: int, seed: int = 0, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None
) -> torch.Tensor:
    """A Haar-distributed random ``[n, n]`` orthogonal matrix.

    QR of an ``[n, n]`` standard Gaussian matrix drawn in float64 from ``torch.Generator`` seeded with
    ``seed``, with the signs of ``Q``'s columns fixed so that ``diag(R_qr) > 0`` (without the fix the
    distribution is not Haar). The same seed gives the same matrix in every dtype, up to rounding.
    The determinant is +1 or -1 with equal probability.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise InvalidInputError(f"n must be a positive int, got {n!r}")
    gen = torch.Generator().manual_seed(int(seed))
    A = torch.randn(n, n, generator=gen, dtype=torch.float64)
    return positive_qr_factor(A).to(dtype=dtype, device=device)


def positive_qr_factor(A: torch.Tensor) -> torch.Tensor:
    """The Q factor of ``A = Q @ T`` with ``diag(T) > 0`` (unique for invertible ``A``), row-major.

    LAPACK returns ``Q`` column-major; it is returned row-major, as every iterate of the solvers (the
    layout decides the BLAS path of later products, and a resumed run reads row-major tensors).
    """
    Q, T = torch.linalg.qr(A)
    signs = torch.sign(torch.diagonal(T))
    signs[signs == 0] = 1.0
    return (Q * signs).contiguous()


def orthogonality_error(R: torch.Tensor) -> float:
    """``||R.T @ R - I||_F``, computed in float64 whatever the dtype of ``R`` ([n, n]); the tolerance it
    is held to is :func:`orthoopt.core.tolerance.orthogonality_tolerance`."""
    check_square(R)
    return _orthogonality_error(R)


def skew(A: torch.Tensor) -> torch.Tensor:
    """Skew-symmetric part ``(A - A.T) / 2`` of a square matrix."""
    return 0.5 * (A - A.T)


def project_tangent(R: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """Orthogonal projection of an ``[n, n]`` matrix ``G`` onto the tangent space at ``R``.

    Returns ``R @ skew(R.T @ G)`` (the tangent space is ``{R @ Omega : Omega skew}``). For a square ``R``
    this equals ``geoopt.EuclideanStiefel().proju(R, G) = G - R @ (R.T G + G.T R) / 2``. It is idempotent,
    and the same vector in the left generator form is ``skew(G @ R.T) @ R``.
    """
    check_square(R)
    if G.shape != R.shape:
        raise InvalidInputError(f"G must have the shape of R {tuple(R.shape)}, got {tuple(G.shape)}")
    return R @ skew(R.T @ G)
