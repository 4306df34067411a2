"""GPTQ on a whole decoder, layer by layer, as in the reference algorithm.

1. The inputs of decoder layer 0 for every calibration window are captured by swapping the layers for
   recorders that store what the model passes them (hidden states, and for each layer its keyword
   arguments: attention mask, ``position_embeddings``, ``position_ids``, ...) and stop the forward.
2. For each decoder layer, the linears are quantized in the reference's sequential order: the
   architecture table's input-sharing groups in forward order (``ArchSpec.groups``; Llama:
   q/k/v together, o, gate/up together, down). For each group, the layer is
   run on all windows with hooks accumulating each linear's input Hessian (the groups before it
   already quantized), then every linear of the group is quantized with :func:`gptq_quantize`
   ("true sequential", the GPTQ reference's ``--true-sequential`` and AutoGPTQ's default). With
   ``true_sequential=False`` the whole layer is one group: one pass collects every linear's Hessian
   from the layer's unquantized function (llm-compressor's ``GPTQModifier``), so a layer costs two
   forward passes instead of up to five.
3. The quantized layer's outputs become the next layer's inputs.

MoE expert tensors (:mod:`orthoopt.quant.experts`) take part in their group's pass: a forward
pre-hook on the experts module records its inputs (hidden rows and the router's top-k indices) for
every window; then each expert's slice is quantized with its own Hessian, from the rows routed to it
(``gate_up``) or from ``act(gate) * up`` of those rows with the already-quantized ``gate_up``
(``down``, the next group), one expert at a time. An expert that no calibration token reaches is
quantized by RTN (with a warning; listed in ``rtn_experts``). ``down`` is computed from the quantized
``gate_up`` in both modes: with ``true_sequential=False`` the two share one pass, so this is the one
Hessian there that is not taken from the layer's unquantized function.

Any forward pre-hooks on the linears (e.g. the online Hadamard of :mod:`orthoopt.quant.act`) act
during calibration, so the Hessians describe the inputs the linears really see.
"""

from __future__ import annotations

import sys

import torch
from torch import nn
from tqdm.auto import tqdm

from orthoopt.adapters.archs import layer_output, locate
from orthoopt.adapters.recording import StopForward, record_layer_inputs
from orthoopt.errors import InvalidInputError
from orthoopt.quant.experts import expert_params, gptq_experts
from orthoopt.quant.gptq import GPTQFactor, HessianAccumulator, gptq_factor, gptq_quantize
from orthoopt.quant.quantizer import QuantSpec, WeightQuantParams

def _layer_list(model: nn.Module) -> nn.ModuleList:
    spec = locate(model).spec
    return getattr(getattr(model, spec.decoder), spec.layers)


def capture_layer_inputs(model: nn.Module, calib: torch.Tensor) -> tuple[list[torch.Tensor], list[dict]]:
    """Inputs of decoder layer 0 (one ``[1, seq_len, hidden]`` tensor per window of ``calib``) and the
    keyword arguments the model passes each decoder layer (those of the first window; the windows
    are unpadded and equally long, so masks and positions are the same for all)."""
    hidden, kwargs = record_layer_inputs(model, _layer_list(model), [row.unsqueeze(0) for row in calib])
    return hidden, kwargs[0]


def _collect_hessians(layer: nn.Module, linears: dict[str, nn.Linear], inputs, kwargs,
                      experts: dict[str, nn.Module] | None = None) -> dict[str, HessianAccumulator]:
    """Run ``layer`` on every input, accumulating the input Hessian of each of ``linears``.

    ``experts`` (``{name: fused experts module}``): their inputs ``(hidden [tokens, hidden],
    top_k_index [tokens, k])`` are appended, one pair per window, to ``captured[name]`` (the returned
    dict's entry ``name`` is that list instead of an accumulator).

    Inputs are taken by forward pre-hooks, registered after any others (so they see what the linear
    computes on, e.g. after an online Hadamard), and each forward stops as soon as all of ``linears``
    and ``experts`` have seen their input: the last of them never runs. Linears handed the very same
    input tensor in a forward (q/k/v, gate/up) share one accumulator: the Hessian is computed once.
    Hessians are float32 (float64 for float64 weights).
    """
    experts = experts or {}
    accs = {
        name: HessianAccumulator(
            lin.in_features,
            dtype=torch.float64 if lin.weight.dtype == torch.float64 else torch.float32,
            device=lin.weight.device,
        )
        for name, lin in linears.items()
    }
    accs.update({name: [] for name in experts})
    seen: set[str] = set()
    inputs_seen: list[tuple[torch.Tensor, str]] = []  # this forward's (input, first linear fed it)
    shares: dict[str, str] = {}  # linear -> the linear whose accumulator it shares (fixed by window 1)

    def hook(name, module, args):
        x = args[0]
        owner = next((n for t, n in inputs_seen if t is x), None)
        if name not in shares:  # first window: decide whether it shares its input with an earlier linear
            shares[name] = name if owner is None else owner
        if shares[name] == name:
            accs[name].add(x)
            inputs_seen.append((x, name))
        elif owner != shares[name]:
            raise RuntimeError(f"{name}: its input was shared with {shares[name]} in the first window, not in a later one")
        seen.add(name)
        if len(seen) == len(linears) + len(experts):
            raise StopForward

    def expert_hook(name, module, args, kwargs):
        hidden = (args[0] if args else kwargs["hidden_states"]).detach()
        hidden = hidden.reshape(-1, hidden.shape[-1])
        idx = args[1] if len(args) > 1 else kwargs["top_k_index"]
        accs[name].append((hidden, idx.detach().reshape(hidden.shape[0], -1)))
        seen.add(name)
        if len(seen) == len(linears) + len(experts):
            raise StopForward

    handles = [lin.register_forward_pre_hook(lambda m, a, n=name: hook(n, m, a)) for name, lin in linears.items()]
    handles += [mod.register_forward_pre_hook(lambda m, a, k, n=name: expert_hook(n, m, a, k), with_kwargs=True)
                for name, mod in experts.items()]
    try:
        for x in inputs:
            seen.clear()
            inputs_seen.clear()
            try:
                layer(x, **kwargs)
            except StopForward:
                pass
    finally:
        for h in handles:
            h.remove()
    for name, owner in shares.items():
        accs[name] = accs[owner]
    return accs


