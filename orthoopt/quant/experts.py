"""Quantization of MoE expert tensors (Mixtral, Qwen2-MoE, Qwen3-MoE in transformers 5).

transformers 5 stores the routed experts of one MoE block as two 3-D parameters of one ``*Experts``
module (``mlp.experts``): ``gate_up_proj`` ``[experts, 2 * inter, hidden]`` (gate rows, then up rows)
and ``down_proj`` ``[experts, hidden, inter]``. The module is called as ``experts(x, top_k_index,
top_k_weights)`` with ``x`` ``[tokens, hidden]`` (the post-attention-norm hidden states, flattened) and
the router's choice ``top_k_index`` / ``top_k_weights`` ``[tokens, k]``; expert ``e`` computes, for the
tokens ``t`` routed to it, ``y_t = down[e] (act(gate[e] x_t) * up[e] x_t)`` and adds ``w_{t,e} y_t``.
Each expert's ``[out, in]`` slice is therefore a linear layer of its own, reading only its routed rows.

What this module provides, with the same grid (:mod:`orthoopt.core.grid`) as ``nn.Linear`` weights:

* :func:`expert_params` / :func:`quantized_expert_tensors`: which 3-D tensors a layer has (the
  architecture table's ``Proj(experts=True, quantize=True)``); routers (``quantize=False``) are not
  among them and stay in full precision.
* :func:`quantize_experts_rtn`: RTN of every expert slice ``W[e]`` per output row (or per group of
  ``group_size`` input columns), exactly :func:`orthoopt.quant.rtn.quantize_rtn_params` of each slice;
  the grid is returned with a leading expert dimension (:class:`WeightQuantParams` with ``scale``/``zero``
  ``[experts, out, groups]``, ``group_index`` ``[experts, in]``).
* :func:`routed_inputs` and :func:`expert_hessian`: the calibration inputs of one expert (the routed
  hidden rows for ``gate_up``; ``act(gate) * up`` of those rows, computed with the current, i.e. already
  quantized, ``gate_up`` for ``down``), for GPTQ (:mod:`orthoopt.quant.sequential`).
* :func:`gptq_experts`: GPTQ of every expert slice with its own Hessian; an expert that received no
  calibration token falls back to RTN (a warning names it; GPTQ would have no Hessian to work with).
* :func:`install_experts_act_quant`: activation fake-quant of the experts' inputs (the routed hidden
  states before ``gate_up``, and the hidden ``act(gate) * up`` before ``down``, which is internal to the
  experts module): the module's ``forward`` is replaced, for as long as the hook is installed, by
  :func:`experts_forward`, the eager per-expert loop with the two quantizers (per token).

Only the standard layout is handled (concatenated ``[gate; up]``, not transposed, no bias, gated, no
post-expert norm: the ``use_experts_implementation`` defaults, which all three architectures use);
:func:`check_experts_module` refuses any other with the reason.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn

from orthoopt.adapters.arch_table import EXPERT_PARAMS
from orthoopt.adapters.archs import ArchSpec, LayerModules
from orthoopt.errors import InvalidInputError
from orthoopt.quant.gptq import HessianAccumulator, gptq_quantize
from orthoopt.quant.quantizer import QuantSpec, WeightQuantParams
from orthoopt.quant.rtn import quantize_rtn_params

GATE_UP, DOWN = EXPERT_PARAMS  # the architecture table's names of the fused experts' tensors


def expert_params(spec: ArchSpec, L: LayerModules) -> dict[str, tuple[nn.Module, str]]:
    """``{role: (experts module, parameter name)}`` of the expert tensors the weight quantizers quantize
    in layer ``L`` (``Proj.experts`` and ``Proj.quantize``), in table order; empty for a dense layer."""
    return {r: (m, spec.proj(r).param) for r, m in L.projs.items()
            if spec.proj(r).experts and spec.proj(r).quantize}


def quantized_expert_tensors(spec: ArchSpec, L: LayerModules) -> dict[str, torch.Tensor]:
    """``{parameter name relative to the decoder ("layers.0.mlp.experts.gate_up_proj"): 3-D tensor}``."""
    return {L.param_name(spec, r): getattr(m, p) for r, (m, p) in expert_params(spec, L).items()}


def check_experts_module(module: nn.Module, name: str = "experts") -> None:
    """Raise ValueError unless ``module`` is a fused experts module of the standard layout (module docstring)."""
    gu, down = getattr(module, GATE_UP, None), getattr(module, DOWN, None)
    problems = []
    if not isinstance(gu, torch.Tensor) or not isinstance(down, torch.Tensor) or gu.ndim != 3 or down.ndim != 3:
        problems.append("no 3-D gate_up_proj and down_proj tensors")
    else:
        e, two_i, h = gu.shape
        if two_i % 2 or tuple(down.shape) != (e, h, two_i // 2):
            problems.append(f"gate_up_proj {tuple(gu.shape)} and down_proj {tuple(down.shape)} are not "
                            "[experts, 2 * inter, hidden] and [experts, hidden, inter]")
    for attr, want in (("has_gate", True), ("is_transposed", False), ("has_bias", False),
                       ("is_concatenated", True), ("has_post_expert_norm", False)):
        if getattr(module, attr, want) != want:
            problems.append(f"{attr}={getattr(module, attr)!r}")
    if not callable(getattr(module, "act_fn", None)):
        problems.append("no act_fn")
    if problems:
        raise InvalidInputError(f"{name} ({type(module).__name__}) is not a supported fused experts module: "
                         + "; ".join(problems))


def quantize_experts_rtn(weight: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, WeightQuantParams]:
    """RTN of a ``[experts, out, in]`` tensor, slice by slice: ``(Q, params)`` with ``Q[e], params[e] =
    quantize_rtn_params(weight[e], spec)``; ``params.scale``/``zero`` ``[experts, out, groups]``,
    ``params.group_index`` ``[experts, in]``."""
    if weight.ndim != 3:
        raise InvalidInputError(f"quantize_experts_rtn expects a 3-D [experts, out, in] tensor, got {tuple(weight.shape)}")
    results = [quantize_rtn_params(w, spec) for w in weight]
    return torch.stack([q for q, _ in results]), stack_params([p for _, p in results])


def stack_params(params: list[WeightQuantParams]) -> WeightQuantParams:
    """One :class:`WeightQuantParams` with a leading expert dimension from one per expert."""
    return WeightQuantParams(torch.stack([p.scale for p in params]), torch.stack([p.zero for p in params]),
                             torch.stack([p.group_index for p in params]))


def routed_tokens(top_k_index: torch.Tensor, expert: int) -> torch.Tensor:
    """Indices of the tokens (rows of ``top_k_index``, ``[tokens, k]``) routed to ``expert``, ascending."""
    return (top_k_index == expert).any(dim=-1).nonzero().flatten()


def routed_inputs(module: nn.Module, param: str, hidden: torch.Tensor, top_k_index: torch.Tensor,
                  expert: int) -> torch.Tensor:
    """The rows expert ``expert``'s ``param`` reads: ``hidden[routed]`` for ``gate_up_proj``;
    ``act(gate) * up`` of those rows (with the module's current ``gate_up_proj[expert]``) for ``down_proj``.
    ``[routed tokens, in]``."""
    x = hidden[routed_tokens(top_k_index, expert)]
    if param == GATE_UP:
        return x
    if param != DOWN:
        raise InvalidInputError(f"unknown expert tensor {param!r} (expected {GATE_UP!r} or {DOWN!r})")
    gate, up = nn.functional.linear(x, getattr(module, GATE_UP)[expert]).chunk(2, dim=-1)
    return module.act_fn(gate) * up


def expert_hessian(module: nn.Module, param: str, captured: list[tuple[torch.Tensor, torch.Tensor]],
                   expert: int, dtype: torch.dtype = torch.float32) -> HessianAccumulator:
    """GPTQ's ``2 X^T X / tokens`` of expert ``expert``'s ``param`` over the captured experts-module
    inputs ``[(hidden [tokens, hidden], top_k_index [tokens, k]), ...]`` (one per calibration window)."""
    W = getattr(module, param)
    acc = HessianAccumulator(W.shape[-1], dtype=dtype, device=W.device)
    for hidden, idx in captured:
        acc.add(routed_inputs(module, param, hidden, idx, expert))
    return acc


@torch.no_grad()
def gptq_experts(module: nn.Module, param: str, captured: list[tuple[torch.Tensor, torch.Tensor]],
                 spec: QuantSpec, *, name: str = "experts", block_size: int = 128, percdamp: float = 0.01,
                 act_order: bool = False) -> tuple[float, WeightQuantParams, list[int]]:
    """GPTQ of every expert slice of ``module.<param>`` in place, each with its own Hessian from the
    tokens routed to it (:func:`expert_hessian`; one Hessian in memory at a time).

    Returns ``(loss, params, rtn_experts)``: the sum of GPTQ's loss estimates over the experts, the grid
    with a leading expert dimension, and the experts that received no calibration token and were
    quantized by RTN instead (with a warning naming them).
    """
    W = getattr(module, param)
    dtype = torch.float64 if W.dtype == torch.float64 else torch.float32
    loss, params, rtn = 0.0, [], []
    for e in range(W.shape[0]):
        acc = expert_hessian(module, param, captured, e, dtype)
        if acc.tokens == 0:
            q, p = quantize_rtn_params(W[e], spec)
            rtn.append(e)
        else:
            r = gptq_quantize(W[e], acc.hessian, spec, block_size=block_size, percdamp=percdamp, act_order=act_order)
            q, p = r.weight, WeightQuantParams(r.scale, r.zero, r.group_index)
            loss += r.loss
        W[e].copy_(q)
        params.append(p)
    if rtn:
        warnings.warn(f"GPTQ: {name}.{param}: experts {rtn} received no calibration token; quantized by RTN",
                      stacklevel=2)
    return loss, stack_params(params), rtn


def experts_forward(module: nn.Module, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                    quant_in: Callable | None = None, quant_hidden: Callable | None = None) -> torch.Tensor:
    """The experts module's function, evaluated expert by expert, with ``quant_in`` applied to the routed
    hidden rows before ``gate_up`` and ``quant_hidden`` to ``act(gate) * up`` before ``down`` (either None:
    full precision). ``hidden`` ``[tokens, hidden]``; returns ``[tokens, hidden]`` in ``hidden``'s dtype."""
    out = torch.zeros_like(hidden)
    gate_up, down = getattr(module, GATE_UP), getattr(module, DOWN)
    if quant_in is not None:  # per token: the same as quantizing each routed row
        hidden = quant_in(hidden)
    for e in top_k_index.unique().tolist():
        if not 0 <= e < gate_up.shape[0]:  # transformers marks dropped slots with num_experts
            continue
        pos = (top_k_index == e)
        tokens = pos.any(dim=-1).nonzero().flatten()
        weight = (top_k_weights * pos).sum(dim=-1)[tokens]
        gate, up = nn.functional.linear(hidden[tokens], gate_up[e]).chunk(2, dim=-1)
        h = module.act_fn(gate) * up
        if quant_hidden is not None:
            h = quant_hidden(h)
        y = nn.functional.linear(h, down[e]) * weight.unsqueeze(-1).to(h.dtype)
        out = out.index_add(0, tokens, y.to(out.dtype))
    return out


class ExpertsQuantHandle:
    """Undoes :func:`install_experts_act_quant` on one module (``remove()``)."""

    def __init__(self, module: nn.Module):
        self.module = module

    def remove(self) -> None:
        if "forward" in self.module.__dict__:
            del self.module.forward


def install_experts_act_quant(module: nn.Module, quant: Callable, name: str = "experts") -> ExpertsQuantHandle:
    """Replace ``module.forward`` (an instance attribute, removed by the handle) by
    :func:`experts_forward` with ``quant`` on both expert inputs. ``quant(x) -> x'`` of the same shape."""
    check_experts_module(module, name)
    if "forward" in module.__dict__:
        raise InvalidInputError(f"{name} already has activation quantization installed")

    def forward(hidden_states, top_k_index, top_k_weights):
        return experts_forward(module, hidden_states, top_k_index, top_k_weights, quant, quant)

    module.forward = forward
    return ExpertsQuantHandle(module)
