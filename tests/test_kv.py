"""Online R3 (Hadamard on post-RoPE queries/keys) and K/V-cache fake quantization."""

from __future__ import annotations

import pytest
import torch

from orthoopt.testing import planted_outlier_model
from orthoopt.adapters.archs import locate
from orthoopt.hadamard import hadamard_transform
from orthoopt.quant import QuantSpec, quantize_model, quantize_rows
from orthoopt.quant.config import QuantizeConfig
from orthoopt.quant.kv import KVQuantConfig, install_kv_quant, quantize_heads

ARCHS = [
    ("llama", {}),
    ("llama", {"num_kv_heads": 2}),  # GQA
    ("mistral", {"num_kv_heads": 2}),
    ("qwen2", {"num_kv_heads": 2}),  # q/k/v biases
    ("qwen3", {"num_kv_heads": 2}),  # q/k norms before RoPE
]


def tiny(arch="llama", dtype=torch.float32, **kw):
    args = dict(arch=arch, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, dtype=dtype)
    args.update(kw)
    return planted_outlier_model(**args)


def ids(n=2, t=12, seed=0):
    return torch.randint(0, 259, (n, t), generator=torch.Generator().manual_seed(seed))


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("arch,kw", ARCHS)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_r3_alone_leaves_logits_unchanged(arch, kw, dtype, tol, impl):
    model = tiny(arch, dtype, **kw)
    model.set_attn_implementation(impl)
    x = ids()
    ref = logits(model, x)
    with install_kv_quant(model, KVQuantConfig(r3=True)):
        assert model.config._attn_implementation == f"orthoopt_kv_{impl}"
        got = logits(model, x)
    assert model.config._attn_implementation == impl
    err = float((got - ref).norm() / ref.norm())
    assert err < tol, err
    assert torch.equal(logits(model, x), ref)  # removed cleanly


def test_r3_actually_rotates_queries_and_keys():
    model = tiny(num_kv_heads=2)
    seen = {}
    from orthoopt.quant import kv as kvmod

    orig = kvmod._KVTransform.__call__

    def record(self, q, k, v):
        out = orig(self, q, k, v)
        seen.setdefault("in", (q, k, v))
        seen.setdefault("out", out)
        return out

    kvmod._KVTransform.__call__ = record
    try:
        with install_kv_quant(model, KVQuantConfig(r3=True)):
            logits(model, ids())
    finally:
        kvmod._KVTransform.__call__ = orig
    (q, k, v), (q2, k2, v2) = seen["in"], seen["out"]
    assert k.shape[1] == 2 and q.shape[1] == 4  # GQA: keys per kv head
    torch.testing.assert_close(q2, hadamard_transform(q))
    torch.testing.assert_close(k2, hadamard_transform(k))
    assert torch.equal(v2, v) and not torch.allclose(k2, k)


def test_quantize_heads_groups_each_head_and_token():
    x = torch.randn(2, 3, 5, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    spec = QuantSpec(bits=4, symmetric=False)
    got = quantize_heads(x, spec, 8)
    want = quantize_rows(x.reshape(-1, 8), spec).reshape(x.shape)
    assert torch.equal(got, want)
    # changing one head of one token leaves the other groups alone
    y = x.clone()
    y[0, 1, 2, :8] *= 100
    diff = (quantize_heads(y, spec, 8) != got)
    assert diff[0, 1, 2, :8].any() and not diff[0, 1, 2, 8:].any() and diff.sum() == diff[0, 1, 2, :8].sum()
    with pytest.raises(ValueError, match="does not divide head_dim"):
        quantize_heads(x, spec, 5)


def test_quantize_heads_is_straight_through_under_autograd():
    x = torch.randn(4, 16, dtype=torch.float64, requires_grad=True)
    y = quantize_heads(x, QuantSpec(bits=3, symmetric=False), 16)
    torch.testing.assert_close(y.detach(), quantize_rows(x.detach(), QuantSpec(bits=3, symmetric=False)))
    (g,) = torch.autograd.grad((y * torch.arange(16.0, dtype=torch.float64)).sum(), x)
    assert torch.equal(g, torch.arange(16.0, dtype=torch.float64).expand(4, 16))


@pytest.mark.parametrize("arch,kw", ARCHS)
def test_kv_quantization_changes_output_and_r3_helps_outlier_keys(arch, kw):
    model = tiny(arch, **kw)
    x = ids(2, 16)
    ref = logits(model, x)
    errs = {}
    for r3 in (False, True):
        with install_kv_quant(model, KVQuantConfig(bits=3, r3=r3)):
            errs[r3] = float((logits(model, x) - ref).norm() / ref.norm())
    assert errs[False] > 1e-4 and errs[True] > 1e-4  # quantization is really on
    with install_kv_quant(model, KVQuantConfig(bits=8, r3=True)):
        err8 = float((logits(model, x) - ref).norm() / ref.norm())
    assert err8 < min(errs.values())  # 8 bits closer than 3 bits


def test_generation_with_cache_matches_full_forward():
    """The wrapper re-quantizes cached tokens each step; per-token quantization makes that exact."""
    model = tiny(num_kv_heads=2)
    x = ids(1, 10)
    with install_kv_quant(model, KVQuantConfig(bits=4, r3=True)):
        full = logits(model, x)
        with torch.no_grad():
            out = model(x[:, :6], use_cache=True)
            step = model(x[:, 6:], cache=out.past_key_values, use_cache=True).logits
    torch.testing.assert_close(step, full[:, 6:], atol=1e-5, rtol=1e-5)


def test_config_validation_and_errors():
    assert KVQuantConfig.from_dict(KVQuantConfig(bits=4, group_size=8, r3=True).to_dict()) == KVQuantConfig(
        bits=4, group_size=8, r3=True)
    for kw, match in [({"bits": 1}, "bits"), ({"bits": 4, "group_size": 0}, "group_size"),
                      ({"k_clip_ratio": 0.0}, "k_clip_ratio"), ({"v_clip_ratio": 1.5}, "v_clip_ratio")]:
        with pytest.raises(ValueError, match=match):
            KVQuantConfig(**kw)
    with pytest.raises(ValueError, match="unknown"):
        KVQuantConfig.from_dict({"bits": 4, "nope": 1})
    model = tiny()
    with pytest.raises(ValueError, match="does not divide head_dim"):
        install_kv_quant(model, KVQuantConfig(bits=4, group_size=5))
    with pytest.raises(ValueError, match="Hadamard|supported"):
        install_kv_quant(tiny(hidden_size=88, num_heads=4), KVQuantConfig(r3=True))  # head_dim 22
    assert model.config._attn_implementation == "sdpa"
    with install_kv_quant(model, KVQuantConfig(bits=4)):
        with pytest.raises(ValueError, match="already installed"):
            install_kv_quant(model, KVQuantConfig(bits=4))


def test_quantize_model_records_kv_and_r3():
    model = tiny(num_kv_heads=2)
    res = quantize_model(model, QuantizeConfig("rtn", wbits=16, kv=KVQuantConfig(bits=4, r3=True)), progress=False)
    s = res.settings
    assert s["kvbits"] == 4 and s["kv"]["r3"] and s["r3"]["size"] == locate(model).head_dim
    assert model.config._attn_implementation == "orthoopt_kv_sdpa"
    res.hooks.remove()
    assert model.config._attn_implementation == "sdpa"
