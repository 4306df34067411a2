"""Checks on tensors and devices shared by every entry point (CLI and API), with messages that name
the offending tensor: no data (the ``meta`` device), NaN or inf weights, an unusable device."""

from __future__ import annotations

import torch
from torch import nn

from orthoopt.core.checks import check_finite_tensor, check_not_meta
from orthoopt.errors import InvalidInputError


def check_device(device: torch.device | str | None, what: str = "device") -> torch.device | None:
    """``torch.device(device)`` (None stays None) after checking it can compute: not ``meta``, a known
    type, and for CUDA an available GPU. Raises ValueError."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise InvalidInputError(f"{what} {device!r} is not a device ({e})") from None
    if dev.type == "meta":
        raise InvalidInputError(f"{what} 'meta' cannot compute: meta tensors hold no data; use cpu or cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidInputError(f"{what} {device!r}: CUDA is not available on this machine")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise InvalidInputError(f"{what} {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def check_model_weights(model: nn.Module, source: str | None = None, finite: bool = True) -> None:
    """Raise ValueError naming the first parameter or buffer of ``model`` that is on the meta device,
    or (``finite``) the first parameter holding NaN/inf (buffers such as attention masks may hold
    -inf by design); ``source`` (e.g. the model folder) prefixes the message."""
    prefix = f"{source}: " if source else ""
    for name, t in model.named_parameters():
        check_not_meta(t, f"{prefix}weight {name!r}")
        if finite:
            check_finite_tensor(t.detach(), f"{prefix}weight {name!r}")
    for name, t in model.named_buffers():
        check_not_meta(t, f"{prefix}buffer {name!r}")


__all__ = ["check_device", "check_model_weights"]
