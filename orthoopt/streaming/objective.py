"""OptRot's R1 objective on a checkpoint on disk: the fourth power of the R1 blocks, read layer by layer.

Every call to :meth:`StreamedFourthPower.value_and_grad` reads the norm-fused R1 blocks
(:class:`~orthoopt.streaming.fused.FusedReader`) unit by unit (embedding slices, one layer, lm_head
slices), packs their rows into segments with a reused buffer and accumulates the loss and the R1
gradient, so the resident memory is about one layer plus the ``[chunk_rows, hidden]`` buffers. The row
stream, the segments and the accumulation loop are those of
``FourthPower(adapter.weight_blocks("R1"))`` (:mod:`orthoopt.objectives.row_segments`), so both give
the same numbers bit for bit. Conventions: ``docs/conventions.md`` (R1 acts as ``x -> x @ R1``).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from orthoopt.errors import InvalidInputError
from orthoopt.core.blocks import Rotations, WeightBlock, get_rotation
from orthoopt.objectives.base import Objective
from orthoopt.objectives.row_segments import (
    FourthPowerKernel,
    RowPacker,
    RowSampler,
    accumulate_rows,
    check_chunk_rows,
    packed,
    value_rows,
)
from orthoopt.streaming.fused import FusedReader, Unit

F64 = torch.float64


class StreamedFourthPower(Objective):
    """``sum_b sum((A_b @ R1) ** 4)`` over the R1 blocks of ``units`` (default: all) of a checkpoint.

    reader:          the norm-fused tensors (its ``dtype`` plays the model dtype of ``load_model``).
    units:           the part of the row stream this objective covers (``"embed"``, layer indices,
                     ``"lm_head"``, in stream order); a distributed run gives each rank a share.
    chunk_rows, sample_fraction, seed: as in :class:`~orthoopt.objectives.FourthPower` (``fused=True``).
    device:          where segments are computed (rows are copied there as they are read); rotations on
                     another device are moved there and gradients returned on theirs. Default: CPU.
    """

    def __init__(self, reader: FusedReader, units: Iterable[Unit] | None = None, *, chunk_rows: int | None = None,
                 sample_fraction: float | None = None, seed: int = 0,
                 device: torch.device | str | None = None) -> None:
        self.reader = reader
        all_units = reader.units()
        self.units = list(all_units if units is None else units)
        unknown = [u for u in self.units if u not in all_units]
        if unknown or not self.units:
            raise InvalidInputError(f"units must be a non-empty subset of {all_units}, got {self.units}")
        self.n = reader.layout.hidden
        self.chunk_rows = check_chunk_rows(chunk_rows, self.n)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.sample_fraction = None if sample_fraction is None or sample_fraction == 1 else float(sample_fraction)
        self.sampler = None if self.sample_fraction is None else RowSampler(self.sample_fraction, seed)
        self.kernel = FourthPowerKernel(self.n, self.chunk_rows)
        self.dtype = torch.promote_types(reader.dtype, torch.float32)
        self._packer = RowPacker(self.n, self.chunk_rows, self.dtype, self.device, reuse=True)  # one buffer for all calls

    @property
    def dims(self) -> dict[str, int]:
        return {"R1": self.n}

    def _segments(self):
        self._packer.reset()
        return packed((rows for _, rows in self.reader.r1_pieces(self.units)), self._packer)

    def _rotation(self, rotations: Rotations) -> tuple[torch.Tensor, torch.Tensor]:
        R = get_rotation(rotations, "R1", self.n).detach()
        return R.to(self.device), R

    def loss(self, rotations: Rotations) -> torch.Tensor:
        """The exact loss (float64 0-dim tensor; not differentiable: use :meth:`value_and_grad`)."""
        with torch.no_grad():
            Rc, _ = self._rotation(rotations)
            return value_rows(self._segments(), Rc, self.kernel).cpu()

    def value_and_grad(self, rotations: Rotations) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(loss float64, {"R1": 4 sum_b A_b.T @ (A_b @ R1) ** 3})``; sampled when ``sample_fraction < 1``."""
        with torch.no_grad():
            Rc, R = self._rotation(rotations)
            loss, G = accumulate_rows(self._segments(), Rc, self.kernel, self.sampler)
        return loss.cpu(), {"R1": G.to(R.device)}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The row sampler's generator state (``{"sampler.R1": uint8 tensor}``; empty when exact), so
        that a resumed run draws the rows an uninterrupted one would."""
        return {} if self.sampler is None else {"sampler.R1": self.sampler.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore :meth:`state_dict`; ValueError if it does not match this objective's sampling."""
        want = set() if self.sampler is None else {"sampler.R1"}
        if set(state) != want:
            raise InvalidInputError(f"objective state has samplers {sorted(state)}, this objective {sorted(want)}")
        if self.sampler is not None:
            self.sampler.generator.set_state(state["sampler.R1"].clone())

    def __repr__(self) -> str:
        return f"StreamedFourthPower({self.reader.ckpt.path}, {len(self.units)} units, n={self.n})"


class StreamedBlockSum(Objective):
    """``sum_u make(blocks of u)`` over the R1 units of a checkpoint: any data-free objective that is a
    sum over weight blocks, read from disk unit by unit at every call (about one layer in memory).

    Parameters
    ----------
    reader : FusedReader
        The norm-fused checkpoint.
    units : iterable or None
        The part of the row stream covered, as in :class:`StreamedFourthPower` (None: all).
    make : callable
        ``make(blocks) -> Objective`` for one unit's R1 blocks, given as side-"in" blocks of their rows
        (``block.as_rows()``, rotated as ``rows @ R1``; embedding and lm_head come in row slices, each
        its own block).

    Notes
    -----
    Equal to the objective over all blocks up to the order of the float sums. Stateless: nothing to
    save for a resume; ``make`` is called anew every step, so it should not sample rows (a sampler
would restart with every call).
    """

    def __init__(self, reader: FusedReader, units: Iterable[Unit] | None, make) -> None:
        self.reader, self.make = reader, make
        self.units = list(reader.units() if units is None else units)
        self.n = reader.layout.hidden

    @property
    def dims(self) -> dict[str, int]:
        return {"R1": self.n}

    def _terms(self):
        for unit in self.units:
            blocks = [WeightBlock(rows, "R1", "in", name) for name, rows in self.reader.r1_pieces([unit])]
            yield self.make(blocks)

    def loss(self, rotations: Rotations) -> torch.Tensor:
        """The loss (float64 0-dim tensor), summed over the units."""
        with torch.no_grad():
            return sum((term.loss(rotations).double().cpu() for term in self._terms()), torch.zeros((), dtype=F64))

    def value_and_grad(self, rotations: Rotations) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(loss float64, {"R1": gradient})``, both summed over the units."""
        total, grad = torch.zeros((), dtype=F64), None
        for term in self._terms():
            value, g = term.value_and_grad(rotations)
            total = total + value.detach().double().cpu()
            grad = g["R1"] if grad is None else grad + g["R1"]
        return total, {"R1": grad}
