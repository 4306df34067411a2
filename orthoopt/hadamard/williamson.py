"""Williamson's construction, for the base orders Paley cannot reach (156 = 4·39, 172 = 4·43).

Four symmetric circulant ±1 matrices ``A, B, C, D`` of order ``w`` with
``A² + B² + C² + D² = 4 w I`` (Williamson matrices) give the Hadamard matrix of order ``4 w``::

    [[ A,  B,  C,  D],
     [-B,  A, -D,  C],
     [-C,  D,  A, -B],
     [-D, -C,  B,  A]]

(circulants commute and are symmetric here, so the off-diagonal block products cancel).

The first rows below are published search results, tabulated as ``+``/``-`` strings:

* ``w = 39``: Holzmann, Kharaghani & Tayfeh-Rezaie, "Williamson matrices up to order 59",
  Des. Codes Cryptogr. 46 (2008) 343-352 (as tabulated in SageMath's ``williamson_type_quadruples_smallcases``).
* ``w = 43``: M. Hall, *Combinatorial Theory*, 2nd ed. (1983) (same SageMath table).

They are data, not derivations, so :func:`williamson_quadruple` checks symmetry and the sum-of-squares
identity every time it builds one and raises ``RuntimeError`` if the table is wrong.
"""

from __future__ import annotations

import torch

from orthoopt.errors import InvalidInputError

WILLIAMSON_FIRST_ROWS: dict[int, tuple[str, str, str, str]] = {
    39: (
        "+++--+-+-----+--++----++--+-----+-+--++",
        "+++--++-+---+-+--+----+--+-+---+-++--++",
        "++++---+--++----+-+--+-+----++--+---+++",
        "+---++-+-+-----+++-++-+++-----+-+-++---",
    ),
    43: (
        "++---++++-+--+--++--------++--+--+-++++---+",
        "+++-+-++--+-+-++++-+----+-++++-+-+--++-+-++",
        "++-++++++----+-+--++-++-++--+-+----++++++-+",
        "+---++--++++-+-+++-++--++-+++-+-++++--++---",
    ),
}

WILLIAMSON_ORDERS: frozenset[int] = frozenset(4 * w for w in WILLIAMSON_FIRST_ROWS)
"""Hadamard orders ``4 w`` available from :data:`WILLIAMSON_FIRST_ROWS`."""


def circulant(first_row: torch.Tensor) -> torch.Tensor:
    """The ``[w, w]`` circulant with the given first row: ``M[i, j] = first_row[(j - i) mod w]``."""
    w = first_row.shape[0]
    idx = (torch.arange(w)[None, :] - torch.arange(w)[:, None]) % w
    return first_row[idx]


def williamson_quadruple(w: int) -> tuple[torch.Tensor, ...]:
    """The verified Williamson matrices ``(A, B, C, D)`` of order ``w`` (int64, ``[w, w]`` each)."""
    if w not in WILLIAMSON_FIRST_ROWS:
        raise InvalidInputError(f"no Williamson matrices of order w={w} in the table (have {sorted(WILLIAMSON_FIRST_ROWS)})")
    mats = tuple(
        circulant(torch.tensor([1 if c == "+" else -1 for c in row], dtype=torch.int64))
        for row in WILLIAMSON_FIRST_ROWS[w]
    )
    if any(m.shape != (w, w) or not torch.equal(m, m.T) for m in mats):
        raise RuntimeError(f"Williamson table entry w={w} is not four symmetric circulants of order {w}")
    if not torch.equal(sum(m @ m for m in mats), 4 * w * torch.eye(w, dtype=torch.int64)):
        raise RuntimeError(f"Williamson table entry w={w} violates A²+B²+C²+D² = 4wI")
    return mats


def williamson_hadamard(order: int) -> torch.Tensor:
    """Williamson Hadamard matrix of order ``4 w`` (int8, entries ±1) for ``4 w`` in :data:`WILLIAMSON_ORDERS`."""
    if order % 4 or order // 4 not in WILLIAMSON_FIRST_ROWS:
        raise InvalidInputError(f"no Williamson construction of order {order} (have {sorted(WILLIAMSON_ORDERS)})")
    a, b, c, d = williamson_quadruple(order // 4)
    h = torch.cat(
        [
            torch.cat([a, b, c, d], dim=1),
            torch.cat([-b, a, -d, c], dim=1),
            torch.cat([-c, d, a, -b], dim=1),
            torch.cat([-d, -c, b, a], dim=1),
        ],
        dim=0,
    )
    return h.to(torch.int8)
