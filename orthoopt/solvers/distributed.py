"""Data-parallel objectives over several processes (``torch.distributed``; launched with ``torchrun``).

An objective that is a sum over weight blocks splits across ranks: each rank builds the objective of
its share of the blocks (:func:`shard_blocks`, :func:`shard_ranges`) and wraps it in
:class:`DistributedObjective`, whose ``value_and_grad`` all-reduces (sums) the loss and each
rotation's gradient. Every rank then runs the same solver steps on the same summed gradient, so the
rotations stay identical on every rank without being sent around: the all-reduce (gloo on CPU, NCCL
on GPU) hands every rank the same bits. :func:`max_rank_difference` checks that at the end.

Only the summation order differs from a single process: the sum of the per-rank partial gradients
instead of one running sum over all blocks (``docs/performance.md`` gives the resulting tolerance).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist

from orthoopt.errors import InvalidInputError

from ..core.blocks import Rotations, WeightBlock
from ..objectives.base import Objective


def world(group: Any = None) -> tuple[int, int]:
    """``(rank, world_size)``: ``(0, 1)`` when ``torch.distributed`` is not initialized."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def shard_ranges(sizes: Sequence[int], world_size: int) -> list[range]:
    """Split items of the given ``sizes`` into ``world_size`` contiguous ranges of about equal total size.

    Item ``j`` goes to the rank whose share ``[r S / W, (r + 1) S / W)`` of the total ``S`` holds the
    middle of the item; ranks may get no item when there are fewer items than ranks. Order is kept, so
    concatenating the ranges in rank order gives back every item once.
    """
    if not isinstance(world_size, int) or world_size < 1:
        raise InvalidInputError(f"world_size must be a positive int, got {world_size!r}")
    sizes = [int(s) for s in sizes]
    if any(s < 0 for s in sizes):
        raise InvalidInputError("sizes must be non-negative")
    total = sum(sizes) or 1
    owner, prefix = [], 0
    for s in sizes:
        owner.append(min(world_size - 1, int((prefix + s / 2) * world_size // total)))
        prefix += s
    out = []
    for r in range(world_size):
        idx = [j for j, o in enumerate(owner) if o == r]
        out.append(range(idx[0], idx[-1] + 1) if idx else range(0))
    return out


def shard_blocks(blocks: Sequence[WeightBlock], rank: int | None = None,
                 world_size: int | None = None) -> list[WeightBlock]:
    """This rank's contiguous share of ``blocks``, balanced by ``weight.numel()`` (:func:`shard_ranges`).

    ``rank`` and ``world_size`` default to those of the initialized process group (0 and 1 without one).
    """
    r, w = world()
    rank = r if rank is None else rank
    world_size = w if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise InvalidInputError(f"rank {rank} is outside world_size {world_size}")
    share = shard_ranges([b.weight.numel() for b in blocks], world_size)[rank]
    return [blocks[j] for j in share]


class DistributedObjective(Objective):
    """The sum over ranks of each rank's ``local`` objective.

    local: this rank's objective (its share of the blocks), or None for a rank with no share.
    dims:  ``{name: n}`` of the whole objective (default ``local.dims``); must be the same on every rank.
    group: the process group (default: the world).

    :meth:`value_and_grad` all-reduces the loss (float64) and, for each rotation of ``dims``, the
    gradient (zeros where ``local`` has none) in the rotation's dtype, on the rotation's device (CPU
    tensors for gloo, CUDA tensors for NCCL). Every rank must call it the same number of times.
    """

    def __init__(self, local: Objective | None, dims: Mapping[str, int] | None = None, group: Any = None) -> None:
        if local is None and dims is None:
            raise InvalidInputError("DistributedObjective needs dims when this rank has no local objective")
        if not (dist.is_available() and dist.is_initialized()):
            raise InvalidInputError("DistributedObjective needs an initialized torch.distributed process group")
        self.local, self.group = local, group
        self._dims = dict(dims if dims is not None else local.dims)
        if local is not None:
            extra = set(local.dims) - set(self._dims)
            if extra:
                raise InvalidInputError(f"local objective has rotations {sorted(extra)} outside dims {self._dims}")

    @property
    def dims(self) -> dict[str, int]:
        return dict(self._dims)

    def _reduce_loss(self, value: torch.Tensor | float | None, device: torch.device) -> torch.Tensor:
        t = torch.zeros((), dtype=torch.float64, device=device)
        if value is not None:
            t += torch.as_tensor(value, dtype=torch.float64).to(device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t.cpu()

    def loss(self, rotations: Rotations) -> torch.Tensor:
        """The all-reduced loss (float64 0-dim tensor, not differentiable)."""
        with torch.no_grad():
            value = None if self.local is None else self.local.loss(rotations).detach()
        return self._reduce_loss(value, _device(rotations, self._dims))

    def value_and_grad(self, rotations: Rotations) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        value, grads = (None, {}) if self.local is None else self.local.value_and_grad(rotations)
        out = {}
        for name in sorted(self._dims):  # the same order on every rank
            R = rotations[name]
            g = grads.get(name)
            g = torch.zeros_like(R) if g is None else g.to(device=R.device, dtype=R.dtype).contiguous()
            dist.all_reduce(g, op=dist.ReduceOp.SUM, group=self.group)
            out[name] = g
        return self._reduce_loss(value, _device(rotations, self._dims)), out

    def state_dict(self) -> dict[str, torch.Tensor]:
        """This rank's local objective's state (its sampling generators; empty without one)."""
        fn = getattr(self.local, "state_dict", None)
        return fn() if callable(fn) else {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore :meth:`state_dict` into the local objective."""
        fn = getattr(self.local, "load_state_dict", None)
        if callable(fn):
            fn(state)
        elif state:
            raise InvalidInputError(f"objective state {sorted(state)} for a rank whose objective keeps none")

    def __repr__(self) -> str:
        rank, size = world(self.group)
        return f"DistributedObjective(rank {rank}/{size}, local={self.local!r})"


def _device(rotations: Rotations, dims: Mapping[str, int]) -> torch.device:
    for name in sorted(dims):
        if name in rotations:
            return rotations[name].device
    return torch.device("cpu")


def all_gather_objects(obj: Any, group: Any = None) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` without a process group)."""
    _, size = world(group)
    if size == 1:
        return [obj]
    out: list[Any] = [None] * size
    dist.all_gather_object(out, obj, group=group)
    return out


def max_rank_difference(rotations: Mapping[str, torch.Tensor], group: Any = None) -> float:
    """``max |R - R_on_rank_0|`` over rotations and ranks (0.0 without a process group). Collective."""
    _, size = world(group)
    if size == 1:
        return 0.0
    worst = torch.zeros((), dtype=torch.float64)
    for name in sorted(rotations):
        ref = rotations[name].detach().clone()
        dist.broadcast(ref, src=0, group=group)
        worst = torch.maximum(worst, (ref - rotations[name]).abs().max().to(torch.float64).cpu())
    worst = worst.to(next(iter(rotations.values())).device) if rotations else worst
    dist.all_reduce(worst, op=dist.ReduceOp.MAX, group=group)
    return float(worst)
