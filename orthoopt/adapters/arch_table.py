"""The declarative architecture table: the one file a contributor edits to add an architecture.

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

from collections.abc import Iterable
from dataclasses import dataclass

NORM_KINDS = ("rms", "rms1p", "layernorm")
"""``rms``: ``x / rms(x) * w`` (identity: ``w = 1``); ``rms1p``: ``x / rms(x) * (1 + w)`` (identity: ``w = 0``);
``layernorm``: ``(x - mean) / std * w + b`` (not rotation-invariant; refused)."""

PART_SIZES = ("q_heads", "kv_heads", "half")
"""Row counts of the parts of a fused projection: ``num_heads * head_dim``, ``num_kv_heads * head_dim``,
half of the rows (``gate_up``)."""

GROUPS = {
    "attn_in": "attention input (q/k/v_proj)",
    "attn_out": "attention output (o_proj input)",
    "mlp_in": "MLP input (gate/up_proj)",
    "mlp_hidden": "MLP hidden (down_proj input)",
    "expert_hidden": "MoE experts' hidden (experts' down_proj input)",
    "shared_hidden": "MoE shared expert's hidden (its down_proj input)",
}
"""``{Proj.group: label}``: every input-sharing group a table entry may use, in forward order, with
the label diagnostics print for it (``tests/test_architectures.py`` checks every entry's groups are
here)."""


@dataclass(frozen=True)
class Proj:
    """One weight of a decoder layer on the residual stream.

    role:    unique name within the layer (``"q"``, ``"qkv"``, ``"down"``, ``"router"``, ``"experts.down"``).
    path:    module path relative to the layer (``"self_attn.q_proj"``, ``"mlp.experts"``).
    side:    ``"in"`` reads the stream (``W @ R1``), ``"out"`` writes it (``R1.T @ W``, bias ``b @ R1``).
    group:   projections with the same group read the same tensor, a key of :data:`GROUPS`
             (``"attn_in"``, ``"attn_out"``, ``"mlp_in"``, ``"mlp_hidden"``, ...).
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

    def input_leaders(self, roles: Iterable[str]) -> dict[str, list[str]]:
        """``{leader: [roles reading its input]}`` for ``roles``: one entry per input-sharing group that
        has any of them, led by the first of them in the table's order (one hook records the group's
        input); a role of no group of the table leads itself."""
        wanted = list(dict.fromkeys(roles))
        out: dict[str, list[str]] = {}
        for group in self.groups:
            present = [r for r in group if r in wanted]
            if present:
                out[present[0]] = present
        grouped = {r for g in self.groups for r in g}
        out.update({r: [r] for r in wanted if r not in grouped})
        return out

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


EXPERT_PARAMS = ("gate_up_proj", "down_proj")
"""The 3-D parameters of a fused experts module (transformers' layout, ``[experts, 2 * inter, hidden]``
and ``[experts, hidden, inter]``): the table's ``experts.gate_up`` / ``experts.down`` params, which
:mod:`orthoopt.quant.experts` reads the module by."""
_MOE_ROUTED = (
    Proj("router", "mlp.gate", "in", "mlp_in", quantize=False),
    Proj("experts.gate_up", "mlp.experts", "in", "mlp_in", param=EXPERT_PARAMS[0],
          parts=(("gate", "half"), ("up", "half")), experts=True),
    Proj("experts.down", "mlp.experts", "out", "expert_hidden", param=EXPERT_PARAMS[1], experts=True),
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


__all__ = ["ARCHS", "ArchSpec", "EXPERT_PARAMS", "GROUPS", "NORM_KINDS", "Norm", "PART_SIZES", "Proj"]
