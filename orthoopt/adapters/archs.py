"""Per-architecture attribute tables and the located modules of a decoder.

Every supported model is a pre-norm decoder with RMSNorm and a gated MLP (Llama layout)::

    CausalLM.<decoder>.<embed>            token embedding             [vocab, hidden]
    CausalLM.<decoder>.<layers>[i]
        .<input_norm>                     RMSNorm read by q, k, v
        .<attn>.<q|k|v|o>                 attention projections (GQA allowed, q/k/v biases allowed)
        .<attn>.<q_norm|k_norm>           per-head q/k RMSNorm (Qwen3 only; left untouched)
        .<post_attn_norm>                 RMSNorm read by gate, up
        .<mlp>.<gate|up|down>             gated MLP
    CausalLM.<decoder>.<final_norm>       RMSNorm read by lm_head
    CausalLM.<lm_head>                    classifier                  [vocab, hidden]

:data:`ARCHS` maps a config ``model_type`` to the attribute names of that layout; :func:`locate`
resolves them on a model, checks shapes, and reports everything that is missing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass(frozen=True)
class ArchSpec:
    """Attribute names of one architecture (all relative to their parent module)."""

    model_type: str
    decoder: str = "model"
    embed: str = "embed_tokens"
    layers: str = "layers"
    final_norm: str = "norm"
    lm_head: str = "lm_head"
    attn: str = "self_attn"
    q: str = "q_proj"
    k: str = "k_proj"
    v: str = "v_proj"
    o: str = "o_proj"
    mlp: str = "mlp"
    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"
    input_norm: str = "input_layernorm"
    post_attn_norm: str = "post_attention_layernorm"
    qk_norms: tuple[str, str] | None = None


ARCHS: dict[str, ArchSpec] = {
    "llama": ArchSpec("llama"),
    "mistral": ArchSpec("mistral"),
    "qwen2": ArchSpec("qwen2"),
    "qwen3": ArchSpec("qwen3", qk_norms=("q_norm", "k_norm")),
}


@dataclass
class LayerModules:
    """The modules of decoder layer ``index``; ``prefix`` is its name, e.g. ``"layers.3"``."""

    index: int
    prefix: str
    input_norm: nn.Module
    attn: nn.Module
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear
    post_attn_norm: nn.Module
    gate: nn.Linear
    up: nn.Linear
    down: nn.Linear
    names: dict[str, str] = field(default_factory=dict)  # role ("q", "down", ...) -> module name


@dataclass
class DecoderModules:
    """All modules an adapter touches, with the sizes it needs.

    Module names are relative to the decoder (``"embed_tokens"``, ``"layers.3.self_attn.q_proj"``,
    ``"norm"``) except ``"lm_head"``, which lives on the causal-LM wrapper.
    """

    spec: ArchSpec
    embed: nn.Embedding
    layers: list[LayerModules]
    final_norm: nn.Module
    lm_head: nn.Linear
    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    names: dict[str, str] = field(default_factory=dict)  # "embed", "final_norm", "lm_head" -> name

    @property
    def tied(self) -> bool:
        """True when ``lm_head.weight`` and the embedding are the same tensor."""
        return self.lm_head.weight.data_ptr() == self.embed.weight.data_ptr()

    def linears(self) -> dict[str, nn.Linear]:
        """``{module name: nn.Linear}`` of every projection and ``lm_head``, in forward order."""
        out: dict[str, nn.Linear] = {}
        for L in self.layers:
            for role in ("q", "k", "v", "o", "gate", "up", "down"):
                out[L.names[role]] = getattr(L, role)
        out[self.names["lm_head"]] = self.lm_head
        return out

    def residual_norms(self) -> dict[str, nn.Module]:
        """``{name: norm}`` of the RMSNorms on the residual stream (not Qwen3's q/k norms)."""
        out: dict[str, nn.Module] = {}
        for L in self.layers:
            out[L.names["input_norm"]] = L.input_norm
            out[L.names["post_attn_norm"]] = L.post_attn_norm
        out[self.names["final_norm"]] = self.final_norm
        return out


class UnsupportedModelError(ValueError):
    """The model is not an RMSNorm + gated-MLP decoder this package knows how to rotate."""


def _get(obj: object, path: str) -> object | None:
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def locate(model: nn.Module, arch: str | None = None) -> DecoderModules:
    """Resolve the modules of ``model`` (a ``*ForCausalLM``) using ``ARCHS[arch]``.

    ``arch`` defaults to ``model.config.model_type``; pass ``arch="llama"`` to treat a decoder of the
    same layout under another ``model_type`` as Llama. Raises :class:`UnsupportedModelError` naming
    the ``model_type`` and every missing or malformed module.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    key = arch if arch is not None else model_type
    if key not in ARCHS:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported (supported: {sorted(ARCHS)}); "
            f"a decoder with the Llama layout may be forced with arch='llama'. "
            f"Layout check: {_layout_problems(model, ARCHS['llama']) or 'no missing modules'}"
        )
    spec = ARCHS[key]
    problems = _layout_problems(model, spec)
    if problems:
        raise UnsupportedModelError(f"model_type {model_type!r} does not have the {key!r} layout: {problems}")

    dec = _get(model, spec.decoder)
    layers = []
    for i, layer in enumerate(_get(dec, spec.layers)):
        attn, mlp = _get(layer, spec.attn), _get(layer, spec.mlp)
        p, pa, pm = f"{spec.layers}.{i}", f"{spec.layers}.{i}.{spec.attn}", f"{spec.layers}.{i}.{spec.mlp}"
        names = {
            "input_norm": f"{p}.{spec.input_norm}", "post_attn_norm": f"{p}.{spec.post_attn_norm}",
            "q": f"{pa}.{spec.q}", "k": f"{pa}.{spec.k}", "v": f"{pa}.{spec.v}", "o": f"{pa}.{spec.o}",
            "gate": f"{pm}.{spec.gate}", "up": f"{pm}.{spec.up}", "down": f"{pm}.{spec.down}",
        }
        layers.append(LayerModules(
            index=i, prefix=p, input_norm=_get(layer, spec.input_norm), attn=attn,
            q=_get(attn, spec.q), k=_get(attn, spec.k), v=_get(attn, spec.v), o=_get(attn, spec.o),
            post_attn_norm=_get(layer, spec.post_attn_norm),
            gate=_get(mlp, spec.gate), up=_get(mlp, spec.up), down=_get(mlp, spec.down), names=names,
        ))

    hidden = int(config.hidden_size)
    num_heads = int(config.num_attention_heads)
    num_kv = int(getattr(config, "num_key_value_heads", None) or num_heads)
    L0 = layers[0]
    head_dim = L0.q.out_features // num_heads
    out = DecoderModules(
        spec=spec, embed=_get(dec, spec.embed), layers=layers, final_norm=_get(dec, spec.final_norm),
        lm_head=_get(model, spec.lm_head), hidden=hidden, num_heads=num_heads, num_kv_heads=num_kv,
        head_dim=head_dim,
        names={"embed": spec.embed, "final_norm": spec.final_norm, "lm_head": spec.lm_head},
    )
    shape_problems = _shape_problems(out)
    if shape_problems:
        raise UnsupportedModelError(f"model_type {model_type!r}: unexpected shapes: {shape_problems}")
    return out


def _layout_problems(model: nn.Module, spec: ArchSpec) -> str:
    """Human-readable list of what ``model`` lacks for ``spec`` ('' if nothing)."""
    missing: list[str] = []
    config = getattr(model, "config", None)
    for attr in ("hidden_size", "num_attention_heads"):
        if getattr(config, attr, None) is None:
            missing.append(f"config.{attr}")
    dec = _get(model, spec.decoder)
    if dec is None:
        return f"missing {spec.decoder} (the decoder module)"
    if not isinstance(_get(dec, spec.embed), nn.Embedding):
        missing.append(f"{spec.decoder}.{spec.embed} (nn.Embedding)")
    if _get(dec, spec.final_norm) is None:
        missing.append(f"{spec.decoder}.{spec.final_norm}")
    if not isinstance(_get(model, spec.lm_head), nn.Linear):
        missing.append(f"{spec.lm_head} (nn.Linear)")
    layers = _get(dec, spec.layers)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        missing.append(f"{spec.decoder}.{spec.layers} (non-empty nn.ModuleList)")
        return "missing " + ", ".join(missing)
    linears = [(spec.attn, n) for n in (spec.q, spec.k, spec.v, spec.o)]
    linears += [(spec.mlp, n) for n in (spec.gate, spec.up, spec.down)]
    for i, layer in enumerate(layers):
        for parent, name in linears:
            if not isinstance(_get(layer, f"{parent}.{name}"), nn.Linear):
                missing.append(f"{spec.decoder}.{spec.layers}.{i}.{parent}.{name} (nn.Linear)")
        for name in (spec.input_norm, spec.post_attn_norm):
            if _get(layer, name) is None:
                missing.append(f"{spec.decoder}.{spec.layers}.{i}.{name}")
        if len(missing) > 12:
            break
    return ("missing " + ", ".join(missing)) if missing else ""


def _shape_problems(m: DecoderModules) -> str:
    out: list[str] = []
    h, d, nh, nkv = m.hidden, m.head_dim, m.num_heads, m.num_kv_heads
    if m.embed.weight.shape[1] != h:
        out.append(f"embedding width {m.embed.weight.shape[1]} != hidden_size {h}")
    if m.lm_head.in_features != h:
        out.append(f"lm_head in_features {m.lm_head.in_features} != hidden_size {h}")
    if nh % nkv:
        out.append(f"num_attention_heads {nh} is not a multiple of num_key_value_heads {nkv}")
    for L in m.layers:
        want = {"q": (nh * d, h), "k": (nkv * d, h), "v": (nkv * d, h), "o": (h, nh * d),
                "gate": (None, h), "up": (None, h), "down": (h, L.gate.out_features)}
        for role, (o, i) in want.items():
            W = getattr(L, role).weight
            if (o is not None and W.shape[0] != o) or W.shape[1] != i:
                out.append(f"{L.names[role]} weight {tuple(W.shape)}, expected ({o if o else '*'}, {i})")
        if L.up.out_features != L.gate.out_features:
            out.append(f"{L.names['up']} and {L.names['gate']} differ in width")
        if len(out) > 8:
            break
    return "; ".join(out)


def norm_eps(norm: nn.Module) -> float:
    """The epsilon of an RMSNorm module (``variance_epsilon`` in HF models, ``eps`` in torch)."""
    for attr in ("variance_epsilon", "eps"):
        eps = getattr(norm, attr, None)
        if isinstance(eps, (int, float)):
            return float(eps)
    raise UnsupportedModelError(f"{type(norm).__name__} has no variance_epsilon/eps attribute")


def check_rms_norm(name: str, norm: nn.Module, hidden: int) -> None:
    """Raise :class:`UnsupportedModelError` unless ``norm(x) == x / rms(x) * weight``.

    Checked numerically on random inputs (in the norm's dtype), so a mean-subtracting LayerNorm,
    a bias, or a ``(1 + weight)`` parametrization is rejected. Norm fusion and the R1 invariance
    ``rms(x @ R) = rms(x)`` rely on this exact form.
    """
    w = getattr(norm, "weight", None)
    if not isinstance(w, torch.Tensor) or tuple(w.shape) != (hidden,):
        raise UnsupportedModelError(f"{name} ({type(norm).__name__}) has no weight of shape ({hidden},)")
    if getattr(norm, "bias", None) is not None:
        raise UnsupportedModelError(f"{name} ({type(norm).__name__}) has a bias: only RMSNorm is supported")
    eps = norm_eps(norm)
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(4, hidden, generator=g, dtype=torch.float64) + 0.5).to(w.device)
    with torch.no_grad():
        got = norm(x.to(w.dtype)).double()
        want = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w.double()
    tol = 1e-2 if w.dtype in (torch.float16, torch.bfloat16) else 1e-4
    err = ((got - want).norm() / want.norm().clamp_min(1e-30)).item()
    if not err < tol:
        raise UnsupportedModelError(
            f"{name} ({type(norm).__name__}) is not an RMSNorm x / rms(x) * weight (relative "
            f"deviation {err:.2e}); mean-subtracting LayerNorm and (1 + weight) norms are not supported"
        )
