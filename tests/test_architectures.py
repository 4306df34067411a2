"""Every entry of the architecture table: norm fusion and rotations keep the logits, on tiny models built
from transformers' own config classes; architectures that cannot take ``R1`` exactly refuse it with the
reason. Adding an architecture is one entry in ``orthoopt.adapters.arch_table.ARCHS`` plus one row of
:data:`CASES` (``docs/adapters.md``).

Models are float64 with every weight random (norm scales too, so fusion is exercised). The float64
checks patch the few places where transformers computes in float32 whatever the model dtype (RMSNorm,
MoE router softmax) with the same formula in the input dtype; the float32 checks run transformers
unpatched.
"""

from __future__ import annotations

import copy
import types

import pytest
import torch
import transformers
from torch import nn
from transformers import AutoModelForCausalLM

from orthoopt.adapters import DecoderAdapter, UnsupportedModelError, logits_relative_error
from orthoopt.adapters.archs import ARCHS, effective_scale
from orthoopt.streaming import DecoderLayout, FusedReader, SafetensorsCheckpoint
from orthoopt.streaming.layer_rotation import apply_r1, apply_r2, r2_blocks

from helpers import assert_streamed_r1_blocks_match

BASE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)

# model_type -> (config class, extra config arguments, expects R1 on random weights)
CASES: dict[str, tuple[str, dict, bool]] = {
    "llama": ("LlamaConfig", dict(attention_bias=True), True),
    "qwen3": ("Qwen3Config", {}, True),
    "gemma2": ("Gemma2Config", dict(attn_logit_softcapping=50.0, final_logit_softcapping=30.0), False),
    "gemma3_text": ("Gemma3TextConfig", {}, False),
    "phi3": ("Phi3Config", dict(head_dim=None), True),
    "olmo2": ("Olmo2Config", {}, False),
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2), True),
    "qwen2_moe": ("Qwen2MoeConfig", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                         shared_expert_intermediate_size=48, mlp_only_layers=[1]), True),
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32), True),
}


def test_every_table_entry_has_a_case():
    """One entry plus one test: an architecture without a case here is untested."""
    assert set(ARCHS) - {"mistral", "qwen2"} == set(CASES)  # mistral/qwen2: test_adapters' planted models


def build(model_type: str, dtype=torch.float64, seed: int = 0) -> nn.Module:
    cls, extra, _ = CASES[model_type]
    kw = {**BASE, **extra}
    if dtype == torch.float64 and "num_experts_per_tok" in kw:
        kw["experts_implementation"] = "eager"  # the default grouped_mm has no float64 kernel
    if kw.get("head_dim", 0) is None:
        kw.pop("head_dim")
    cfg = getattr(transformers, cls)(**kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).to(dtype).eval()
    spec = ARCHS[model_type]
    kinds = {}
    for name, mod in model.named_modules():
        for n in spec.norms:
            if name.endswith("." + n.path):
                kinds[name] = n.kind
    kinds[f"{spec.decoder}.{spec.final_norm}"] = spec.final_norm_kind
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            owner = name.rsplit(".", 1)[0]
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) / p.shape[-1] ** 0.5)
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g, dtype=torch.float64))
            else:  # norm scales (residual and q/k norms), random and non-uniform
                s = torch.exp(0.3 * torch.randn(p.shape, generator=g, dtype=torch.float64))
                p.copy_(s - 1 if "Gemma" in type(model).__name__ else s)
    return model


def _exact_norm(self, x):
    w = self.weight.to(x.dtype)
    scale = 1 + w if type(self).__name__.startswith("Gemma") else w
    eps = getattr(self, "variance_epsilon", getattr(self, "eps", None))
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * scale


def _exact_router(self, h):
    h = h.reshape(-1, self.hidden_dim)
    logits = nn.functional.linear(h, self.weight)
    v, i = logits.softmax(-1).topk(self.top_k, dim=-1)
    if getattr(self, "norm_topk_prob", True):  # Mixtral always normalizes
        v = v / v.sum(-1, keepdim=True)
    return logits, v, i


def exact(model: nn.Module) -> nn.Module:
    """Compute transformers' float32-internal RMSNorms and routers in the model's dtype (float64)."""
    for mod in model.modules():
        name = type(mod).__name__
        if name.endswith("RMSNorm"):
            mod.forward = types.MethodType(_exact_norm, mod)
        elif name.endswith("TopKRouter"):
            mod.forward = types.MethodType(_exact_router, mod)
    return model


