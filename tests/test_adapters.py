"""DecoderAdapter: norm fusion, weight blocks, rotation write-back, calibration inputs, I/O, llama2.c.

Models are tiny planted-outlier models built from real transformers configs (Llama, Mistral, Qwen2
with q/k/v biases, Qwen3 with q/k norms), with GQA, head_dim != hidden / heads, tied and untied
embeddings. Rotations are random orthogonal matrices (QR of a Gaussian).
"""

from __future__ import annotations

import copy
import json
import math
import re
import struct

import numpy as np
import pytest
from safetensors.torch import save_file
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.mistral.modeling_mistral import MistralRMSNorm
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

from orthoopt.adapters import DecoderAdapter, UnsupportedModelError, logits_relative_error, writeback
from orthoopt.models import load_model, load_rotations, load_tokenizer, read_llama2c, save_rotated, write_llama2c
from orthoopt.testing import byte_tokenizer, planted_outlier_model
from orthoopt.models.io import REPORT_FILE, ROTATIONS_FILE

VOCAB = 97
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture
def exact_rms_norm(monkeypatch):
    """Make the HF RMSNorms compute in the input dtype.

    transformers' RMSNorm upcasts to float32 and back, which caps a float64 model's precision at
    ~1e-7 whatever the rotation; the invariance checks at 1e-9 need the norm in float64.
    """
    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    for cls in (LlamaRMSNorm, MistralRMSNorm, Qwen2RMSNorm, Qwen3RMSNorm):
        monkeypatch.setattr(cls, "forward", forward)


@st.composite
def model_kwargs(draw):
    """Keyword arguments of a tiny planted model covering every supported layout variant."""
    arch = draw(st.sampled_from(["llama", "mistral", "qwen2", "qwen3"]))
    kv = draw(st.sampled_from([1, 2]))
    kw = dict(
        arch=arch, hidden_size=draw(st.sampled_from([32, 48])), num_layers=2,
        num_kv_heads=kv, num_heads=kv * draw(st.sampled_from([1, 2])),
        head_dim=draw(st.sampled_from([8, 12, 16])), intermediate_size=40, vocab_size=VOCAB,
        tie_word_embeddings=draw(st.booleans()), norm_log_std=draw(st.sampled_from([0.0, 0.3])),
        outlier_channels=2, seed=draw(st.integers(0, 2**16)),
    )
    if arch in ("llama", "qwen3"):
        kw["attention_bias"] = draw(st.booleans())
    return kw


def random_orthogonal(n: int, g: torch.Generator, dtype=torch.float64) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).to(dtype)


def random_rotations(adapter: DecoderAdapter, seed: int, dtype=torch.float64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: random_orthogonal(n, g, dtype) for k, n in adapter.rotation_dims().items()}


def token_ids(seed: int, batch: int = 2, seq: int = 10, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k].nan_to_num(), v.nan_to_num()), k


def fused(kw: dict, dtype=torch.float64):
    model = planted_outlier_model(**kw, dtype=dtype)
    ref = copy.deepcopy(model)
    adapter = DecoderAdapter(model)
    adapter.fuse_norms()
    return ref, model, adapter


# ---------------------------------------------------------------------------------------------
# norm fusion


@settings(max_examples=8, **SETTINGS)
@given(kw=model_kwargs())
def test_fuse_norms_keeps_logits_and_is_idempotent(exact_rms_norm, kw):
    model = planted_outlier_model(**kw, dtype=torch.float64)
    ref = copy.deepcopy(model)
    adapter = DecoderAdapter(model)
    final_scale_is_one = bool((adapter.modules.final_norm.weight == 1).all())
    assert adapter.norms_fused == (kw["norm_log_std"] == 0.0)
    adapter.fuse_norms()
    assert adapter.norms_fused
    for norm in adapter.modules.residual_norms().values():
        assert torch.equal(norm.weight, torch.ones_like(norm.weight))
    # lm_head is untied exactly when it was tied and the final norm was folded into it
    assert adapter.tied == (kw["tie_word_embeddings"] and final_scale_is_one)
    assert model.config.tie_word_embeddings == adapter.tied
    assert logits_relative_error(ref, model, token_ids(kw["seed"])) < 1e-12
    before = state(model)
    adapter.fuse_norms()
    assert_unchanged(model, before)


