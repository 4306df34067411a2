"""Round-to-nearest (RTN) weight quantization: every weight independently to its nearest grid point."""

from __future__ import annotations

import torch

from orthoopt.errors import InvalidInputError
from orthoopt.quant.quantizer import QuantSpec, WeightQuantParams, quantize_groups


def quantize_rtn(weight: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Fake-quantized copy of a linear weight ``W`` (``[out, in]``), one scale per output row or group.

    Groups are ``spec.group_size`` consecutive input columns. Computed in float32 (or float64 if ``W``
    is float64); the result has ``W``'s dtype.
    """
    return quantize_rtn_params(weight, spec)[0]


def quantize_rtn_params(weight: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, WeightQuantParams]:
    """:func:`quantize_rtn` and the grid it used: ``(Q, params)`` with ``params.scale``/``params.zero``
    of shape ``[out, groups]`` (float32, or float64 for a float64 ``W``) and ``params.group_index[j] =
    j // group_size``."""
    if weight.ndim != 2:
        raise InvalidInputError(f"quantize_rtn expects a 2-D [out, in] weight, got shape {tuple(weight.shape)}")
    work = weight if weight.dtype == torch.float64 else weight.float()
    rows, n = work.shape
    g = spec.group_size or n
    q, scale, zero = quantize_groups(work, spec, "quantize_rtn")
    q = q.to(weight.dtype)
    group_index = torch.arange(n, device=weight.device) // g
    return q, WeightQuantParams(scale.reshape(rows, n // g), zero.reshape(rows, n // g), group_index)
