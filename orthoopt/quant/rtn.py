"""Round-to-nearest (RTN) weight quantization: every weight independently to its nearest grid point."""

from __future__ import annotations

import torch

from orthoopt.quant.quantizer import QuantSpec, quantize_rows


def quantize_rtn(weight: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Fake-quantized copy of a linear weight ``W`` (``[out, in]``), one scale per output row or group.

    Groups are ``spec.group_size`` consecutive input columns. Computed in float32 (or float64 if ``W``
    is float64); the result has ``W``'s dtype.
    """
    if weight.ndim != 2:
        raise ValueError(f"quantize_rtn expects a 2-D [out, in] weight, got shape {tuple(weight.shape)}")
    work = weight if weight.dtype == torch.float64 else weight.float()
    return quantize_rows(work, spec).to(weight.dtype)
