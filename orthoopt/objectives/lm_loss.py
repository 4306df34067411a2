"""SpinQuant's end-to-end objective: the loss of the rotated, fake-quantized network on calibration text.

``L(R1, R2.0, ...) = E_batch[ CE(model_Q(R), batch) ]`` (Liu et al., "SpinQuant", 2024): the causal-LM
cross-entropy of the network with the rotations fused and weights / activations / K-V fake-quantized
(straight-through estimators), differentiated by autograd through the whole model. The model side
lives in :class:`orthoopt.quant.rotated.RotatedQuantLM`; this objective only receives its callable
``loss_fn(rotations, ids) -> scalar`` (objectives never touch models) and streams calibration windows
into it.

Stochastic: every :meth:`~QuantizedLMLoss.loss` / :meth:`~QuantizedLMLoss.value_and_grad` call takes the
next ``batch_size`` windows (cycling through the calibration set in order), as SpinQuant's SGD does, so
consecutive calls at the same rotations may differ; :meth:`~QuantizedLMLoss.state_dict` holds the
stream's position, so a resumed run continues it. Memory stays bounded: the gradient is accumulated
over ``micro_batch_size`` windows at a time, one backward pass each, so only one micro-batch of
activations is alive at any time, and the calibration windows are token ids, never activations.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch

from orthoopt.core.blocks import Rotations
from orthoopt.errors import InvalidInputError

from .base import Objective

LossFn = Callable[[Mapping[str, torch.Tensor], torch.Tensor], torch.Tensor]


class QuantizedLMLoss(Objective):
    """Mean causal-LM loss of ``loss_fn`` over a stream of calibration windows.

    loss_fn:          ``loss_fn(rotations, ids [b, L]) -> mean loss`` (differentiable in the rotations),
                      e.g. :class:`orthoopt.quant.rotated.RotatedQuantLM`.
    batches:          a ``[N, L]`` LongTensor of windows (cycled through), or any re-iterable of
                      ``[b, L]`` LongTensors (re-iterated when exhausted; windows are regrouped into
                      batches of ``batch_size``).
    dims:             ``{rotation name: n}``; default ``loss_fn.dims``.
    batch_size:       windows per loss evaluation (per solver step).
    micro_batch_size: windows per forward/backward pass (default: ``batch_size``).
    """

    def __init__(self, loss_fn: LossFn, batches: torch.Tensor | Iterable[torch.Tensor],
                 dims: Mapping[str, int] | None = None, batch_size: int = 1,
                 micro_batch_size: int | None = None) -> None:
        if not callable(loss_fn):
            raise InvalidInputError("loss_fn must be callable: loss_fn(rotations, ids) -> scalar tensor")
        dims = dims if dims is not None else getattr(loss_fn, "dims", None)
        if not dims:
            raise InvalidInputError("dims is required (loss_fn has no .dims)")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InvalidInputError(f"batch_size must be a positive int, got {batch_size!r}")
        micro = batch_size if micro_batch_size is None else micro_batch_size
        if isinstance(micro, bool) or not isinstance(micro, int) or micro < 1:
            raise InvalidInputError(f"micro_batch_size must be a positive int, got {micro_batch_size!r}")
        if isinstance(batches, torch.Tensor):
            if batches.ndim != 2 or batches.dtype != torch.long or batches.shape[0] < 1 or batches.shape[1] < 2:
                raise InvalidInputError(f"batches must be a [N, L >= 2] LongTensor, got {batches.dtype} {tuple(batches.shape)}")
        self.loss_fn = loss_fn
        self._dims = dict(dims)
        self.batches = batches
        self.batch_size, self.micro_batch_size = batch_size, micro
        self._stream = None
        self.windows_seen = 0

    @property
    def dims(self) -> dict[str, int]:
        return self._dims

    def _windows(self):
        while True:
            if isinstance(self.batches, torch.Tensor):
                yield from self.batches
            else:
                empty = True
                for b in self.batches:
                    b = torch.as_tensor(b)
                    if b.ndim == 1:
                        b = b[None]
                    for row in b:
                        empty = False
                        yield row
                if empty:
                    raise InvalidInputError("the calibration batches are empty")

    def next_batch(self) -> torch.Tensor:
        """The next ``[batch_size, L]`` windows of the stream."""
        if self._stream is None:
            self._stream = self._windows()
        rows = [next(self._stream) for _ in range(self.batch_size)]
        if len({r.shape[0] for r in rows}) != 1:
            raise InvalidInputError(f"calibration windows of one batch differ in length: {sorted({r.shape[0] for r in rows})}")
        self.windows_seen += len(rows)
        return torch.stack(rows).long()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The stream's position (``{"windows_seen": int64 [1]}``), so that a resumed run takes the
        batches an uninterrupted one would."""
        return {"windows_seen": torch.tensor([self.windows_seen], dtype=torch.int64)}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore :meth:`state_dict`: the stream restarts and skips the windows already seen.

        Raises
        ------
        ValueError
            When ``state`` is not a :meth:`state_dict` of this class.
        """
        if set(state) != {"windows_seen"}:
            raise InvalidInputError(f"objective state has {sorted(state)}, QuantizedLMLoss keeps ['windows_seen']")
        seen = int(state["windows_seen"].reshape(-1)[0])
        self._stream = self._windows()
        for _ in range(seen):
            next(self._stream)
        self.windows_seen = seen

    def _chunks(self, ids: torch.Tensor):
        for s in range(0, ids.shape[0], self.micro_batch_size):
            chunk = ids[s:s + self.micro_batch_size]
            yield chunk, chunk.shape[0] / ids.shape[0]

    def loss(self, rotations: Rotations) -> torch.Tensor:
        ids = self.next_batch()
        return sum(w * self.loss_fn(rotations, chunk) for chunk, w in self._chunks(ids))

    def value_and_grad(self, rotations: Rotations) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss on the next batch and its Euclidean gradient, accumulated over micro-batches."""
        names = [k for k in self.dims if k in rotations]
        ids = self.next_batch()
        total = None
        grads = {k: torch.zeros_like(rotations[k]) for k in names}
        for chunk, w in self._chunks(ids):
            leaves = {k: rotations[k].detach().requires_grad_(True) for k in names}
            with torch.enable_grad():
                value = w * self.loss_fn({**rotations, **leaves}, chunk)
                gs = torch.autograd.grad(value, [leaves[k] for k in names], allow_unused=True)
            for k, g in zip(names, gs):
                if g is not None:
                    grads[k] += g
            total = value.detach() if total is None else total + value.detach()
            del value, gs, leaves
        return total, grads
