"""Differentiable per-token fake quantization for the DFRot objective.

The same round-to-nearest grid as the library's quantizer (``orthoopt.quant.quantizer``, without
clipping or grouping), kept here so that objectives do not import the quantization package (which
loads models). For each row ``y`` of ``[..., n]`` with ``b`` bits:

* symmetric:  ``scale = max|y| / (2^(b-1) - 1)``, codes ``q = clamp(round(y / scale), -qmax, qmax)``,
  ``Q(y) = scale * q``;
* asymmetric: ``lo = min(min y, 0)``, ``hi = max(max y, 0)``, ``scale = (hi - lo) / (2^b - 1)``,
  ``zero = round(-lo / scale)``, ``q = clamp(round(y / scale) + zero, 0, 2^b - 1)``,
  ``Q(y) = scale * (q - zero)``.

An all-zero row gets ``scale = 1`` (it quantizes to 0). Gradients: ``round`` has derivative 0, so
the codes are constants and the gradient flows through ``scale`` only; for a loss of ``y - Q(y)``
that is its exact derivative wherever no value sits on a rounding boundary.
"""

from __future__ import annotations

import torch

MIN_BITS, MAX_BITS = 2, 8


def fake_quantize_per_token(y: torch.Tensor, bits: int, symmetric: bool = True) -> torch.Tensor:
    """Quantize-dequantize each row of ``y`` (``[..., n]``) on its own ``bits``-bit grid; same shape."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an integer in [{MIN_BITS}, {MAX_BITS}], got {bits!r}")
    zero_ = torch.zeros((), dtype=y.dtype, device=y.device)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = y.abs().amax(dim=-1, keepdim=True) / qmax
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return scale * torch.clamp(torch.round(y / scale), -qmax, qmax)
    qmax = 2**bits - 1
    lo = torch.minimum(y.amin(dim=-1, keepdim=True), zero_)
    hi = torch.maximum(y.amax(dim=-1, keepdim=True), zero_)
    scale = (hi - lo) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.round(-lo / scale)
    return scale * (torch.clamp(torch.round(y / scale) + zero, 0, qmax) - zero)
