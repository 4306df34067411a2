"""Retractions on O(n): maps from a tangent step back onto the orthogonal group.

A step at ``R`` ([n, n], ``x -> x @ R``, see ``docs/conventions.md``) is given by a skew-symmetric
*generator* ``W`` ([n, n], ``W.T = -W``); the Cayley retractions multiply ``R`` from the **left**:
``R_new = C @ R`` with ``C`` orthogonal, so ``x @ R_new = (x @ C) @ R``: the increment acts first, on
the unrotated coordinates. The tangent vector of the step is ``W @ R``.

Projections back onto O(n) (:func:`reorthogonalize`): the polar factor (nearest orthogonal matrix) or
the Q factor; ``reorthogonalize(R + xi, "qr")`` is the QR retraction of geoopt's ``EuclideanStiefel``
and ``reorthogonalize(R + xi)`` the polar retraction, for an ambient tangent vector ``xi``.

All retractions keep the dtype and device of ``R``.
"""

from __future__ import annotations

import torch

from orthoopt.errors import InvalidInputError

from .orthogonal import check_square, positive_qr_factor


def _check_generator(R: torch.Tensor, W: torch.Tensor) -> None:
    check_square(R)
    if W.shape != R.shape:
        raise InvalidInputError(f"generator W must have the shape of R {tuple(R.shape)}, got {tuple(W.shape)}")
    asym = float(torch.linalg.matrix_norm(W + W.T))
    scale = max(1.0, float(torch.linalg.matrix_norm(W)))
    if asym > torch.finfo(W.dtype).eps ** 0.5 * scale:
        raise InvalidInputError(f"generator W must be skew-symmetric (W.T = -W); ||W + W.T||_F = {asym:.3g}")


def cayley_retraction(R: torch.Tensor, W: torch.Tensor, step: float) -> torch.Tensor:
    """Exact Cayley retraction ``(I - step/2 W)^{-1} (I + step/2 W) @ R`` (left multiplication).

    ``W`` is a skew-symmetric ``[n, n]`` generator; the Cayley factor is orthogonal for every real
    ``step`` (``I - step/2 W`` is always invertible for skew ``W``), so the result is orthogonal to
    rounding. Solved with ``torch.linalg.solve``, no explicit inverse. The curve
    ``Y(step)`` satisfies ``Y(0) = R`` and ``Y'(0) = W @ R``.
    """
    _check_generator(R, W)
    n = R.shape[0]
    eye = torch.eye(n, dtype=R.dtype, device=R.device)
    half = 0.5 * step * W
    # LAPACK's solution is column-major: returned row-major, so that the products that follow (and
    # so their rounding) do not depend on whether the iterate came from a solve or from a file
    return torch.linalg.solve(eye - half, (eye + half) @ R).contiguous()


def cayley_retraction_iterative(R: torch.Tensor, W: torch.Tensor, step: float, n_iters: int = 2) -> torch.Tensor:
    """Fixed-point estimate of :func:`cayley_retraction` (Li, Fuxin & Todorovic, ICLR 2020, eq. 8).

    ``Y_0 = R + step * W @ R``, then ``n_iters`` times ``Y_i = R + step/2 * W @ (R + Y_{i-1})``.
    The exact Cayley point ``Y*`` is the fixed point of this map, which is a contraction with factor
    ``|step| * ||W|| / 2``; the iteration converges when that is below 1 (Cayley SGD clips ``step``
    to keep it at most ``q = 1/2``). ``Y_s`` equals the power series of the Cayley factor up to the
    ``(step W)^{s+1}`` term, so it is orthogonal only up to ``O(|step| ||W||)^{s+2}``: callers
    re-project (:func:`reorthogonalize`) when that matters. Matrix products only, no solve.
    """
    _check_generator(R, W)
    if not isinstance(n_iters, int) or n_iters < 1:
        raise InvalidInputError(f"n_iters must be a positive int, got {n_iters!r}")
    WR = W @ R
    Y = R + step * WR
    for _ in range(n_iters):
        Y = R + (0.5 * step) * (WR + W @ Y)
    return Y


def polar_factor(A: torch.Tensor) -> torch.Tensor:
    """Orthogonal polar factor ``U @ Vh`` of ``A = U S Vh``: the nearest orthogonal matrix in Frobenius norm."""
    U, _, Vh = torch.linalg.svd(A)
    return (U @ Vh).contiguous()


def reorthogonalize(R: torch.Tensor, method: str = "polar") -> torch.Tensor:
    """Project a nearly orthogonal ``[n, n]`` matrix back onto O(n); computed in float64.

    ``method="polar"``: the nearest orthogonal matrix (``U @ Vh`` from the SVD), which moves ``R``
    the least. ``method="qr"``: the Q factor with positive-diagonal triangular factor (cheaper,
    not the nearest). The result is cast back to ``R``'s dtype; float64 arithmetic keeps it at the
    rounding floor of that dtype.
    """
    check_square(R)
    R64 = R.detach().to(torch.float64)
    if method == "polar":
        out = polar_factor(R64)
    elif method == "qr":
        out = positive_qr_factor(R64)
    else:
        raise InvalidInputError(f"method must be 'polar' or 'qr', got {method!r}")
    return out.to(R.dtype)