def test_fused_weights_are_scaled_columns():
    kw = dict(arch="qwen2", hidden_size=32, num_layers=1, num_heads=4, vocab_size=VOCAB, intermediate_size=40)
    model = planted_outlier_model(**kw, dtype=torch.float64)
    L = model.model.layers[0]
    w_in, w_post, w_fin = (n.weight.detach().clone() for n in (L.input_layernorm, L.post_attention_layernorm, model.model.norm))
    q, gate, head = L.self_attn.q_proj.weight.detach().clone(), L.mlp.gate_proj.weight.detach().clone(), model.lm_head.weight.detach().clone()
    q_bias = L.self_attn.q_proj.bias.detach().clone()
    DecoderAdapter(model).fuse_norms()
    torch.testing.assert_close(L.self_attn.q_proj.weight, q * w_in, rtol=0, atol=0)
    torch.testing.assert_close(L.mlp.gate_proj.weight, gate * w_post, rtol=0, atol=0)
    torch.testing.assert_close(model.lm_head.weight, head * w_fin, rtol=0, atol=0)
    assert torch.equal(L.self_attn.q_proj.bias, q_bias)  # a norm scale does not reach the bias


# ---------------------------------------------------------------------------------------------
# rotations keep the function


@settings(max_examples=8, **SETTINGS)
@given(kw=model_kwargs(), rot_seed=st.integers(0, 2**16))
def test_random_rotations_keep_logits_float64(exact_rms_norm, kw, rot_seed):
    ref, model, adapter = fused(kw)
    rotations = random_rotations(adapter, rot_seed)
    tied = adapter.tied
    adapter.apply_rotations(rotations)
    assert adapter.tied == tied
    assert logits_relative_error(ref, model, token_ids(rot_seed)) < 1e-9
    # the weights did change (the check above is not vacuous)
    assert not torch.allclose(ref.model.embed_tokens.weight, model.model.embed_tokens.weight)


@settings(max_examples=4, **SETTINGS)
@given(kw=model_kwargs(), rot_seed=st.integers(0, 2**16))
def test_random_rotations_keep_logits_float32(kw, rot_seed):
    """The real float32 path, with transformers' own RMSNorm and float32 rotations."""
    ref, model, adapter = fused(kw, dtype=torch.float32)
    adapter.apply_rotations(random_rotations(adapter, rot_seed, torch.float32))
    assert logits_relative_error(ref, model, token_ids(rot_seed)) < 1e-4


def test_unrotated_model_is_not_invariant_without_fusion(exact_rms_norm):
    """R1 commutes with RMSNorm only at unit scale: this is why apply_rotations demands fusion."""
    kw = dict(arch="llama", hidden_size=32, num_layers=1, num_heads=4, vocab_size=VOCAB, intermediate_size=40)
    model = planted_outlier_model(**kw, dtype=torch.float64)
    ref = copy.deepcopy(model)
    adapter = DecoderAdapter(model)
    writeback.apply_rotations(  # bypasses the guard, to show what it protects against
        adapter.modules, {"R1": random_rotations(adapter, 0)["R1"]})
    assert logits_relative_error(ref, model, token_ids(0)) > 1e-3


# ---------------------------------------------------------------------------------------------
# weight blocks


def _param_of(model: nn.Module, t: torch.Tensor) -> str | None:
    for name, p in model.named_parameters():
        if t.untyped_storage().data_ptr() == p.untyped_storage().data_ptr():
            return name
    return None


@settings(max_examples=4, **SETTINGS)
@given(kw=model_kwargs(), rot_seed=st.integers(0, 2**16))
def test_blocks_rotated_match_apply_rotations(kw, rot_seed):
    _, model, adapter = fused(kw)
    rotations = random_rotations(adapter, rot_seed)
    for family in ("R1", "R2"):
        m = copy.deepcopy(model)
        a = DecoderAdapter(m)
        blocks = a.weight_blocks(family)
        expected = [b.rotated(rotations[b.rotation]) for b in blocks]
        a.apply_rotations({k: R for k, R in rotations.items() if k == family or k.startswith(family + ".")})
        for b, want in zip(blocks, expected):  # the blocks are views: they now show the new weights
            torch.testing.assert_close(b.weight, want, rtol=0, atol=1e-12, msg=b.name)
    # R1 and all R2 together equal R1 then R2 (they touch v and o from opposite sides)
    both, seq = copy.deepcopy(model), copy.deepcopy(model)
    DecoderAdapter(both).apply_rotations(rotations)
    a = DecoderAdapter(seq)
    a.apply_rotations({"R1": rotations["R1"]})
    a.apply_rotations({k: R for k, R in rotations.items() if k != "R1"})
    for (k, p), q in zip(both.state_dict().items(), seq.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12, msg=k)


