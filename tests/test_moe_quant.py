"""Quantization of MoE models (Mixtral, Qwen2-MoE, Qwen3-MoE): RTN and GPTQ of the expert tensors,
activation fake-quant of the experts' inputs, R3/KV, SpinQuant's simulated quantization, the CLI and
the exporter's refusal. Tiny models from ``tests/test_architectures.py`` (float64 ones computed exactly)."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import transformers
from torch import nn
from transformers import AutoModelForCausalLM

from orthoopt.adapters import DecoderAdapter
from orthoopt.testing.tiny import byte_tokenizer
from orthoopt.cli import main
from orthoopt.quant.act import ActQuantConfig
from orthoopt.quant.experts import expert_hessian, gptq_experts, quantize_experts_rtn
from orthoopt.quant.kv import KVQuantConfig
from orthoopt.quant.model import load_quantized, quantize_model
from orthoopt.quant.config import QuantizeConfig

from test_architectures import BASE, CASES, build, exact

MOE = ["mixtral", "qwen2_moe", "qwen3_moe"]


def ids(n=2, t=16, seed=0, vocab=128):
    return torch.randint(3, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


def experts_of(model):
    """``{"layers.i.mlp.experts": module}`` of every fused experts module."""
    m = DecoderAdapter(model).modules
    return {L.names["experts.down"]: L.projs["experts.down"] for L in m.layers if "experts.down" in L.projs}


def capture(module: nn.Module, model: nn.Module, x: torch.Tensor):
    """The experts module's inputs ``[(hidden [tokens, hidden], top_k_index [tokens, k])]`` on ``x``."""
    got = []
    h = module.register_forward_pre_hook(lambda m, a: got.append((a[0].detach().clone(), a[1].clone())))
    try:
        with torch.no_grad():
            model(x)
    finally:
        h.remove()
    return got


def rtn_reference(W: torch.Tensor, bits: int, group: int | None) -> torch.Tensor:
    """Symmetric RTN of ``[out, in]`` written out: scale = max|w| / (2^(b-1) - 1) per row or group."""
    qmax = 2 ** (bits - 1) - 1
    g = group or W.shape[1]
    Wg = W.reshape(W.shape[0], -1, g)
    scale = Wg.abs().amax(-1, keepdim=True) / qmax
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return (torch.clamp(torch.round(Wg / scale), -qmax, qmax) * scale).reshape(W.shape)


