"""The declarative architecture table, and the located modules of a decoder.

Every supported model is a decoder whose residual stream ``h`` (``[..., hidden]``) is written by the
embedding and by each layer's branch outputs, and read by the projections after a norm. One
:class:`ArchSpec` per ``model_type`` in :data:`ARCHS` says, for that architecture:

* where the modules are (``decoder``, ``embed``, ``layers``, ``final_norm``, ``lm_head``, all paths);
* every weight on the residual stream of a layer (:class:`Proj`): its path, whether it READS the
  stream (side ``"in"``: ``W @ R1``) or WRITES it (side ``"out"``: ``R1.T @ W``, bias ``b @ R1``), the
  group of weights that read the same tensor (calibration capture, GPTQ order, diagnostics), the row
  slices of a fused projection (Phi-3's ``qkv_proj``, ``gate_up_proj``) and whether it is a 3-D
  ``[experts, out, in]`` tensor of MoE experts;
* every norm (:class:`Norm`): its kind (``"rms"``: ``x / rms(x) * w``; ``"rms1p"``: Gemma's
  ``x / rms(x) * (1 + w)``; ``"layernorm"``: mean-subtracting, refused), whether it is a ``"pre"``
  norm read by some projections (folded into them by norm fusion) or a ``"post"`` norm on a branch
  output before the residual add (OLMo-2, Gemma 2/3), and its readers;
* the head layout for ``R2``: which rows hold v (``v_rows``: a role, or a part of a fused role) and
  which projection reads the heads (``o_role``); q/k norms (left untouched);
* invariant extras, stated for the record: embedding scaling (Gemma multiplies the embedding by
  ``sqrt(hidden)``, a scalar, which commutes with any rotation), final logit soft-capping (acts on the
  logits, which rotations do not change).

Every consumer (fusion, write-back, block lists, the streaming layout, calibration capture, GPTQ
order, activation hooks, full-precision lists, diagnostics) reads these tables; none lists roles
itself. Adding an architecture is one entry here plus one parameter in ``tests/test_architectures.py``
(``docs/adapters.md``).

Exactness (what :func:`r1_refusal` checks): a ``"post"`` norm with a non-uniform scale ``D`` does
not commute with a rotation (``(y R / rms(y R)) D = (y / rms(y)) R D != (y / rms(y)) D R`` unless
``D = c I``), and it sits after the branch's last linear layer, so nothing can absorb ``R1``: such
models refuse ``R1`` with the reason, while ``R2`` (inside attention, between v and o) stays exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from orthoopt.errors import OrthooptError

NORM_KINDS = ("rms", "rms1p", "layernorm")
"""``rms``: ``x / rms(x) * w`` (identity: ``w = 1``); ``rms1p``: ``x / rms(x) * (1 + w)`` (identity: ``w = 0``);
``layernorm``: ``(x - mean) / std * w + b`` (not rotation-invariant; refused)."""

PART_SIZES = ("q_heads", "kv_heads", "half")
"""Row counts of the parts of a fused projection: ``num_heads * head_dim``, ``num_kv_heads * head_dim``,
half of the rows (``gate_up``)."""


@dataclass(frozen=True)
class Proj:
    """One weight of a decoder layer on the residual stream.

    role:    unique name within the layer (``"q"``, ``"qkv"``, ``"down"``, ``"router"``, ``"experts.down"``).
    path:    module path relative to the layer (``"self_attn.q_proj"``, ``"mlp.experts"``).
    side:    ``"in"`` reads the stream (``W @ R1``), ``"out"`` writes it (``R1.T @ W``, bias ``b @ R1``).
    group:   projections with the same group read the same tensor (``"attn_in"``, ``"attn_out"``,
             ``"mlp_in"``, ``"mlp_hidden"``, ...); groups are listed in forward order.
    param:   the weight's parameter name on the module (``"weight"``; fused experts: ``"gate_up_proj"``).
    parts:   row parts of a fused weight, in order: ``(("q", "q_heads"), ("k", "kv_heads"), ("v", "kv_heads"))``
             (sizes: :data:`PART_SIZES`).
    experts: the weight is ``[experts, out, in]`` (rotations act per expert: ``W[e] @ R1``, ``R1.T @ W[e]``).
    optional: some layers lack it (Qwen2-MoE's dense layers have ``mlp.gate_proj`` instead of experts).
    quantize: weight quantizers quantize it (False: kept in full precision, e.g. MoE routers).
    """

    role: str
    path: str
    side: str
    group: str
    param: str = "weight"
    parts: tuple[tuple[str, str], ...] = ()
    experts: bool = False
    optional: bool = False
    quantize: bool = True

    @property
    def is_linear(self) -> bool:
        """True when the weight is a module's 2-D ``weight`` (an ``nn.Linear`` or a router)."""
        return self.param == "weight" and not self.experts

    @property
    def bias_param(self) -> str | None:
        """Name of the bias parameter on the module (None for expert tensors)."""
        return "bias" if self.param == "weight" else None


@dataclass(frozen=True)
class Norm:
    """A norm on the residual stream of a layer (path relative to the layer; see :data:`NORM_KINDS`).

    position: ``"pre"``: its output is read by ``readers`` (roles), so its scale folds into them;
              ``"post"``: it normalizes a branch output before the residual add (no readers).
    """

    role: str
    path: str
    kind: str = "rms"
    position: str = "pre"
    readers: tuple[str, ...] = ()


@dataclass(frozen=True)
class ArchSpec:
    """The declarative description of one architecture (see the module docstring)."""

    model_type: str
    projs: tuple[Proj, ...]
    norms: tuple[Norm, ...]
    decoder: str = "model"
    embed: str = "embed_tokens"
    layers: str = "layers"
    final_norm: str = "norm"
    final_norm_kind: str = "rms"
    lm_head: str = "lm_head"
    attn: str = "self_attn"
    mlp: str = "mlp"
    v_rows: tuple[str, str | None] = ("v", None)
    o_role: str = "o"
    qk_norms: tuple[str, str] | None = None
    embed_scale: str | None = None
    logit_softcap: bool = False
    r4_role: str | None = "down"
    """The ``nn.Linear`` whose input gets the online Hadamard R4 (the MLP's hidden -> residual writer);
    None where R4 is not supported (MoE experts)."""

    @property
    def full_precision(self) -> tuple[str, ...]:
        """Module names kept in full precision by the quantizers (and left out of learned objectives by
        default): the embedding, ``lm_head`` and every projection with ``quantize=False``, as
        ``layers.*.<path>`` patterns."""
        return (self.embed, self.lm_head) + tuple(f"{self.layers}.*.{p.path}" for p in self.projs if not p.quantize)

    def is_full_precision(self, name: str) -> bool:
        """True when module or block ``name`` (``"embed_tokens"``, ``"layers.3.mlp.gate"``) matches
        :attr:`full_precision`: the quantizers leave it in full precision and the learned objectives
        leave it out (unless ``include_embeddings``, for the embedding and ``lm_head``)."""
        from fnmatch import fnmatchcase

        return any(fnmatchcase(name, pattern) for pattern in self.full_precision)

    def proj(self, role: str) -> Proj:
        for p in self.projs:
            if p.role == role:
                return p
        raise KeyError(f"{self.model_type} has no projection {role!r}")

    @property
    def roles(self) -> tuple[str, ...]:
        """Roles of every projection, in the table's (forward) order."""
        return tuple(p.role for p in self.projs)

    @property
    def groups(self) -> tuple[tuple[str, ...], ...]:
        """Roles grouped by shared input, groups in forward order (first appearance in ``projs``)."""
        out: dict[str, list[str]] = {}
        for p in self.projs:
            out.setdefault(p.group, []).append(p.role)
        return tuple(tuple(v) for v in out.values())

    def group_of(self, role: str) -> str:
        return self.proj(role).group

    @property
    def pre_norms(self) -> tuple[Norm, ...]:
        return tuple(n for n in self.norms if n.position == "pre")

    @property
    def post_norms(self) -> tuple[Norm, ...]:
        return tuple(n for n in self.norms if n.position == "post")


_ATTN = (
    Proj("q", "self_attn.q_proj", "in", "attn_in"),
    Proj("k", "self_attn.k_proj", "in", "attn_in"),
    Proj("v", "self_attn.v_proj", "in", "attn_in"),
    Proj("o", "self_attn.o_proj", "out", "attn_out"),
)
_MLP = (
    Proj("gate", "mlp.gate_proj", "in", "mlp_in"),
    Proj("up", "mlp.up_proj", "in", "mlp_in"),
    Proj("down", "mlp.down_proj", "out", "mlp_hidden"),
)
_LLAMA_NORMS = (
    Norm("input_norm", "input_layernorm", "rms", "pre", ("q", "k", "v")),
    Norm("post_attn_norm", "post_attention_layernorm", "rms", "pre", ("gate", "up")),
)


def _llama(model_type: str, **kw) -> ArchSpec:
    return ArchSpec(model_type, _ATTN + _MLP, _LLAMA_NORMS, **kw)


def _gemma(model_type: str, **kw) -> ArchSpec:
    # Gemma 2/3: (1 + w) RMSNorms; pre- and post- norms around both branches; the embedding is
    # multiplied by sqrt(hidden) and (Gemma 2) the logits soft-capped: both invariant.
    norms = (
        Norm("input_norm", "input_layernorm", "rms1p", "pre", ("q", "k", "v")),
        Norm("attn_post_norm", "post_attention_layernorm", "rms1p", "post"),
        Norm("mlp_norm", "pre_feedforward_layernorm", "rms1p", "pre", ("gate", "up")),
        Norm("mlp_post_norm", "post_feedforward_layernorm", "rms1p", "post"),
    )
    return ArchSpec(model_type, _ATTN + _MLP, norms, final_norm_kind="rms1p", embed_scale="sqrt(hidden)", **kw)


_MOE_ROUTED = (
    Proj("router", "mlp.gate", "in", "mlp_in", quantize=False),
    Proj("experts.gate_up", "mlp.experts", "in", "mlp_in", param="gate_up_proj",
          parts=(("gate", "half"), ("up", "half")), experts=True),
    Proj("experts.down", "mlp.experts", "out", "expert_hidden", param="down_proj", experts=True),
)
_MOE_NORMS = (
    Norm("input_norm", "input_layernorm", "rms", "pre", ("q", "k", "v")),
    Norm("post_attn_norm", "post_attention_layernorm", "rms", "pre",
         ("gate", "up", "router", "experts.gate_up", "shared.gate", "shared.up", "shared.router")),
)


def _optional(projs: tuple[Proj, ...]) -> tuple[Proj, ...]:
    return tuple(Proj(p.role, p.path, p.side, p.group, p.param, p.parts, p.experts, True, p.quantize) for p in projs)


def _moe(model_type: str, shared: bool, dense_layers: bool, **kw) -> ArchSpec:
    projs = _ATTN + (_optional(_MOE_ROUTED) if dense_layers else _MOE_ROUTED)
    if shared:
        projs += (
            Proj("shared.gate", "mlp.shared_expert.gate_proj", "in", "mlp_in", optional=dense_layers),
            Proj("shared.up", "mlp.shared_expert.up_proj", "in", "mlp_in", optional=dense_layers),
            Proj("shared.router", "mlp.shared_expert_gate", "in", "mlp_in", optional=dense_layers, quantize=False),
            Proj("shared.down", "mlp.shared_expert.down_proj", "out", "shared_hidden", optional=dense_layers),
        )
    if dense_layers:  # layers listed in mlp_only_layers (or off the sparse step) have a plain MLP
        projs += _optional(_MLP)
    return ArchSpec(model_type, projs, _MOE_NORMS, r4_role=None, **kw)


ARCHS: dict[str, ArchSpec] = {
    "llama": _llama("llama"),
    "mistral": _llama("mistral"),
    "qwen2": _llama("qwen2"),
    "qwen3": _llama("qwen3", qk_norms=("q_norm", "k_norm")),
    "gemma2": _gemma("gemma2", logit_softcap=True),
    "gemma3_text": _gemma("gemma3_text", qk_norms=("q_norm", "k_norm")),
    "phi3": ArchSpec(
        "phi3",
        (
            Proj("qkv", "self_attn.qkv_proj", "in", "attn_in",
                  parts=(("q", "q_heads"), ("k", "kv_heads"), ("v", "kv_heads"))),
            Proj("o", "self_attn.o_proj", "out", "attn_out"),
            Proj("gate_up", "mlp.gate_up_proj", "in", "mlp_in", parts=(("gate", "half"), ("up", "half"))),
            Proj("down", "mlp.down_proj", "out", "mlp_hidden"),
        ),
        (
            Norm("input_norm", "input_layernorm", "rms", "pre", ("qkv",)),
            Norm("post_attn_norm", "post_attention_layernorm", "rms", "pre", ("gate_up",)),
        ),
        v_rows=("qkv", "v"),
    ),
    # OLMo-2: no pre-norms; RMSNorms on the branch outputs; q/k norms over the whole projection
    "olmo2": ArchSpec(
        "olmo2", _ATTN + _MLP,
        (
            Norm("attn_post_norm", "post_attention_layernorm", "rms", "post"),
            Norm("mlp_post_norm", "post_feedforward_layernorm", "rms", "post"),
        ),
        qk_norms=("q_norm", "k_norm"),
    ),
    "mixtral": _moe("mixtral", shared=False, dense_layers=False),
    "qwen2_moe": _moe("qwen2_moe", shared=True, dense_layers=True),
    "qwen3_moe": _moe("qwen3_moe", shared=False, dense_layers=True, qk_norms=("q_norm", "k_norm")),
}

LEGACY_ROLES = ("q", "k", "v", "o", "gate", "up", "down")
"""Roles that :class:`LayerModules` also exposes as attributes (None where the layer lacks them)."""


@dataclass
class LayerModules:
    """The modules of decoder layer ``index``; ``prefix`` is its name, e.g. ``"layers.3"``.

    ``projs``: ``{role: owning module}`` for the roles this layer has (table order); ``norms``:
    ``{norm role: module}``; ``names``: ``{role or norm role: module name}`` relative to the decoder.
    The Llama roles are also attributes (``L.q``, ``L.down``, ``L.input_norm``, ...; None if absent).
    """

    index: int
    prefix: str
    attn: nn.Module
    projs: dict[str, nn.Module]
    norms: dict[str, nn.Module]
    names: dict[str, str] = field(default_factory=dict)
    q: nn.Linear | None = None
    k: nn.Linear | None = None
    v: nn.Linear | None = None
    o: nn.Linear | None = None
    gate: nn.Linear | None = None
    up: nn.Linear | None = None
    down: nn.Linear | None = None
    input_norm: nn.Module | None = None
    post_attn_norm: nn.Module | None = None

    def quant_linears(self, spec: ArchSpec) -> dict[str, nn.Linear]:
        """``{role: nn.Linear}`` of the projections weight quantizers quantize (``Proj.quantize``), in
        table order."""
        return {r: m for r, m in self.projs.items()
                if spec.proj(r).is_linear and spec.proj(r).quantize and isinstance(m, nn.Linear)}

    def weight(self, spec: ArchSpec, role: str) -> nn.Parameter:
        return getattr(self.projs[role], spec.proj(role).param)

    def bias(self, spec: ArchSpec, role: str) -> nn.Parameter | None:
        b = spec.proj(role).bias_param
        return None if b is None else getattr(self.projs[role], b, None)

    def param_name(self, spec: ArchSpec, role: str, param: str | None = None) -> str:
        """``layers.3.self_attn.q_proj.weight`` (or ``.bias``; relative to the decoder)."""
        return f"{self.names[role]}.{param or spec.proj(role).param}"


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
        """``{module name: nn.Linear}`` of every ``nn.Linear`` projection and ``lm_head``, in forward
        order (MoE routers and expert tensors are not ``nn.Linear``: see :meth:`input_modules`)."""
        out: dict[str, nn.Linear] = {}
        for L in self.layers:
            for role, mod in L.projs.items():
                if self.spec.proj(role).is_linear and isinstance(mod, nn.Linear):
                    out[L.names[role]] = mod
        out[self.names["lm_head"]] = self.lm_head
        return out

    def input_modules(self) -> dict[str, nn.Module]:
        """``{module name: module}`` of every module owning a projection (whose first forward argument
        is that projection's input) and ``lm_head``, in forward order."""
        out: dict[str, nn.Module] = {}
        for L in self.layers:
            for role, mod in L.projs.items():
                out.setdefault(L.names[role], mod)
        out[self.names["lm_head"]] = self.lm_head
        return out

    def residual_norms(self) -> dict[str, nn.Module]:
        """``{name: norm}`` of the pre-norms on the residual stream (the ones fusion folds) and the
        final norm; post-norms and q/k norms are not included."""
        out: dict[str, nn.Module] = {}
        for L in self.layers:
            for n in self.spec.pre_norms:
                out[L.names[n.role]] = L.norms[n.role]
        out[self.names["final_norm"]] = self.final_norm
        return out

    def all_norms(self) -> dict[str, tuple[nn.Module, str]]:
        """``{name: (norm, kind)}`` of every residual norm, pre and post, and the final norm."""
        out: dict[str, tuple[nn.Module, str]] = {}
        for L in self.layers:
            for n in self.spec.norms:
                out[L.names[n.role]] = (L.norms[n.role], n.kind)
        out[self.names["final_norm"]] = (self.final_norm, self.spec.final_norm_kind)
        return out

    def post_norm_scales(self) -> dict[str, torch.Tensor]:
        """``{name: effective scale}`` of every post-norm (``w`` or ``1 + w``)."""
        out: dict[str, torch.Tensor] = {}
        for L in self.layers:
            for n in self.spec.post_norms:
                out[L.names[n.role]] = effective_scale(L.norms[n.role].weight.detach(), n.kind)
        return out


class UnsupportedModelError(OrthooptError, ValueError):
    """The model is not a decoder this package knows how to rotate (exactly)."""


def effective_scale(weight: torch.Tensor, kind: str) -> torch.Tensor:
    """The per-channel scale a norm of ``kind`` multiplies by: ``w`` (``rms``) or ``1 + w`` (``rms1p``),
    in float64."""
    w = weight.detach().to(torch.float64)
    return w + 1.0 if kind == "rms1p" else w


def identity_weight(like: torch.Tensor, kind: str) -> torch.Tensor:
    """The weight that makes a norm of ``kind`` a pure ``x / rms(x)``: ones (``rms``) or zeros (``rms1p``)."""
    return torch.zeros_like(like) if kind == "rms1p" else torch.ones_like(like)


def r1_refusal(post_scales: dict[str, torch.Tensor]) -> str | None:
    """Why ``R1`` cannot be fused exactly, or None: a post-norm ``{name: effective scale}`` that is not
    uniform (see the module docstring)."""
    for name, s in post_scales.items():
        if s.numel() and not bool((s == s.reshape(-1)[0]).all()):
            return (f"R1 cannot be fused exactly: {name} is an RMSNorm on a branch output (a post-norm) "
                    f"with a non-uniform scale (min {float(s.min()):.4g}, max {float(s.max()):.4g}); "
                    "x / rms(x) * w does not commute with a rotation unless w is constant, and no linear "
                    "layer follows it to absorb the rotation. R2 (per-head v/o) is still exact")
    return None


def _get(obj: object, path: str) -> object | None:
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _has_param(module: object, proj: Proj) -> bool:
    if module is None:
        return False
    return isinstance(getattr(module, proj.param, None), torch.Tensor)


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
        p = f"{spec.layers}.{i}"
        projs = {pr.role: _get(layer, pr.path) for pr in spec.projs if _has_param(_get(layer, pr.path), pr)}
        norms = {n.role: _get(layer, n.path) for n in spec.norms}
        names = {pr.role: f"{p}.{pr.path}" for pr in spec.projs if pr.role in projs}
        names.update({n.role: f"{p}.{n.path}" for n in spec.norms})
        legacy = {r: projs[r] for r in LEGACY_ROLES if r in projs and isinstance(projs[r], nn.Linear)}
        layers.append(LayerModules(
            index=i, prefix=p, attn=_get(layer, spec.attn), projs=projs, norms=norms, names=names,
            input_norm=norms.get("input_norm"), post_attn_norm=norms.get("post_attn_norm"), **legacy,
        ))

    hidden = int(config.hidden_size)
    num_heads = int(config.num_attention_heads)
    num_kv = int(getattr(config, "num_key_value_heads", None) or num_heads)
    o0 = layers[0].weight(spec, spec.o_role)
    head_dim = o0.shape[-1] // num_heads
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
    optional = [p for p in spec.projs if p.optional]
    for i, layer in enumerate(layers):
        where = f"{spec.decoder}.{spec.layers}.{i}"
        for pr in spec.projs:
            if not pr.optional and not _has_param(_get(layer, pr.path), pr):
                what = "nn.Linear" if pr.is_linear else f"tensor {pr.param}"
                missing.append(f"{where}.{pr.path} ({what})")
        if optional:  # each layer needs every role of at least one MLP variant: check the readers
            present = {pr.role for pr in optional if _has_param(_get(layer, pr.path), pr)}
            if not any(p.side == "out" and p.role in present for p in optional):
                missing.append(f"{where}.{spec.mlp} (an MLP or MoE block of the {spec.model_type!r} layout)")
        for n in spec.norms:
            if _get(layer, n.path) is None:
                missing.append(f"{where}.{n.path}")
        if len(missing) > 12:
            break
    return ("missing " + ", ".join(missing)) if missing else ""


def part_rows(spec: ArchSpec, role: str, rows: int, num_heads: int, num_kv_heads: int, head_dim: int) -> dict[str, slice]:
    """``{part: row slice}`` of a fused projection with ``rows`` rows (``{role: slice(0, rows)}`` if not fused)."""
    pr = spec.proj(role)
    if not pr.parts:
        return {role: slice(0, rows)}
    size = {"q_heads": num_heads * head_dim, "kv_heads": num_kv_heads * head_dim, "half": rows // 2}
    out, start = {}, 0
    for name, kind in pr.parts:
        out[name] = slice(start, start + size[kind])
        start += size[kind]
    if start != rows:
        raise UnsupportedModelError(f"{role} has {rows} rows, but its parts {pr.parts} add up to {start}")
    return out


def _shape_problems(m: DecoderModules) -> str:
    out: list[str] = []
    spec, h, d, nh, nkv = m.spec, m.hidden, m.head_dim, m.num_heads, m.num_kv_heads
    if m.embed.weight.shape[1] != h:
        out.append(f"embedding width {m.embed.weight.shape[1]} != hidden_size {h}")
    if m.lm_head.in_features != h:
        out.append(f"lm_head in_features {m.lm_head.in_features} != hidden_size {h}")
    if nh % nkv:
        out.append(f"num_attention_heads {nh} is not a multiple of num_key_value_heads {nkv}")
    for L in m.layers:
        for role in L.projs:
            pr = spec.proj(role)
            W = L.weight(spec, role)
            dim = -1 if pr.side == "in" else -2
            if W.ndim != (3 if pr.experts else 2) or W.shape[dim] != h:
                out.append(f"{L.param_name(spec, role)} {tuple(W.shape)}: expected the hidden size {h} "
                           f"on its {'input' if pr.side == 'in' else 'output'} side")
        vrole, vpart = spec.v_rows
        try:
            vrows = part_rows(spec, vrole, L.weight(spec, vrole).shape[0], nh, nkv, d)[vpart or vrole]
            if vrows.stop - vrows.start != nkv * d:
                out.append(f"{L.names[vrole]}: {vrows.stop - vrows.start} value rows, expected {nkv * d}")
        except UnsupportedModelError as e:
            out.append(str(e))
        if L.weight(spec, spec.o_role).shape[-1] != nh * d:
            out.append(f"{L.names[spec.o_role]}: {L.weight(spec, spec.o_role).shape[-1]} input columns, "
                       f"expected {nh} heads x {d}")
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


def check_rms_norm(name: str, norm: nn.Module, hidden: int, kind: str = "rms") -> None:
    """Raise :class:`UnsupportedModelError` unless ``norm(x) == x / rms(x) * s`` with ``s`` the
    effective scale of ``kind`` (``w`` for ``"rms"``, ``1 + w`` for ``"rms1p"``).

    Checked numerically on random inputs (in the norm's dtype), so a mean-subtracting LayerNorm, a
    bias, or the wrong parametrization is rejected. Norm fusion and the R1 invariance
    ``rms(x @ R) = rms(x)`` rely on this exact form.
    """
    if kind == "layernorm":
        raise UnsupportedModelError(f"{name} is a mean-subtracting LayerNorm: not rotation-invariant, not supported")
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
        want = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * effective_scale(w, kind)
    tol = 1e-2 if w.dtype in (torch.float16, torch.bfloat16) else 1e-4
    err = ((got - want).norm() / want.norm().clamp_min(1e-30)).item()
    if not err < tol:
        form = "(1 + weight)" if kind == "rms1p" else "weight"
        raise UnsupportedModelError(
            f"{name} ({type(norm).__name__}) is not an RMSNorm x / rms(x) * {form} (relative "
            f"deviation {err:.2e}); mean-subtracting LayerNorm and other parametrizations are not supported"
        )
