"""The rotated, fake-quantized causal-LM loss as a function of the rotations (SpinQuant's objective).

:class:`RotatedQuantLM` is the model-side half of SpinQuant (Liu et al., 2024): a callable
``loss_fn(rotations, ids) -> scalar`` that evaluates the causal-LM cross-entropy of the model as it
would be after fusing ``rotations`` (``{"R1": [hidden, hidden], "R2.i": [head_dim, head_dim]}``,
``docs/conventions.md``) and quantizing it, without changing the model. It is differentiable in the
rotations (autograd through the whole network), so :class:`orthoopt.objectives.QuantizedLMLoss`
can hand it to any solver; objectives never see the model, only this callable.

What one call does (norms must be fused, :meth:`orthoopt.adapters.DecoderAdapter.fuse_norms`):

* every decoder-layer projection of the architecture table gets its rotated weight through
  ``torch.func.functional_call`` (the model's parameters are not touched), computed by the write-back's
  own :func:`orthoopt.adapters.writeback.rotate_layer` in the rotations' dtype (Llama: q, k, gate, up
  ``W @ R1``; v ``blockdiag(R2).T @ W @ R1``, bias ``b @ blockdiag(R2)``; o ``R1.T @ W @ blockdiag(R2)``;
  down ``R1.T @ W``, ``@ H`` too with the online R4 Hadamard; o/down biases ``b @ R1``);
* then the rotated weights are RTN fake-quantized (``wbits < 16``) with a straight-through estimator
  (forward value quantized, gradient of the identity), as in SpinQuant's training; MoE expert tensors
  ``[experts, out, in]`` per row of every expert's slice (the grid of
  :func:`orthoopt.quant.experts.quantize_experts_rtn`), routers in full precision;
* the token embedding and ``lm_head`` stay in full precision, so instead of rotating their
  ``[vocab, hidden]`` matrices the embedding's output is multiplied by ``R1`` and ``lm_head``'s input by
  ``R1.T`` (identical values, no vocabulary-sized products);
* activation fake-quant / online R4 (:mod:`orthoopt.quant.act`) and R3 / K-V quantization
  (:mod:`orthoopt.quant.kv`) are installed for the duration of the call; their quantizers are
  straight-through under autograd.

A rotation missing from ``rotations`` acts as the identity. With everything at 16 bits the loss
does not depend on the rotations (the rotated network computes the same function).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.func import functional_call

from orthoopt.adapters.decoder import DecoderAdapter
from orthoopt.adapters.writeback import layer_params, rotate_layer
from orthoopt.core.grid import check_bits_or_off, straight_through
from orthoopt.errors import InvalidInputError
from orthoopt.hadamard import hadamard_transform
from orthoopt.quant.act import ActQuantConfig, _intermediate_size, _r4_linears, install_act_quant
from orthoopt.quant.experts import check_experts_module, expert_params, quantized_expert_tensors
from orthoopt.quant.kv import KVQuantConfig, install_kv_quant
from orthoopt.quant.quantizer import QuantSpec, quantize_rows


@dataclass(frozen=True)
class SimQuantConfig:
    """The quantization the loss simulates (SpinQuant trains its rotations for the target setting).

    wbits:        weight bits of every decoder-layer linear (16 = full precision), RTN.
    w_group_size: input columns per weight scale (None: one scale per output channel).
    w_sym:        symmetric weight grid.
    w_mse:        per-row MSE clipping search (GPTQ's ``mse``, SpinQuant's ``--w_clip``); slower.
    act:          activation quantization and online R4 (:class:`~orthoopt.quant.act.ActQuantConfig`).
    kv:           R3 and K/V-cache quantization (:class:`~orthoopt.quant.kv.KVQuantConfig`).
    """

    wbits: int = 4
    w_group_size: int | None = None
    w_sym: bool = True
    w_mse: bool = False
    act: ActQuantConfig = field(default_factory=ActQuantConfig)
    kv: KVQuantConfig = field(default_factory=KVQuantConfig)

    def __post_init__(self) -> None:
        check_bits_or_off(self.wbits, "weight")
        if self.wbits < 16:  # validates the group size
            QuantSpec(bits=self.wbits, symmetric=self.w_sym, group_size=self.w_group_size, mse=self.w_mse)

    @property
    def weight_spec(self) -> QuantSpec | None:
        return None if self.wbits >= 16 else QuantSpec(bits=self.wbits, symmetric=self.w_sym,
                                                       group_size=self.w_group_size, mse=self.w_mse)

    def to_dict(self) -> dict:
        return {"wbits": self.wbits, "w_group_size": self.w_group_size, "w_sym": self.w_sym, "w_mse": self.w_mse,
                "act": self.act.to_dict(), "kv": self.kv.to_dict()}


class RotatedQuantLM:
    """``loss_fn(rotations, ids) -> mean causal-LM loss`` of ``model`` rotated and fake-quantized on the fly.

    model:     a supported ``*ForCausalLM`` with fused norms (the pipeline fuses them first).
    config:    :class:`SimQuantConfig`.
    rotations: which of ``"R1"``, ``"R2"`` the loss depends on (:attr:`dims`); others are ignored.

    ``ids`` is a ``[batch, seq_len]`` LongTensor; the loss is the mean next-token cross-entropy
    (``labels = ids``). The model's parameters and mode are left unchanged.
    """

    def __init__(self, model: nn.Module, config: SimQuantConfig | None = None,
                 rotations: Iterable[str] = ("R1", "R2")) -> None:
        self.model = model
        self.config = config if config is not None else SimQuantConfig()
        self.adapter = DecoderAdapter(model)
        self.adapter._require_fused("RotatedQuantLM")
        m = self.adapter.modules
        if self.config.act.online_hadamard:
            _intermediate_size(model)
        for L in m.layers if self.config.wbits < 16 or self.config.act.enabled else ():
            for role, (mod, _) in expert_params(m.spec, L).items():
                check_experts_module(mod, L.names[role])
        if self.config.w_group_size is not None and self.config.wbits < 16:
            for L in m.layers:
                for role, lin in L.quant_linears(m.spec).items():
                    if lin.in_features % self.config.w_group_size:
                        raise InvalidInputError(f"weight group_size {self.config.w_group_size} does not divide "
                                         f"{L.names[role]}'s {lin.in_features} input columns")
                for name, t in quantized_expert_tensors(m.spec, L).items():
                    if t.shape[-1] % self.config.w_group_size:
                        raise InvalidInputError(f"weight group_size {self.config.w_group_size} does not divide "
                                         f"{name}'s {t.shape[-1]} input columns")
        selected = set(rotations)
        if not selected or selected - {"R1", "R2"}:
            raise InvalidInputError(f"rotations must be a non-empty subset of ('R1', 'R2'), got {sorted(selected)}")
        self.dims = {k: n for k, n in self.adapter.rotation_dims().items()
                     if (k == "R1" and "R1" in selected) or (k.startswith("R2.") and "R2" in selected)}
        prefix = m.spec.decoder + "."
        self._param_names = {id(p): n for n, p in model.named_parameters()}
        self._prefix = prefix
        # the online R4's weight half, computed once (the model's own down_proj weights stay as they are)
        self._down_h = {}
        if self.config.act.online_hadamard:
            with torch.no_grad():
                self._down_h = {L.index: hadamard_transform(lin.weight.detach().double()).to(lin.weight.dtype)
                                for L, lin in zip(m.layers, _r4_linears(model))}

    def _name(self, p: torch.Tensor) -> str:
        return self._param_names[id(p)]

    def rotated_weights(self, rotations: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{parameter name: rotated (and fake-quantized) tensor}`` for every decoder-layer linear."""
        m = self.adapter.modules
        R1 = rotations.get("R1") if "R1" in self.dims else None
        spec = self.config.weight_spec
        out: dict[str, torch.Tensor] = {}

        def cast(W):
            dtype = R1.dtype if R1 is not None else W.dtype
            return W.to(dtype)

        for L in m.layers:
            R2 = rotations.get(f"R2.{L.index}") if f"R2.{L.index}" in self.dims else None
            params = layer_params(m, L)  # {name relative to the decoder: parameter}, from the table
            t = {k: cast(p) for k, p in params.items()}
            quantized = {L.param_name(m.spec, r): lin.weight for r, lin in L.quant_linears(m.spec).items()}
            quantized.update(quantized_expert_tensors(m.spec, L))
            if L.index in self._down_h:
                t[L.param_name(m.spec, m.spec.r4_role)] = cast(self._down_h[L.index])
            if R1 is not None or R2 is not None:
                some = next(iter(t.values()))
                t.update(rotate_layer(m.spec, t, L.prefix, None if R1 is None else R1.to(some.dtype),
                                      None if R2 is None else R2.to(some.dtype),
                                      num_heads=m.num_heads, num_kv_heads=m.num_kv_heads, dtype=None))
            for k, p in params.items():
                Wr = t[k].to(p.dtype)
                if spec is not None and k in quantized:  # expert tensors: rows of every [out, in] slice
                    work = Wr.detach() if Wr.dtype == torch.float64 else Wr.detach().float()
                    q = quantize_rows(work.reshape(-1, work.shape[-1]), spec).reshape(work.shape)
                    Wr = straight_through(Wr, q.to(p.dtype))
                out[self._name(p)] = Wr
        return out

    def __call__(self, rotations: Mapping[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
        if not isinstance(ids, torch.Tensor) or ids.dtype != torch.long or ids.ndim != 2 or ids.shape[1] < 2:
            raise InvalidInputError("ids must be a [batch, seq_len >= 2] LongTensor of token ids")
        m = self.adapter.modules
        R1 = rotations.get("R1") if "R1" in self.dims else None
        params = self.rotated_weights(rotations)
        with ExitStack() as stack:
            if R1 is not None:
                h1 = m.embed.register_forward_hook(lambda mod, args, out: out @ R1.to(out.dtype))
                stack.callback(h1.remove)
                h2 = m.lm_head.register_forward_pre_hook(lambda mod, args: (args[0] @ R1.T.to(args[0].dtype),
                                                                            *args[1:]))
                stack.callback(h2.remove)
            stack.enter_context(install_act_quant(self.model, self.config.act))
            stack.enter_context(install_kv_quant(self.model, self.config.kv))
            out = functional_call(self.model, params, (ids.to(m.embed.weight.device),),
                                  {"labels": ids.to(m.embed.weight.device), "use_cache": False}, strict=False)
        return out.loss