def ids(seed=0, batch=2, seq=12):
    return torch.randint(3, BASE["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(seed))


def orth(n: int, g: torch.Generator, dtype=torch.float64) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).to(dtype)


def rotations(adapter: DecoderAdapter, seed: int, names=("R1", "R2"), dtype=torch.float64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: orth(n, g, dtype) for k, n in adapter.rotation_dims().items()
            if k == "R1" and "R1" in names or k.startswith("R2.") and "R2" in names}


def uniform_post_norms(model: nn.Module, value: float = 0.7) -> None:
    """Give every post-norm one constant scale, the case where R1 commutes with it."""
    m = DecoderAdapter(model).modules
    with torch.no_grad():
        for L in m.layers:
            for n in m.spec.post_norms:
                w = L.norms[n.role].weight
                w.fill_(value - 1 if n.kind == "rms1p" else value)


def assert_logits_equal(ref, model, seed=0, rtol=1e-10, atol=1e-10):
    torch.testing.assert_close(model(input_ids=ids(seed)).logits, ref(input_ids=ids(seed)).logits, rtol=rtol, atol=atol)


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", list(CASES))
def test_fusion_and_rotations_keep_logits_float64(model_type):
    model = exact(build(model_type))
    assert model.config.model_type == model_type
    ref = copy.deepcopy(model)
    adapter = DecoderAdapter(model)
    spec = adapter.modules.spec
    if spec.pre_norms:
        assert not adapter.norms_fused
    adapter.fuse_norms()
    assert adapter.norms_fused
    assert_logits_equal(ref, model)
    for name, (norm, kind) in adapter.modules.all_norms().items():  # pre-norms are now the identity
        if name in adapter.modules.residual_norms():
            assert bool((effective_scale(norm.weight, kind) == 1).all()), name
    if not CASES[model_type][2]:  # post-norms with non-uniform scales: R1 is refused, R2 still exact
        with pytest.raises(UnsupportedModelError, match=r"R1 cannot be fused exactly: .*post-norm.*non-uniform"):
            adapter.apply_rotations(rotations(adapter, 1))
        with pytest.raises(UnsupportedModelError, match="post_attention_layernorm"):
            adapter.weight_blocks("R1")
        assert_logits_equal(ref, model)  # refused before any change
        before = copy.deepcopy(model)
        adapter.apply_rotations(rotations(adapter, 2, names=("R2",)))
        assert_logits_equal(ref, model)
        assert logits_relative_error(before, model, ids(0)) < 1e-12
        assert not torch.equal(before.model.layers[0].self_attn.o_proj.weight, model.model.layers[0].self_attn.o_proj.weight)
        # with uniform post-norm scales R1 commutes with them: exact again
        uniform_post_norms(model)
        uniform_post_norms(ref)
    before = copy.deepcopy(model)
    adapter.apply_rotations(rotations(adapter, 3))
    assert_logits_equal(ref, model)
    assert not torch.equal(before.model.embed_tokens.weight, model.model.embed_tokens.weight)  # not vacuous


@pytest.mark.parametrize("model_type", list(CASES))
def test_fusion_and_rotations_keep_logits_float32(model_type):
    """The real float32 path: transformers' own norms and routers, float32 rotations."""
    model = build(model_type, torch.float32)
    if not CASES[model_type][2]:
        uniform_post_norms(model)
    ref = copy.deepcopy(model)
    adapter = DecoderAdapter(model)
    adapter.fuse_norms()
    adapter.apply_rotations(rotations(adapter, 4, dtype=torch.float32))
    assert logits_relative_error(ref, model, ids(1)) < 1e-4


@pytest.mark.parametrize("model_type", list(CASES))
def test_blocks_are_the_table_and_rotate_like_the_write_back(model_type):
    """Every weight the table names is a block; each block rotated by itself equals the written-back
    weight (R1 and R2 applied separately so that a block sees only its own rotation)."""
    model = build(model_type)
    if not CASES[model_type][2]:
        uniform_post_norms(model)
    adapter = DecoderAdapter(model)
    adapter.fuse_norms()
    m = adapter.modules
    rots = rotations(adapter, 5)
    for phase in (["R1"], [k for k in rots if k.startswith("R2.")]):
        blocks = adapter.weight_blocks(phase)
        want = [b.weight.detach().clone().double() for b in blocks]
        want = [(W @ rots[b.rotation] if b.side == "in" else rots[b.rotation].T @ W) for b, W in zip(blocks, want)]
        adapter.apply_rotations({k: rots[k] for k in phase})
        for b, W in zip(blocks, want):  # blocks are views: they show the written-back weights
            torch.testing.assert_close(b.weight.double(), W, rtol=1e-12, atol=1e-12, msg=b.name)
    names = {b.name for b in adapter.weight_blocks("R1")}
    for L in m.layers:
        for role, mod in L.projs.items():
            pr = m.spec.proj(role)
            expect = L.names[role] if not pr.experts else f"{L.names[role]}.{pr.param}.0"
            assert expect in names, expect
    r2 = adapter.weight_blocks("R2.0")
    assert sum(b.side == "out" for b in r2) == m.num_kv_heads and sum(b.side == "in" for b in r2) == m.num_heads


@pytest.mark.parametrize("model_type", ["phi3", "gemma2", "qwen3"])
def test_streamed_layer_functions_match_the_adapter(model_type, tmp_path):
    """The streamed path (layout from the checkpoint, fused reader, per-layer write-back) gives the
    adapter's blocks and weights, for a fused-projection, a (1 + w)-norm and a q/k-norm architecture."""
    model = build(model_type, torch.float32)
    if not CASES[model_type][2]:
        uniform_post_norms(model)
    model.save_pretrained(tmp_path / "m")
    ckpt = SafetensorsCheckpoint(tmp_path / "m")
    layout = DecoderLayout.from_checkpoint(ckpt)
    reader = FusedReader(ckpt, layout)
    adapter = DecoderAdapter(model)
    adapter.fuse_norms()
    assert_streamed_r1_blocks_match(reader, layout, adapter)
    rots = rotations(adapter, 6)
    t = reader.layer(1)
    apply_r1(t, layout, 1, rots["R1"])
    apply_r2(t, layout, 1, rots["R2.1"])
    adapter.apply_rotations({"R1": rots["R1"]})
    adapter.apply_rotations({"R2.1": rots["R2.1"]})
    state = model.state_dict()
    for k, v in t.items():
        assert torch.equal(v, state[k]), k
    theirs = adapter.weight_blocks("R2.1")
    ours = r2_blocks(t, layout, 1)
    assert [(b.name, b.side) for b in ours] == [(b.name, b.side) for b in theirs]
    assert all(torch.equal(a.weight, b.weight) for a, b in zip(ours, theirs))


def test_streamed_layout_refuses_moe_checkpoints(tmp_path):
    build("mixtral", torch.float32).save_pretrained(tmp_path / "m")
    with pytest.raises(UnsupportedModelError, match="streamed rotation does not support MoE"):
        DecoderLayout.from_checkpoint(SafetensorsCheckpoint(tmp_path / "m"))


def test_streamed_reader_refuses_non_uniform_post_norms(tmp_path):
    model = build("olmo2", torch.float32)
    model.save_pretrained(tmp_path / "m")
    ckpt = SafetensorsCheckpoint(tmp_path / "m")
    with pytest.raises(UnsupportedModelError, match=r"post_attention_layernorm.*non-uniform"):
        FusedReader(ckpt, DecoderLayout.from_checkpoint(ckpt))


@pytest.mark.parametrize("model_type", ["olmo2", "gemma2"])
def test_r1_through_a_non_uniform_post_norm_changes_the_function(model_type):
    """Why R1 is refused: forced past the guard, it changes the logits of a post-norm model."""
    from orthoopt.adapters import writeback

    model = exact(build(model_type))
    ref = copy.deepcopy(model)
    adapter = DecoderAdapter(model)
    adapter.fuse_norms()
    writeback.apply_rotations(adapter.modules, {"R1": rotations(adapter, 7, names=("R1",))["R1"]})
    assert logits_relative_error(ref, model, ids(0)) > 1e-3


def test_layernorm_kind_and_wrong_parametrization_are_refused():
    model = build("gemma2")
    adapter_ok = DecoderAdapter(model)  # (1 + w) norms pass the (1 + w) check
    assert adapter_ok.modules.spec.final_norm_kind == "rms1p"
    with pytest.raises(UnsupportedModelError, match=r"input_layernorm.*x / rms\(x\) \* weight"):
        DecoderAdapter(model, arch="llama")  # a Gemma model read as Llama has the wrong norm form


@pytest.mark.parametrize("model_type", ["phi3", "mixtral", "qwen2_moe"])
def test_calibration_inputs_follow_the_table_groups(model_type):
    """Every R1 block with an input gets one; modules of one input-sharing group share one capture."""
    model = build(model_type)
    adapter = DecoderAdapter(model)
    adapter.fuse_norms()
    batches = [torch.randint(3, BASE["vocab_size"], (1, 8), generator=torch.Generator().manual_seed(s)) for s in (0, 1)]
    X = adapter.linear_inputs(batches, max_tokens=100, progress=False)
    sources = adapter.block_sources("R1")
    for block, src in sources.items():
        if src is not None:
            assert X[src[0]].shape[0] == 16, block  # all 2 x 8 tokens
    m = adapter.modules
    for L in m.layers:
        for group in m.spec.groups:
            names = list(dict.fromkeys(L.names[r] for r in group if r in L.projs))
            assert all(X[n] is X[names[0]] for n in names), names
    # the expert-down and hidden-side tensors have no captured input; everything reading R1 does
    readers = [b for b in adapter.weight_blocks("R1") if b.side == "in" and b.name != m.names["embed"]]
    assert all(sources[b.name] is not None and X[sources[b.name][0]].shape[1] == adapter.hidden_size for b in readers)


def test_quantization_reads_the_table():
    from orthoopt.quant.act import ActQuantConfig
    from orthoopt.quant.model import quantize_model
    from orthoopt.quant.config import QuantizeConfig

    model = build("phi3", torch.float32)
    m = DecoderAdapter(model).modules
    r = quantize_model(model, QuantizeConfig("rtn", wbits=4, act=ActQuantConfig(bits=8, online_hadamard=True)), progress=False)
    assert len(r.params) == sum(len(L.quant_linears(m.spec)) for L in m.layers) == 4 * len(m.layers)
    assert any(k.endswith("self_attn.qkv_proj") for k in r.params)
    moe = build("qwen2_moe", torch.float32)
    assert set(DecoderAdapter(moe).modules.spec.full_precision) >= {"embed_tokens", "lm_head", "layers.*.mlp.gate"}
    r = quantize_model(moe, QuantizeConfig("rtn", wbits=4), progress=False)  # experts per slice (tests/test_moe_quant.py)
    assert {k for k in r.params if ".experts." in k} == {"model.layers.0.mlp.experts.gate_up_proj",
                                                         "model.layers.0.mlp.experts.down_proj"}  # layer 1 is dense
    assert not any(k.endswith(("mlp.gate", "shared_expert_gate")) for k in r.params)  # routers: full precision


@pytest.mark.parametrize("model_type", ["phi3", "gemma2"])
def test_streamed_rotation_equals_in_memory(model_type, tmp_path):
    """The whole streamed OptRot run (fused qkv / (1 + w) norms, uniform post-norms) writes the
    in-memory pipeline's checkpoint."""
    from orthoopt.config import RotateConfig
    from orthoopt.pipeline import rotate_model
    from orthoopt.pipeline import rotate_streamed

    model = build(model_type, torch.float32)
    if not CASES[model_type][2]:
        uniform_post_norms(model)
    model.save_pretrained(tmp_path / "src")
    mem = AutoModelForCausalLM.from_pretrained(tmp_path / "src", dtype=torch.float32)
    rotate_model(mem, RotateConfig("optrot", seed=3, solve={"solver": "cayley-sgd", "steps": 3}), progress=False)
    rotate_streamed(
        tmp_path / "src", tmp_path / "out", RotateConfig(seed=3, solve={"solver": "cayley-sgd", "steps": 3}), progress=False
    )
    got = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).state_dict()
    want = mem.state_dict()
    assert set(got) == set(want)
    assert max(float((got[k] - want[k]).abs().max()) for k in want) <= 1e-6  # bit-identical on one machine
    assert not torch.equal(got["model.embed_tokens.weight"], model.state_dict()["model.embed_tokens.weight"])


