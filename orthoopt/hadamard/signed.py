"""A random Hadamard rotation applied without its dense matrix (the fast write-back of QuaRot's R1).

:func:`~orthoopt.hadamard.random_hadamard` gives ``R = D H / sqrt(n)`` as a dense ``[n, n]`` tensor: that
is what solvers, rotation files and checks handle. Fusing it into a model costs a dense product per
weight, ``2 n`` flops per element (at hidden 3072, most of ``rotate --method hadamard``'s time).
:class:`SignedHadamard` is the same rotation as an operator: ``x @ R = hadamard_transform(x * d)``, a
few passes over ``x`` (:mod:`orthoopt.hadamard.fwht`). :meth:`SignedHadamard.recognize` finds it in a
dense tensor, so any write-back can take the fast path for any ``R`` that is exactly such a matrix,
whoever made it; any other ``R`` (learned, float32-rounded, requiring grad) keeps the dense product.
"""

from __future__ import annotations

import torch

from orthoopt.core.rowwise import ROW_BLOCK, by_row_blocks
from orthoopt.errors import InvalidInputError

from .construct import base_matrix, hadamard_plan, is_hadamard_size
from .fwht import hadamard_transform

F64 = torch.float64
#: Elements per block of :meth:`SignedHadamard.right` / :meth:`~SignedHadamard.left_t`: the transform's
#: temporaries are one block's and a block stays in the cache between factors (the write-backs' shared
#: block size, :data:`orthoopt.core.rowwise.ROW_BLOCK`, and why).
CHUNK = ROW_BLOCK
_ROWS = 512  # rows of R compared per block in recognize (bounded memory at any n)