def check_calib(calib) -> None:
    """Raise ValueError unless ``calib`` is a non-empty ``[nsamples, seq_len]`` LongTensor."""
    if not isinstance(calib, torch.Tensor) or calib.ndim != 2 or calib.dtype != torch.long or calib.numel() == 0:
        got = f"{calib.dtype} {tuple(calib.shape)}" if isinstance(calib, torch.Tensor) else type(calib).__name__
        raise InvalidInputError(f"calib must be a non-empty [nsamples, seq_len] LongTensor of token ids, got {got}")


@torch.no_grad()
def gptq_quantize_model(
    model: nn.Module,
    calib: torch.Tensor,
    spec: QuantSpec,
    *,
    act_order: bool = False,
    percdamp: float = 0.01,
    block_size: int = 128,
    progress: bool = True,
    params: dict[str, WeightQuantParams] | None = None,
    rtn_experts: dict[str, list[int]] | None = None,
    true_sequential: bool = True,
    onload=None,
) -> dict[str, float]:
    """Quantize every decoder-layer linear and MoE expert tensor of ``model`` in place with GPTQ.

    ``calib``: ``[nsamples, seq_len]`` token ids (see :func:`orthoopt.quant.calib.calibration_batches`).
    Embeddings, ``lm_head`` and routers are not touched. Returns GPTQ's loss estimate per linear, keyed
    by module name relative to the decoder (``"layers.3.mlp.down_proj"``), and per expert tensor (the
    sum over its experts), keyed by parameter name (``"layers.3.mlp.experts.down_proj"``). When
    ``params`` is a dict, it receives each one's grid (scale, zero, group index; expert tensors with a
    leading expert dimension) under the same keys; when ``rtn_experts`` is a dict, it receives, per
    expert tensor, the experts quantized by RTN for want of calibration tokens. ``true_sequential``:
    the layer's input-sharing groups one after the other (default), or the whole layer at once (module doc).
    ``onload``: for a model whose layers stay on disk, an object whose ``load_layer(i)`` is called before
    layer ``i`` is touched and ``finish_layer(i)`` once its outputs are computed (None: all in memory).
    """
    check_calib(calib)
    located = locate(model)
    layers = _layer_list(model)
    inputs, layer_kwargs = capture_layer_inputs(model, calib)
    groups = located.spec.groups if true_sequential else (tuple(r for g in located.spec.groups for r in g),)
    losses: dict[str, float] = {}
    for i in tqdm(range(len(layers)), desc="GPTQ layers", disable=not progress, file=sys.stderr):
        if onload is not None:
            onload.load_layer(i)
        layer, mods = layers[i], located.layers[i]
        quantized = mods.quant_linears(located.spec)
        expert_tensors = expert_params(located.spec, mods)
        for group in groups:
            linears = {mods.names[role]: quantized[role] for role in group if role in quantized}
            roles = [r for r in group if r in expert_tensors]
            if not linears and not roles:
                continue
            modules = {mods.names[r]: expert_tensors[r][0] for r in roles}
            accs = _collect_hessians(layer, linears, inputs, layer_kwargs[i], modules)
            for r in roles:
                (mod, param), name = expert_tensors[r], mods.param_name(located.spec, r)
                loss, grid, rtn = gptq_experts(
                    mod, param, accs[mods.names[r]], spec, name=mods.names[r],
                    block_size=block_size, percdamp=percdamp, act_order=act_order,
                )
                losses[name] = loss
                if params is not None:
                    params[name] = grid
                if rtn_experts is not None:
                    rtn_experts[name] = rtn
            factors: dict[int, GPTQFactor] = {}  # one factorization per shared accumulator (q/k/v, gate/up)
            for name, lin in linears.items():
                acc = accs[name]
                if id(acc) not in factors:
                    dtype = torch.float64 if lin.weight.dtype == torch.float64 else torch.float32
                    factors[id(acc)] = gptq_factor(acc.hessian.to(lin.weight.device), percdamp=percdamp,
                                                   act_order=act_order, dtype=dtype)
                result = gptq_quantize(
                    lin.weight, factors[id(acc)], spec,
                    block_size=block_size, percdamp=percdamp, act_order=act_order,
                )
                lin.weight.copy_(result.weight)
                losses[name] = result.loss
                if params is not None:
                    params[name] = WeightQuantParams(result.scale, result.zero, result.group_index)
            del factors  # not alive through the next group's Hessians (down_proj's U: 822 MB at 8B)
        inputs = [layer_output(layer(x, **layer_kwargs[i])) for x in inputs]
        if onload is not None:
            onload.finish_layer(i)
    return losses