@pytest.mark.parametrize("model_type", sorted(CASES))
def test_full_settings_quantize_and_spinquant_on_every_architecture(model_type):
    """Issue 14 on every table entry: W4A4KV4 with R3 (``quantize --abits 4 --kvbits 4 --r3``) quantizes
    and changes the logits, R3 alone keeps them, and ``rotate --method spinquant`` (R1 and R2, or R2
    where R1 is refused) keeps the float model's logits. float32, transformers unpatched."""
    from orthoopt.config import RotateConfig
    from orthoopt.pipeline import rotate_model
    from orthoopt.quant.act import ActQuantConfig
    from orthoopt.quant.config import QuantizeConfig
    from orthoopt.quant.kv import KVQuantConfig
    from orthoopt.quant.model import quantize_model
    from orthoopt.quant.rotated import SimQuantConfig

    model = build(model_type, torch.float32)
    x = ids(3)
    with torch.no_grad():
        ref = model(x).logits
    r3 = copy.deepcopy(model)
    hooks = quantize_model(r3, QuantizeConfig(wbits=16, kv=KVQuantConfig(r3=True)), progress=False).hooks
    with torch.no_grad():
        assert (r3(x).logits - ref).norm() < 1e-4 * ref.norm()  # the online Hadamard alone is exact
    hooks.remove()
    q = copy.deepcopy(model)
    quantize_model(q, QuantizeConfig("rtn", wbits=4, act=ActQuantConfig(bits=4, symmetric=False), kv=KVQuantConfig(bits=4, r3=True)), progress=False)
    with torch.no_grad():
        out = q(x).logits
    assert torch.isfinite(out).all() and (out - ref).norm() > 1e-3 * ref.norm()  # really quantized

    rotations = ("R1", "R2") if CASES[model_type][2] else ("R2",)
    sim = SimQuantConfig(wbits=4, act=ActQuantConfig(bits=4, symmetric=False), kv=KVQuantConfig(bits=4, r3=True))
    spun = copy.deepcopy(model)
    result = rotate_model(
        spun,
        RotateConfig("spinquant", rotations=rotations, solve={"steps": 2}, spinquant={"sim_quant": sim, "batch_size": 2}),
        calib=ids(4, batch=4, seq=16),
        progress=False,
        verify_ids=x,
    )
    assert result.report["invariance_error"] < 1e-4
    assert ("R1" in result.rotations) == ("R1" in rotations)
    assert sum(k.startswith("R2.") for k in result.rotations) == BASE["num_hidden_layers"]


