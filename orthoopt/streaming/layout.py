"""Tensor names and sizes of a decoder checkpoint, from the architecture table.

The names are those of :data:`orthoopt.adapters.archs.ARCHS`: a module path (``model.layers.3.mlp.up_proj``)
plus ``.weight`` / ``.bias`` is a safetensors key. Block names are the adapter's
(``DecoderAdapter.weight_blocks``: relative to the decoder, e.g. ``layers.3.mlp.up_proj``, and
``lm_head``), so the streamed blocks can be checked against the in-memory ones.
"""

from __future__ import annotations

from dataclasses import dataclass

from orthoopt.adapters.archs import ARCHS, ArchSpec, UnsupportedModelError
from orthoopt.streaming.checkpoint import SafetensorsCheckpoint

ROLES = ("q", "k", "v", "o", "gate", "up", "down")
"""Projections of a layer in the adapter's block order; ``o`` and ``down`` write the residual (side "out")."""
OUT_ROLES = ("o", "down")
NORM_READERS = {"input_norm": ("q", "k", "v"), "post_attn_norm": ("gate", "up")}
"""Residual RMSNorms and the projections that read them (``orthoopt.adapters.fusion``)."""


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

    @classmethod
    def from_checkpoint(cls, ckpt: SafetensorsCheckpoint, arch: str | None = None) -> DecoderLayout:
        """Read the layout off ``config.json`` and the tensor shapes. ``arch`` overrides ``model_type``
        as in :func:`orthoopt.adapters.archs.locate`. Raises ``UnsupportedModelError`` naming what is
        missing or malformed."""
        cfg = ckpt.config
        model_type = cfg.get("model_type")
        key = arch if arch is not None else model_type
        if key not in ARCHS:
            raise UnsupportedModelError(
                f"model_type {model_type!r} is not supported (supported: {sorted(ARCHS)}); "
                "a decoder with the Llama layout may be forced with arch='llama'"
            )
        spec = ARCHS[key]
        missing = [k for k in ("hidden_size", "num_attention_heads", "num_hidden_layers") if cfg.get(k) is None]
        if missing:
            raise UnsupportedModelError(f"{ckpt.path}/config.json lacks {missing}")
        hidden, heads, layers = int(cfg["hidden_size"]), int(cfg["num_attention_heads"]), int(cfg["num_hidden_layers"])
        kv = int(cfg.get("num_key_value_heads") or heads)
        probe = cls(spec, layers, hidden, heads, kv, 1, 1, False)
        needed = [probe.key(probe.embed), probe.key(probe.final_norm)]
        for i in range(layers):
            needed += [probe.key(m) for m in probe.layer_modules(i).values()]
        absent = [n for n in needed if n not in ckpt]
        if absent:
            raise UnsupportedModelError(
                f"checkpoint {ckpt.path} does not have the {key!r} layout: missing {absent[:6]}"
                + (f" and {len(absent) - 6} more" if len(absent) > 6 else "")
            )
        names0 = probe.layer_modules(0)
        q_out = ckpt.shape(probe.key(names0["q"]))[0]
        if q_out % heads:
            raise UnsupportedModelError(f"q_proj has {q_out} rows, not a multiple of {heads} heads")
        inter = ckpt.shape(probe.key(names0["gate"]))[0]
        has_head = probe.key(spec.lm_head, top=True) in ckpt
        tied = bool(cfg.get("tie_word_embeddings", not has_head))
        if not tied and not has_head:
            raise UnsupportedModelError(f"{ckpt.path}: no {spec.lm_head}.weight and tie_word_embeddings is false")
        out = cls(spec, layers, hidden, heads, kv, q_out // heads, inter, tied)
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
        """``{role: module name}`` of layer ``i``, as ``locate`` names them (roles: :data:`ROLES`,
        ``input_norm``, ``post_attn_norm``)."""
        s = self.spec
        p, pa, pm = f"{s.layers}.{i}", f"{s.layers}.{i}.{s.attn}", f"{s.layers}.{i}.{s.mlp}"
        return {
            "input_norm": f"{p}.{s.input_norm}", "post_attn_norm": f"{p}.{s.post_attn_norm}",
            "q": f"{pa}.{s.q}", "k": f"{pa}.{s.k}", "v": f"{pa}.{s.v}", "o": f"{pa}.{s.o}",
            "gate": f"{pm}.{s.gate}", "up": f"{pm}.{s.up}", "down": f"{pm}.{s.down}",
        }

    def r1_blocks(self, untie: bool) -> list[tuple[str, str]]:
        """``(block name, side)`` of R1 in the adapter's order: embedding, per layer q, k, v, o, gate, up,
        down, then ``lm_head`` unless it stays tied (``untie``: fusion gives it its own weight)."""
        out = [(self.embed, "in")]
        for i in range(self.num_layers):
            names = self.layer_modules(i)
            out += [(names[r], "out" if r in OUT_ROLES else "in") for r in ROLES]
        if not self.tied or untie:
            out.append((self.lm_head, "in"))
        return out

    def check_shapes(self, ckpt: SafetensorsCheckpoint) -> None:
        """Raise ``UnsupportedModelError`` naming every tensor whose shape does not fit the layout."""
        h, d, nh, nkv, f = self.hidden, self.head_dim, self.num_heads, self.num_kv_heads, self.intermediate
        want = {self.key(self.embed): (None, h), self.key(self.final_norm): (h,)}
        if not self.tied:
            want[self.key(self.lm_head)] = (None, h)
        for i in range(self.num_layers):
            n = self.layer_modules(i)
            want.update({
                self.key(n["q"]): (nh * d, h), self.key(n["k"]): (nkv * d, h), self.key(n["v"]): (nkv * d, h),
                self.key(n["o"]): (h, nh * d), self.key(n["gate"]): (f, h), self.key(n["up"]): (f, h),
                self.key(n["down"]): (h, f), self.key(n["input_norm"]): (h,), self.key(n["post_attn_norm"]): (h,),
            })
        bad = []
        for name, shape in want.items():
            got = ckpt.shape(name)
            if len(got) != len(shape) or any(w is not None and g != w for g, w in zip(got, shape)):
                bad.append(f"{name} {got}, expected {tuple('*' if w is None else w for w in shape)}")
        if nh % nkv:
            bad.append(f"num_attention_heads {nh} is not a multiple of num_key_value_heads {nkv}")
        if bad:
            raise UnsupportedModelError(f"{ckpt.path}: unexpected shapes: {'; '.join(bad[:6])}")
