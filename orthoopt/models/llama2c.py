"""Karpathy's llama2.c checkpoints (``.bin``) <-> ``transformers.LlamaForCausalLM``.

Two float32 layouts are read (little endian):

* version 0 ("legacy"): a header of 7 int32 ``dim, hidden_dim, n_layers, n_heads, n_kv_heads,
  vocab_size, max_seq_len`` (a negative ``vocab_size`` flags an unshared classifier), then
  ``token_embedding [V, D]``, ``rms_att [L, D]``, ``wq [L, D, D]``, ``wk [L, KV, D]``, ``wv [L, KV, D]``,
  ``wo [L, D, D]``, ``rms_ffn [L, D]``, ``w1 [L, H, D]`` (gate), ``w2 [L, D, H]`` (down),
  ``w3 [L, H, D]`` (up), ``rms_final [D]``, ``freq_cis_real``/``freq_cis_imag [S, hs/2]``, and
  ``wcls [V, D]`` when unshared. Matrices are PyTorch ``[out, in]``, row-major.
* version 1: magic ``0x616b3432`` ("ak42"), int32 version, the same 7 ints (``vocab_size`` positive),
  a byte ``shared_classifier``, zero padding to 256 bytes, then the norms first (``rms_att``,
  ``rms_ffn``, ``rms_final``), the embedding, wq, wk, wv, wo, w1, w2, w3 and ``wcls`` if unshared.

llama2.c applies RoPE to interleaved pairs ``(2i, 2i+1)`` of each head; Hugging Face Llama pairs
``(i, i + hs/2)``. The converter permutes the rows of wq and wk per head accordingly (the same
permutation as ``transformers``' Llama conversion script). RMSNorm epsilon is llama2.c's 1e-5;
the RoPE base is read off the version-0 frequency table (10000 for version 1, as in ``run.c``).
Version 2 (int8) files are rejected.
"""

from __future__ import annotations

import math
import os
import struct
from pathlib import Path

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from orthoopt.adapters.archs import locate
from orthoopt.errors import InvalidInputError
from orthoopt.utils.atomic import atomic_file

MAGIC = 0x616B3432
NORM_EPS = 1e-5
HEADER_V1_BYTES = 256


