"""Tensor names and sizes of a decoder checkpoint, from the architecture table.

The names are those of :data:`orthoopt.adapters.arch_table.ARCHS`: a module path (``model.layers.3.mlp.up_proj``)
plus ``.weight`` / ``.bias`` is a safetensors key. Block names are the adapter's
(``DecoderAdapter.weight_blocks``: relative to the decoder, e.g. ``layers.3.mlp.up_proj``, and
``lm_head``), so the streamed blocks can be checked against the in-memory ones.
"""

from __future__ import annotations

from dataclasses import dataclass

from orthoopt.adapters.arch_table import ARCHS, ArchSpec
from orthoopt.adapters.archs import UnsupportedModelError, layer_problems, part_rows, spec_for
from orthoopt.models.safetensors_folder import SafetensorsCheckpoint

_LLAMA = ARCHS["llama"]
ROLES = _LLAMA.roles
"""Projections of a Llama layer in the adapter's block order (derived from the table; every other
architecture: :meth:`DecoderLayout.roles`)."""


@dataclass(frozen=True)
class DecoderLayout:
    """Where every tensor of a supported decoder lives in its checkpoint.

    tied: ``lm_head`` shares the embedding (``tie_word_embeddings``; the checkpoint then stores no
    ``lm_head.weight``).
    """

    spec: ArchSpec
    num_layers: int
    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate: int
    tied: bool
    layer_roles: tuple[tuple[str, ...], ...] | None = None
    """Roles present in each layer (optional roles may be absent); None: every role of the table."""
    expert_counts: tuple[tuple[tuple[str, int], ...], ...] | None = None
    """``((role, experts), ...)`` per layer for expert tensors."""

    @classmethod
    def from_checkpoint(cls, ckpt: SafetensorsCheckpoint, arch: str | None = None) -> DecoderLayout:
        """Read the layout off ``config.json`` and the tensor shapes. ``arch`` overrides ``model_type``
        as in :func:`orthoopt.adapters.archs.locate`. Raises ``UnsupportedModelError`` naming what is
        missing or malformed."""
        cfg = ckpt.config
        model_type = cfg.get("model_type")
        key = arch if arch is not None else model_type
        spec = spec_for(model_type, arch)
        if any(p.experts for p in spec.projs):
            raise UnsupportedModelError(
                f"model_type {model_type!r}: streamed rotation does not support MoE checkpoints: their experts are "
                "stored one tensor per expert on disk (mlp.experts.<e>.gate_proj ...), while the architecture "
                "table describes the [experts, out, in] tensors transformers loads; rotate it in memory instead"
            )
        missing = [k for k in ("hidden_size", "num_attention_heads", "num_hidden_layers") if cfg.get(k) is None]
        if missing:
            raise UnsupportedModelError(f"{ckpt.path}/config.json lacks {missing}")
        hidden, heads, layers = int(cfg["hidden_size"]), int(cfg["num_attention_heads"]), int(cfg["num_hidden_layers"])
        kv = int(cfg.get("num_key_value_heads") or heads)
        probe = cls(spec, layers, hidden, heads, kv, 1, 1, False)
        absent = [f"{spec.decoder}.{name}" for name in (spec.embed, spec.final_norm)
                  if probe.key(name) not in ckpt]
        absent += [f"{spec.decoder}.{name}" for name in layer_problems(
            spec, layers, lambda path, pr: probe.key(path, pr.param if pr is not None else "weight") in ckpt)]
        if absent:
            raise UnsupportedModelError(f"checkpoint {ckpt.path} does not have the {key!r} layout: missing "
                                        + ", ".join(absent))
        roles, experts = [], []
        for i in range(layers):
            names = probe.layer_modules(i)
            have = tuple(p.role for p in spec.projs if probe.key(names[p.role], p.param) in ckpt)
            roles.append(have)
            experts.append(tuple((p.role, ckpt.shape(probe.key(names[p.role], p.param))[0])
                                 for p in spec.projs if p.experts and p.role in have))
        names0 = probe.layer_modules(0)
        o_in = ckpt.shape(probe.key(names0[spec.o_role], spec.proj(spec.o_role).param))[-1]
        if o_in % heads:
            raise UnsupportedModelError(f"{names0[spec.o_role]} has {o_in} input columns, not a multiple of {heads} heads")
        writer = next((p for p in spec.projs if p.side == "out" and p.role != spec.o_role and p.role in roles[0]), None)
        inter = ckpt.shape(probe.key(names0[writer.role], writer.param))[-1] if writer is not None else 0
        has_head = probe.key(spec.lm_head, top=True) in ckpt
        tied = bool(cfg.get("tie_word_embeddings", not has_head))
        if not tied and not has_head:
            raise UnsupportedModelError(f"{ckpt.path}: no {spec.lm_head}.weight and tie_word_embeddings is false")
        out = cls(spec, layers, hidden, heads, kv, o_in // heads, inter, tied, tuple(roles), tuple(experts))
        out.check_shapes(ckpt)
        return out

    # names ------------------------------------------------------------------------------------
    @property
    def embed(self) -> str:
        return self.spec.embed

    @property
    def final_norm(self) -> str:
        return self.spec.final_norm

    @property
    def lm_head(self) -> str:
        return self.spec.lm_head

    def key(self, module: str, param: str = "weight", top: bool = False) -> str:
        """Safetensors key of ``module`` (relative to the decoder unless ``top``, as ``lm_head`` is)."""
        if module == self.spec.lm_head:
            top = True
        return f"{module}.{param}" if top else f"{self.spec.decoder}.{module}.{param}"

    def layer_prefix(self, i: int) -> str:
        """Key prefix of every tensor of layer ``i`` (``model.layers.3.``)."""
        return f"{self.spec.decoder}.{self.spec.layers}.{i}."

    def layer_modules(self, i: int) -> dict[str, str]:
        """``{role: module name}`` of layer ``i``, as ``locate`` names them: every projection role of the
        table (:meth:`roles`; optional ones too) and every norm role (``input_norm``, ...)."""
        s, p = self.spec, f"{self.spec.layers}.{i}"
        out = {pr.role: f"{p}.{pr.path}" for pr in s.projs}
        out.update({n.role: f"{p}.{n.path}" for n in s.norms})
        return out

    def layer_key_prefix(self, i: int) -> str:
        """The prefix of layer ``i``'s keys without the trailing dot (``model.layers.3``), as the
        tensor-level functions of :mod:`orthoopt.adapters.writeback` take it."""
        return self.layer_prefix(i)[:-1]

    def roles(self, i: int | None = None) -> tuple[str, ...]:
        """Projection roles (of layer ``i``, or of the table), in block order."""
        if i is None or self.layer_roles is None:
            return self.spec.roles
        return self.layer_roles[i]

    def param_key(self, i: int, role: str) -> str:
        """Safetensors key of role ``role``'s weight in layer ``i``."""
        return self.key(self.layer_modules(i)[role], self.spec.proj(role).param)

    def r1_blocks(self, untie: bool) -> list[tuple[str, str]]:
        """``(block name, side)`` of R1 in the adapter's order: embedding, per layer the table's
        projections (expert tensors: one block per expert), then ``lm_head`` unless it stays tied
        (``untie``: fusion gives it its own weight)."""
        out = [(self.embed, "in")]
        for i in range(self.num_layers):
            names = self.layer_modules(i)
            experts = dict(self.expert_counts[i]) if self.expert_counts is not None else {}
            for r in self.roles(i):
                pr = self.spec.proj(r)
                if pr.experts:
                    out += [(f"{names[r]}.{pr.param}.{e}", pr.side) for e in range(experts[r])]
                else:
                    out.append((names[r], pr.side))
        if not self.tied or untie:
            out.append((self.lm_head, "in"))
        return out

    def check_shapes(self, ckpt: SafetensorsCheckpoint) -> None:
        """Raise ``UnsupportedModelError`` naming every tensor whose shape does not fit the layout."""
        h, d, nh, nkv = self.hidden, self.head_dim, self.num_heads, self.num_kv_heads
        want = {self.key(self.embed): (None, h), self.key(self.final_norm): (h,)}
        if not self.tied:
            want[self.key(self.lm_head)] = (None, h)
        s = self.spec
        for i in range(self.num_layers):
            n = self.layer_modules(i)
            for r in self.roles(i):
                pr = s.proj(r)
                lead = (None,) if pr.experts else ()
                want[self.key(n[r], pr.param)] = lead + ((None, h) if pr.side == "in" else (h, None))
            want[self.key(n[s.o_role], s.proj(s.o_role).param)] = (h, nh * d)
            want.update({self.key(n[x.role]): (h,) for x in s.norms})
        bad = []
        for name, shape in want.items():
            got = ckpt.shape(name)
            if len(got) != len(shape) or any(w is not None and g != w for g, w in zip(got, shape)):
                bad.append(f"{name} {got}, expected {tuple('*' if w is None else w for w in shape)}")
        vrole, vpart = s.v_rows
        for i in range(self.num_layers):
            rows = ckpt.shape(self.param_key(i, vrole))[0]
            sl = part_rows(s, vrole, rows, nh, nkv, d)[vpart or vrole]
            if sl.stop - sl.start != nkv * d:
                bad.append(f"{self.param_key(i, vrole)}: {sl.stop - sl.start} value rows, expected {nkv * d}")
        if nh % nkv:
            bad.append(f"num_attention_heads {nh} is not a multiple of num_key_value_heads {nkv}")
        if bad:
            raise UnsupportedModelError(f"{ckpt.path}: unexpected shapes: {'; '.join(bad[:6])}")
