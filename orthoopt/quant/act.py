"""Activation fake quantization (W4A8 / W4A4) and the online Hadamard before ``down_proj`` (R4).

Every linear of every decoder layer (q/k/v/o, gate/up/down) gets a forward pre-hook that fake-quantizes
its input per token (one scale per row ``x[..., :]``) with the shared uniform quantizer
(:mod:`orthoopt.quant.quantizer`). ``lm_head`` reads full-precision activations (as in QuaRot and
SpinQuant). MoE: both inputs of every expert (the routed hidden states before ``gate_up`` and
``act(gate) * up`` before ``down``) are quantized per token by a forward wrapper of the fused experts
module (:func:`orthoopt.quant.experts.install_experts_act_quant`); the routers (``mlp.gate``,
Qwen2-MoE's ``shared_expert_gate``), which stay full-precision linears (``Proj.quantize=False``), read
full-precision activations, as the weight-and-activation MoE recipes of llm-compressor/vLLM keep them
(QuaRot and SpinQuant have no MoE model).

Online Hadamard (R4 in SpinQuant's naming): with ``H = hadamard_matrix(n) / sqrt(n)`` (orthogonal,
``n`` = intermediate size), the input of ``down_proj`` becomes ``x @ H`` (before it is quantized) and
its weight ``W -> W @ H`` (docs/conventions.md: ``down_proj`` reads the rotated space, side "in"), so
``(x @ H) @ (W @ H).T = x @ W.T`` in full precision. The two halves are applied at different times:
:func:`rotate_down_proj_weights` once, before weight quantization (the checkpoint stores the rotated,
quantized weight); :func:`install_act_quant` every time the model is loaded (the hook rotates the
activation). ``quant.json`` records the Hadamard's size and a fingerprint so that a checkpoint is never
paired with a different matrix.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from orthoopt.adapters.archs import locate
from orthoopt.core.grid import check_bits_or_off
from orthoopt.errors import InvalidInputError
from orthoopt.hadamard import hadamard_matrix, hadamard_plan, hadamard_transform
from orthoopt.quant.experts import expert_params, install_experts_act_quant
from orthoopt.quant.quantizer import QuantSpec, quantize_rows



def _r4_linears(model: nn.Module) -> list[nn.Linear]:
    """The ``nn.Linear`` of each layer that gets the online Hadamard (``ArchSpec.r4_role``)."""
    m = locate(model)
    role = m.spec.r4_role
    lins = [L.projs.get(role) if role else None for L in m.layers]
    if role is None or any(not isinstance(x, nn.Linear) for x in lins):
        raise InvalidInputError(f"the online Hadamard (R4) is not supported for model_type {m.spec.model_type!r}: "
                         "no dense MLP output projection in every layer")
    return lins


@dataclass(frozen=True)
class ActQuantConfig:
    """Activation quantization of the inputs of every decoder-layer linear.

    bits:            16 (off) or 2..8 (typically 8 or 4).
    symmetric:       symmetric per-token grid, or asymmetric with a zero point.
    clip_ratio:      fixed shrink of each token's range, in (0, 1] (QuaRot uses 0.9 for A4).
    online_hadamard: rotate the ``down_proj`` input by a Hadamard (R4); see the module docstring.
    """

    bits: int = 16
    symmetric: bool = True
    clip_ratio: float = 1.0
    online_hadamard: bool = False

    def __post_init__(self) -> None:
        check_bits_or_off(self.bits, "activation")
        if not 0.0 < self.clip_ratio <= 1.0:
            raise InvalidInputError(f"activation clip_ratio must be in (0, 1], got {self.clip_ratio!r}")

    @property
    def enabled(self) -> bool:
        """True when activations are quantized (bits < 16)."""
        return self.bits < 16

    @property
    def spec(self) -> QuantSpec:
        """The per-token quantizer (only when :attr:`enabled`)."""
        if not self.enabled:
            raise InvalidInputError("activation quantization is off (bits=16)")
        return QuantSpec(bits=self.bits, symmetric=self.symmetric, clip_ratio=self.clip_ratio)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ActQuantConfig":
        unknown = set(d) - {"bits", "symmetric", "clip_ratio", "online_hadamard"}
        if unknown:
            raise InvalidInputError(f"unknown activation quantization settings: {sorted(unknown)}")
        return cls(**d)


def quantize_activations(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Per-token fake quantization of ``x`` (``[..., n]``): one scale (and zero) per row ``x[..., :]``.

    Computed in float32 (float64 for float64 input); returns ``x``'s shape and dtype.
    """
    if spec.group_size is not None:
        raise InvalidInputError("activation quantization is per token; group_size must be None")
    work = x if x.dtype == torch.float64 else x.float()
    return quantize_rows(work.reshape(-1, x.shape[-1]), spec).reshape(x.shape).to(x.dtype)


