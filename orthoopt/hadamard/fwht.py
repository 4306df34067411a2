"""Fast Hadamard transforms along the last dimension, without forming the dense matrix.

* :func:`fwht`: ``x @ S_n`` (Sylvester order, ``n`` a power of two) in ``O(n log n)`` by butterflies.
* :func:`hadamard_transform`: ``x @ hadamard_matrix(n)`` for any supported ``n = 2^j * m``, using
  ``hadamard_matrix(n) = kron(B_m, S_{2^j})``: view ``x`` as ``X`` of shape ``[..., m, 2^j]``, then
  ``x @ (B ⊗ S) = B.T @ (X @ S)``; cost ``O(n (j + m))``.

Both act on row vectors as ``x -> x @ H`` (docs/conventions.md), divide by ``sqrt(n)`` when
``normalize=True`` (then the map is orthogonal), and are differentiable.
"""

from __future__ import annotations

import math

import torch

from orthoopt.errors import InvalidInputError

from .construct import base_matrix, hadamard_plan


def _check_input(x: torch.Tensor, normalize: bool) -> int:
    if not isinstance(x, torch.Tensor) or x.dim() == 0:
        raise InvalidInputError("x must be a tensor with at least one dimension (transformed along the last)")
    if normalize and not (x.dtype.is_floating_point or x.dtype.is_complex):
        raise InvalidInputError(f"normalize=True needs a floating tensor, got {x.dtype}; pass normalize=False for integers")
    return x.shape[-1]


def _butterflies(x: torch.Tensor) -> torch.Tensor:
    """Unnormalized ``x @ S_n`` along the last dim (``n`` a power of two, already checked)."""
    n = x.shape[-1]
    lead = x.shape[:-1]
    y = x.reshape(-1, n)
    h = 1
    while h < n:
        # Index = (block, bit, low) with bit the digit of weight h; apply [[1, 1], [1, -1]] to that digit.
        y = y.reshape(y.shape[0], n // (2 * h), 2, h)
        a, b = y[:, :, 0, :], y[:, :, 1, :]
        y = torch.stack((a + b, a - b), dim=2)
        h *= 2
    return y.reshape(*lead, n)


def fwht(x: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """Fast Walsh–Hadamard transform of ``x`` (``[..., n]``, ``n`` a power of two) along the last dim.

    Returns ``x @ hadamard_matrix(n) / sqrt(n)`` (Sylvester order; without the ``/ sqrt(n)`` when
    ``normalize=False``), same shape as ``x``. Normalized, it is an involution: ``fwht(fwht(x)) == x``.
    ``log2(n)`` vectorized butterfly stages, ``O(n log n)`` per row. Raises ``ValueError`` if ``n`` is not
    a power of two.
    """
    n = _check_input(x, normalize)
    if n < 1 or n & (n - 1):
        raise InvalidInputError(f"fwht needs a power-of-two last dimension, got {n}; use hadamard_transform for 2^k * m")
    y = _butterflies(x)
    return y / math.sqrt(n) if normalize else y


def hadamard_transform(x: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """``x @ hadamard_matrix(n)`` (``/ sqrt(n)`` if ``normalize``) along the last dim, for any supported ``n``.

    ``x`` is ``[..., n]``; the result has the same shape. Uses the Kronecker structure (module
    docstring) with the small base matrix in ``x``'s dtype and device, so it never forms the ``[n, n]``
    matrix. For ``n`` a power of two it equals :func:`fwht`. Raises ``ValueError`` for an unsupported
    ``n`` (naming the nearest supported sizes).
    """
    n = _check_input(x, normalize)
    plan = hadamard_plan(n)
    m, s = plan.base_order, plan.power_of_two
    if m == 1:
        y = _butterflies(x)
    else:
        lead = x.shape[:-1]
        xs = x.reshape(*lead, m, s)
        if s > 1:
            xs = _butterflies(xs)
        base = base_matrix(plan, x.dtype).to(x.device)
        y = torch.matmul(base.T, xs).reshape(*lead, n)
    return y / math.sqrt(n) if normalize else y