@pytest.mark.parametrize("model_type,group", [("mixtral", None), ("qwen2_moe", 16)])
def test_rtn_quantizes_every_expert_slice_and_keeps_routers(model_type, group):
    model = build(model_type, torch.float64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    r = quantize_model(model, QuantizeConfig("rtn", wbits=4, group_size=group), progress=False)
    m = DecoderAdapter(model).modules
    names = [f"model.{L.names['experts.down']}.{p}" for L in m.layers if "experts.down" in L.projs
             for p in ("gate_up_proj", "down_proj")]
    assert names and set(names) <= set(r.params)
    assert r.settings["experts"] == sorted(n.removeprefix("model.") for n in names)
    sd = model.state_dict()
    for name in names:
        W0, W = before[name], sd[name]
        want = torch.stack([rtn_reference(w, 4, group) for w in W0])
        torch.testing.assert_close(W, want, rtol=0, atol=1e-12)
        p = r.params[name]
        e, out, n = W.shape
        assert p.scale.shape == (e, out, n // (group or n)) and p.group_index.shape == (e, n)
        codes = p.codes(W, r.spec).double()
        back = torch.stack([p.scale[i][:, p.group_index[i]] * (codes[i] - p.zero[i][:, p.group_index[i]])
                            for i in range(e)])
        torch.testing.assert_close(back, W, rtol=0, atol=1e-12)
    for k in before:  # routers (mlp.gate, shared_expert_gate), norms, embedding: untouched
        if k.endswith("mlp.gate.weight") or "shared_expert_gate" in k or "norm" in k or "embed" in k:
            assert torch.equal(before[k], sd[k]), k


def test_quantize_experts_rtn_is_the_linear_grid_per_slice():
    from orthoopt.quant.quantizer import QuantSpec
    from orthoopt.quant.rtn import quantize_rtn_params

    W = torch.randn(3, 8, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    spec = QuantSpec(bits=3, symmetric=False, group_size=8)
    Q, p = quantize_experts_rtn(W, spec)
    for e in range(3):
        q, pe = quantize_rtn_params(W[e], spec)
        assert torch.equal(Q[e], q) and torch.equal(p.scale[e], pe.scale) and torch.equal(p.zero[e], pe.zero)
    with pytest.raises(ValueError, match="3-D"):
        quantize_experts_rtn(W[0], spec)


def _routed_reference(module, captured, expert, param):
    """float64 ``2 X^T X / tokens`` built token by token from the router's choices."""
    rows = []
    for hidden, idx in captured:
        for t in range(hidden.shape[0]):
            if expert in idx[t].tolist():
                x = hidden[t].double()
                if param == "down_proj":
                    gu = module.gate_up_proj[expert].double() @ x
                    inter = gu.shape[0] // 2
                    x = module.act_fn(gu[:inter]) * gu[inter:]
                rows.append(x)
    X = torch.stack(rows)
    return 2 * X.T @ X / X.shape[0], X.shape[0]


@pytest.mark.parametrize("param", ["gate_up_proj", "down_proj"])
def test_expert_hessians_are_built_from_the_routed_tokens(param):
    model = exact(build("mixtral", torch.float64))
    module = next(iter(experts_of(model).values()))
    captured = capture(module, model, ids(3, 16, seed=1))
    for e in range(module.num_experts):
        acc = expert_hessian(module, param, captured, e, torch.float64)
        H, tokens = _routed_reference(module, captured, e, param)
        assert acc.tokens == tokens > 0
        torch.testing.assert_close(acc.hessian, H, rtol=1e-12, atol=1e-12)


def test_gptq_experts_lower_output_error_than_rtn_and_rtn_fallback():
    model = exact(build("qwen3_moe", torch.float64))
    module = next(iter(experts_of(model).values()))
    captured = capture(module, model, ids(8, 32, seed=2))
    from orthoopt.quant.quantizer import QuantSpec

    spec = QuantSpec(bits=3)
    ref = copy.deepcopy(module)

    def out_error(mod):
        with torch.no_grad():
            return sum(float((mod.forward(h, i, torch.full(i.shape, 0.5, dtype=h.dtype))
                              - ref.forward(h, i, torch.full(i.shape, 0.5, dtype=h.dtype))).norm() ** 2)
                       for h, i in captured)

    g = copy.deepcopy(module)
    gptq_experts(g, "gate_up_proj", captured, spec)
    loss, params, rtn = gptq_experts(g, "down_proj", captured, spec)  # Hessian from the quantized gate_up
    assert rtn == [] and loss > 0 and params.scale.shape == (module.num_experts, module.down_proj.shape[1], 1)
    r = copy.deepcopy(module)
    with torch.no_grad():
        for p in ("gate_up_proj", "down_proj"):
            getattr(r, p).copy_(quantize_experts_rtn(getattr(r, p), spec)[0])
    assert out_error(g) < 0.9 * out_error(r)

    # an expert no calibration token reaches: RTN, with a warning naming it
    starved = [(h, torch.where(i == 3, (i + 1) % 3, i)) for h, i in captured]
    f = copy.deepcopy(module)
    with pytest.warns(UserWarning, match=r"experts \[3\] received no calibration token"):
        _, _, rtn = gptq_experts(f, "gate_up_proj", starved, spec, name="layers.0.mlp.experts")
    assert rtn == [3]
    assert torch.equal(f.gate_up_proj[3], quantize_experts_rtn(module.gate_up_proj, spec)[0][3])
    assert torch.isfinite(f.gate_up_proj).all()


def test_gptq_on_moe_model_beats_rtn_and_records_grids():
    base = exact(build("qwen2_moe", torch.float64))
    calib = ids(8, 32, seed=1)
    with torch.no_grad():
        ref = base(calib).logits
    err = {}
    for method in ("rtn", "gptq"):
        model = copy.deepcopy(base)
        r = quantize_model(model, QuantizeConfig(method, wbits=4), calib=calib, progress=False)
        with torch.no_grad():
            err[method] = float((model(calib).logits - ref).norm() / ref.norm())
        if method == "gptq":
            assert "layers.0.mlp.experts.down_proj" in r.losses
            name = "model.layers.0.mlp.experts.gate_up_proj"
            W = model.state_dict()[name]
            codes = r.params[name].codes(W, r.spec).double()
            p = r.params[name]
            back = torch.stack([p.scale[e][:, p.group_index[e]] * (codes[e] - p.zero[e][:, p.group_index[e]])
                                for e in range(W.shape[0])])
            torch.testing.assert_close(back, W, rtol=0, atol=1e-12)  # every expert slice on its grid
            assert r.settings["experts_rtn_fallback"] is None
    assert err["gptq"] < 0.95 * err["rtn"], err


def test_gptq_records_experts_without_calibration_tokens():
    """A router that never picks expert 3: GPTQ quantizes it by RTN, warns, and quant.json says so."""
    import types

    model = exact(build("mixtral", torch.float64))
    for L in DecoderAdapter(model).modules.layers:
        router = L.projs["router"]
        inner = router.forward

        def never_3(self, h, inner=inner):
            logits, v, i = inner(h)
            masked = logits.clone()
            masked[:, 3] = -torch.inf
            top = masked.softmax(-1).topk(self.top_k, dim=-1)
            return logits, top.values / top.values.sum(-1, keepdim=True), top.indices

        router.forward = types.MethodType(never_3, router)
    before = model.model.layers[1].mlp.experts.down_proj.detach().clone()
    with pytest.warns(UserWarning, match="received no calibration token"):
        r = quantize_model(model, QuantizeConfig("gptq", wbits=4), calib=ids(4, 16, seed=1), progress=False)
    assert r.settings["experts_rtn_fallback"] == {f"layers.{i}.mlp.experts.{p}": [3]
                                                  for i in range(2) for p in ("gate_up_proj", "down_proj")}
    want = quantize_experts_rtn(before, r.spec)[0][3]
    assert torch.equal(model.model.layers[1].mlp.experts.down_proj[3], want)


def _per_token_reference(module, hidden, idx, weights, spec):
    """The experts' output token by token with per-token A-bit quantization of both expert inputs."""
    from orthoopt.quant.act import quantize_activations

    out = torch.zeros_like(hidden)
    xq = quantize_activations(hidden, spec)
    for t in range(hidden.shape[0]):
        for j, e in enumerate(idx[t].tolist()):
            gu = module.gate_up_proj[e] @ xq[t]
            inter = gu.shape[0] // 2
            h = quantize_activations((module.act_fn(gu[:inter]) * gu[inter:]).unsqueeze(0), spec)[0]
            out[t] += weights[t, j] * (module.down_proj[e] @ h)
    return out


@pytest.mark.parametrize("model_type", MOE)
def test_activation_and_kv_quant_on_moe(model_type):
    model = exact(build(model_type, torch.float64))
    x = ids()
    with torch.no_grad():
        ref = model(x).logits
    # R3 alone is exact; K/V and activation quantization change the logits
    r = quantize_model(model, QuantizeConfig(wbits=16, kv=KVQuantConfig(r3=True)), progress=False)
    with torch.no_grad():
        assert float((model(x).logits - ref).norm() / ref.norm()) < 1e-10
    r.hooks.remove()
    module = next(iter(experts_of(model).values()))
    captured = capture(module, model, x)
    r = quantize_model(model, QuantizeConfig(wbits=16, act=ActQuantConfig(bits=4), kv=KVQuantConfig(bits=4)), progress=False)
    m = DecoderAdapter(model).modules  # one hook per linear, one wrapper per experts module, the KV wrapper
    assert len(r.hooks) == sum(len(L.quant_linears(m.spec)) for L in m.layers) + len(experts_of(model)) + 1
    h, i = captured[0]
    w = torch.rand(i.shape, generator=torch.Generator().manual_seed(0), dtype=h.dtype)
    with torch.no_grad():
        got = module(h, i, w)
        want = _per_token_reference(module, h, i, w, ActQuantConfig(bits=4).spec)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
        assert float((model(x).logits - ref).norm() / ref.norm()) > 1e-3
    r.hooks.remove()
    assert "forward" not in module.__dict__
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, ref, rtol=0, atol=0)


def test_cli_quantize_moe_a4kv4_then_eval(tmp_path, capsys):
    cls, extra, _ = CASES["qwen2_moe"]
    cfg = getattr(transformers, cls)(**{**BASE, **extra, "vocab_size": 259})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    src = tmp_path / "moe"
    model.save_pretrained(src)
    byte_tokenizer().save_pretrained(src)
    text = tmp_path / "t.txt"
    text.write_text("".join(f" line {i} about experts and routers .\n" for i in range(40)))
    out = tmp_path / "q"
    capsys.readouterr()
    assert main(["quantize", str(src), "--out", str(out), "--abits", "4", "--kvbits", "4", "--json",
                 "--no-progress"]) == 0  # the command: RTN is the default method
    settings = json.loads(capsys.readouterr().out)
    assert settings["wbits"] == 4 and settings["abits"] == 4 and settings["kvbits"] == 4
    assert "layers.0.mlp.experts.gate_up_proj" in settings["experts"]
    loaded = load_quantized(out)
    assert len(loaded.hooks) > 0
    assert all("forward" in mod.__dict__ for mod in experts_of(loaded.model).values())  # re-installed
    assert main(["eval", str(out), "--text", str(text), "--seq-len", "32", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ppl"] > 1 and report["ppl"] == pytest.approx(math.exp(report["nll"]))
    # the loaded checkpoint computes what the in-memory quantized model computes (hooks re-installed)
    mem = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    quantize_model(mem, QuantizeConfig("rtn", wbits=4, act=ActQuantConfig(bits=4), kv=KVQuantConfig(bits=4)), progress=False)
    x = ids(2, 16, vocab=259)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x).logits, mem(x).logits, rtol=0, atol=1e-5)
    # the compressed-tensors exporter refuses expert tensors with the reason, before quantizing, and writes nothing
    import orthoopt.quant.model as quant_model  # orthoopt.jobs.oneshot calls it from there

    def must_not_run(*a, **k):
        raise AssertionError("quantize_model ran before the refusal")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(quant_model, "quantize_model", must_not_run)
        assert main(["quantize", str(src), "--out", str(tmp_path / "ct"), "--method", "rtn", "--format",
                     "compressed-tensors", "--no-progress"]) == 2
    assert "MoE expert tensors" in capsys.readouterr().err
    assert not (tmp_path / "ct").exists()
    # the default --format auto learns of the experts once the model is loaded and writes orthoopt's format
    assert main(["quantize", str(src), "--out", str(tmp_path / "auto"), "--no-progress"]) == 0
    assert "export" not in json.loads((tmp_path / "auto" / "quant.json").read_text())
    assert "MoE expert tensors" in (tmp_path / "auto" / "report.md").read_text()
    capsys.readouterr()
    # rotate --method spinquant (default simulated W4 RTN weights, experts included) with A4/KV4 and R3
    assert main(["rotate", str(src), "--out", str(tmp_path / "r"), "--method", "spinquant", "--calib", str(text),
                 "--calib-tokens", "128", "--calib-seq-len", "32", "--steps", "2", "--abits", "4", "--kvbits", "4",
                 "--r3", "--batch-size", "2", "--json", "--no-progress"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["sim_quant"]["wbits"] == 4 and report["invariance_error"] < 1e-4


@pytest.mark.parametrize("model_type", MOE)
def test_spinquant_on_moe(model_type):
    from orthoopt.config import RotateConfig
    from orthoopt.pipeline import rotate_model
    from orthoopt.quant.rotated import RotatedQuantLM, SimQuantConfig
    from orthoopt.solvers import initial_rotations

    sq = SimQuantConfig(wbits=4, act=ActQuantConfig(bits=4), kv=KVQuantConfig(bits=4, r3=True))
    # float64: the on-the-fly rotated, quantized loss equals write-back + quantize_model (RTN experts)
    model = exact(build(model_type, torch.float64))
    DecoderAdapter(model).fuse_norms()
    rots = initial_rotations(DecoderAdapter(model).rotation_dims(), "random", seed=3, dtype=torch.float64)
    x = ids()
    with torch.no_grad():
        on = RotatedQuantLM(model, sq)(rots, x)
        off = RotatedQuantLM(model, SimQuantConfig(wbits=16))(rots, x)
        ref = copy.deepcopy(model)
        DecoderAdapter(ref).apply_rotations(rots)
        r = quantize_model(ref, QuantizeConfig("rtn", wbits=4, act=sq.act, kv=sq.kv), progress=False)
        assert float(on) == pytest.approx(float(ref(x, labels=x).loss), rel=1e-9)
        r.hooks.remove()
        assert float(off) == pytest.approx(float(model(x, labels=x).loss), rel=1e-9)
    # float32: two steps of the joint solve keep the float model's logits
    model = build(model_type, torch.float32)
    with torch.no_grad():
        want = model(x).logits
    res = rotate_model(
        model,
        RotateConfig("spinquant", solve={"steps": 2}, spinquant={"sim_quant": sq, "batch_size": 2}),
        calib=ids(4, 16, seed=1),
        progress=False,
        verify_ids=x,
    )
    assert res.solves["R1"].steps == 2 and res.report["invariance_error"] < 1e-4
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, want, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe"])
def test_moe_routers_never_enter_the_learned_objectives(model_type):
    """Issue 22, item 4: the architecture table keeps the routers in full precision
    (``Proj.quantize=False``, ``ArchSpec.full_precision``), so no learned objective counts their
    rows (until then only embed_tokens / lm_head were left out and ``mlp.gate`` entered R1's loss);
    ``include_embeddings`` brings back the embedding and lm_head, never a router."""
    from orthoopt.config import RotateConfig
    from orthoopt.pipeline import build_objective

    adapter = DecoderAdapter(build(model_type, torch.float32))
    adapter.fuse_norms()
    spec = adapter.modules.spec
    routers = [b.name for b in adapter.weight_blocks("R1") if spec.is_full_precision(b.name)
               and b.name not in (spec.embed, spec.lm_head)]
    assert routers and all(".mlp.gate" in r or "shared_expert_gate" in r for r in routers)
    for include in (False, True):
        config = RotateConfig("optrot", include_embeddings=include)
        names = [b.name for b in build_objective(config, adapter, "R1").blocks]
        assert not set(routers) & set(names), include
        assert any(".experts." in n for n in names)
        assert (spec.embed in names) == include
