"""The uniform quantizer, RTN, activation fake quantization, online Hadamard (R4), calibration data."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from orthoopt.testing import byte_tokenizer, planted_outlier_model
from orthoopt.hadamard import hadamard_transform
from orthoopt.quant import (
    ActQuantConfig,
    QuantSpec,
    calibration_batches,
    find_params,
    install_act_quant,
    online_hadamard_matrix,
    quantize_activations,
    quantize_model,
    quantize_rows,
    quantize_rtn,
    rotate_down_proj_weights,
    tokenize_text,
)
from orthoopt.quant.config import GPTQConfig, QuantizeConfig
from orthoopt.quant.kv import KVQuantConfig

ROLES = ("q", "k", "v", "o", "gate", "up", "down")


def tiny(dtype=torch.float32, **kw):
    args = dict(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, dtype=dtype)
    args.update(kw)
    return planted_outlier_model(**args)


def layers(model):
    from orthoopt.adapters.archs import locate

    return locate(model).layers


def hand_params(x: torch.Tensor, bits: int, symmetric: bool):
    """Scale/zero per row, straight from the formulas in docs/quantization.md."""
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = x.abs().amax(dim=1, keepdim=True) / qmax
        scale[scale == 0] = 1
        return scale, torch.zeros_like(scale), -qmax, qmax
    lo = x.amin(dim=1, keepdim=True).clamp(max=0)
    hi = x.amax(dim=1, keepdim=True).clamp(min=0)
    scale = (hi - lo) / (2**bits - 1)
    scale[scale == 0] = 1
    return scale, torch.round(-lo / scale), 0, 2**bits - 1


matrices = st.builds(
    lambda rows, groups, g, seed, spread: (torch.randn(rows, groups * g, generator=torch.Generator().manual_seed(seed),
                                                       dtype=torch.float64) * spread, g),
    rows=st.integers(1, 5), groups=st.integers(1, 4), g=st.sampled_from([1, 2, 8, 16]),
    seed=st.integers(0, 10_000), spread=st.sampled_from([1e-3, 1.0, 50.0]),
)


# --------------------------------------------------------------------------------------- quantizer

@settings(max_examples=60, deadline=None)
@given(data=matrices, bits=st.integers(2, 8), symmetric=st.booleans())
def test_values_on_grid_and_within_half_step(data, bits, symmetric):
    x, _ = data
    q = quantize_rows(x, QuantSpec(bits=bits, symmetric=symmetric))
    scale, zero, qmin, qmax = hand_params(x, bits, symmetric)
    codes = q / scale + zero
    assert torch.allclose(codes, codes.round(), atol=1e-6, rtol=0)
    assert codes.round().min() >= qmin and codes.round().max() <= qmax
    # no clipping: every element is within half a step of its quantized value
    assert ((q - x).abs() <= scale / 2 * (1 + 1e-9) + 1e-12).all()


@settings(max_examples=40, deadline=None)
@given(data=matrices, bits=st.integers(2, 8))
def test_symmetric_grid_is_symmetric(data, bits):
    x, _ = data
    spec = QuantSpec(bits=bits, symmetric=True)
    assert torch.equal(quantize_rows(-x, spec), -quantize_rows(x, spec))
    # the largest magnitude of each row is exactly representable
    q = quantize_rows(x, spec)
    i = x.abs().argmax(dim=1, keepdim=True)
    assert torch.allclose(q.gather(1, i), x.gather(1, i), rtol=1e-12, atol=0)


@settings(max_examples=40, deadline=None)
@given(data=matrices, bits=st.integers(2, 8), symmetric=st.booleans())
def test_group_size_splits_rows_into_independent_groups(data, bits, symmetric):
    x, g = data
    grouped = quantize_rows(x, QuantSpec(bits=bits, symmetric=symmetric, group_size=g))
    per_group = torch.cat(
        [quantize_rows(x[:, k : k + g], QuantSpec(bits=bits, symmetric=symmetric)) for k in range(0, x.shape[1], g)],
        dim=1,
    )
    assert torch.equal(grouped, per_group)


@settings(max_examples=25, deadline=None)
@given(data=matrices, bits=st.integers(2, 5), symmetric=st.booleans())
def test_mse_search_never_worse_than_full_range(data, bits, symmetric):
    x, _ = data
    plain = QuantSpec(bits=bits, symmetric=symmetric)
    mse = QuantSpec(bits=bits, symmetric=symmetric, mse=True)
    err = lambda q: (q - x).abs().pow(2.4).sum(dim=1)  # noqa: E731 - the search's own criterion
    assert (err(quantize_rows(x, mse)) <= err(quantize_rows(x, plain)) * (1 + 1e-12)).all()
    scale, zero = find_params(x, mse)
    full_scale, _ = find_params(x, plain)
    assert (scale <= full_scale * (1 + 1e-12)).all()  # only shrinks the range


def test_asymmetric_represents_zero_and_zero_rows_exactly():
    x = torch.tensor([[0.0, 0.3, 1.7, 2.5], [0.0, 0.0, 0.0, 0.0], [-4.0, 0.0, -1.0, -0.2]], dtype=torch.float64)
    for symmetric in (True, False):
        q = quantize_rows(x, QuantSpec(bits=3, symmetric=symmetric))
        assert torch.equal(q[x == 0], torch.zeros_like(q[x == 0]))
        assert torch.equal(q[1], torch.zeros(4, dtype=torch.float64))


def test_asymmetric_uses_one_sided_range_better_than_symmetric():
    # all-positive data: the asymmetric grid spends all 2^b codes on [0, max], the symmetric one half
    x = torch.rand(8, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    err_sym = (quantize_rows(x, QuantSpec(bits=4, symmetric=True)) - x).norm()
    err_asym = (quantize_rows(x, QuantSpec(bits=4, symmetric=False)) - x).norm()
    assert err_asym < 0.6 * err_sym  # steps max/15 vs max/7: about 7/15 of the error


def test_clip_ratio_shrinks_scale():
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    s1, _ = find_params(x, QuantSpec(bits=4))
    s9, _ = find_params(x, QuantSpec(bits=4, clip_ratio=0.9))
    assert torch.allclose(s9, 0.9 * s1)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(bits=1), "bits"),
        (dict(bits=9), "bits"),
        (dict(bits=4.0), "bits"),
        (dict(bits=4, group_size=0), "group_size"),
        (dict(bits=4, clip_ratio=0.0), "clip_ratio"),
        (dict(bits=4, clip_ratio=1.5), "clip_ratio"),
    ],
)
def test_spec_rejects_bad_settings(kw, match):
    with pytest.raises(ValueError, match=match):
        QuantSpec(**kw)


def test_group_size_must_divide_row():
    with pytest.raises(ValueError, match="does not divide"):
        quantize_rows(torch.zeros(2, 10), QuantSpec(bits=4, group_size=4))


def test_rtn_keeps_dtype_and_matches_rows_quantizer():
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(2))
    spec = QuantSpec(bits=4, group_size=8)
    q = quantize_rtn(w, spec)
    assert q.dtype == torch.float32 and q.shape == w.shape
    assert torch.equal(q, quantize_rows(w, spec))
    assert torch.equal(quantize_rtn(w.bfloat16(), spec), quantize_rows(w.bfloat16().float(), spec).bfloat16())


# ------------------------------------------------------------------------------ activations, R4

@pytest.mark.parametrize("symmetric", [True, False])
def test_activation_quantization_is_per_token(symmetric):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 32, generator=gen, dtype=torch.float64)
    spec = ActQuantConfig(bits=8, symmetric=symmetric).spec
    q = quantize_activations(x, spec)
    assert q.shape == x.shape
    flat_x, flat_q = x.reshape(-1, 32), q.reshape(-1, 32)
    scale, _, _, _ = hand_params(flat_x, 8, symmetric)
    assert ((flat_q - flat_x).abs() <= scale / 2 * (1 + 1e-9)).all()  # per-token error bound
    # an outlier token does not change how the other tokens are quantized
    y = x.clone()
    y[0, 2] *= 1000.0
    qy = quantize_activations(y, spec)
    keep = torch.ones(2, 5, dtype=torch.bool)
    keep[0, 2] = False
    assert torch.equal(qy[keep], q[keep])


def test_act_config_validation_and_roundtrip():
    for bad in (3.5, 1, 9, 12, 32):
        with pytest.raises(ValueError, match="bits"):
            ActQuantConfig(bits=bad)
    with pytest.raises(ValueError, match="clip_ratio"):
        ActQuantConfig(bits=4, clip_ratio=0)
    cfg = ActQuantConfig(bits=4, symmetric=False, clip_ratio=0.9, online_hadamard=True)
    assert ActQuantConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown"):
        ActQuantConfig.from_dict({**cfg.to_dict(), "groups": 4})
    with pytest.raises(ValueError, match="off"):
        ActQuantConfig().spec  # noqa: B018


def test_act_hooks_quantize_every_decoder_linear_input_and_remove_cleanly():
    model = tiny()
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = model(ids).logits
    seen = {}
    probes = [
        L.projs[role].register_forward_hook(lambda m, a, o, key=(L.index, role): seen.__setitem__(key, a[0]))
        for L in layers(model) for role in ROLES
    ]
    cfg = ActQuantConfig(bits=4)
    hooks = install_act_quant(model, cfg)
    assert len(hooks) == 2 * len(ROLES)
    with torch.no_grad():
        quantized = model(ids).logits
    for key, x in seen.items():  # what each linear received is already on its per-token 4-bit grid
        assert torch.equal(quantize_activations(x, cfg.spec), x), key
    assert not torch.allclose(quantized, ref)
    hooks.remove()
    for p in probes:
        p.remove()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)


def test_online_hadamard_preserves_full_precision_model():
    model = tiny(dtype=torch.float64)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = model(ids).logits
    downs = [L.projs["down"].weight.clone() for L in layers(model)]
    info = rotate_down_proj_weights(model)
    H = online_hadamard_matrix(128, torch.float64)
    assert info["size"] == 128 and len(info["sha256"]) == 64
    assert torch.allclose(H @ H.T, torch.eye(128, dtype=torch.float64), atol=1e-14, rtol=0)
    for W, L in zip(downs, layers(model)):
        assert torch.allclose(L.projs["down"].weight, W @ H, atol=1e-14, rtol=0)  # side "in": W -> W @ H
    with torch.no_grad():
        rotated_only = model(ids).logits
    assert not torch.allclose(rotated_only, ref, atol=1e-3)  # the weight half alone changes the model
    with install_act_quant(model, ActQuantConfig(online_hadamard=True)) as hooks:
        assert len(hooks) == 2  # one per down_proj
        with torch.no_grad():
            out = model(ids).logits
    assert torch.allclose(out, ref, rtol=0, atol=1e-10 * ref.abs().max())


def test_online_hadamard_rotates_before_quantizing():
    model = tiny()
    rotate_down_proj_weights(model)
    cfg = ActQuantConfig(bits=8, online_hadamard=True)
    down = layers(model)[0].projs["down"]
    raw, got = {}, {}
    down.register_forward_pre_hook(lambda m, a: raw.__setitem__("x", a[0]), prepend=True)  # runs first
    install_act_quant(model, cfg)
    down.register_forward_hook(lambda m, a, o: got.__setitem__("x", a[0]))
    with torch.no_grad():
        model(torch.randint(0, 256, (1, 8)))
    rotated = hadamard_transform(raw["x"])  # the hook's fast transform: x @ H without the dense H
    assert torch.allclose(rotated, raw["x"] @ online_hadamard_matrix(128), atol=1e-5 * raw["x"].abs().max(), rtol=0)
    assert torch.equal(got["x"], quantize_activations(rotated, cfg.spec))


# ---------------------------------------------------------------------------------- whole model

def test_quantize_model_rtn_touches_only_decoder_linears():
    model = tiny()
    before = copy.deepcopy(model)
    result = quantize_model(model, QuantizeConfig("rtn", wbits=3, group_size=32, sym=False), progress=False)
    spec = QuantSpec(bits=3, symmetric=False, group_size=32)
    for L0, L1 in zip(layers(before), layers(model)):
        for role in ROLES:
            assert torch.equal(L1.projs[role].weight, quantize_rtn(L0.projs[role].weight, spec))
    assert torch.equal(model.model.embed_tokens.weight, before.model.embed_tokens.weight)
    assert torch.equal(model.lm_head.weight, before.lm_head.weight)
    assert torch.equal(model.model.layers[0].input_layernorm.weight, before.model.layers[0].input_layernorm.weight)
    s = result.settings
    assert (s["method"], s["wbits"], s["abits"], s["group_size"], s["sym"]) == ("rtn", 3, 16, 32, False)
    assert s["online_hadamard"] is None and s["calibration"] is None and len(result.hooks) == 0


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(method="gptq", wbits=4), "calib"),
        (dict(method="gptq", wbits=4, calib=torch.zeros(2, 8), act=ActQuantConfig(online_hadamard=True)), "LongTensor"),
        (dict(method="awq", wbits=4), "method"),
        (dict(method="rtn", wbits=1), "bits"),
        (dict(method="rtn", wbits=12), "bits"),
        (dict(method="rtn", wbits=4, group_size=48), "group_size 48 does not divide"),
    ],
)
def test_quantize_model_rejects_bad_settings(kw, match):
    model = tiny()
    before = copy.deepcopy(model.state_dict())
    kw = dict(kw)
    calib = kw.pop("calib", None)
    with pytest.raises(ValueError, match=match):  # QuantizeConfig refuses some, quantize_model the rest
        quantize_model(model, QuantizeConfig(**kw), calib=calib, progress=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # nothing changed


# ------------------------------------------------------------------------------------ calibration

TEXT = "".join(f"Sentence number {i} talks about quantization and rotations.\n" for i in range(60))


def test_calibration_batches_are_seeded_windows_of_the_text(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text(TEXT, encoding="utf-8")
    tok = byte_tokenizer()
    ids = tokenize_text(TEXT, tok)
    batches = calibration_batches(path, tok, nsamples=6, seq_len=40, seed=7)
    assert batches.shape == (6, 40) and batches.dtype == torch.long
    windows = ids.unfold(0, 40, 1)  # every window of the tokenized text
    for row in batches:
        assert (windows == row).all(dim=1).any()
    assert torch.equal(batches, calibration_batches(path, tok, nsamples=6, seq_len=40, seed=7))
    assert not torch.equal(batches, calibration_batches(path, tok, nsamples=6, seq_len=40, seed=8))
    exact = calibration_batches(path, tok, nsamples=2, seq_len=ids.numel(), seed=0)  # the only window
    assert torch.equal(exact, ids.expand(2, -1))


def test_calibration_errors(tmp_path):
    tok = byte_tokenizer()
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        calibration_batches(tmp_path / "missing.txt", tok, nsamples=2, seq_len=8)
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="empty"):
        calibration_batches(empty, tok, nsamples=2, seq_len=8)
    short = tmp_path / "short.txt"
    short.write_text("tiny", encoding="utf-8")
    with pytest.raises(ValueError, match="4 tokens, fewer than seq_len=8"):
        calibration_batches(short, tok, nsamples=2, seq_len=8)
    with pytest.raises(ValueError, match="nsamples"):
        calibration_batches(short, tok, nsamples=0, seq_len=2)


def test_one_grid_tokens_and_straight_through():
    from orthoopt.core.grid import quantize_tokens, straight_through

    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    spec = QuantSpec(bits=4, symmetric=False)
    # per token over [..., n]: the same as quantize_rows on the flattened rows, and what activations use
    flat = quantize_rows(x.reshape(-1, 16), spec).reshape(x.shape)
    assert torch.equal(quantize_tokens(x, spec), flat)
    assert torch.equal(quantize_activations(x, spec), flat)
    with pytest.raises(ValueError, match="group_size"):
        quantize_tokens(x, QuantSpec(bits=4, group_size=8))
    # gradients: through the scale only (codes constant) vs straight-through (identity)
    y = x.clone().requires_grad_(True)
    (quantize_tokens(y, spec) - y).square().sum().backward()
    exact = y.grad.clone()
    y.grad = None
    straight_through(y, quantize_tokens(y.detach(), spec)).sum().backward()
    assert torch.equal(y.grad, torch.ones_like(x)) and not torch.equal(exact, torch.zeros_like(x))


# ------------------------------------------------------------------------------------ QuantizeConfig
@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(method="awq"), "method must be one of"),
        (dict(wbits=1), "weight bits"),
        (dict(wbits=True), "weight bits"),
        (dict(group_size=0), "group_size must be a positive int"),
        (dict(act=8), "act must be a ActQuantConfig"),
        (dict(gptq=dict(percdamp=0.01)), "gptq must be a GPTQConfig"),
    ],
)
def test_quantize_config_refuses_bad_fields_by_name(kw, match):
    with pytest.raises(ValueError, match=match):
        QuantizeConfig(**kw)


@pytest.mark.parametrize("kw, match", [(dict(percdamp=-0.1), "percdamp"), (dict(block_size=0), "block_size")])
def test_gptq_config_refuses_bad_fields_by_name(kw, match):
    with pytest.raises(ValueError, match=match):
        GPTQConfig(**kw)


def test_quantize_settings_map_every_flag_onto_the_config():
    from orthoopt.jobs.settings import QuantizeSettings

    flags = QuantizeSettings(method="gptq", wbits=3, group_size=32, sym=False, abits=8, act_asym=True, act_clip=0.9,
                             online_hadamard=True, mse_clip=True, kvbits=4, kv_group_size=8, kv_sym=True, k_clip=0.8,
                             v_clip=0.7, r3=True, act_order=True, true_sequential=False, damp=0.05, block_size=64)
    c = flags.resolved()[0].quantize_config()
    assert (c.method, c.wbits, c.group_size, c.sym, c.mse_clip) == ("gptq", 3, 32, False, True)
    assert c.act == ActQuantConfig(bits=8, symmetric=False, clip_ratio=0.9, online_hadamard=True)
    assert c.kv == KVQuantConfig(bits=4, group_size=8, symmetric=True, k_clip_ratio=0.8, v_clip_ratio=0.7, r3=True)
    assert c.gptq == GPTQConfig(act_order=True, true_sequential=False, percdamp=0.05, block_size=64)
    assert c.uses_calibration and c.weight_spec.bits == 3 and not c.weight_spec.symmetric
