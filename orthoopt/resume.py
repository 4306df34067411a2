"""Partial checkpoints of :func:`orthoopt.pipeline.rotate_model`: the whole state of an unfinished
run, so that a resumed run is bit-identical to an uninterrupted one (same machine, same threads).

One safetensors file, written atomically (temporary name, then rename: :mod:`orthoopt.utils.atomic`):

tensors
    ``done.<name>``        rotations of the finished phases, float64, exactly as they were fused;
    ``solver.<key>``       the solver's :meth:`~orthoopt.solvers.Solver.state_dict` tensors (iterate,
                           momentum, Adam moments, BB / L-BFGS memory, cached gradients; own dtypes);
    ``objective.<key>``    the objective's ``state_dict()`` (sampling generators), if it has one.
metadata (strings)
    ``format``             :data:`FORMAT`;
    ``settings``           JSON of everything the trajectory depends on (method, phases, solver and
                           its settings, steps, seed, dtype, learning rate, sampling, a checksum of the
                           model's weights and of the calibration tokens, ...): a resume refuses a file
                           whose settings differ and names the differences;
    ``phase``, ``step``    the phase in progress and the steps it has taken;
    ``solver``             JSON of the solver's ``state_dict()["meta"]`` (counters, scalar state);
    ``histories``          JSON ``{phase: [loss before each step]}`` of the finished phases and the
                           current one, and ``results`` the finished phases' final loss, orthogonality
                           error, evaluations and stop reason (so the report of a resumed run is whole).

Floats in the JSON are Python floats, written with their shortest round-trip repr: exact.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from orthoopt.errors import InvalidInputError
from orthoopt.utils.atomic import atomic_path

FORMAT = "orthoopt-partial/3"
"""Version of the file layout; 3: the settings name RotateConfig's fields by their group (``solve.steps``),
so a file of version 2 is refused by its format, not reported as another run's."""


def tensor_checksum(tensors) -> str:
    """SHA-256 (first 16 hex digits) of the bytes of ``tensors`` (an iterable), for settings checks."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass
class Partial:
    """A partial checkpoint in memory (see the module doc)."""

    settings: dict
    phase: str
    step: int
    done: dict[str, torch.Tensor] = field(default_factory=dict)
    solver: dict | None = None  # {"tensors": ..., "meta": ...} or None at a phase boundary
    objective: dict[str, torch.Tensor] = field(default_factory=dict)
    histories: dict[str, list[float]] = field(default_factory=dict)
    results: dict[str, dict] = field(default_factory=dict)


def write_partial(path: str | Path, p: Partial) -> None:
    """Write ``p`` to ``path`` atomically."""
    tensors = {f"done.{k}": v.detach().cpu().contiguous() for k, v in p.done.items()}
    meta = {"format": FORMAT, "settings": json.dumps(p.settings, sort_keys=True), "phase": p.phase,
            "step": str(p.step), "histories": json.dumps(p.histories), "results": json.dumps(p.results),
            "solver": json.dumps(None if p.solver is None else p.solver["meta"])}
    if p.solver is not None:
        tensors.update({f"solver.{k}": v.detach().cpu().contiguous() for k, v in p.solver["tensors"].items()})
    tensors.update({f"objective.{k}": v.detach().cpu().contiguous() for k, v in p.objective.items()})
    with atomic_path(Path(path)) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def read_partial(path: str | Path) -> Partial:
    """Read a partial checkpoint; ValueError naming the file when it is not one (or is damaged)."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise InvalidInputError(f"{path} is not an orthoopt partial checkpoint of format {FORMAT} "
                                 f"(format {meta.get('format')!r}); delete it or run without --resume")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise InvalidInputError(f"{path}: cannot read the partial checkpoint ({e}); delete it or run without --resume") from None
    try:
        solver_meta = json.loads(meta["solver"])
        p = Partial(settings=json.loads(meta["settings"]), phase=meta["phase"], step=int(meta["step"]),
                    histories=json.loads(meta["histories"]), results=json.loads(meta["results"]))
    except (KeyError, ValueError) as e:
        raise InvalidInputError(f"{path}: damaged partial checkpoint metadata ({e})") from None

    def part(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

    p.done = part("done.")
    p.objective = part("objective.")
    if solver_meta is not None:
        p.solver = {"tensors": part("solver."), "meta": solver_meta}
    return p


def settings_difference(saved: dict, current: dict) -> list[str]:
    """Human-readable differences ``"key: saved -> current"`` between two settings dicts."""
    keys = sorted(set(saved) | set(current))
    return [f"{k}: {saved.get(k)!r} in the file, {current.get(k)!r} now" for k in keys if saved.get(k) != current.get(k)]
