"""A row-wise map over a tensor in blocks of rows, written into one new output.

The write-backs' elementwise and per-row products (the norm fold, the fast Hadamard write-back) go
through :func:`by_row_blocks`, so their float64 temporaries are one block's rather than a copy of the
weight, and each block stays in the cache while it is worked on.
"""

from __future__ import annotations

from typing import Callable

import torch

#: Elements per block (512 KiB of float64): below the 1 MiB mmap threshold the command line fixes
#: (``orthoopt.utils.heap``), so the temporaries come from the heap. At 2^18 each temporary was a fresh
#: mmap: a [8192, 3072] weight and its transpose took 1.21 s through the fast Hadamard write-back with
#: that threshold instead of 0.49 s without, against 0.57 s at 2^16 with or without it.
ROW_BLOCK = 1 << 16


def by_row_blocks(x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor], dtype: torch.dtype | None = None,
                  elements: int | None = None) -> torch.Tensor:
    """``fn`` applied to ``x`` (``[..., k]``) viewed as rows ``[-1, k]``, a block of rows at a time.

    ``fn`` maps a ``[rows, k]`` block to a tensor of the same shape (any dtype: it is cast on the way
    into the output); the result is a new tensor of ``x``'s shape in ``dtype`` (default ``x``'s), and
    ``x`` is not modified. A block holds about ``elements`` entries (default :data:`ROW_BLOCK`, at
    least one row), so ``fn`` must act on each row independently for the blocks not to matter.
    """
    k = max(1, x.shape[-1]) if x.dim() else 1
    out = torch.empty(x.shape, dtype=x.dtype if dtype is None else dtype, device=x.device)
    rows, flat = x.reshape(-1, x.shape[-1]), out.view(-1, x.shape[-1])
    step = max(1, (ROW_BLOCK if elements is None else elements) // k)
    for start in range(0, rows.shape[0], step):
        flat[start:start + step] = fn(rows[start:start + step])
    return out


__all__ = ["ROW_BLOCK", "by_row_blocks"]
