"""The grid each quantizer records (WeightQuantParams) reproduces its fake-quantized weight exactly."""

from __future__ import annotations

import pytest
import torch

from orthoopt.quant import QuantSpec, gptq_quantize, quantize_rtn, quantize_rtn_params
from orthoopt.quant.quantizer import WeightQuantParams


def dequant(params: WeightQuantParams, codes: torch.Tensor) -> torch.Tensor:
    scale, zero = params.scale[:, params.group_index], params.zero[:, params.group_index]
    return scale * (codes.to(scale.dtype) - zero)


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group", [None, 16])
def test_rtn_params_reproduce_the_weight(sym, group):
    spec = QuantSpec(bits=4, symmetric=sym, group_size=group, mse=not sym)
    W = torch.randn(24, 64, generator=torch.Generator().manual_seed(0))
    Q, params = quantize_rtn_params(W, spec)
    assert torch.equal(Q, quantize_rtn(W, spec))
    assert params.scale.shape == (24, 64 // (group or 64)) and params.group_index.shape == (64,)
    codes = params.codes(Q, spec)
    assert codes.min() >= spec.qmin and codes.max() <= spec.qmax
    assert torch.equal(dequant(params, codes), Q)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_params_reproduce_the_weight_with_act_order_groups(act_order):
    gen = torch.Generator().manual_seed(1)
    W = torch.randn(16, 64, generator=gen)
    X = torch.randn(256, 64, generator=gen) * torch.linspace(0.1, 3.0, 64)
    spec = QuantSpec(bits=3, symmetric=False, group_size=16)
    r = gptq_quantize(W, 2 * X.T @ X / 256, spec, act_order=act_order, block_size=8)
    params = WeightQuantParams(r.scale, r.zero, r.group_index)
    assert torch.equal(dequant(params, params.codes(r.weight, spec)), r.weight)
    consecutive = torch.equal(r.group_index, torch.arange(64) // 16)
    assert consecutive != act_order  # act-order groups follow the processing order (g_idx), not the columns
