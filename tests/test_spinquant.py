"""SpinQuant's objective: the rotated fake-quantized LM loss (model side) and QuantizedLMLoss (objective side)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from orthoopt.adapters import DecoderAdapter
from orthoopt.testing import planted_outlier_model, save_planted
from orthoopt.cli import main
from orthoopt.manifold import orthogonality_error
from orthoopt.objectives import FourthPower, QuantizedLMLoss
from orthoopt.config import RotateConfig
from orthoopt.pipeline import rotate_model
from orthoopt.quant import quantize_model
from orthoopt.quant.config import QuantizeConfig
from orthoopt.quant.act import ActQuantConfig
from orthoopt.quant.kv import KVQuantConfig
from orthoopt.quant.rotated import RotatedQuantLM, SimQuantConfig
from orthoopt.solvers import initial_rotations

ARCHS = [("llama", {}), ("llama", {"num_kv_heads": 2}), ("mistral", {"num_kv_heads": 2}),
         ("qwen2", {"num_kv_heads": 2}), ("qwen3", {"num_kv_heads": 2})]
FULL = SimQuantConfig(wbits=4, act=ActQuantConfig(bits=4, online_hadamard=True), kv=KVQuantConfig(bits=4, r3=True))


def fused(arch="llama", dtype=torch.float64, **kw):
    args = dict(arch=arch, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, dtype=dtype)
    args.update(kw)
    model = planted_outlier_model(**args)
    DecoderAdapter(model).fuse_norms()
    return model


def ids(n=2, t=16, seed=0):
    return torch.randint(0, 259, (n, t), generator=torch.Generator().manual_seed(seed))


def lm_loss(model, x):
    with torch.no_grad():
        return model(x, labels=x).loss


@pytest.mark.parametrize("arch,kw", ARCHS)
def test_rotated_loss_matches_fused_and_quantized_model(arch, kw):
    """float64: the on-the-fly rotation equals write-back (quant off: the model itself; quant on:
    apply_rotations + quantize_model with the same RTN/activation/KV settings)."""
    model = fused(arch, **kw)
    rots = initial_rotations(DecoderAdapter(model).rotation_dims(), "random", seed=3, dtype=torch.float64)
    x = ids()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        off = RotatedQuantLM(model, SimQuantConfig(wbits=16))(rots, x)
        on = RotatedQuantLM(model, FULL)(rots, x)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # model untouched
    assert model.config._attn_implementation == "sdpa"
    # (transformers computes the cross-entropy in float32 even for a float64 model)
    assert float(off) == pytest.approx(float(lm_loss(model, x)), rel=1e-6)
    ref = copy.deepcopy(model)
    DecoderAdapter(ref).apply_rotations(rots)
    r = quantize_model(ref, QuantizeConfig("rtn", wbits=4, act=FULL.act, kv=FULL.kv), progress=False)
    assert float(on) == pytest.approx(float(lm_loss(ref, x)), rel=1e-6)
    r.hooks.remove()
    assert abs(float(on) - float(off)) > 1e-4  # the quantization is really simulated


def test_full_precision_loss_is_rotation_invariant_so_riemannian_gradient_vanishes():
    model = fused(num_kv_heads=2)
    fn = RotatedQuantLM(model, SimQuantConfig(wbits=16))
    obj = QuantizedLMLoss(fn, ids(4, 12))
    rots = initial_rotations(obj.dims, "random", seed=1, dtype=torch.float64)
    _, grads = obj.value_and_grad(rots)
    for k, G in grads.items():
        R = rots[k]
        riem = G @ R.T - R @ G.T  # skew part: the Riemannian gradient (times R)
        assert riem.norm() < 1e-5 * G.norm(), k  # the float32 cross-entropy limits this to ~1e-7
    assert max(G.norm() for G in grads.values()) > 1e-6  # a nonzero Euclidean gradient nonetheless

    qobj = QuantizedLMLoss(RotatedQuantLM(model, FULL), ids(4, 12))
    _, qgrads = qobj.value_and_grad(rots)
    R, G = rots["R1"], qgrads["R1"]
    assert (G @ R.T - R @ G.T).norm() > 1e-2 * G.norm()  # quantized: the loss does depend on R1


def test_microbatches_accumulate_the_full_batch_gradient_and_stream_cycles():
    model = fused(dtype=torch.float64)
    fn = RotatedQuantLM(model, FULL)
    data = ids(5, 12, seed=2)
    rots = initial_rotations(fn.dims, "hadamard", seed=0, dtype=torch.float64)
    whole = QuantizedLMLoss(fn, data, batch_size=4)
    parts = QuantizedLMLoss(fn, data, batch_size=4, micro_batch_size=1)
    v1, g1 = whole.value_and_grad(rots)
    v2, g2 = parts.value_and_grad(rots)
    # the loss is transformers' float32 cross-entropy (even for a float64 model): one mean over 4 windows
    # and a sum of 4 weighted means differ by a few float32 ulps, by a CPU-dependent amount (AVX2 vs
    # AVX-512 reductions); 1e-6 is 8 ulps. The gradients flow back in float64 and agree far tighter.
    assert float(v1) == pytest.approx(float(v2), rel=1e-6, abs=0)
    for k in g1:
        torch.testing.assert_close(g1[k], g2[k], rtol=1e-7, atol=1e-10)
    # the stream continues with window 4, then wraps around to 0, 1, 2
    assert torch.equal(whole.next_batch(), torch.stack([data[4], data[0], data[1], data[2]]))
    # an iterable of batches works as well
    it = QuantizedLMLoss(fn, [data[:2], data[2:]], batch_size=3)
    assert torch.equal(it.next_batch(), data[:3]) and torch.equal(it.next_batch(), torch.stack([data[3], data[4], data[0]]))


def test_composes_with_fourth_power():
    model = fused(dtype=torch.float64)
    adapter = DecoderAdapter(model)
    lm = QuantizedLMLoss(RotatedQuantLM(model, FULL, rotations=("R1",)), ids(2, 12))
    fp = FourthPower([b for b in adapter.weight_blocks("R1") if b.name not in ("embed_tokens", "lm_head")])
    total = fp + 0.5 * lm
    assert total.dims == {"R1": 64}
    rots = initial_rotations(total.dims, "hadamard", seed=0, dtype=torch.float64)
    v, g = total.value_and_grad(rots)
    lm._stream = None  # replay the same first batch
    v_lm, g_lm = lm.value_and_grad(rots)
    v_fp, g_fp = fp.value_and_grad(rots)
    assert float(v) == pytest.approx(float(v_fp + 0.5 * v_lm), rel=1e-12)
    torch.testing.assert_close(g["R1"], g_fp["R1"] + 0.5 * g_lm["R1"])


def test_errors():
    model = fused()
    with pytest.raises(ValueError, match="fuse_norms"):
        RotatedQuantLM(planted_outlier_model(hidden_size=64, num_layers=1, num_heads=4))
    with pytest.raises(ValueError, match="subset"):
        RotatedQuantLM(model, rotations=("R3",))
    with pytest.raises(ValueError, match="group_size"):
        RotatedQuantLM(model, SimQuantConfig(wbits=4, w_group_size=48))
    fn = RotatedQuantLM(model)
    with pytest.raises(ValueError, match="LongTensor"):
        QuantizedLMLoss(fn, torch.zeros(2, 8))
    with pytest.raises(ValueError, match="batch_size"):
        QuantizedLMLoss(fn, ids(), batch_size=0)
    with pytest.raises(ValueError, match="spinquant"):
        rotate_model(fused(), RotateConfig("optrot", solve={"steps": 1}, spinquant={"batch_size": 2}), progress=False)


def test_rotate_model_spinquant_joint_cosine_and_invariance():
    model = fused(dtype=torch.float32, num_kv_heads=2)
    x = ids(2, 16, seed=5)
    ref = model(x).logits.detach()
    lrs = []
    steps = 4

    def spy(phase, step, loss, rots):
        lrs.append((phase, sorted(rots)))

    res = rotate_model(
        model,
        RotateConfig("spinquant", solve={"steps": steps}, spinquant={"sim_quant": FULL, "batch_size": 2}),
        calib=ids(6, 16, seed=1),
        progress=False,
        callback=spy,
        verify_ids=x,
    )
    assert set(res.solves) == {"R1"} and res.solves["R1"].steps == steps  # one joint solve
    assert lrs[0][1] == ["R1", "R2.0", "R2.1"]
    assert res.report["lr"] == 1.5 and res.report["lr_schedule"] == "cosine"
    assert res.report["sim_quant"]["kv"]["bits"] == 4 and res.report["invariance_error"] < 1e-4
    assert max(orthogonality_error(R) for R in res.rotations.values()) < 1e-10
    assert not torch.allclose(res.rotations["R2.0"], initial_rotations({"R2.0": 16}, "hadamard", seed=0,
                                                                           dtype=torch.float64)["R2.0"])
    torch.testing.assert_close(model(x).logits.detach(), ref, rtol=1e-3, atol=1e-3)


def test_cosine_schedule_values():
    from orthoopt.pipeline.loop import _cosine

    class S:
        lr = 1.5

    s = S()
    seen = []
    cb = _cosine(s, 1.5, 4, 0, lambda i, loss, r: seen.append(s.lr))
    assert s.lr == 1.5
    for i in range(4):
        cb(i, 0.0, {})
    assert seen == pytest.approx([1.5 * 0.5 * (1 + c) for c in (0.7071067811865476, 0.0, -0.7071067811865476)] + [1e-12])
    _cosine(s, 1.5, 4, 2, None)  # a resumed run continues the schedule
    assert s.lr == pytest.approx(0.75)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_cli_rotate_spinquant_every_arch(tmp_path, capsys, arch):
    src = save_planted(tmp_path / "m", arch=arch, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                       intermediate_size=64)
    text = tmp_path / "t.txt"
    text.write_text("".join(f" line {i} about rotations and quantization .\n" for i in range(60)))
    out = tmp_path / "r"
    capsys.readouterr()
    assert main(["rotate", str(src), "--out", str(out), "--method", "spinquant", "--calib", str(text),
                 "--calib-tokens", "128", "--calib-seq-len", "32", "--steps", "2", "--abits", "4", "--kvbits", "4",
                 "--r3", "--online-hadamard", "--batch-size", "2", "--json", "--no-progress"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["method"] == "spinquant" and report["batch_size"] == 2
    assert report["sim_quant"]["act"]["online_hadamard"] and report["sim_quant"]["kv"]["r3"]
    assert report["invariance_error"] < 1e-4
    assert sorted(load_file(str(out / "orthoopt" / "rotations.safetensors"))) == ["R1", "R2.0", "R2.1"]
