"""Row segments: the packed layout on which the fourth-power loss and its gradient are computed.

A rotation ``R`` (``[n, n]``, ``x -> x @ R``, ``docs/conventions.md``) multiplies every block's rows
``A_b = block.as_rows()`` (``[m_b, n]``) from the right. The fast path of
:class:`~orthoopt.objectives.FourthPower` concatenates the rows of all blocks of one rotation in block
order and cuts them into *segments* of ``chunk_rows`` rows: segment ``j`` holds the global rows
``[j * chunk_rows, (j + 1) * chunk_rows)`` (the last one is shorter). One matrix product per segment
replaces one per block, and small blocks (a ``[512, 512]`` projection) no longer run at the low
efficiency of small products. The segmentation depends only on the row stream and ``chunk_rows``, not on
how the rows arrive, so a model read layer by layer from disk (:mod:`orthoopt.streaming`) gives
exactly the segments, and hence exactly the floating-point results, of the in-memory objective.

* :class:`RowPacker` cuts a stream of row pieces into segments.
* :class:`FourthPowerKernel` computes ``sum((A @ R) ** 4)`` (accumulated in float64) and adds
  ``4 * A.T @ (A @ R) ** 3`` to a gradient, reusing its work buffers across calls.
* :class:`RowSampler` draws a uniform subset of a segment's rows for stochastic steps.
* :func:`accumulate_rows` / :func:`value_rows` run the kernel over a stream of row pieces: the one
  loop both the in-memory and the streamed objective use, so their results agree bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from orthoopt.errors import InvalidInputError

CHUNK_ELEMENTS = 1 << 22
"""Default segment size in elements (16 MiB in float32): ``chunk_rows = CHUNK_ELEMENTS // n``."""
MIN_CHUNK_ROWS = 256


def default_chunk_rows(n: int) -> int:
    """Default rows per segment for rotations of size ``n``: ``max(256, 2**22 // n)``.

    Measured on a 2-core AVX2 CPU (``docs/performance.md``): segments of ``2**20`` to ``2**24`` elements
    run the two products within a few percent of one product over all rows, while the three
    ``[chunk_rows, n]`` work buffers stay at 48 MiB.
    """
    if not isinstance(n, int) or n < 1:
        raise InvalidInputError(f"n must be a positive int, got {n!r}")
    return max(MIN_CHUNK_ROWS, CHUNK_ELEMENTS // n)


def check_chunk_rows(chunk_rows: int | None, n: int) -> int:
    """``chunk_rows`` checked (a positive int), or :func:`default_chunk_rows` ``(n)`` for None."""
    if chunk_rows is None:
        return default_chunk_rows(n)
    if not isinstance(chunk_rows, int) or isinstance(chunk_rows, bool) or chunk_rows < 1:
        raise InvalidInputError(f"chunk_rows must be a positive int or None, got {chunk_rows!r}")
    return chunk_rows


class RowPacker:
    """Cut a stream of ``[m, n]`` row pieces into contiguous segments of ``chunk_rows`` rows.

    ``add(rows)`` copies the rows (any layout or floating dtype, e.g. the transposed view ``W.T`` of a
    side-"out" block) into the current segment and yields every segment it completes; ``flush()`` yields
    the last, partial one. Segments are ``dtype`` tensors on ``device``.

    reuse: ``True`` yields one buffer over and over (consume each segment before resuming the
           generator: the streamed path); ``False`` yields a new tensor per segment (the stored segments
           of the in-memory objective). Values, shapes and strides are the same either way.
    """

    def __init__(self, n: int, chunk_rows: int, dtype: torch.dtype, device: torch.device | str, reuse: bool) -> None:
        self.n, self.chunk_rows = n, check_chunk_rows(chunk_rows, n)
        self.dtype, self.device, self.reuse = dtype, torch.device(device), reuse
        self._buf: torch.Tensor | None = None
        self._fill = 0

    def _buffer(self) -> torch.Tensor:
        if self._buf is None:
            self._buf = torch.empty(self.chunk_rows, self.n, dtype=self.dtype, device=self.device)
        return self._buf

    def add(self, rows: torch.Tensor, scale: float = 1.0) -> Iterator[torch.Tensor]:
        """Append ``rows`` (``[m, n]``), multiplied by ``scale`` after the copy; yield completed segments."""
        if rows.ndim != 2 or rows.shape[1] != self.n:
            raise InvalidInputError(f"row piece must be [m, {self.n}], got {tuple(rows.shape)}")
        start, m = 0, rows.shape[0]
        while start < m:
            buf = self._buffer()
            take = min(m - start, self.chunk_rows - self._fill)
            dst = buf[self._fill:self._fill + take]
            dst.copy_(rows[start:start + take])
            if scale != 1.0:
                dst.mul_(scale)
            self._fill += take
            start += take
            if self._fill == self.chunk_rows:
                yield self._emit()

    def reset(self) -> None:
        """Drop pending rows (e.g. after an interrupted pass); the buffer is kept."""
        self._fill = 0

    def flush(self) -> Iterator[torch.Tensor]:
        """Yield the partial last segment, if any rows are pending."""
        if self._fill:
            yield self._emit()

    def _emit(self) -> torch.Tensor:
        seg = self._buf[:self._fill]
        if not self.reuse:  # the caller keeps this segment; the next one gets a new buffer
            seg = seg if self._fill == self.chunk_rows else seg.clone()  # no unused rows kept
            self._buf = None
        self._fill = 0
        return seg


class RowSampler:
    """Uniform row subsets for stochastic steps: ``k = max(1, round(fraction * m))`` of a segment's
    ``m`` rows, without replacement, from one seeded CPU generator.

    Each row is kept with probability ``k / m``, so weighting the subset's terms by ``m / k`` gives an
    unbiased estimate of the segment's loss and gradient.
    """

    def __init__(self, fraction: float, seed: int = 0) -> None:
        if not (isinstance(fraction, (int, float)) and 0 < fraction <= 1):
            raise InvalidInputError(f"sample_fraction must be in (0, 1], got {fraction!r}")
        self.fraction = float(fraction)
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)

    def sample(self, A: torch.Tensor, out: torch.Tensor) -> tuple[torch.Tensor, float]:
        """``(rows, weight)``: a sorted uniform subset of ``A``'s rows gathered into ``out`` (a buffer
        of at least ``k`` rows) and the weight ``m / k`` that makes its terms unbiased."""
        m = A.shape[0]
        k = min(m, max(1, round(self.fraction * m)))
        if k == m:
            return A, 1.0
        idx = torch.randperm(m, generator=self.generator)[:k].sort().values.to(A.device)
        rows = out[:k]
        torch.index_select(A, 0, idx, out=rows)
        return rows, m / k


