"""compressed-tensors export: plain transformers loads it and computes what orthoopt's fake-quant model does."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("compressed_tensors", reason="compressed-tensors not installed (pip install 'orthoopt[export]')")

from transformers import AutoModelForCausalLM, CompressedTensorsConfig  # noqa: E402

from orthoopt.testing import save_planted  # noqa: E402
from orthoopt.cli import main  # noqa: E402
from orthoopt.export.compressed_tensors import save_compressed_tensors, unrepresentable  # noqa: E402
from orthoopt.quant import load_checkpoint, quantize_model  # noqa: E402
from orthoopt.quant.config import GPTQConfig, QuantizeConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def real_model_dir() -> Path | None:
    """SmolLM2-135M when cached (``$ORTHOOPT_SMOLLM``, the fetch cache, ../shared/models)."""
    candidates = [os.environ.get("ORTHOOPT_SMOLLM"), Path.home() / ".cache/orthoopt/models/smollm2-135m",
                  ROOT.parent / "shared/models/smollm2-135m"]
    for c in candidates:
        if c and (Path(c) / "config.json").is_file() and (Path(c) / "tokenizer.json").is_file():
            return Path(c)
    return None


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return save_planted(tmp_path_factory.mktemp("m") / "tiny", hidden_size=64, num_layers=2, num_heads=4,
                        intermediate_size=128)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def assert_same(got, ref):
    err = (got - ref).abs().max().item()
    assert err <= 1e-5 * ref.abs().max().item(), f"logits differ by {err}"


CASES = [  # method, sym, group_size, act_order
    ("rtn", True, None, False),
    ("rtn", False, None, False),
    ("rtn", True, 32, False),
    ("rtn", False, 16, False),
    ("gptq", True, 32, False),
    ("gptq", False, None, True),
]


@pytest.mark.parametrize("method,sym,group,act_order", CASES)
def test_export_loads_in_transformers_with_orthoopt_logits(tmp_path, tiny, method, sym, group, act_order):
    model, tok = load_checkpoint(tiny)
    gen = torch.Generator().manual_seed(0)
    calib = torch.randint(0, model.config.vocab_size, (4, 32), generator=gen)
    ids = torch.randint(0, model.config.vocab_size, (2, 20), generator=gen)
    res = quantize_model(model, QuantizeConfig(method, wbits=4, group_size=group, sym=sym, gptq=GPTQConfig(act_order=act_order)), calib=calib, progress=False)
    ref = logits(model, ids)
    out = save_compressed_tensors(model, tok, tmp_path / "ct", res)
    assert_same(logits(model, ids), ref)  # the in-memory model is given back unchanged
    assert all(not hasattr(m, "weight_packed") and not hasattr(m, "quantization_scheme") for m in model.modules())

    # On disk: packed int32 codes, [out, groups] scales, zero points only for the asymmetric grid.
    tensors = load_file(out / "model.safetensors")
    lin = model.model.layers[1].mlp.down_proj
    key = "model.layers.1.mlp.down_proj"
    assert f"{key}.weight" not in tensors
    packed = tensors[f"{key}.weight_packed"]
    assert packed.dtype == torch.int32 and tuple(packed.shape) == (lin.out_features, lin.in_features * 4 // 32)
    groups = lin.in_features // group if group else 1
    assert tuple(tensors[f"{key}.weight_scale"].shape) == (lin.out_features, groups)
    assert (f"{key}.weight_zero_point" in tensors) == (not sym)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    w = qc["config_groups"]["group_0"]["weights"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert (w["num_bits"], w["symmetric"], w["group_size"]) == (4, sym, group)
    assert w["strategy"] == ("group" if group else "channel")
    assert qc["ignore"] == ["lm_head"]
    assert json.loads((out / "quant.json").read_text())["export"]["format"] == "compressed-tensors"

    dense = AutoModelForCausalLM.from_pretrained(out, quantization_config=CompressedTensorsConfig(dequantize=True))
    assert_same(logits(dense, ids), ref)
    try:  # the default route keeps packed weights and decompresses on the first forward
        plain = AutoModelForCausalLM.from_pretrained(out)
    except RuntimeError as e:
        # transformers 5.2x's compressed route builds unpacked zero-point shapes: a loud refusal is
        # acceptable for the asymmetric grid (docs/export.md), a silently different model is not
        assert not sym and "mismatch" in str(e).lower()
    else:
        assert_same(logits(plain, ids), ref)


def test_unrepresentable_settings_are_refused_with_reasons(tmp_path, tiny, capsys):
    base = {"wbits": 4, "abits": 16, "group_size": None, "gptq": None, "act": {"bits": 16, "online_hadamard": False}}
    assert unrepresentable(base) == []
    assert "nothing to pack" in unrepresentable({**base, "wbits": 16})[0]
    cases = [
        (["--abits", "4"], "A4 activations"),
        (["--kvbits", "8"], "K/V-cache"),
        (["--method", "gptq", "--calib", str(tiny / "config.json"), "--act-order", "--group-size", "32"], "g_idx"),
    ]
    for extra, reason in cases:
        argv = ["quantize", str(tiny), "--out", str(tmp_path / "x"), "--format", "compressed-tensors",
                "--no-progress", *extra]
        if "--method" not in extra:
            argv += ["--method", "rtn"]
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "cannot export to compressed-tensors" in err and reason in err, err
        assert not (tmp_path / "x").exists()


def test_cli_export_then_orthoopt_eval_matches_fake_quant(tmp_path, tiny, capsys):
    text = tmp_path / "t.txt"
    text.write_text("".join(f" line {i} of rotations and outliers .\n" for i in range(80)), encoding="utf-8")
    ppl = {}
    for fmt in ("orthoopt", "compressed-tensors"):
        out = tmp_path / fmt
        capsys.readouterr()
        assert main(["quantize", str(tiny), "--out", str(out), "--method", "rtn", "--asym", "--group-size", "16",
                     "--format", fmt, "--json", "--no-progress"]) == 0
        captured = capsys.readouterr()
        assert json.loads(captured.out)["out"] == str(out)
        assert "it/s" not in captured.err  # --no-progress: no bar, compressed-tensors' own included
        assert main(["eval", str(out), "--text", str(text), "--seq-len", "32", "--json", "--no-progress"]) == 0
        captured = capsys.readouterr()
        assert "it/s" not in captured.err
        ppl[fmt] = json.loads(captured.out)["ppl"]
    assert (tmp_path / "compressed-tensors" / "model.safetensors").stat().st_size < (
        tmp_path / "orthoopt" / "model.safetensors").stat().st_size
    assert ppl["compressed-tensors"] == pytest.approx(ppl["orthoopt"], rel=1e-5)


@pytest.mark.slow
def test_smollm2_export_matches_fake_quant(tmp_path):
    src = real_model_dir()
    if src is None:
        pytest.skip("SmolLM2-135M not cached (set ORTHOOPT_SMOLLM or run `orthoopt fetch smollm2-135m`)")
    model, tok = load_checkpoint(src)
    res = quantize_model(model, QuantizeConfig("rtn", wbits=4, group_size=64, sym=True), progress=False)
    ids = tok("Rotations spread outliers before 4-bit quantization.", return_tensors="pt").input_ids
    ref = logits(model, ids)
    out = save_compressed_tensors(model, tok, tmp_path / "ct", res)
    del model
    loaded = AutoModelForCausalLM.from_pretrained(out)  # plain transformers, no orthoopt
    assert_same(logits(loaded, ids), ref)
    size = (out / "model.safetensors").stat().st_size
    assert size < 0.6 * (src / "model.safetensors").stat().st_size
