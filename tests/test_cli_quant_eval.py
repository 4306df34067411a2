"""``orthoopt quantize`` / ``orthoopt eval``: round trips through saved folders, JSON output, errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from orthoopt.testing import save_planted
from orthoopt.cli import main
from orthoopt.eval import perplexity
from orthoopt.quant import ActQuantConfig, load_checkpoint, quantize_model
from orthoopt.quant.config import QuantizeConfig

from helpers import run_error, sample_text_file

EVAL = ["--seq-len", "32", "--max-tokens", "512", "--no-progress"]


@pytest.fixture(scope="module")
def model_dir(tiny_llama) -> Path:
    return tiny_llama


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    return sample_text_file(tmp_path_factory.mktemp("text") / "text.txt")


def run_json(capsys, argv: list[str]) -> dict:
    capsys.readouterr()
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1  # exactly one JSON object on stdout
    return json.loads(out)


def test_rtn_w4a8_r4_roundtrip_matches_in_memory(capsys, tmp_path, model_dir, text_file):
    out = tmp_path / "q"
    record = run_json(capsys, ["quantize", str(model_dir), "--out", str(out), "--method", "rtn", "--wbits", "4",
                               "--asym", "--abits", "8", "--act-asym", "--act-clip", "0.9", "--online-hadamard",
                               "--json", "--no-progress"])
    assert record["out"] == str(out) and record["source"] == str(model_dir)
    saved = json.loads((out / "quant.json").read_text())
    assert saved == {k: v for k, v in record.items() if k != "out"}
    assert (saved["method"], saved["wbits"], saved["abits"], saved["sym"]) == ("rtn", 4, 8, False)
    assert saved["act"] == {"bits": 8, "symmetric": False, "clip_ratio": 0.9, "online_hadamard": True}
    assert saved["online_hadamard"]["size"] == 128 and saved["calibration"] is None
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}

    evaluated = run_json(capsys, ["eval", str(out), "--text", str(text_file), *EVAL, "--json"])
    assert evaluated["quant"] == saved and evaluated["windows"] == 16 and evaluated["seq_len"] == 32

    model, tok = load_checkpoint(model_dir)  # the same pipeline in memory
    quantize_model(model, QuantizeConfig("rtn", wbits=4, sym=False, act=ActQuantConfig(bits=8, symmetric=False, clip_ratio=0.9, online_hadamard=True)), progress=False)
    direct = perplexity(model, tok, text=text_file.read_text(), seq_len=32, max_tokens=512, progress=False)
    assert evaluated["ppl"] == pytest.approx(direct["ppl"], rel=1e-6)

    fp = run_json(capsys, ["eval", str(model_dir), "--text", str(text_file), *EVAL, "--json"])
    assert fp["quant"] is None and fp["ppl"] != pytest.approx(evaluated["ppl"], rel=1e-4)


def test_online_hadamard_alone_survives_save_and_load(capsys, tmp_path, model_dir, text_file):
    """W16A16 + R4: the weight half is saved, the activation half re-installed by eval: same perplexity."""
    out = tmp_path / "r4"
    run_json(capsys, ["quantize", str(model_dir), "--out", str(out), "--method", "rtn", "--wbits", "16",
                      "--online-hadamard", "--json", "--no-progress"])
    fp = run_json(capsys, ["eval", str(model_dir), "--text", str(text_file), *EVAL, "--json"])
    r4 = run_json(capsys, ["eval", str(out), "--text", str(text_file), *EVAL, "--json"])
    assert r4["ppl"] == pytest.approx(fp["ppl"], rel=1e-5)
    # without the activation half (quant.json removed) the rotated down_proj weights are wrong
    (out / "quant.json").unlink()
    bare = run_json(capsys, ["eval", str(out), "--text", str(text_file), *EVAL, "--json"])
    assert bare["ppl"] != pytest.approx(fp["ppl"], rel=1e-3)


def test_gptq_writes_grid_weights_and_calibration_record(capsys, tmp_path, model_dir, text_file):
    out = tmp_path / "g"
    record = run_json(capsys, ["quantize", str(model_dir), "--out", str(out), "--method", "gptq", "--wbits", "4",
                               "--group-size", "32", "--calib", str(text_file), "--nsamples", "4",
                               "--seq-len", "32", "--seed", "3", "--format", "orthoopt", "--json", "--no-progress"])
    # (--format orthoopt: the fake-quantized weights are read back; the default would pack them)
    assert record["calibration"] == {"file": str(text_file), "nsamples": 4, "seq_len": 32, "seed": 3}
    assert record["gptq"] == {"act_order": False, "percdamp": 0.01, "block_size": 128, "true_sequential": True} and record["seconds"] >= 0
    before, after = load_file(model_dir / "model.safetensors"), load_file(out / "model.safetensors")
    for name, w in after.items():
        if "layers" in name and name.endswith("proj.weight"):
            assert not torch.equal(w, before[name])
            # symmetric 4 bits: at most 15 levels in every group of 32 input columns
            groups = w.reshape(w.shape[0], -1, 32)
            assert max(len(torch.unique(g)) for g in groups.reshape(-1, 32)) <= 15, name
        else:  # embeddings, norms, lm_head stay as they were
            assert torch.equal(w, before[name]), name


@pytest.mark.slow  # a fresh interpreter imports torch + transformers (~10 s on 2 busy cores)
def test_console_script_eval(capsys, model_dir, text_file):
    in_process = run_json(capsys, ["eval", str(model_dir), "--text", str(text_file), *EVAL, "--json"])
    exe = shutil.which("orthoopt")
    cmd = [exe] if exe else [sys.executable, "-m", "orthoopt"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*cmd, "eval", str(model_dir), "--text", str(text_file), *EVAL, "--json"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout)
    assert record["ppl"] == pytest.approx(in_process["ppl"], rel=1e-6)


def test_human_readable_output(capsys, tmp_path, model_dir, text_file):
    assert main(["eval", str(model_dir), "--text", str(text_file), *EVAL]) == 0
    assert capsys.readouterr().out.startswith("perplexity ")


def test_errors(capsys, tmp_path, model_dir, text_file):
    out = tmp_path / "never"
    base = ["quantize", str(model_dir), "--out", str(out), "--no-progress"]
    assert "--calib" in run_error(capsys, [*base, "--method", "gptq"])
    assert "--wbits" in run_error(capsys, [*base, "--method", "rtn", "--wbits", "9"])
    assert "would replace the input" in run_error(capsys, ["quantize", str(model_dir), "--out", str(model_dir),
                                                     "--method", "rtn"])
    assert "not found" in run_error(capsys, ["quantize", str(tmp_path / "nope"), "--out", str(out),
                                             "--method", "rtn"])
    short = tmp_path / "short.txt"
    short.write_text("only a few words", encoding="utf-8")
    assert "fewer than seq_len=32" in run_error(capsys, [*base, "--method", "gptq", "--calib", str(short),
                                                         "--seq-len", "32"])
    assert not out.exists()  # nothing half-written

    no_tok = tmp_path / "no_tokenizer"
    no_tok.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(model_dir / f, no_tok / f)
    err = run_error(capsys, ["quantize", str(no_tok), "--out", str(out), "--method", "rtn"])
    assert str(no_tok) in err and "tokenizer" in err

    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n", encoding="utf-8")
    assert "empty" in run_error(capsys, ["eval", str(model_dir), "--text", str(empty)])
    assert "not found" in run_error(capsys, ["eval", str(model_dir), "--text", str(tmp_path / "none.txt")])


def test_eval_refuses_a_mismatched_hadamard(capsys, tmp_path, model_dir, text_file):
    out = tmp_path / "r4"
    run_json(capsys, ["quantize", str(model_dir), "--out", str(out), "--method", "rtn", "--abits", "8",
                      "--online-hadamard", "--json", "--no-progress"])
    settings = json.loads((out / "quant.json").read_text())
    settings["online_hadamard"]["sha256"] = "0" * 64
    (out / "quant.json").write_text(json.dumps(settings))
    assert "fingerprint" in run_error(capsys, ["eval", str(out), "--text", str(text_file), *EVAL])


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_w4a4kv4_r3_r4_roundtrip_every_arch(capsys, tmp_path, text_file, arch):
    """quantize --abits 4 --kvbits 4 --r3 --online-hadamard; eval re-installs R3/KV from quant.json."""
    src = save_planted(tmp_path / "m", arch=arch, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                       intermediate_size=128)
    out = tmp_path / "q"
    record = run_json(capsys, ["quantize", str(src), "--out", str(out), "--method", "rtn", "--abits", "4",
                               "--kvbits", "4", "--kv-group-size", "8", "--r3", "--online-hadamard", "--json",
                               "--no-progress"])
    assert record["kv"] == {"bits": 4, "group_size": 8, "symmetric": False, "k_clip_ratio": 1.0,
                            "v_clip_ratio": 1.0, "r3": True}
    assert record["kvbits"] == 4 and record["r3"]["size"] == 16
    evaluated = run_json(capsys, ["eval", str(out), "--text", str(text_file), *EVAL, "--json"])

    from orthoopt.quant.kv import KVQuantConfig

    model, tok = load_checkpoint(src)
    quantize_model(model, QuantizeConfig("rtn", wbits=4, act=ActQuantConfig(bits=4, online_hadamard=True), kv=KVQuantConfig(bits=4, group_size=8, r3=True)), progress=False)
    direct = perplexity(model, tok, text=text_file.read_text(), seq_len=32, max_tokens=512, progress=False)
    assert evaluated["ppl"] == pytest.approx(direct["ppl"], rel=1e-6)
    # quant.json without the kv record: the KV quantization is gone and the perplexity moves
    settings = json.loads((out / "quant.json").read_text())
    settings.pop("kv")
    (out / "quant.json").write_text(json.dumps(settings))
    no_kv = run_json(capsys, ["eval", str(out), "--text", str(text_file), *EVAL, "--json"])
    assert no_kv["ppl"] != pytest.approx(evaluated["ppl"], rel=1e-6)


def test_eval_refuses_a_mismatched_r3(capsys, tmp_path, model_dir, text_file):
    out = tmp_path / "r3"
    run_json(capsys, ["quantize", str(model_dir), "--out", str(out), "--method", "rtn", "--wbits", "16",
                      "--r3", "--json", "--no-progress"])
    settings = json.loads((out / "quant.json").read_text())
    settings["r3"]["sha256"] = "0" * 64
    (out / "quant.json").write_text(json.dumps(settings))
    assert "R3" in run_error(capsys, ["eval", str(out), "--text", str(text_file), *EVAL])
    assert "group_size" in run_error(capsys, ["quantize", str(model_dir), "--out", str(tmp_path / "x"), "--method",
                                              "rtn", "--kvbits", "4", "--kv-group-size", "7"])