def _from_interleaved(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows ``[h, i, c]`` (pair ``i``, component ``c``) -> ``[h, c, i]`` (Hugging Face rotate_half)."""
    d1, d2 = w.shape
    return w.reshape(heads, d1 // heads // 2, 2, d2).transpose(1, 2).reshape(d1, d2)


def _to_interleaved(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Inverse of :func:`_from_interleaved`."""
    d1, d2 = w.shape
    return w.reshape(heads, 2, d1 // heads // 2, d2).transpose(1, 2).reshape(d1, d2)


def _read_header(raw: bytes, path: Path) -> tuple[int, int, list[int], bool]:
    """``(version, data offset in bytes, [D, H, L, nh, nkv, V, S], shared classifier)``."""
    if len(raw) < 28:
        raise InvalidInputError(f"{path}: too short for a llama2.c checkpoint ({len(raw)} bytes)")
    if struct.unpack("<I", raw[:4])[0] == MAGIC:
        version = struct.unpack("<i", raw[4:8])[0]
        if version != 1:
            raise InvalidInputError(f"{path}: llama2.c version {version} is not supported (only float32 versions 0 and 1)")
        params = list(struct.unpack("<7i", raw[8:36]))
        return 1, HEADER_V1_BYTES, params, bool(raw[36])
    params = list(struct.unpack("<7i", raw[:28]))
    shared = params[5] > 0
    params[5] = abs(params[5])
    return 0, 28, params, shared


def is_llama2c(path: str | os.PathLike) -> bool:
    """True if ``path`` is a file whose header and size match a llama2.c float32 checkpoint."""
    try:
        _layout(Path(path))
        return True
    except (ValueError, OSError):
        return False


def llama2c_file(path: Path) -> Path | None:
    """``path`` itself or the single llama2.c ``.bin`` inside folder ``path`` (None if there is none)."""
    if path.is_file():
        return path if is_llama2c(path) else None
    found = [p for p in sorted(path.glob("*.bin")) if is_llama2c(p)]
    if len(found) > 1:
        raise InvalidInputError(f"{path} holds several llama2.c checkpoints: {[p.name for p in found]}; pass one file")
    return found[0] if found else None


def _layout(path: Path):
    with open(path, "rb") as f:
        head = f.read(HEADER_V1_BYTES)
    version, offset, params, shared = _read_header(head, path)
    D, H, L, nh, nkv, V, S = params
    if min(params) < 1 or D % nh or nh % nkv or (D // nh) % 2:
        raise InvalidInputError(f"{path}: implausible llama2.c header {params} (dim, hidden_dim, n_layers, n_heads, "
                         f"n_kv_heads, vocab_size, max_seq_len)")
    hs = D // nh
    kv = nkv * hs
    shapes = {"embed": (V, D), "rms_att": (L, D), "wq": (L, D, D), "wk": (L, kv, D), "wv": (L, kv, D),
              "wo": (L, D, D), "rms_ffn": (L, D), "w1": (L, H, D), "w2": (L, D, H), "w3": (L, H, D),
              "rms_final": (D,), "freq_cos": (S, hs // 2), "freq_sin": (S, hs // 2), "wcls": (V, D)}
    if version == 0:
        order = list(shapes)
    else:
        order = ["rms_att", "rms_ffn", "rms_final", "embed", "wq", "wk", "wv", "wo", "w1", "w2", "w3", "wcls"]
    if shared:
        order.remove("wcls")
    floats = sum(math.prod(shapes[k]) for k in order)
    size = path.stat().st_size
    if size != offset + 4 * floats:
        raise InvalidInputError(f"{path}: {size} bytes, but a llama2.c v{version} checkpoint with header {params} "
                         f"has {offset + 4 * floats} bytes")
    return version, offset, params, shared, order, shapes


def _rope_theta(cos: np.ndarray, sin: np.ndarray, hs: int, path: Path) -> float:
    """The RoPE base that generated llama2.c's table ``cos/sin[p, i] = cos/sin(p * theta**(-2i/hs))``."""
    theta = 10000.0
    if cos.shape[0] > 1 and hs >= 4:
        angle = math.atan2(float(sin[1, 1]), float(cos[1, 1]))  # = theta ** (-2 / hs)
        if angle > 0:
            theta = angle ** (-hs / 2)
            if abs(theta - round(theta)) <= 1e-4 * theta:
                theta = float(round(theta))
    freqs = theta ** (-np.arange(0, hs, 2, dtype=np.float64) / hs)
    ang = np.outer(np.arange(cos.shape[0], dtype=np.float64), freqs)
    err = max(np.abs(np.cos(ang) - cos).max(), np.abs(np.sin(ang) - sin).max())
    if not err < 1e-3:
        raise InvalidInputError(f"{path}: the RoPE table is not a standard table with base {theta:g} (max deviation {err:.2e})")
    return theta


@torch.no_grad()
def read_llama2c(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """Load a llama2.c ``.bin`` (version 0 or 1, float32) as an eval-mode ``LlamaForCausalLM``.

    Raises FileNotFoundError for a missing file, ValueError for a malformed or unsupported one.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"llama2.c checkpoint not found: {path}")
    version, offset, params, shared, order, shapes = _layout(path)
    D, H, L, nh, nkv, V, S = params
    data = torch.from_numpy(np.fromfile(path, dtype="<f4", offset=offset))
    arrays, pos = {}, 0
    for key in order:
        n = math.prod(shapes[key])
        arrays[key] = data[pos:pos + n].reshape(shapes[key])
        pos += n
    theta = _rope_theta(arrays["freq_cos"].numpy(), arrays["freq_sin"].numpy(), D // nh, path) if version == 0 else 10000.0

    config = LlamaConfig(
        vocab_size=V, hidden_size=D, intermediate_size=H, num_hidden_layers=L, num_attention_heads=nh,
        num_key_value_heads=nkv, max_position_embeddings=S, rms_norm_eps=NORM_EPS, tie_word_embeddings=shared,
        rope_parameters={"rope_type": "default", "rope_theta": theta}, hidden_act="silu",
        attention_bias=False, mlp_bias=False, architectures=["LlamaForCausalLM"],
    )
    model = LlamaForCausalLM(config).to(dtype).eval()
    m = locate(model)

    def put(p: torch.Tensor, a: torch.Tensor) -> None:
        p.data.copy_(a.to(p.dtype))

    put(m.embed.weight, arrays["embed"])
    for i, Lm in enumerate(m.layers):
        put(Lm.norms["input_norm"].weight, arrays["rms_att"][i])
        put(Lm.projs["q"].weight, _from_interleaved(arrays["wq"][i], nh))
        put(Lm.projs["k"].weight, _from_interleaved(arrays["wk"][i], nkv))
        put(Lm.projs["v"].weight, arrays["wv"][i])
        put(Lm.projs["o"].weight, arrays["wo"][i])
        put(Lm.norms["post_attn_norm"].weight, arrays["rms_ffn"][i])
        put(Lm.projs["gate"].weight, arrays["w1"][i])
        put(Lm.projs["down"].weight, arrays["w2"][i])
        put(Lm.projs["up"].weight, arrays["w3"][i])
    put(m.final_norm.weight, arrays["rms_final"])
    if not shared:
        put(m.lm_head.weight, arrays["wcls"])
    return model


@torch.no_grad()
def write_llama2c(model: torch.nn.Module, path: str | os.PathLike, version: int = 0) -> Path:
    """Write a Llama-layout model as a llama2.c float32 ``.bin`` (version 0 or 1), atomically.

    Requires ``head_dim == hidden / heads``, no biases, RMSNorm epsilon 1e-5 and (version 1) RoPE
    base 10000; raises ValueError otherwise. The tied/untied classifier is kept.
    """
    if version not in (0, 1):
        raise InvalidInputError(f"version must be 0 or 1, got {version}")
    m = locate(model)
    cfg = model.config
    D, nh, nkv, hs = m.hidden, m.num_heads, m.num_kv_heads, m.head_dim
    theta = float((getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", 10000.0))
    problems = []
    if hs * nh != D:
        problems.append(f"head_dim {hs} != hidden {D} / heads {nh}")
    if any(lin.bias is not None for lin in m.linears().values()):
        problems.append("linear biases")
    if abs(float(cfg.rms_norm_eps) - NORM_EPS) > 1e-12:
        problems.append(f"rms_norm_eps {cfg.rms_norm_eps} (llama2.c uses {NORM_EPS})")
    if version == 1 and theta != 10000.0:
        problems.append(f"rope_theta {theta} (version 1 assumes 10000)")
    if problems:
        raise InvalidInputError("cannot write as llama2.c: " + "; ".join(problems))
    V, H, L, S = m.embed.weight.shape[0], m.layers[0].projs["gate"].out_features, len(m.layers), int(cfg.max_position_embeddings)
    shared = m.tied

    def f32(t: torch.Tensor) -> bytes:
        return t.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4").tobytes()

    norms_att = [f32(Lm.norms["input_norm"].weight) for Lm in m.layers]
    norms_ffn = [f32(Lm.norms["post_attn_norm"].weight) for Lm in m.layers]
    wq = [f32(_to_interleaved(Lm.projs["q"].weight, nh)) for Lm in m.layers]
    wk = [f32(_to_interleaved(Lm.projs["k"].weight, nkv)) for Lm in m.layers]
    wv = [f32(Lm.projs["v"].weight) for Lm in m.layers]
    wo = [f32(Lm.projs["o"].weight) for Lm in m.layers]
    w1 = [f32(Lm.projs["gate"].weight) for Lm in m.layers]
    w2 = [f32(Lm.projs["down"].weight) for Lm in m.layers]
    w3 = [f32(Lm.projs["up"].weight) for Lm in m.layers]
    with atomic_file(path, "wb") as f:
        if version == 0:
            f.write(struct.pack("<7i", D, H, L, nh, nkv, V if shared else -V, S))
            freqs = theta ** (-torch.arange(0, hs, 2, dtype=torch.float64) / hs)
            ang = torch.outer(torch.arange(S, dtype=torch.float64), freqs)
            parts = [f32(m.embed.weight), *norms_att, *wq, *wk, *wv, *wo, *norms_ffn, *w1, *w2, *w3,
                     f32(m.final_norm.weight), f32(torch.cos(ang)), f32(torch.sin(ang))]
        else:
            header = struct.pack("<Ii7iB", MAGIC, 1, D, H, L, nh, nkv, V, S, int(shared))
            f.write(header + b"\0" * (HEADER_V1_BYTES - len(header)))
            parts = [*norms_att, *norms_ffn, f32(m.final_norm.weight), f32(m.embed.weight),
                     *wq, *wk, *wv, *wo, *w1, *w2, *w3]
        if not shared:
            parts.append(f32(m.lm_head.weight))
        for p in parts:
            f.write(p)
    return Path(path)
