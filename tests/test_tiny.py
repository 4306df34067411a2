"""The planted-outlier model and the byte tokenizer (orthoopt.testing.tiny)."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM, AutoTokenizer

from orthoopt.testing import BYTE_VOCAB_SIZE, byte_tokenizer, planted_outlier_model, save_planted
from orthoopt.adapters.verify import logits_relative_error

SMALL = dict(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128)


def excess_kurtosis(x: torch.Tensor) -> float:
    x = x.detach().double().flatten()
    x = x - x.mean()
    return (x.pow(4).mean() / x.pow(2).mean() ** 2).item() - 3.0


def test_outlier_channels_dominate_the_residual_writers():
    model = planted_outlier_model(**SMALL, outlier_channels=3, outlier_scale=20.0)
    channels = model.config.planted_outliers["channels"]
    assert len(channels) == 3 and len(set(channels)) == 3
    rest = [c for c in range(64) if c not in channels]
    E = model.model.embed_tokens.weight.detach()
    col = E.norm(dim=0)
    assert col[channels].min() > 10 * col[rest].median()
    for L in model.model.layers:
        for W in (L.self_attn.o_proj.weight, L.mlp.down_proj.weight):
            row = W.detach().norm(dim=1)
            assert row[channels].min() > 10 * row[rest].median()
        # readers of the residual are not scaled
        col_q = L.self_attn.q_proj.weight.detach().norm(dim=0)
        assert col_q.max() < 3 * col_q.median()
    # the residual stream carries the outliers: the largest |hidden state| channels are the planted ones
    ids = torch.randint(0, BYTE_VOCAB_SIZE, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        h = model(input_ids=ids, output_hidden_states=True).hidden_states[1]
    top = h.abs().reshape(-1, 64).mean(0).topk(3).indices
    assert sorted(top.tolist()) == channels


def test_mlp_is_heavy_tailed_and_norms_are_not_ones():
    model = planted_outlier_model(**SMALL, student_t_df=3.0, norm_log_std=0.3)
    L = model.model.layers[0]
    assert excess_kurtosis(L.mlp.gate_proj.weight) > 2.0  # Student-t(3): infinite in theory
    assert abs(excess_kurtosis(L.self_attn.q_proj.weight)) < 0.5  # Gaussian: 0
    # unit-variance scaling: std ~ 1/sqrt(fan_in) for both
    for W in (L.mlp.up_proj.weight, L.self_attn.k_proj.weight):
        assert W.std().item() * np.sqrt(W.shape[1]) == pytest.approx(1.0, rel=0.25)
    log_w = torch.log(L.input_layernorm.weight.detach().double())
    assert log_w.std().item() == pytest.approx(0.3, rel=0.3) and abs(log_w.mean().item()) < 0.15
    gaussian = planted_outlier_model(**SMALL, student_t_df=None, norm_log_std=0.0)
    assert abs(excess_kurtosis(gaussian.model.layers[0].mlp.gate_proj.weight)) < 0.5
    assert torch.equal(gaussian.model.norm.weight, torch.ones(64))


def test_deterministic_in_the_seed():
    a, b = planted_outlier_model(**SMALL, seed=3), planted_outlier_model(**SMALL, seed=3)
    c = planted_outlier_model(**SMALL, seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.layers.0.mlp.down_proj.weight"], sc["model.layers.0.mlp.down_proj.weight"])
    # float64 and float32 builds are the same draws, rounded differently
    d = planted_outlier_model(**SMALL, seed=3, dtype=torch.float64)
    assert torch.equal(d.model.embed_tokens.weight.float(), a.model.embed_tokens.weight)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_architectures_and_shapes(arch):
    model = planted_outlier_model(arch, hidden_size=48, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=16,
                                  intermediate_size=40, vocab_size=100)
    assert model.config.model_type == arch and not model.training
    attn = model.model.layers[0].self_attn
    assert tuple(attn.q_proj.weight.shape) == (64, 48) and tuple(attn.v_proj.weight.shape) == (32, 48)
    assert (attn.q_proj.bias is not None) == (arch == "qwen2")
    assert hasattr(attn, "q_norm") == (arch == "qwen3")
    if arch == "qwen3":
        assert not torch.equal(attn.q_norm.weight, torch.ones(16))
    assert model(input_ids=torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 100)


def test_bad_arguments():
    with pytest.raises(ValueError, match="arch"):
        planted_outlier_model("gpt2", **SMALL)
    with pytest.raises(ValueError, match="attention_bias"):
        planted_outlier_model("mistral", **SMALL, attention_bias=True)
    with pytest.raises(ValueError, match="num_kv_heads"):
        planted_outlier_model(**{**SMALL, "num_kv_heads": 3})
    with pytest.raises(ValueError, match="student_t_df"):
        planted_outlier_model(**SMALL, student_t_df=2.0)


@functools.cache
def _tokenizer():
    return byte_tokenizer()


@settings(max_examples=40, deadline=None)
@given(text=st.text(max_size=40))
def test_byte_tokenizer_round_trips_any_text(text):
    tok = _tokenizer()
    ids = tok(text)["input_ids"]
    assert ids == list(text.encode("utf-8"))  # one token per byte, no special tokens added
    assert tok.decode(ids) == text


def test_tokenizer_specials_and_save_planted(tmp_path):
    tok = byte_tokenizer()
    assert len(tok) == BYTE_VOCAB_SIZE == 259
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (256, 257, 258)
    kw = dict(SMALL, arch="qwen3", seed=5)
    out = save_planted(tmp_path / "planted", **kw)
    model = AutoModelForCausalLM.from_pretrained(out)
    loaded_tok = AutoTokenizer.from_pretrained(out)
    assert loaded_tok("naïve 😀")["input_ids"] == tok("naïve 😀")["input_ids"]
    ids = torch.tensor([loaded_tok("hello world")["input_ids"]])
    assert logits_relative_error(planted_outlier_model(**kw), model, ids) == 0.0
    assert model.config.planted_outliers == planted_outlier_model(**kw).config.planted_outliers
    with pytest.raises(ValueError, match="vocab_size"):
        save_planted(tmp_path / "too_small", **SMALL, vocab_size=100)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["planted"]
