"""What the phase loop (:func:`orthoopt.pipeline.run_phases`) asks of the weights it rotates.

A :class:`WeightStore` holds a model's weights somewhere (an in-memory Hugging Face module:
:class:`orthoopt.pipeline.MemoryStore`; a safetensors folder read layer by layer and written as
shards: :class:`orthoopt.streaming.rotate.SafetensorsStore`). The loop is written once; a store
builds each :class:`Unit`'s objective and fuses (or writes) each unit's rotations. Rotations are
``{name: [n, n]}`` (``docs/conventions.md``); ``apply`` receives them in float64 on the CPU.

How a run splits into solves is the loop's decision (:func:`orthoopt.pipeline.plan_units`), not the
store's: a store only says which rotations it holds (:meth:`WeightStore.rotation_dims`) and which of
the planned units this process solves (:meth:`WeightStore.local_units`; all of them, except under
``torchrun``, where the layers' R2 units are shared out among the ranks).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

from orthoopt.objectives import Objective


@dataclass(frozen=True)
class Unit:
    """One solve of the phase loop.

    key:    its name in partial checkpoints and results (``"R1"``, ``"R2"``, ``"R2.3"``).
    phase:  the phase whose step budget it takes and that the callback reports (``"R1"`` / ``"R2"``).
    dims:   ``{rotation name: n}`` it learns.
    phases: the phases its objective covers (several for a joint method such as spinquant).
    """

    key: str
    phase: str
    dims: dict[str, int] = field(hash=False)
    phases: tuple[str, ...] = ()


@runtime_checkable
class WeightStore(Protocol):
    """The store side of the phase loop (see the module doc)."""

    def fingerprint(self) -> dict:
        """JSON-able identity of the weights (a checksum), for refusing a foreign partial checkpoint."""

    def begin(self) -> None:
        """Prepare for the loop (e.g. fuse the norms); called once, after :meth:`fingerprint`."""

    def rotation_dims(self) -> dict[str, int]:
        """``{rotation name: n}`` of every rotation of the model, in order (``R1``, ``R2.0``, ...);
        called after :meth:`begin`."""

    def local_units(self, units: list[Unit]) -> list[Unit]:
        """The units of the plan that this process solves, in plan order."""

    def prepare(self, phase: str, config, calib: torch.Tensor | None, progress: bool) -> None:
        """Called once per phase with a unit left to solve, before the phase's first unit is solved or
        re-applied from a resume file: take what the phase's objectives share (calibration statistics),
        so that they do not depend on how many of its units were fused when the run started."""

    def objective(self, unit: Unit, config, calib: torch.Tensor | None, progress: bool) -> Objective:
        """The objective of ``unit`` on the weights with every earlier unit's rotations applied."""

    def settle(self, unit: Unit, rotations: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The solved rotations as every process will fuse them (distributed: rank 0's)."""

    def apply(self, unit: Unit, rotations: dict[str, torch.Tensor]) -> None:
        """Fuse (or write) ``unit``'s rotations (float64, CPU)."""

    def report(self) -> dict:
        """Store-specific entries of ``report.json``."""

    def write_partial(self, path, partial, unit: Unit) -> None:
        """Write the partial checkpoint ``partial`` (:class:`orthoopt.resume.Partial`) of a run at
        ``path``, during or right after ``unit``; every process calls it at the same points of a
        collective unit."""

    def read_partial(self, path):
        """The partial checkpoint this process resumes from, or None when there is none."""

    # the output (orthoopt.pipeline.output.run_and_write): rank / world_size are attributes
    rank: int
    world_size: int

    def gather(self, rotations: dict[str, torch.Tensor], results: dict) -> tuple[dict, dict]:
        """Every process's rotations and solve results, on every process (collective; one process:
        unchanged)."""

    def open_output(self, folder) -> None:
        """Called on the writing process with the temporary output folder before the loop (one
        process) or after it (``torchrun``): a store that writes as it goes starts here."""

    def write_weights(self, folder) -> None:
        """Write the rotated weights and the model's side files (config, tokenizer) into ``folder``."""
