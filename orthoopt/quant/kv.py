"""Online R3 (head-wise Hadamard on queries and keys after RoPE) and K/V-cache fake quantization.

R3 (SpinQuant's naming; QuaRot's "K quantization needs another rotation"): with
``H = hadamard_matrix(d) / sqrt(d)`` (orthogonal, ``d`` = head_dim), every query and key head vector
*after* RoPE (and after Qwen3's q/k norms, which act before RoPE) becomes ``q @ H``, ``k @ H``, so
``(q @ H) . (k @ H) = q . k``: attention is unchanged in full precision, and the keys that enter
the cache are the rotated ones, whose outliers are spread before they are quantized. Nothing is
fused into the weights (RoPE sits between k_proj and the cache), so R3 is purely online.

K/V quantization: the rotated keys and the values (``[batch, kv_heads, tokens, head_dim]``) are
fake-quantized per token and head, in groups of ``group_size`` consecutive channels of one head
(default: the whole head, ``group_size = head_dim``), with the shared uniform quantizer
(:mod:`orthoopt.quant.quantizer`). Defaults are QuaRot's and SpinQuant's published KV settings
(``--k_asym --v_asym --k_groupsize 128 --v_groupsize 128`` with ``head_dim = 128``, clip ratio 1.0
for K and V, the argparse default of both codebases): asymmetric, one group per head, no clipping.

Where it hooks in (transformers 5.x): every supported decoder's attention computes q, k, v, applies
RoPE, updates the cache, then calls ``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]`` with
``(module, query, key, value, mask, ...)``. :func:`install_kv_quant` registers a wrapper around the
model's implementation (``"orthoopt_kv_sdpa"`` around ``"sdpa"``, ``"orthoopt_kv_eager"`` around the
model's own eager function, with the inner implementation's mask function) and switches the model to
it; the wrapper applies R3 and the quantizers of ``module`` and calls the inner implementation. With a
cache (generation), the cache therefore holds the keys before R3 and the wrapper rotates and quantizes
every cached token again at each step; because R3 and the quantizers act on each token independently,
this computes exactly what a cache of rotated, quantized keys and values would give (fake
quantization simulates the numerics, not the memory layout).

Under autograd (SpinQuant's objective) the quantizers are straight-through: the forward value is the
quantized tensor, the gradient that of the identity.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass

import torch
from torch import nn

from orthoopt.adapters.archs import locate
from orthoopt.core.grid import check_bits_or_off, straight_through
from orthoopt.errors import InvalidInputError
from orthoopt.hadamard import hadamard_plan, hadamard_transform
from orthoopt.quant.quantizer import QuantSpec, quantize_rows

WRAPPER_PREFIX = "orthoopt_kv_"
_STATE_ATTR = "_orthoopt_kv"


@dataclass(frozen=True)
class KVQuantConfig:
    """R3 and K/V-cache quantization.

    bits:         16 (off) or 2..8, for both K and V.
    group_size:   channels per scale within one head; ``None`` = head_dim (one scale per token and head).
    symmetric:    symmetric grid; default False (asymmetric with a zero point, as QuaRot and SpinQuant).
    k_clip_ratio, v_clip_ratio: fixed shrink of each group's range, in (0, 1]; default 1.0.
    r3:           rotate queries and keys by the head-wise Hadamard after RoPE (module docstring).
    """

    bits: int = 16
    group_size: int | None = None
    symmetric: bool = False
    k_clip_ratio: float = 1.0
    v_clip_ratio: float = 1.0
    r3: bool = False

    def __post_init__(self) -> None:
        check_bits_or_off(self.bits, "KV-cache")
        if self.group_size is not None and (isinstance(self.group_size, bool) or not isinstance(self.group_size, int)
                                            or self.group_size < 1):
            raise InvalidInputError(f"KV-cache group_size must be a positive integer or None, got {self.group_size!r}")
        for name in ("k_clip_ratio", "v_clip_ratio"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise InvalidInputError(f"KV-cache {name} must be in (0, 1], got {getattr(self, name)!r}")

    @property
    def enabled(self) -> bool:
        """True when K and V are quantized (bits < 16)."""
        return self.bits < 16

    @property
    def active(self) -> bool:
        """True when anything is installed (quantization or R3)."""
        return self.enabled or self.r3

    def specs(self) -> tuple[QuantSpec, QuantSpec]:
        """``(K spec, V spec)`` of the per-group quantizers (only when :attr:`enabled`)."""
        if not self.enabled:
            raise InvalidInputError("KV-cache quantization is off (bits=16)")
        return (QuantSpec(bits=self.bits, symmetric=self.symmetric, clip_ratio=self.k_clip_ratio),
                QuantSpec(bits=self.bits, symmetric=self.symmetric, clip_ratio=self.v_clip_ratio))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "KVQuantConfig":
        unknown = set(d) - {"bits", "group_size", "symmetric", "k_clip_ratio", "v_clip_ratio", "r3"}
        if unknown:
            raise InvalidInputError(f"unknown KV-cache quantization settings: {sorted(unknown)}")
        return cls(**d)


def quantize_heads(x: torch.Tensor, spec: QuantSpec, group_size: int) -> torch.Tensor:
    """Fake-quantize ``x`` (``[..., head_dim]``) in groups of ``group_size`` consecutive channels of the
    last dim, one scale (and zero) per group; computed in float32 (float64 for float64 input),
    returned in ``x``'s dtype and shape; straight-through under autograd."""
    d = x.shape[-1]
    if d % group_size:
        raise InvalidInputError(f"KV-cache group_size {group_size} does not divide head_dim {d}")
    work = x if x.dtype == torch.float64 else x.float()
    q = quantize_rows(work.detach().reshape(-1, group_size), spec).reshape(x.shape).to(x.dtype)
    return straight_through(x, q)