def test_block_table_names_shapes_and_views():
    kw = dict(arch="qwen3", hidden_size=48, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
              vocab_size=VOCAB, intermediate_size=40)
    _, model, adapter = fused(kw, torch.float32)
    assert adapter.rotation_dims() == {"R1": 48, "R2.0": 16, "R2.1": 16}
    blocks = {b.name: b for b in adapter.weight_blocks()}
    r1 = [n for n, b in blocks.items() if b.rotation == "R1"]
    assert r1[0] == "embed_tokens" and r1[-1] == "lm_head" and len(r1) == 2 + 2 * 7
    assert blocks["layers.1.self_attn.o_proj"].side == "out" and blocks["layers.1.mlp.down_proj"].side == "out"
    assert blocks["layers.1.self_attn.q_proj"].side == "in" and blocks["lm_head"].side == "in"
    v1, o3 = blocks["layers.0.self_attn.v_proj.head1"], blocks["layers.0.self_attn.o_proj.head3"]
    assert (v1.rotation, v1.side, tuple(v1.weight.shape)) == ("R2.0", "out", (16, 48))
    assert (o3.rotation, o3.side, tuple(o3.weight.shape)) == ("R2.0", "in", (48, 16))
    L0 = model.model.layers[0].self_attn
    assert torch.equal(v1.weight, L0.v_proj.weight[16:32]) and torch.equal(o3.weight, L0.o_proj.weight[:, 48:64])
    assert sum(b.rotation == "R2.1" for b in blocks.values()) == 2 + 4  # kv heads + query heads
    for b in blocks.values():  # views of the parameters, not copies, and not tracking gradients
        assert _param_of(model, b.weight) is not None, b.name
        assert not b.weight.requires_grad
    assert [b.name for b in adapter.weight_blocks("R2.1")] == [n for n, b in blocks.items() if b.rotation == "R2.1"]
    sources = adapter.block_sources()
    assert sources["embed_tokens"] is None
    assert sources["layers.0.self_attn.o_proj.head3"] == ("layers.0.self_attn.o_proj", slice(48, 64))
    assert sources["layers.0.self_attn.v_proj.head1"] == ("layers.0.self_attn.v_proj", None)


def test_tied_embedding_is_one_block_and_stays_tied(exact_rms_norm):
    kw = dict(arch="llama", hidden_size=32, num_layers=1, num_heads=4, vocab_size=VOCAB, intermediate_size=40,
              tie_word_embeddings=True, norm_log_std=0.0)
    ref, model, adapter = fused(kw)
    assert adapter.tied
    names = [b.name for b in adapter.weight_blocks("R1")]
    assert "lm_head" not in names and names.count("embed_tokens") == 1
    adapter.apply_rotations(random_rotations(adapter, 1))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert logits_relative_error(ref, model, token_ids(1)) < 1e-9


# ---------------------------------------------------------------------------------------------
# bad input: clear errors, nothing changed


def test_unsupported_model_type_names_it():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50, n_positions=16,
                                      bos_token_id=0, eos_token_id=0))
    with pytest.raises(UnsupportedModelError, match=r"'gpt2'.*missing"):
        DecoderAdapter(gpt2)
    assert issubclass(UnsupportedModelError, ValueError)


def test_missing_module_and_layernorm_are_rejected():
    kw = dict(arch="llama", hidden_size=32, num_layers=2, num_heads=4, vocab_size=VOCAB, intermediate_size=40)
    model = planted_outlier_model(**kw)
    del model.model.layers[1].mlp.up_proj
    with pytest.raises(UnsupportedModelError, match=r"layers\.1\.mlp\.up_proj"):
        DecoderAdapter(model)
    for norm in (nn.LayerNorm(32), nn.LayerNorm(32, bias=False)):
        model = planted_outlier_model(**kw)
        model.model.layers[0].post_attention_layernorm = norm
        with pytest.raises(UnsupportedModelError, match="post_attention_layernorm"):
            DecoderAdapter(model)


def _small(dtype=torch.float64):
    kw = dict(arch="qwen2", hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, vocab_size=VOCAB,
              intermediate_size=40)
    return fused(kw, dtype)


