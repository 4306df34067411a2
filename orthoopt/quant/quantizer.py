"""The uniform quantizer shared by weights (RTN, GPTQ) and activations.

The grid itself (``QuantSpec``, ``find_params``, ``fake_quantize``, ``quantize_rows``,
``quantize_groups``; formulas and conventions) is :mod:`orthoopt.core.grid`, which the objectives use
too; it is re-exported here under its historical names. This module adds what only the model side
needs: the grid a quantized weight was stored on, for exporters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from orthoopt.core.grid import (  # noqa: F401  (re-exported)
    MAX_BITS,
    MIN_BITS,
    QuantSpec,
    _params_for_range,
    fake_quantize,
    find_params,
    quantize_groups,
    quantize_rows,
    quantize_tokens,
    straight_through,
)


@dataclass
class WeightQuantParams:
    """The grid a weight ``W`` (``[out, in]``) was quantized on, for exporters that store integer codes.

    scale, zero: ``[out, groups]``; column ``j`` of ``W`` uses ``scale[:, group_index[j]]`` and
                 ``zero[:, group_index[j]]`` (with GPTQ act-order, group ``k`` is in processing order).
    group_index: ``[in]`` long tensor.

    MoE expert tensors ``W`` (``[experts, out, in]``) carry a leading expert dimension on all three
    (``[experts, out, groups]``, ``[experts, in]``): slice ``e`` is the grid of ``W[e]``.
    """

    scale: torch.Tensor
    zero: torch.Tensor
    group_index: torch.Tensor

    def codes(self, weight: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
        """Integer codes ``q`` (``[out, in]`` long, in ``[spec.qmin, spec.qmax]``) of a weight on this grid:
        for the fake-quantized weight ``scale * (q - zero)`` they are exactly the ``q`` it came from.
        Expert tensors: ``[experts, out, in]``, slice by slice."""
        if self.scale.ndim == 3:
            return torch.stack([WeightQuantParams(s, z, g).codes(w, spec)
                                for s, z, g, w in zip(self.scale, self.zero, self.group_index, weight)])
        scale = self.scale[:, self.group_index].to(torch.float64)
        zero = self.zero[:, self.group_index].to(torch.float64)
        q = torch.round(weight.to(torch.float64) / scale) + zero
        return torch.clamp(q, spec.qmin, spec.qmax).long()
