"""The located modules of a decoder: :func:`locate` finds, by the architecture table
(:mod:`orthoopt.adapters.arch_table`, which says what each architecture has and where), the modules
of a loaded model, checks the layout once and gives :class:`DecoderModules`; the norm helpers that
fusion and write-back share live here too.

"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from orthoopt.adapters.arch_table import ARCHS, ArchSpec, Proj
from orthoopt.errors import OrthooptError


@dataclass
class LayerModules:
    """The modules of decoder layer ``index``; ``prefix`` is its name, e.g. ``"layers.3"``.

    ``projs``: ``{role: owning module}`` for the roles this layer has (table order); ``norms``:
    ``{norm role: module}``; ``names``: ``{role or norm role: module name}`` relative to the decoder.
    Every architecture's roles are reached the same way, ``L.projs["down"]``, ``L.norms["input_norm"]``.
    """

    index: int
    prefix: str
    attn: nn.Module
    projs: dict[str, nn.Module]
    norms: dict[str, nn.Module]
    names: dict[str, str] = field(default_factory=dict)

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


def spec_for(model_type: str | None, arch: str | None = None, layout_check=None) -> ArchSpec:
    """The table entry of ``model_type`` (or of ``arch``, which overrides it); the one refusal of an
    unsupported model, for loaded models (:func:`locate`) and safetensors files
    (:class:`orthoopt.streaming.layout.DecoderLayout`) alike. ``layout_check``: a callable giving what
    the Llama layout would lack, appended to the message."""
    key = arch if arch is not None else model_type
    if key not in ARCHS:
        check = f". Layout check: {layout_check() or 'no missing modules'}" if layout_check is not None else ""
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported (supported: {sorted(ARCHS)}); "
            f"a decoder with the Llama layout may be forced with arch='llama'{check}"
        )
    return ARCHS[key]


def layer_problems(spec: ArchSpec, num_layers: int, has, limit: int = 12) -> list[str]:
    """What the decoder layers lack for ``spec``, as decoder-relative names (``layers.3.mlp.down_proj
    (nn.Linear)``); empty when nothing. The one layout validator of the layers, for a loaded model
    and a safetensors file alike: ``has(path, proj)`` says whether the decoder-relative module
    ``path`` exists, with ``proj``'s weight when ``proj`` is given (None: a norm). Every non-optional
    projection and every norm is required; of the optional ones (Qwen2-MoE's dense or expert MLP),
    each layer needs at least one variant's writer. Stops after ``limit`` problems."""
    missing: list[str] = []
    optional = [p for p in spec.projs if p.optional]
    for i in range(num_layers):
        where = f"{spec.layers}.{i}"
        for pr in spec.projs:
            if not pr.optional and not has(f"{where}.{pr.path}", pr):
                what = "nn.Linear" if pr.is_linear else f"tensor {pr.param}"
                missing.append(f"{where}.{pr.path} ({what})")
        if optional:
            present = {pr.role for pr in optional if has(f"{where}.{pr.path}", pr)}
            if not any(p.side == "out" and p.role in present for p in optional):
                missing.append(f"{where}.{spec.mlp} (an MLP or MoE block of the {spec.model_type!r} layout)")
        for n in spec.norms:
            if not has(f"{where}.{n.path}", None):
                missing.append(f"{where}.{n.path}")
        if len(missing) > limit:
            break
    return missing


def layer_output(output):
    """A decoder layer's hidden states (transformers 5 returns a tensor, 4.x a tuple)."""
    return output[0] if isinstance(output, tuple) else output


def locate(model: nn.Module, arch: str | None = None) -> DecoderModules:
    """Resolve the modules of ``model`` (a ``*ForCausalLM``) using ``ARCHS[arch]``.

    ``arch`` defaults to ``model.config.model_type``; pass ``arch="llama"`` to treat a decoder of the
    same layout under another ``model_type`` as Llama. Raises :class:`UnsupportedModelError` naming
    the ``model_type`` and every missing or malformed module.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    spec = spec_for(model_type, arch, lambda: _layout_problems(model, ARCHS["llama"]))
    key = arch if arch is not None else model_type
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
        layers.append(LayerModules(index=i, prefix=p, attn=_get(layer, spec.attn), projs=projs, norms=norms,
                                   names=names))

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
    def has(path: str, pr: Proj | None) -> bool:
        module = _get(dec, path)
        return module is not None if pr is None else _has_param(module, pr)

    missing += [f"{spec.decoder}.{name}" for name in layer_problems(spec, len(layers), has)]
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
