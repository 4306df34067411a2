"""A tiny decoder with the outlier structure of real LLMs, and a byte-level tokenizer.

Used by tests and examples when no real checkpoint is present (``../shared/models`` may be empty).
Everything is built locally and deterministically from a seed; nothing is downloaded.

What :func:`planted_outlier_model` plants (``h`` = hidden size; all draws from one
``numpy.random.default_rng(seed)``, in float64, then cast to ``dtype``):

============================  ==================================================================
parameter                     initial value
============================  ==================================================================
embedding ``[vocab, h]``      N(0, 1)
q/k/v/o projections           N(0, 1/fan_in)                          (std ``1/sqrt(fan_in)``)
gate/up/down projections      Student-t(``student_t_df``) rescaled to variance ``1/fan_in``
                              (heavy-tailed; Gaussian when ``student_t_df`` is None)
lm_head (when untied)         N(0, 1/h)
biases (q/k/v, o if present)  N(0, 0.1^2)
RMSNorm scales (all norms,    lognormal: ``exp(N(0, norm_log_std^2))`` (median 1)
incl. Qwen3 q_norm/k_norm)
============================  ==================================================================

Then the *outlier channels*: ``outlier_channels`` residual channels ``c`` (drawn without
replacement from the same generator) are multiplied by ``outlier_scale`` wherever the residual
stream is written: embedding columns ``E[:, c]``, output rows ``W_o[c, :]`` and ``W_down[c, :]``
(and their biases ``b[c]`` if any). The residual stream thus carries a few channels about
``outlier_scale`` times larger than the rest, as in real LLMs. The channels and settings are
recorded in ``model.config.planted_outliers`` (saved in ``config.json``).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

from orthoopt.adapters.archs import locate
from orthoopt.errors import InvalidInputError
from orthoopt.utils.atomic import atomic_dir

SPECIAL_TOKENS = ("<s>", "</s>", "<unk>")
"""Special tokens of :func:`byte_tokenizer`, with ids 256, 257, 258 after the 256 byte tokens."""

BYTE_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)

CONFIG_CLASSES: dict[str, type[PretrainedConfig]] = {
    "llama": LlamaConfig,
    "mistral": MistralConfig,
    "qwen2": Qwen2Config,
    "qwen3": Qwen3Config,
}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters.

    The ``tokenizers`` ByteLevel pre-tokenizer turns text into these characters, so a vocabulary of
    exactly them encodes any text.
    """
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer: token ``i < 256`` is byte ``i``; then ``<s>``, ``</s>``, ``<unk>``.

    Built locally with ``tokenizers`` (BPE without merges over the 256 byte symbols), so every text
    round-trips: ``decode(encode(t)) == t``. No special token is added on encoding. ``pad_token`` is
    ``</s>``. Saved with ``save_pretrained``; ``AutoTokenizer.from_pretrained`` loads it back.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    for i, tok in enumerate(SPECIAL_TOKENS):
        vocab[tok] = 256 + i
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    bos, eos, unk = SPECIAL_TOKENS
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token=bos, eos_token=eos, unk_token=unk,
                                   pad_token=eos)


def _config(arch: str, hidden_size: int, num_layers: int, num_heads: int, num_kv_heads: int | None,
            head_dim: int | None, intermediate_size: int | None, vocab_size: int,
            tie_word_embeddings: bool, attention_bias: bool | None) -> PretrainedConfig:
    if arch not in CONFIG_CLASSES:
        raise InvalidInputError(f"arch must be one of {sorted(CONFIG_CLASSES)}, got {arch!r}")
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    if num_heads < 1 or num_kv_heads < 1 or num_heads % num_kv_heads:
        raise InvalidInputError(f"num_heads ({num_heads}) must be a positive multiple of num_kv_heads ({num_kv_heads})")
    if head_dim is None:
        if hidden_size % num_heads:
            raise InvalidInputError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}; give head_dim")
        head_dim = hidden_size // num_heads
    kw = dict(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=num_kv_heads, head_dim=head_dim,
        intermediate_size=intermediate_size if intermediate_size is not None else 2 * hidden_size,
        tie_word_embeddings=tie_word_embeddings, max_position_embeddings=2048,
    )
    if vocab_size >= BYTE_VOCAB_SIZE:
        kw.update(bos_token_id=256, eos_token_id=257, pad_token_id=257)
    # Qwen2 always has q/k/v biases, Mistral never; Llama and Qwen3 make it an option.
    fixed = {"qwen2": True, "mistral": False}
    if arch in fixed:
        if attention_bias is not None and attention_bias != fixed[arch]:
            raise InvalidInputError(f"{arch} has attention_bias={fixed[arch]} fixed, got {attention_bias}")
    elif attention_bias is not None:
        kw["attention_bias"] = attention_bias
    return CONFIG_CLASSES[arch](**kw)