def online_hadamard_matrix(n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The orthogonal R4 matrix ``hadamard_matrix(n) / sqrt(n)`` (``[n, n]``, built in float64): the
    matrix the hooks apply with the fast :func:`orthoopt.hadamard.hadamard_transform`."""
    return (hadamard_matrix(n, dtype=torch.float64) / math.sqrt(n)).to(dtype)


def hadamard_fingerprint(n: int) -> str:
    """SHA-256 of the ±1 matrix ``hadamard_matrix(n)`` (as int8 bytes): identifies the R4 matrix."""
    return hashlib.sha256(hadamard_matrix(n, dtype=torch.int8).numpy().tobytes()).hexdigest()


def _intermediate_size(model: nn.Module) -> int:
    """The ``down_proj`` input size, checked to be one size with a Hadamard matrix."""
    sizes = {lin.in_features for lin in _r4_linears(model)}
    if len(sizes) != 1:
        raise InvalidInputError(f"online Hadamard needs one intermediate size, the layers have {sorted(sizes)}")
    n = sizes.pop()
    hadamard_plan(n)  # raises ValueError naming the nearest supported sizes
    return n


@torch.no_grad()
def rotate_down_proj_weights(model: nn.Module, layers=None) -> dict:
    """Weight half of R4: every ``down_proj`` weight ``W`` (``[hidden, n]``) becomes ``W @ H``.

    Computed in float64 and cast back. Returns ``{"size": n, "sha256": hadamard_fingerprint(n)}``
    for quant.json. Apply once; the activation half is installed by :func:`install_act_quant`.
    ``layers``: only these decoder layers' (indices; None: all), for a model quantized layer by layer.
    """
    n = _intermediate_size(model)
    for i, lin in enumerate(_r4_linears(model)):
        if layers is not None and i not in layers:
            continue
        W = lin.weight
        W.copy_(hadamard_transform(W.double()).to(W.dtype))  # rows: W @ H
    return {"size": n, "sha256": hadamard_fingerprint(n)}


class ActQuantHooks:
    """The forward pre-hooks installed by :func:`install_act_quant`; ``remove()`` takes them out.

    Also a context manager: ``with install_act_quant(model, cfg): ...`` removes them on exit.
    """

    def __init__(self, config: ActQuantConfig, handles: list):
        self.config = config
        self._handles = handles

    def __len__(self) -> int:
        return len(self._handles)

    def add(self, handle) -> None:
        """Take over another removable hook (anything with ``remove()``, e.g. the R3/KV hooks of
        :mod:`orthoopt.quant.kv`), so that one ``remove()`` takes everything out."""
        self._handles.append(handle)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> "ActQuantHooks":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


class _InputHook:
    """Forward pre-hook ``x -> quantize(x @ H)`` (either part optional).

    Under autograd (``x.requires_grad``, SpinQuant's objective) the quantizer is straight-through:
    forward value ``quantize(x @ H)``, gradient that of ``x @ H``.

    ``x @ H`` is the fast transform :func:`orthoopt.hadamard.hadamard_transform` in ``x``'s dtype
    (no dense ``[n, n]`` matrix is stored).
    """

    def __init__(self, rotate: bool, spec: QuantSpec | None):
        self.rotate, self.spec = rotate, spec

    def __call__(self, module: nn.Module, args: tuple):
        x = args[0]
        if self.rotate:
            x = hadamard_transform(x)
        if self.spec is not None:
            x = _quantize_ste(x, self.spec)
        return (x, *args[1:])


def _quantize_ste(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Per-token fake quantization of ``x``, straight-through under autograd."""
    q = quantize_activations(x.detach(), spec)
    return x + (q - x).detach() if torch.is_grad_enabled() and x.requires_grad else q


def install_act_quant(model: nn.Module, config: ActQuantConfig) -> ActQuantHooks:
    """Install activation fake-quant (and the activation half of R4) on every decoder-layer linear
    and, on MoE models, on both inputs of every expert (module docstring).

    With ``config.online_hadamard`` the ``down_proj`` hook computes ``quantize(x @ H)``; the weights
    must already be rotated (:func:`rotate_down_proj_weights`), otherwise the model's function
    changes. With ``bits=16`` and no online Hadamard nothing is installed.
    """
    spec = config.spec if config.enabled else None
    if config.online_hadamard:
        _intermediate_size(model)  # fail now, not in the first forward
    handles = []
    m = locate(model)
    for L in m.layers:
        for role, lin in L.quant_linears(m.spec).items():
            rotate = config.online_hadamard and role == m.spec.r4_role
            if not rotate and spec is None:
                continue
            handles.append(lin.register_forward_pre_hook(_InputHook(rotate, spec)))
        experts = {id(mod): (mod, L.names[role]) for role, (mod, _) in expert_params(m.spec, L).items()}
        for module, name in experts.values() if spec is not None else ():
            try:
                handles.append(install_experts_act_quant(module, lambda x, s=spec: _quantize_ste(x, s), name))
            except ValueError:
                for h in handles:
                    h.remove()
                raise
    return ActQuantHooks(config, handles)