class SignedHadamard:
    """The orthogonal ``R = diag(signs) @ hadamard_matrix(n) / sqrt(n)``, applied as an operator.

    Parameters
    ----------
    signs : torch.Tensor
        ``[n]`` entries ±1 (any floating dtype; kept as float64 on their device); ``n`` must be a
        supported Hadamard order.

    Notes
    -----
    Results are computed in the ``dtype`` asked for (default the input's; the write-back asks for
    float64) and equal the dense products to float64 rounding (different summation order, not the
    same bits).
    """

    def __init__(self, signs: torch.Tensor) -> None:
        self.signs = signs.to(F64)
        self.n = int(signs.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.n)

    @property
    def device(self) -> torch.device:
        return self.signs.device

    def to(self, device) -> "SignedHadamard":
        """This rotation with its signs on ``device``."""
        return SignedHadamard(self.signs.to(device))

    def right(self, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``x @ R`` for ``x`` ``[..., n]``, a new tensor in ``dtype`` (default ``x``'s; ``x`` is not modified).

        Rows are cast to ``dtype`` and transformed in blocks of about :data:`CHUNK` elements written into
        the output, so the work beside ``x`` and the result is one block (``x.to(dtype) @ R`` needs a
        cast copy of ``x`` besides). The same values as ``hadamard_transform(x.to(dtype) * d)``.
        """
        if x.dim() == 0 or x.shape[-1] != self.n:
            raise InvalidInputError(f"x @ R needs x [..., {self.n}], got {tuple(x.shape)}")
        dtype = x.dtype if dtype is None else dtype
        d, signed = self.signs.to(dtype), _signer(x.dtype, dtype)
        return by_row_blocks(x, lambda rows: hadamard_transform(signed(rows, d)), dtype, CHUNK)

    def left_t(self, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``R.T @ x`` for ``x`` ``[..., n, k]``, a new tensor in ``dtype`` (default ``x``'s): ``H.T @ (D x) /
        sqrt(n)``, the transform along ``dim=-2``, in blocks of columns of about :data:`CHUNK` elements
        cast to ``dtype`` one at a time (as :meth:`right`)."""
        if x.dim() < 2 or x.shape[-2] != self.n:
            raise InvalidInputError(f"R.T @ x needs x [..., {self.n}, k], got {tuple(x.shape)}")
        dtype = x.dtype if dtype is None else dtype
        d = self.signs.to(dtype)[:, None]
        out = torch.empty(x.shape, dtype=dtype, device=x.device)
        mats, flat = x.reshape(-1, self.n, x.shape[-1]), out.view(-1, self.n, x.shape[-1])
        step = max(1, CHUNK // self.n)
        signed = _signer(x.dtype, dtype)
        for b in range(mats.shape[0]):
            for start in range(0, x.shape[-1], step):
                cols = slice(start, start + step)
                flat[b, :, cols] = hadamard_transform(signed(mats[b, :, cols], d), dim=-2)
        return out

    def dense(self, dtype: torch.dtype = F64) -> torch.Tensor:
        """The ``[n, n]`` matrix ``R``."""
        return self.right(torch.eye(self.n, dtype=dtype, device=self.device))

    @classmethod
    def recognize(cls, R: torch.Tensor, atol: float = 1e-15) -> "SignedHadamard | None":
        """The operator equal to ``R`` if ``R`` is ``diag(d) H / sqrt(n)`` to within ``atol``, else None.

        ``R`` must be a square floating tensor that does not require grad, of a supported Hadamard
        order. Row signs are read from ``R``'s first column, then every row of ``R`` is compared with
        the operator's (in blocks of rows, stopping at the first mismatch), so a learned ``R`` is
        refused after one block. ``atol`` (default 1e-15, a few hundred float64 rounding units of
        ``1/sqrt(n)``) admits float64 copies of :func:`~orthoopt.hadamard.random_hadamard` and nothing
        rounded to float32.
        """
        if (not isinstance(R, torch.Tensor) or R.dim() != 2 or R.shape[0] != R.shape[1]
                or not R.dtype.is_floating_point or R.requires_grad or not is_hadamard_size(R.shape[0])):
            return None
        n = R.shape[0]
        R = R.to(F64)
        signs = torch.sign(R[:, 0]) * _first_column(n, R.device)  # R[i, 0] = d_i H[i, 0] / sqrt(n)
        if not bool((signs.abs() == 1).all()):
            return None
        op = cls(signs)
        for start in range(0, n, _ROWS):
            stop = min(start + _ROWS, n)
            rows = torch.zeros(stop - start, n, dtype=F64, device=R.device)
            rows[:, start:stop].fill_diagonal_(1.0)
            if not torch.allclose(op.right(rows), R[start:stop], rtol=0, atol=atol):
                return None
        return op


def _signer(source: torch.dtype, dtype: torch.dtype):
    """``block -> block.to(dtype) * d`` in one pass where ``dtype`` is ``source`` promoted (bf16 times a
    float64 ``d`` is formed in float64: the same values, the cast is exact), else cast first."""
    if torch.promote_types(source, dtype) == dtype:
        return torch.mul
    return lambda block, d: block.to(dtype) * d


def _first_column(n: int, device) -> torch.Tensor:
    """``hadamard_matrix(n)[:, 0] = kron(B[:, 0], S[:, 0])``, and Sylvester's first column is all ones."""
    plan = hadamard_plan(n)
    return torch.kron(base_matrix(plan, F64)[:, 0], torch.ones(plan.power_of_two, dtype=F64)).to(device)


def fast_rotation(R: torch.Tensor | None) -> "torch.Tensor | SignedHadamard | None":
    """``R`` as a :class:`SignedHadamard` when it is one (:meth:`SignedHadamard.recognize`), else ``R``."""
    if R is None:
        return None
    return SignedHadamard.recognize(R) or R


def times(x: torch.Tensor, R: "torch.Tensor | SignedHadamard", dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x.to(dtype) @ R`` (``dtype`` None: ``x``'s) for a dense ``R`` or a :class:`SignedHadamard`
    (which casts block by block)."""
    if isinstance(R, SignedHadamard):
        return R.right(x, dtype)
    return (x if dtype is None else x.to(dtype)) @ R


def t_times(R: "torch.Tensor | SignedHadamard", x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``R.T @ x.to(dtype)`` (``dtype`` None: ``x``'s) for a dense ``R`` or a :class:`SignedHadamard`."""
    if isinstance(R, SignedHadamard):
        return R.left_t(x, dtype)
    return R.T @ (x if dtype is None else x.to(dtype))


__all__ = ["SignedHadamard", "fast_rotation", "t_times", "times"]
