"""Checks on tensors and devices shared by every entry point (CLI and API), with messages that name
the offending tensor: no data (the ``meta`` device), NaN or inf weights, an unusable device."""

from __future__ import annotations

import torch
from torch import nn

META_HINT = ("it holds no data (the 'meta' device, e.g. a model built under init_empty_weights or loaded with "
             "device_map='meta'); load the real weights first")


def check_device(device: torch.device | str | None, what: str = "device") -> torch.device | None:
    """``torch.device(device)`` (None stays None) after checking it can compute: not ``meta``, a known
    type, and for CUDA an available GPU. Raises ValueError."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"{what} {device!r} is not a device ({e})") from None
    if dev.type == "meta":
        raise ValueError(f"{what} 'meta' cannot compute: meta tensors hold no data; use cpu or cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{what} {device!r}: CUDA is not available on this machine")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"{what} {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def check_not_meta(t: torch.Tensor, what: str) -> None:
    """Raise ValueError naming ``what`` if ``t`` is on the meta device."""
    if isinstance(t, torch.Tensor) and t.is_meta:
        raise ValueError(f"{what} is on the meta device: {META_HINT}")


def check_finite_tensor(t: torch.Tensor, what: str) -> None:
    """Raise ValueError naming ``what`` and the count if ``t`` holds NaN or inf (meta: see :func:`check_not_meta`)."""
    check_not_meta(t, what)
    if not (t.is_floating_point() or t.is_complex()) or t.numel() == 0:
        return
    # fast path: NaN and inf propagate through a sum (~15x faster than isfinite().all() on the CPU); a
    # non-finite sum of finite values (overflow) falls through to the exact count, which then passes
    acc = None if t.is_complex() or t.dtype == torch.float64 else torch.float32
    if bool(torch.isfinite(t.sum(dtype=acc))):
        return
    if not bool(torch.isfinite(t).all()):
        bad, nan = int((~torch.isfinite(t)).sum()), int(torch.isnan(t).sum())
        raise ValueError(f"{what} has {bad} non-finite value(s) of {t.numel()} ({nan} NaN, {bad - nan} inf)")


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


__all__ = ["check_device", "check_finite_tensor", "check_model_weights", "check_not_meta"]