class _KVTransform:
    """Per-attention-module state: ``(q, k, v) -> (q @ H, Q_k(k @ H), Q_v(v))`` (each part optional)."""

    def __init__(self, config: KVQuantConfig, head_dim: int):
        self.config = config
        self.group_size = config.group_size or head_dim
        self.specs = config.specs() if config.enabled else None

    def __call__(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor):
        if self.config.r3:
            query, key = hadamard_transform(query), hadamard_transform(key)
        if self.specs is not None:
            key = quantize_heads(key, self.specs[0], self.group_size)
            value = quantize_heads(value, self.specs[1], self.group_size)
        return query, key, value


def _inner_function(module: nn.Module, inner: str):
    """The attention function the wrapper delegates to: the model's own eager function for "eager"
    (defined in its modeling module), the registered one otherwise."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if inner == "eager":
        fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if fn is None:
            raise InvalidInputError(f"{type(module).__name__}'s module defines no eager_attention_forward")
        return fn
    return ALL_ATTENTION_FUNCTIONS[inner]


def _make_wrapper(inner: str):
    def attention(module, query, key, value, attention_mask, **kwargs):
        transform = getattr(module, _STATE_ATTR, None)
        if transform is not None:
            query, key, value = transform(query, key, value)
        return _inner_function(module, inner)(module, query, key, value, attention_mask, **kwargs)

    attention.__name__ = f"{WRAPPER_PREFIX}{inner}"
    return attention


def register_wrapper(inner: str) -> str:
    """Register (once) the wrapper around attention implementation ``inner`` and its mask function
    under ``"orthoopt_kv_" + inner``; returns that name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = WRAPPER_PREFIX + inner
    if name in ALL_ATTENTION_FUNCTIONS._global_mapping:
        return name
    if inner != "eager" and inner not in ALL_ATTENTION_FUNCTIONS._global_mapping:
        raise InvalidInputError(f"attention implementation {inner!r} is not registered in transformers")
    if inner not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        raise InvalidInputError(f"attention implementation {inner!r} has no mask function; R3/KV quantization "
                         "supports sdpa, eager and the implementations with a registered mask")
    AttentionInterface.register(name, _make_wrapper(inner))
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS._global_mapping[inner])
    return name


class KVQuantHooks:
    """What :func:`install_kv_quant` changed; ``remove()`` restores the model's attention implementation."""

    def __init__(self, model: nn.Module, config: KVQuantConfig, original: str | None, modules: list[nn.Module]):
        self.model, self.config, self._original, self._modules = model, config, original, modules

    def remove(self) -> None:
        for m in self._modules:
            if hasattr(m, _STATE_ATTR):
                delattr(m, _STATE_ATTR)
        if self._original is not None:
            self.model.set_attn_implementation(self._original)
            self._original = None
        self._modules = []

    def __enter__(self) -> "KVQuantHooks":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def r3_size(model: nn.Module) -> int:
    """The head_dim R3 acts on, checked to have a Hadamard matrix (ValueError naming nearby sizes)."""
    d = locate(model).head_dim
    hadamard_plan(d)
    return d


def install_kv_quant(model: nn.Module, config: KVQuantConfig) -> KVQuantHooks:
    """Install R3 and/or K/V quantization on every decoder layer's attention (nothing when inactive).

    Raises ValueError (before changing anything) when ``head_dim`` has no Hadamard matrix (R3), the
    group size does not divide ``head_dim``, the model's attention implementation cannot be wrapped,
    or hooks are already installed.
    """
    located = locate(model)
    if not config.active:
        return KVQuantHooks(model, config, None, [])
    d = located.head_dim
    if config.r3:
        hadamard_plan(d)
    if config.group_size is not None and d % config.group_size:
        raise InvalidInputError(f"KV-cache group_size {config.group_size} does not divide head_dim {d}")
    current = model.config._attn_implementation or "eager"
    if current.startswith(WRAPPER_PREFIX) or any(hasattr(L.attn, _STATE_ATTR) for L in located.layers):
        raise InvalidInputError("R3/KV-cache hooks are already installed on this model; remove() them first")
    name = register_wrapper(current)
    modules = []
    for L in located.layers:
        setattr(L.attn, _STATE_ATTR, _KVTransform(config, d))
        modules.append(L.attn)
    model.set_attn_implementation(name)
    return KVQuantHooks(model, config, current, modules)