class FourthPowerKernel:
    """``sum((A @ R) ** 4)`` and ``G += 4 w A.T @ (A @ R) ** 3`` for row segments ``A`` (``[m, n]``).

    Work buffers of ``[chunk_rows, n]`` (``Y = A @ R``, ``Y ** 2``, and a gather buffer for sampled
    rows) are allocated once per dtype and device and reused, so a step allocates no large tensor.
    Products and powers are computed in ``R``'s dtype; each segment's loss is summed in that dtype
    along rows and in float64 across rows.
    """

    def __init__(self, n: int, chunk_rows: int) -> None:
        self.n, self.chunk_rows = n, check_chunk_rows(chunk_rows, n)
        self._buffers: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}

    def buffers(self, dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
        """The three ``[chunk_rows, n]`` work buffers for ``dtype`` on ``device``."""
        key = (dtype, torch.device(device))
        if key not in self._buffers:
            self._buffers[key] = [torch.empty(self.chunk_rows, self.n, dtype=dtype, device=device) for _ in range(3)]
        return self._buffers[key]

    def _powers(self, A: torch.Tensor, R: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(Y, Y ** 2)`` in the work buffers, for ``Y = A @ R``."""
        m = A.shape[0]
        if m > self.chunk_rows:
            raise InvalidInputError(f"segment of {m} rows exceeds chunk_rows={self.chunk_rows}")
        bufY, bufY2, _ = self.buffers(R.dtype, R.device)
        Y = torch.mm(A, R, out=bufY[:m])
        Y2 = torch.mul(Y, Y, out=bufY2[:m])
        return Y, Y2

    def value(self, A: torch.Tensor, R: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
        """``weight * sum((A @ R) ** 4)`` as a float64 0-dim tensor (no gradient)."""
        _, Y2 = self._powers(A, R)
        return weight * Y2.mul_(Y2).sum(dim=-1).sum(dtype=torch.float64)

    def accumulate(self, A: torch.Tensor, R: torch.Tensor, G: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
        """Add ``4 weight A.T @ (A @ R) ** 3`` to ``G`` in place; return ``weight * sum((A @ R) ** 4)``
        (float64 0-dim tensor)."""
        Y, Y2 = self._powers(A, R)
        Y.mul_(Y2)  # Y ** 3
        loss = weight * Y2.mul_(Y2).sum(dim=-1).sum(dtype=torch.float64)  # Y ** 4, summed
        G.addmm_(A.T, Y, alpha=4.0 * weight)
        return loss

    def gather_buffer(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The buffer :meth:`RowSampler.sample` gathers sampled rows into."""
        return self.buffers(dtype, device)[2]


def accumulate_rows(pieces: Iterable[tuple[torch.Tensor, float]], R: torch.Tensor, kernel: FourthPowerKernel,
                    sampler: RowSampler | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum_p w_p sum((A_p @ R) ** 4), sum_p 4 w_p A_p.T @ (A_p @ R) ** 3)`` over ``(A_p, w_p)`` pieces.

    Pieces are cast to ``R``'s dtype (no copy when they are in it already) and must be on ``R``'s
    device. With a ``sampler`` each piece is replaced by a uniform row subset weighted by ``m / k``.
    The loss is a float64 0-dim tensor on ``R``'s device (no host sync per piece); the gradient has
    ``R``'s dtype. Pieces are accumulated in order, into one gradient.
    """
    G = torch.zeros_like(R)
    loss = torch.zeros((), dtype=torch.float64, device=R.device)
    for A, weight in pieces:
        A = A.to(dtype=R.dtype)
        if sampler is not None:
            A, w = sampler.sample(A, kernel.gather_buffer(R.dtype, R.device))
            weight = weight * w
        loss += kernel.accumulate(A, R, G, weight)
    return loss, G


def value_rows(pieces: Iterable[tuple[torch.Tensor, float]], R: torch.Tensor, kernel: FourthPowerKernel) -> torch.Tensor:
    """``sum_p w_p sum((A_p @ R) ** 4)`` (float64 0-dim tensor on ``R``'s device), exact (no sampling)."""
    loss = torch.zeros((), dtype=torch.float64, device=R.device)
    for A, weight in pieces:
        loss += kernel.value(A.to(dtype=R.dtype), R, weight)
    return loss


def packed(pieces: Iterable[torch.Tensor], packer: RowPacker) -> Iterator[tuple[torch.Tensor, float]]:
    """``(segment, 1.0)`` for each segment ``packer`` cuts from the row ``pieces`` (then the last one)."""
    for rows in pieces:
        for seg in packer.add(rows):
            yield seg, 1.0
    for seg in packer.flush():
        yield seg, 1.0