def test_llmcompressor_ignore_list_is_the_tables_full_precision_linears():
    """llm-compressor's ignore list comes from the table: lm_head, and every router (quantize=False)
    as a pattern that matches the router's full module name and no other projection's."""
    import re

    from orthoopt.interop.llmcompressor import ignore_list

    for model_type, spec in ARCHS.items():
        ignore = ignore_list(spec)
        assert ignore[0] == spec.lm_head
        patterns = [re.compile(p.removeprefix("re:")) for p in ignore[1:]]
        assert len(patterns) == sum(not p.quantize for p in spec.projs), model_type
        for p in spec.projs:
            name = f"{spec.decoder}.{spec.layers}.7.{p.path}"
            assert any(r.match(name) for r in patterns) == (not p.quantize), (model_type, p.path)


def test_every_group_of_the_table_has_its_diagnostics_label():
    from orthoopt.adapters.arch_table import GROUPS
    from orthoopt.diagnostics.report import INPUT_ROLES

    for model_type, spec in ARCHS.items():
        assert {p.group for p in spec.projs} <= set(GROUPS), model_type
    assert set(INPUT_ROLES) == {*GROUPS, "head_in"}


def test_one_layout_validator_for_modules_and_safetensors(tmp_path):
    """A missing projection gets the same decoder-relative name from a loaded model and from its file."""
    from safetensors.torch import load_file, save_file

    from orthoopt.adapters.archs import locate

    model = build("llama", torch.float32)
    model.save_pretrained(tmp_path / "m")
    path = tmp_path / "m" / "model.safetensors"
    tensors = load_file(path)
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, path, metadata={"format": "pt"})
    del model.model.layers[1].mlp.down_proj
    want = "missing model.layers.1.mlp.down_proj (nn.Linear)"
    with pytest.raises(UnsupportedModelError) as loaded:
        locate(model)
    with pytest.raises(UnsupportedModelError) as streamed:
        DecoderLayout.from_checkpoint(SafetensorsCheckpoint(tmp_path / "m"))
    assert want in str(loaded.value) and want in str(streamed.value)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_input_leaders_hook_one_role_per_shared_input(arch):
    """All roles: one leader per input-sharing group (its first role), the group its value; a subset:
    each group led by its first requested role; a role of no group leads itself."""
    spec = ARCHS[arch]
    assert spec.input_leaders(spec.roles) == {g[0]: list(g) for g in spec.groups}
    for group in spec.groups:
        tail = list(group[1:]) or list(group)
        assert spec.input_leaders(reversed(tail)) == {tail[0]: tail}
    assert spec.input_leaders(["not-a-role", spec.roles[0]]) == {spec.roles[0]: [spec.roles[0]], "not-a-role": ["not-a-role"]}
