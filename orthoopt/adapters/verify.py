"""Check that a write-back kept a model's function: relative error of logits."""

from __future__ import annotations

import torch
from torch import nn

from orthoopt.errors import InvalidInputError


@torch.no_grad()
def logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """float64 logits ``[batch, seq, vocab]`` of ``model`` on ``input_ids`` ``[batch, seq]`` (or ``[seq]``)."""
    ids = input_ids if input_ids.ndim == 2 else input_ids.reshape(1, -1)
    device = next(model.parameters()).device
    return model(input_ids=ids.to(device), use_cache=False).logits.to(torch.float64).cpu()


def logits_relative_error(model_a: nn.Module, model_b: nn.Module, input_ids: torch.Tensor) -> float:
    """``||L_b - L_a||_F / ||L_a||_F`` of the two models' logits on ``input_ids`` (in float64)."""
    a, b = logits(model_a, input_ids), logits(model_b, input_ids)
    if a.shape != b.shape:
        raise InvalidInputError(f"logit shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    return ((b - a).norm() / a.norm().clamp_min(torch.finfo(torch.float64).tiny)).item()
