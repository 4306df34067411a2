"""Checkpoints load and save in their own dtype (issue 23, item 1): a bfloat16 / float16 checkpoint stays
so through ``rotate`` (in memory and ``--streamed``), ``quantize`` (fake-quant and compressed-tensors)
and ``eval``; ``--dtype`` overrides; the float-model invariance check holds to the stated bf16 tolerance."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from orthoopt.models import load_model
from orthoopt.testing import save_planted
from orthoopt.models.dtypes import checkpoint_dtype, parse_dtype, resolve_model_dtype
from orthoopt.models.sources import resolve_source
from orthoopt.cli import main
from orthoopt.core.tolerance import INVARIANCE, check_orthogonal, invariance_ok, invariance_tolerance, unit_roundoff
from orthoopt.config import RotateConfig
from orthoopt.pipeline import rotate_model

from helpers import run_error, sample_text_file

TINY = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128)
Q = ["--no-progress"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dtypes")
    return {name: save_planted(root / name, dtype=dt, **TINY)
            for name, dt in (("bfloat16", torch.bfloat16), ("float16", torch.float16), ("float32", torch.float32))}


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    return sample_text_file(tmp_path_factory.mktemp("text") / "text.txt")


def stored_dtypes(folder: Path) -> dict[str, str]:
    """``{tensor: safetensors dtype}`` of every weight file of ``folder``."""
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            out.update({k: h.get_slice(k).get_dtype() for k in h.keys()})
    return out


def test_auto_is_the_checkpoints_own_dtype(folders):
    for name, folder in folders.items():
        assert checkpoint_dtype(folder) == getattr(torch, name)
        assert load_model(folder).dtype == getattr(torch, name)  # load_model's default is "auto"
    assert resolve_model_dtype(resolve_source("planted")) == torch.float32  # no stored dtype: float32
    assert resolve_model_dtype(resolve_source(str(folders["bfloat16"])), "float32") == torch.float32
    assert parse_dtype("auto") is None
    with pytest.raises(ValueError, match="dtype must be one of"):
        parse_dtype("int8")


def test_the_bf16_tolerance_is_derived_from_the_unit_roundoff():
    assert unit_roundoff(torch.bfloat16) == 2.0 ** -8  # 8 significand bits
    assert unit_roundoff(torch.float16) == 2.0 ** -11
    assert invariance_tolerance(torch.bfloat16) == 16 * 2.0 ** -8
    assert INVARIANCE[torch.bfloat16][1] == 2.0 ** -8
    assert invariance_tolerance(torch.float32) == 1e-4 and invariance_tolerance(torch.float64) == 1e-6  # unchanged
    z = torch.randn(2, 8, 50, dtype=torch.float64)
    assert invariance_ok(z * (1 + 0.05), z, torch.bfloat16)
    assert not invariance_ok(z * (1 + 0.07), z, torch.bfloat16)
    assert invariance_ok(torch.full_like(z, 2.0 ** -9), torch.zeros_like(z), torch.bfloat16)  # atol: logits near 0


@pytest.mark.parametrize("name", ["bfloat16", "float16"])
def test_rotate_keeps_the_dtype_in_memory_and_streamed_bit_for_bit(folders, tmp_path, name):
    src = folders[name]
    mem, streamed = tmp_path / "mem", tmp_path / "streamed"
    assert main(["rotate", str(src), "--out", str(mem), "--method", "hadamard", *Q]) == 0
    assert main(["rotate", str(src), "--out", str(streamed), "--method", "hadamard", "--streamed", *Q]) == 0
    code = {"bfloat16": "BF16", "float16": "F16"}[name]
    for out in (mem, streamed):
        floats = {k: v for k, v in stored_dtypes(out).items() if v.startswith(("F", "BF"))}
        assert floats and set(floats.values()) == {code}, out
        assert json.loads((out / "config.json").read_text())["dtype"] == name
        assert json.loads((out / "report.json").read_text())["config"]["checkpoint"]["dtype"] == name
    a, b = load_model(mem).state_dict(), load_model(streamed).state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)  # the same per-tensor arithmetic
    report = json.loads((mem / "report.json").read_text())
    assert report["invariance_error"] <= report["invariance_tolerance"] == invariance_tolerance(getattr(torch, name))


def test_rotate_dtype_override(folders, tmp_path):
    assert main(["rotate", str(folders["bfloat16"]), "--out", str(tmp_path / "up"), "--method", "hadamard",
                 "--dtype", "float32", *Q]) == 0
    assert set(stored_dtypes(tmp_path / "up").values()) == {"F32"}
    assert main(["rotate", str(folders["float32"]), "--out", str(tmp_path / "down"), "--method", "hadamard",
                 "--streamed", "--dtype", "bfloat16", *Q]) == 0
    assert set(stored_dtypes(tmp_path / "down").values()) == {"BF16"}


def test_float32_checkpoints_rotate_as_before(folders, tmp_path):
    """auto on a float32 checkpoint is exactly the old default (--dtype float32, float32 rotations)."""
    for args, out in (([], "auto"), (["--dtype", "float32", "--rotation-dtype", "float32"], "explicit")):
        assert main(["rotate", str(folders["float32"]), "--out", str(tmp_path / out), "--method", "optrot",
                     "--steps", "2", *args, *Q]) == 0
    a, b = load_model(tmp_path / "auto").state_dict(), load_model(tmp_path / "explicit").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    config = json.loads((tmp_path / "auto" / "report.json").read_text())["config"]
    assert (config["compute"]["dtype"], config["checkpoint"]["dtype"]) == ("float32", "float32")


def test_learned_rotation_of_a_bf16_model(folders):
    """optrot on a bf16 model: the objective's products run in float32 rotations, the write-back in
    float64 per tensor, cast back once; the model stays bf16 and keeps its function to the bf16 tolerance."""
    model = load_model(folders["bfloat16"])
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    result = rotate_model(model, RotateConfig("optrot", solve={"steps": 2}), verify_ids=ids, progress=False)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert result.report["config"]["compute"]["dtype"] == "float32"  # learned in float32, re-orthogonalized in float64
    for name, R in result.rotations.items():
        check_orthogonal(R, name)
    assert result.report["invariance_error"] <= invariance_tolerance(torch.bfloat16)


def test_a_wrong_bf16_write_back_is_caught(folders, monkeypatch):
    """The bf16 tolerance still catches a write-back that breaks the function (R1 left out of o_proj)."""
    import orthoopt.adapters.writeback as wb

    real = wb.rotate_layer

    def broken(spec, t, prefix, R1=None, R2=None, **kw):
        out = real(spec, t, prefix, R1, R2, **kw)
        return {k: v for k, v in out.items() if not (R1 is not None and k.endswith("o_proj.weight"))}

    monkeypatch.setattr(wb, "rotate_layer", broken)
    model = load_model(folders["bfloat16"])
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="bfloat16 model"):
        rotate_model(model, RotateConfig("hadamard"), verify_ids=ids, progress=False)


def test_quantize_and_eval_keep_bf16(folders, tmp_path, text_file, capsys):
    src = folders["bfloat16"]
    rtn, gptq, ct = tmp_path / "rtn", tmp_path / "gptq", tmp_path / "ct"
    assert main(["quantize", str(src), "--out", str(rtn), "--format", "orthoopt", *Q]) == 0
    assert main(["quantize", str(src), "--out", str(gptq), "--method", "gptq", "--calib", str(text_file),
                 "--nsamples", "2", "--seq-len", "32", "--format", "orthoopt", *Q]) == 0
    assert main(["quantize", str(src), "--out", str(ct), "--format", "compressed-tensors", "--scheme", "W4A16",
                 "--group-size", "32", *Q]) == 0
    for out in (rtn, gptq):
        assert set(stored_dtypes(out).values()) == {"BF16"}, out
        assert json.loads((out / "quant.json").read_text())["dtype"] == "bfloat16"
    ct_types = stored_dtypes(ct)
    assert ct_types["model.layers.0.self_attn.q_proj.weight_scale"] == "BF16"
    assert ct_types["model.embed_tokens.weight"] == "BF16"
    # the RTN weights are the grid of the bf16 weights, computed in float32, cast back once
    from orthoopt.quant.rtn import quantize_rtn
    from orthoopt.quant.quantizer import QuantSpec

    W = load_model(src).state_dict()["model.layers.1.mlp.down_proj.weight"]
    got = load_model(rtn).state_dict()["model.layers.1.mlp.down_proj.weight"]
    assert torch.equal(got, quantize_rtn(W, QuantSpec(bits=4)))
    for out, dtype in ((rtn, "auto"), (ct, "auto"), (rtn, "float32")):
        capsys.readouterr()
        assert main(["eval", str(out), "--text", str(text_file), "--seq-len", "32", "--max-tokens", "128",
                     "--dtype", dtype, "--json", *Q]) == 0
        record = json.loads(capsys.readouterr().out)
        assert record["dtype"] == ("bfloat16" if dtype == "auto" else dtype)
        assert record["ppl"] is not None and record["ppl"] > 1


def test_a_bad_dtype_is_a_clean_error(folders, tmp_path, capsys):
    for cmd in ("rotate", "quantize", "eval"):
        extra = ["--text", "t.txt"] if cmd == "eval" else ["--out", str(tmp_path / "o")]
        err = run_error(capsys, [cmd, str(folders["float32"]), *extra, "--dtype", "int8"])
        assert "--dtype" in err and "bfloat16" in err
    assert not (tmp_path / "o").exists()


def test_diagnose_loads_the_checkpoints_own_dtype(folders, tmp_path, text_file, capsys):
    """diagnose does not upcast a bf16 model whole (issue 23): it loads bf16 by default, float32 when
    asked, and its float64 statistics agree to bf16 activation rounding between the two."""
    runs = {}
    for dtype in ("auto", "float32"):
        out = tmp_path / dtype
        assert main(["diagnose", str(folders["bfloat16"]), "--out", str(out), "--calib", str(text_file),
                     "--calib-tokens", "64", "--seq-len", "32", "--dtype", dtype, "--json", *Q]) == 0
        runs[dtype] = json.loads(capsys.readouterr().out)["models"][0]
    assert runs["auto"]["dtype"] == "bfloat16" and runs["float32"]["dtype"] == "float32"
    # the weights are the same bf16 values either way: the weight statistics are equal
    assert runs["auto"]["overall"] == runs["float32"]["overall"]
    err = run_error(capsys, ["diagnose", str(folders["bfloat16"]), "--out", str(tmp_path / "bad"), "--dtype", "int8"])
    assert "--dtype" in err and not (tmp_path / "bad").exists()
