"""Paley's constructions of Hadamard matrices over GF(q).

* Paley I, ``q ≡ 3 (mod 4)``: order ``q + 1``. With the Jacobsthal matrix ``Q`` (skew-symmetric here)
  and ``S = [[0, 1^T], [-1, Q]]``, ``H = I + S``.
* Paley II, ``q ≡ 1 (mod 4)``: order ``2 (q + 1)``. With ``Q`` symmetric here, the conference matrix
  ``C = [[0, 1^T], [1, Q]]`` gives ``H = C ⊗ [[1, 1], [1, -1]] + I ⊗ [[1, -1], [-1, -1]]``.

The Jacobsthal matrix of GF(q) is ``Q[a, b] = chi(a - b)`` over the elements in their integer
encoding (``orthoopt.hadamard.galois``); it satisfies ``Q Q^T = q I - J`` and ``Q J = J Q = 0``.
"""

from __future__ import annotations

import numpy as np
import torch

from orthoopt.errors import InvalidInputError

from .galois import finite_field, prime_power

_ROWS_PER_CHUNK_ELEMENTS = 1 << 22  # bound the temporary index array to ~32 MB of int64


def jacobsthal_matrix(q: int) -> np.ndarray:
    """The ``[q, q]`` int8 Jacobsthal matrix ``Q[a, b] = chi(a - b)`` of GF(q), ``q`` a prime power."""
    field = finite_field(q)
    out = np.empty((q, q), dtype=np.int8)
    cols = np.arange(q)
    step = max(1, _ROWS_PER_CHUNK_ELEMENTS // q)
    for start in range(0, q, step):
        rows = np.arange(start, min(q, start + step))
        out[rows] = field.chi[field.sub(rows[:, None], cols[None, :])]
    return out


def paley_i_order(q: int) -> int | None:
    """``q + 1`` when Paley I applies to ``q`` (a prime power ``≡ 3 mod 4``), else ``None``."""
    return q + 1 if q % 4 == 3 and prime_power(q) is not None else None


def paley_ii_order(q: int) -> int | None:
    """``2 (q + 1)`` when Paley II applies to ``q`` (a prime power ``≡ 1 mod 4``), else ``None``."""
    return 2 * (q + 1) if q % 4 == 1 and prime_power(q) is not None else None


def paley_i(q: int) -> torch.Tensor:
    """Paley I Hadamard matrix of order ``q + 1`` (int8, entries ±1) for a prime power ``q ≡ 3 mod 4``."""
    if paley_i_order(q) is None:
        raise InvalidInputError(f"Paley I needs a prime power q ≡ 3 (mod 4), got q={q}")
    n = q + 1
    s = np.zeros((n, n), dtype=np.int8)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = jacobsthal_matrix(q)
    s += np.eye(n, dtype=np.int8)
    return torch.from_numpy(s)


def paley_ii(q: int) -> torch.Tensor:
    """Paley II Hadamard matrix of order ``2 (q + 1)`` (int8, entries ±1) for a prime power ``q ≡ 1 mod 4``."""
    if paley_ii_order(q) is None:
        raise InvalidInputError(f"Paley II needs a prime power q ≡ 1 (mod 4), got q={q}")
    n = q + 1
    c = np.zeros((n, n), dtype=np.int8)
    c[0, 1:] = 1
    c[1:, 0] = 1
    c[1:, 1:] = jacobsthal_matrix(q)
    on_nonzero = np.array([[1, 1], [1, -1]], dtype=np.int8)
    on_zero = np.array([[1, -1], [-1, -1]], dtype=np.int8)
    h = np.kron(c, on_nonzero) + np.kron(np.eye(n, dtype=np.int8), on_zero)
    return torch.from_numpy(h)
