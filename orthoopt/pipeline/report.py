"""What a rotate run returns and writes as ``report.json``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch

from orthoopt.config import RotateConfig
from orthoopt.manifold import orthogonality_error
from orthoopt.resume import Partial
from orthoopt.solvers import SolveResult


@dataclass
class RotateResult:
    """What :func:`rotate_model` / :func:`rotate_streamed` return: the fused rotations (float64), a
    JSON-able report and the solve of each phase."""

    rotations: dict[str, torch.Tensor]
    report: dict
    solves: dict[str, SolveResult] = field(default_factory=dict)


def loss_summary(history: list[float]) -> dict:
    """A report's view of a loss history: first, last, min and at most ~50 evenly spaced points."""
    if not history:
        return {"steps": 0}
    k = max(1, len(history) // 50)  # at most ~50 points for the report
    return {"steps": len(history), "first": history[0], "last": history[-1], "min": min(history),
            "every": k, "curve": history[::k]}


def build_report(config: RotateConfig, rotations: Mapping[str, torch.Tensor], solves: Mapping[str, SolveResult],
                 seconds: float, resumed: Partial | None = None, checkpoint=None) -> dict:
    """``report.json`` of a run: the config (``"config"``, :meth:`RotateConfig.to_json`), its main
    settings at the top level, the losses of each phase and the worst orthogonality error."""
    report = {
        "method": config.method,
        "rotations": list(config.rotations),
        "solver": config.solver_name,
        "steps": config.phase_steps() if config.learned else 0,
        "lr": config.effective_lr,
        "seed": config.seed,
        "include_embeddings": config.include_embeddings,
        "sample_fraction": config.compute.sample_fraction,
        **({"sim_quant": config.spinquant.sim_quant.to_dict(), "batch_size": config.spinquant.batch_size,
            "micro_batch_size": config.spinquant.micro_batch_size or config.spinquant.batch_size, "lr_schedule": "cosine"}
           if config.entry.simulates_quantization else {}),
        "device": config.compute.device,
        "dtype": config.compute.dtype,
        "seconds": seconds,
        "orthogonality_error": max(orthogonality_error(R) for R in rotations.values()),
        "loss": {p: loss_summary(r.history) | {"final": r.final_loss, "orthogonality_error": r.orthogonality_error,
                                               "evaluations": r.num_evaluations, "stop_reason": r.stop_reason,
                                               "reorthogonalizations": r.num_reorthogonalizations}
                 for p, r in solves.items()},
        "config": config.to_json(),
    }
    if config.solve.stop:
        report["stop"] = dict(config.solve.stop)
    if resumed is not None:
        report["resumed"] = {"from": str(checkpoint), "phase": resumed.phase, "steps_done": resumed.step}
    return report