@pytest.mark.parametrize("case", ["wrong_size", "not_orthogonal", "nan", "unknown_name", "integer"])
def test_bad_rotation_raises_before_any_change(case):
    _, model, adapter = _small()
    rotations = random_rotations(adapter, 0)
    bad = {
        "wrong_size": ("R2.1", torch.eye(9, dtype=torch.float64)),
        "not_orthogonal": ("R2.1", rotations["R2.1"] + 1e-5),  # tolerance sqrt(8) * 1e-8
        "nan": ("R2.1", rotations["R2.1"].clone().fill_(float("nan"))),
        "unknown_name": ("R2.7", rotations["R2.1"]),
        "integer": ("R2.1", torch.eye(8, dtype=torch.int64)),
    }[case]
    rotations[bad[0]] = bad[1]  # R1 and R2.0 valid: validation must run before they are applied
    before = state(model)
    with pytest.raises(ValueError, match=rf"rotation '{re.escape(bad[0])}'"):
        adapter.apply_rotations(rotations)
    assert_unchanged(model, before)


def test_orthogonality_tolerance_depends_on_dtype():
    _, model, adapter = _small()
    R = random_rotations(adapter, 0)["R1"]
    nudged = R + 1e-8 * torch.randn(32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with pytest.raises(ValueError, match="not orthogonal"):
        adapter.validate({"R1": nudged})  # float64: ~5e-7 > 1e-10 (orthoopt.core.tolerance)
    adapter.validate({"R1": nudged.float()})  # float32 rotation: within 1e-5
    adapter.validate({"R1": nudged}, tol=1e-3)  # explicit tolerance


def test_nan_weights_are_named_and_nothing_changes():
    _, model, adapter = _small()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    before = state(model)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj\.weight"):
        adapter.apply_rotations(random_rotations(adapter, 0))
    assert_unchanged(model, before)


def test_rotating_before_fusion_is_refused():
    kw = dict(arch="llama", hidden_size=32, num_layers=1, num_heads=4, vocab_size=VOCAB, intermediate_size=40)
    model = planted_outlier_model(**kw, dtype=torch.float64)
    adapter = DecoderAdapter(model)
    before = state(model)
    with pytest.raises(ValueError, match="fuse_norms"):
        adapter.apply_rotations(random_rotations(adapter, 0))
    with pytest.raises(ValueError, match="fuse_norms"):
        adapter.weight_blocks()
    assert_unchanged(model, before)


# ---------------------------------------------------------------------------------------------
# calibration inputs


def test_input_hessians_match_direct_computation_and_rotate_with_r1(exact_rms_norm):
    _, model, adapter = _small()
    batches = [token_ids(1), token_ids(2, batch=1, seq=7)]
    H = adapter.input_hessians(batches, progress=False)
    assert set(H) == set(adapter.linear_names())
    with torch.no_grad():
        X0 = torch.cat([model.model.layers[0].input_layernorm(model.model.embed_tokens(b)).reshape(-1, 32) for b in batches])
        Xh = torch.cat([model.model(input_ids=b).last_hidden_state.reshape(-1, 32) for b in batches])
    torch.testing.assert_close(H["layers.0.self_attn.q_proj"], X0.T @ X0 / X0.shape[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(H["lm_head"], Xh.T @ Xh / Xh.shape[0], rtol=1e-12, atol=1e-12)
    assert H["layers.0.self_attn.k_proj"] is H["layers.0.self_attn.q_proj"]  # shared input, computed once
    # after rotating, every residual reader sees x @ R1: H -> R1.T @ H @ R1
    R = random_rotations(adapter, 3)
    adapter.apply_rotations(R)
    H2 = adapter.input_hessians(batches, modules=["layers.1.mlp.up_proj", "lm_head"], progress=False)
    for name in H2:
        torch.testing.assert_close(H2[name], R["R1"].T @ H[name] @ R["R1"], rtol=1e-9, atol=1e-9)


def test_linear_inputs_sample_the_same_tokens_everywhere():
    _, model, adapter = _small(torch.float32)
    batches = [token_ids(1, batch=3, seq=8)]
    full = adapter.linear_inputs(batches, max_tokens=10_000, progress=False)
    assert full["layers.1.mlp.down_proj"].shape == (24, 40) and full["lm_head"].dtype == torch.float32
    sub = adapter.linear_inputs(batches, max_tokens=5, seed=7, progress=False)
    # the final hidden states of distinct positions differ: locate the sampled tokens by them
    d = torch.cdist(sub["lm_head"], full["lm_head"])
    assert torch.all(d.min(dim=1).values == 0)
    idx = d.argmin(dim=1)
    assert len(set(idx.tolist())) == 5 and torch.equal(idx, idx.sort().values)
    for name in ("layers.0.self_attn.q_proj", "layers.1.mlp.down_proj", "layers.1.self_attn.v_proj"):
        assert torch.equal(sub[name], full[name][idx])  # the same tokens for every module
    other = adapter.linear_inputs(batches, 5, ["lm_head"], seed=8, progress=False)["lm_head"]
    assert not torch.equal(other, sub["lm_head"])
    per_block = adapter.block_inputs(full)
    assert "embed_tokens" not in per_block
    assert torch.equal(per_block["layers.1.self_attn.o_proj.head2"], full["layers.1.self_attn.o_proj"][:, 16:24])
    with pytest.raises(ValueError, match="not linear modules"):
        adapter.linear_inputs(batches, modules=["layers.0.self_attn"], progress=False)


# ---------------------------------------------------------------------------------------------
# save / load


def test_save_rotated_round_trip(tmp_path):
    _, model, adapter = _small(torch.float32)
    rotations = random_rotations(adapter, 0, torch.float32)
    adapter.apply_rotations(rotations)
    report = {"objective": "test", "loss": [1.0, 0.5]}
    out = save_rotated(model, byte_tokenizer(), tmp_path / "rotated", rotations, report)
    loaded = load_model(out, dtype=torch.float32)
    ids = token_ids(0)
    assert logits_relative_error(model, loaded, ids) == 0.0
    back = load_rotations(out)
    assert back.keys() == rotations.keys() and all(torch.equal(back[k], rotations[k]) for k in back)
    assert json.loads((out / REPORT_FILE).read_text()) == report
    tok = load_tokenizer(out)
    assert tok is not None and tok.decode(tok("héllo")["input_ids"]) == "héllo"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left
    # without a tokenizer
    out2 = save_rotated(model, None, tmp_path / "no_tok", {}, {})
    assert load_tokenizer(out2) is None and (out2 / ROTATIONS_FILE).is_file()
    # only the model's weights at the top level (engines load every top-level *.safetensors)
    assert [p.name for p in out.glob("*.safetensors")] == ["model.safetensors"]


def test_load_rotations_reads_older_folders_and_names_a_missing_file(tmp_path):
    old = tmp_path / "old"  # written before the rotations moved into orthoopt/
    old.mkdir()
    save_file({"R1": torch.eye(4, dtype=torch.float64)}, str(old / "rotations.safetensors"))
    assert torch.equal(load_rotations(old)["R1"], torch.eye(4, dtype=torch.float64))
    with pytest.raises(FileNotFoundError, match="orthoopt/rotations.safetensors"):
        load_rotations(tmp_path)


def test_save_rotated_keeps_tied_embedding(tmp_path):
    kw = dict(arch="llama", hidden_size=32, num_layers=1, num_heads=4, vocab_size=VOCAB, intermediate_size=40,
              tie_word_embeddings=True, norm_log_std=0.0)
    _, model, adapter = fused(kw, torch.float32)
    adapter.apply_rotations(random_rotations(adapter, 0, torch.float32))
    loaded = load_model(save_rotated(model, None, tmp_path / "m", {}, {}))
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert logits_relative_error(model, loaded, token_ids(0)) == 0.0


def test_save_rotated_failure_leaves_previous_folder(tmp_path):
    _, model, _ = _small(torch.float32)
    out = tmp_path / "out"
    save_rotated(model, None, out, {}, {"run": 1})
    with pytest.raises(ValueError, match="JSON"):
        save_rotated(model, None, out, {}, {"loss": float("nan")})

    class BrokenTokenizer:
        def save_pretrained(self, path):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_rotated(model, BrokenTokenizer(), out, {}, {"run": 2})
    assert json.loads((out / REPORT_FILE).read_text()) == {"run": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_load_model_missing_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "junk.bin").write_bytes(b"\0" * 10)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path / "empty")


# ---------------------------------------------------------------------------------------------
# llama2.c


def _llama2c_reference_logits(path, ids: torch.Tensor) -> torch.Tensor:
    """Independent llama2.c (version 0) forward in float64: interleaved RoPE pairs (2i, 2i+1)
    from the file's own frequency table, GQA by repeating kv heads, RMSNorm eps 1e-5."""
    raw = path.read_bytes()
    D, Hd, L, nh, nkv, V, S = struct.unpack("<7i", raw[:28])
    shared, V = V > 0, abs(V)
    hs = D // nh
    data = torch.from_numpy(np.frombuffer(raw[28:], dtype="<f4").astype(np.float64))
    pos = 0

    def take(*shape):
        nonlocal pos
        n = math.prod(shape)
        out = data[pos:pos + n].reshape(shape)
        pos += n
        return out

    emb, att_n = take(V, D), take(L, D)
    wq, wk, wv, wo = take(L, D, D), take(L, nkv * hs, D), take(L, nkv * hs, D), take(L, D, D)
    ffn_n, w1, w2, w3 = take(L, D), take(L, Hd, D), take(L, D, Hd), take(L, Hd, D)
    fin, fcos, fsin = take(D), take(S, hs // 2), take(S, hs // 2)
    wcls = emb if shared else take(V, D)

    def rms(x, w):
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w

    def rope(x):  # x [T, heads, hs], pairs (2i, 2i+1) rotated by the angle of (position, i)
        T = x.shape[0]
        xr, xi = x[..., 0::2], x[..., 1::2]
        c, s = fcos[:T, None, :], fsin[:T, None, :]
        return torch.stack([xr * c - xi * s, xr * s + xi * c], dim=-1).reshape(x.shape)

    outs = []
    for seq in ids:
        T = seq.shape[0]
        x = emb[seq]
        for i in range(L):
            h = rms(x, att_n[i])
            q = rope((h @ wq[i].T).reshape(T, nh, hs))
            k = rope((h @ wk[i].T).reshape(T, nkv, hs)).repeat_interleave(nh // nkv, dim=1)
            v = (h @ wv[i].T).reshape(T, nkv, hs).repeat_interleave(nh // nkv, dim=1)
            att = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(hs)
            att = att.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf")).softmax(-1)
            x = x + torch.einsum("hqk,khd->qhd", att, v).reshape(T, D) @ wo[i].T
            h = rms(x, ffn_n[i])
            x = x + (nn.functional.silu(h @ w1[i].T) * (h @ w3[i].T)) @ w2[i].T
        outs.append(rms(x, fin) @ wcls.T)
    return torch.stack(outs)


@pytest.mark.parametrize("tied,version", [(False, 0), (True, 0), (False, 1)])
def test_llama2c_round_trip(tmp_path, tied, version):
    kw = dict(arch="llama", hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, vocab_size=VOCAB,
              intermediate_size=40, tie_word_embeddings=tied, norm_log_std=0.3)
    model = planted_outlier_model(**kw)
    model.config.rms_norm_eps = 1e-5
    for mod in model.modules():
        if isinstance(mod, LlamaRMSNorm):
            mod.variance_epsilon = 1e-5
    folder = tmp_path / "ckpt"
    write_llama2c(model, folder / "model.bin", version=version)
    loaded = load_model(folder)
    assert loaded.config.tie_word_embeddings == tied
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tied
    for (k, p), q in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(p, q), k
    ids = token_ids(0, seq=12)
    assert logits_relative_error(model, loaded, ids) < 1e-6
    if version == 0:  # the file means what llama2.c means by it
        ref = _llama2c_reference_logits(folder / "model.bin", ids)
        with torch.no_grad():
            got = loaded(input_ids=ids).logits.double()
        assert ((got - ref).norm() / ref.norm()).item() < 1e-5
    assert load_tokenizer(folder) is None


def test_llama2c_malformed_files(tmp_path):
    kw = dict(arch="llama", hidden_size=32, num_layers=1, num_heads=4, vocab_size=VOCAB, intermediate_size=40)
    model = planted_outlier_model(**kw)
    model.config.rms_norm_eps = 1e-5
    good = write_llama2c(model, tmp_path / "good.bin")
    (tmp_path / "short.bin").write_bytes(good.read_bytes()[:-4])
    with pytest.raises(ValueError, match="bytes"):
        read_llama2c(tmp_path / "short.bin")
    (tmp_path / "v2.bin").write_bytes(struct.pack("<Ii", 0x616B3432, 2) + b"\0" * 300)
    with pytest.raises(ValueError, match="version 2"):
        read_llama2c(tmp_path / "v2.bin")
    with pytest.raises(FileNotFoundError):
        read_llama2c(tmp_path / "absent.bin")
    with pytest.raises(ValueError, match="head_dim"):
        write_llama2c(planted_outlier_model(**{**kw, "head_dim": 12}), tmp_path / "x.bin")