def planted_outlier_model(
    arch: str = "llama",
    hidden_size: int = 512,
    num_layers: int = 8,
    num_heads: int = 8,
    num_kv_heads: int | None = None,
    head_dim: int | None = None,
    intermediate_size: int | None = None,
    vocab_size: int = BYTE_VOCAB_SIZE,
    tie_word_embeddings: bool = False,
    attention_bias: bool | None = None,
    seed: int = 0,
    outlier_channels: int = 4,
    outlier_scale: float = 20.0,
    student_t_df: float | None = 3.0,
    norm_log_std: float = 0.3,
    dtype: torch.dtype = torch.float32,
) -> PreTrainedModel:
    """A seeded ``*ForCausalLM`` of ``arch`` ("llama" | "mistral" | "qwen2" | "qwen3") with planted outliers.

    The config is a real ``transformers`` config (``LlamaConfig``, ``MistralConfig``, ``Qwen2Config``,
    ``Qwen3Config``); ``num_kv_heads`` < ``num_heads`` gives grouped-query attention; ``head_dim``
    defaults to ``hidden_size // num_heads``; ``intermediate_size`` to ``2 * hidden_size``;
    ``attention_bias`` None keeps the architecture's default (Qwen2: q/k/v biases). The weights are
    described in the module docstring. Same arguments -> bit-identical weights. The model is in
    eval mode. Defaults (hidden 512, 8 layers, 21M parameters) run 8 x 128 tokens in well under a
    second on a CPU.
    """
    if not 0 <= outlier_channels <= hidden_size:
        raise InvalidInputError(f"outlier_channels must be in [0, hidden_size={hidden_size}], got {outlier_channels}")
    if student_t_df is not None and not student_t_df > 2:
        raise InvalidInputError(f"student_t_df must be > 2 (finite variance) or None, got {student_t_df}")
    config = _config(arch, hidden_size, num_layers, num_heads, num_kv_heads, head_dim, intermediate_size,
                     vocab_size, tie_word_embeddings, attention_bias)
    model = AutoModelForCausalLM.from_config(config).to(dtype).eval()
    m = locate(model)
    rng = np.random.default_rng(seed)

    def normal(shape, std):
        return torch.from_numpy(rng.standard_normal(shape)) * std

    def student_t(shape, std):
        if student_t_df is None:
            return normal(shape, std)
        t = torch.from_numpy(rng.standard_t(student_t_df, shape))  # variance df / (df - 2)
        return t * (std / math.sqrt(student_t_df / (student_t_df - 2)))

    def lognormal(shape):
        return torch.exp(normal(shape, norm_log_std))

    def put(p: torch.Tensor, value: torch.Tensor) -> None:
        p.data.copy_(value.to(p.dtype))

    channels = torch.from_numpy(np.sort(rng.permutation(hidden_size)[:outlier_channels]))

    def set_linear(lin: nn.Linear, init, residual_writer: bool) -> None:
        W = init(tuple(lin.weight.shape), 1 / math.sqrt(lin.in_features))
        b = normal((lin.out_features,), 0.1) if lin.bias is not None else None
        if residual_writer:
            W[channels, :] *= outlier_scale
            if b is not None:
                b[channels] *= outlier_scale
        put(lin.weight, W)
        if b is not None:
            put(lin.bias, b)

    with torch.no_grad():
        E = normal(tuple(m.embed.weight.shape), 1.0)
        E[:, channels] *= outlier_scale
        put(m.embed.weight, E)
        for L in m.layers:
            put(L.norms["input_norm"].weight, lognormal((hidden_size,)))
            put(L.norms["post_attn_norm"].weight, lognormal((hidden_size,)))
            for lin in (L.projs["q"], L.projs["k"], L.projs["v"]):
                set_linear(lin, normal, residual_writer=False)
            set_linear(L.projs["o"], normal, residual_writer=True)
            for lin in (L.projs["gate"], L.projs["up"]):
                set_linear(lin, student_t, residual_writer=False)
            set_linear(L.projs["down"], student_t, residual_writer=True)
            if m.spec.qk_norms:
                for norm_name in m.spec.qk_norms:
                    w = getattr(L.attn, norm_name).weight
                    put(w, lognormal(tuple(w.shape)))
        put(m.final_norm.weight, lognormal((hidden_size,)))
        if not m.tied:
            set_linear(m.lm_head, normal, residual_writer=False)

    model.config.planted_outliers = {
        "channels": channels.tolist(), "scale": float(outlier_scale), "student_t_df": student_t_df,
        "norm_log_std": float(norm_log_std), "seed": int(seed),
    }
    return model


def save_planted(path: str | os.PathLike, **kw) -> Path:
    """Write ``planted_outlier_model(**kw)`` and :func:`byte_tokenizer` to folder ``path`` atomically.

    The folder loads with ``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained``.
    ``vocab_size`` must cover the tokenizer (at least 259). Returns ``Path(path)``.
    """
    vocab = kw.get("vocab_size", BYTE_VOCAB_SIZE)
    if vocab < BYTE_VOCAB_SIZE:
        raise InvalidInputError(f"vocab_size {vocab} is smaller than the byte tokenizer's {BYTE_VOCAB_SIZE} tokens")
    model = planted_outlier_model(**kw)
    tokenizer = byte_tokenizer()
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return Path(path)
