"""The in-memory weight store: a Hugging Face decoder module, norms fused and rotations fused in place."""

from __future__ import annotations

from pathlib import Path

import torch

from orthoopt.adapters import DecoderAdapter
from orthoopt.config import RotateConfig
from orthoopt.objectives import Objective
from orthoopt.pipeline.objective import build_objective, phase_statistics
from orthoopt.resume import Partial, read_partial, tensor_checksum, write_partial
from orthoopt.store import Unit


class MemoryStore:
    """A Hugging Face decoder in memory as a :class:`~orthoopt.store.WeightStore`: norms fused by
    :meth:`begin`, rotations fused in place; :meth:`write_weights` saves the module (and ``tokenizer``,
    when given) as ``save_pretrained`` does."""

    rank, world_size = 0, 1

    def __init__(self, model, tokenizer=None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.adapter: DecoderAdapter | None = None
        self._phase_data: tuple[str, dict] | None = None  # (phase, its calibration statistics)
        self._home: torch.device | None = None  # where the model was before a unit moved it to the device

    def fingerprint(self) -> dict:
        return {"store": "memory",
                "model": tensor_checksum(t for _, t in sorted(self.model.state_dict().items())),
                "model_config": getattr(getattr(self.model, "config", None), "model_type", None)}

    def begin(self) -> None:
        self.adapter = DecoderAdapter(self.model)
        self.adapter.fuse_norms()
        self.dims = self.adapter.rotation_dims()

    def rotation_dims(self) -> dict[str, int]:
        return dict(self.dims)

    def prepare(self, phase: str, config: RotateConfig, calib, progress: bool) -> None:
        self._phase_data = None  # the previous phase's statistics go before the next ones are taken
        if config.entry.per_phase_statistics:
            stats = phase_statistics(config, self.adapter, phase, calib, progress)
            self._phase_data = (phase, stats)

    def local_units(self, units: list[Unit]) -> list[Unit]:
        return list(units)

    def objective(self, unit: Unit, config: RotateConfig, calib, progress: bool) -> Objective:
        joint = config.entry.joint
        device = config.compute.device
        if config.entry.simulates_quantization and device is not None and self._home is None:
            # its loss runs the whole (fake-quantized) model: the model goes to the device for this
            # unit, back to where it was in apply (the norms were fused before, where it was loaded)
            self._home = self.adapter.modules.embed.weight.device
            self.model.to(device)
        cache = None
        if not joint and self._phase_data is not None and self._phase_data[0] == unit.phase:
            cache = self._phase_data[1]
        return build_objective(config, self.adapter, unit.phases if joint else unit.phase, calib, progress=progress,
                               names=tuple(unit.dims), cache=cache)

    def settle(self, unit: Unit, rotations: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return rotations

    def apply(self, unit: Unit, rotations: dict[str, torch.Tensor]) -> None:
        self.adapter.apply_rotations(rotations)
        if self._home is not None:
            self.model.to(self._home)
            self._home = None

    def report(self) -> dict:
        return {}

    def gather(self, rotations: dict[str, torch.Tensor], results: dict) -> tuple[dict, dict]:
        return rotations, results

    def open_output(self, folder: Path) -> None:
        pass

    def write_weights(self, folder: Path) -> None:
        self.model.save_pretrained(folder)  # safetensors (the default)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(folder)

    def write_partial(self, path, partial: Partial, unit: Unit) -> None:
        write_partial(path, partial)

    def read_partial(self, path) -> Partial | None:
        return read_partial(path) if Path(path).is_file() else None
