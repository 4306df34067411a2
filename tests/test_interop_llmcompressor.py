"""orthoopt's rotated float checkpoint -> llm-compressor GPTQ (oneshot) -> ``orthoopt eval``.

llm-compressor pins transformers/compressed-tensors versions of its own, so it usually lives in a
separate virtual environment: the GPTQ step runs in this Python when ``llmcompressor`` imports here,
else in ``$ORTHOOPT_PEER_PYTHON`` (or /work/venvs/peer/bin/python); the test skips, saying so, when
neither exists.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from orthoopt.testing import save_planted
from orthoopt.cli import main

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "llmcompressor_interop.py"


def peer_python() -> str | None:
    if importlib.util.find_spec("llmcompressor") is not None:
        return sys.executable
    for cand in (os.environ.get("ORTHOOPT_PEER_PYTHON"), "/work/venvs/peer/bin/python"):
        if cand and Path(cand).is_file():
            return cand
    return None


def run_json(capsys, argv):
    capsys.readouterr()
    assert main([*argv, "--json", "--no-progress"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.slow
def test_llmcompressor_gptq_on_orthoopt_rotation_evaluates_with_orthoopt(tmp_path, capsys):
    python = peer_python()
    if python is None:
        pytest.skip("llmcompressor is not importable here and no peer venv was found (set ORTHOOPT_PEER_PYTHON "
                    "to a Python with `pip install 'orthoopt[peer]'`; docs/export.md)")
    pytest.importorskip("compressed_tensors", reason="orthoopt eval of a packed checkpoint needs compressed-tensors")
    src = save_planted(tmp_path / "tiny", hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128)
    text = tmp_path / "t.txt"
    text.write_text("".join(f" Sentence {i} is about rotations , outliers and quantization .\n" for i in range(120)))
    rotated, quantized = tmp_path / "rot", tmp_path / "rot-w4-llmc"
    run_json(capsys, ["rotate", str(src), "--out", str(rotated), "--method", "hadamard"])

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    step = subprocess.run([python, str(EXAMPLE), "--work", str(tmp_path), "--text", str(text), "--nsamples", "4",
                           "--seq-len", "32", "--llmc-step", str(rotated), str(quantized)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert step.returncode == 0, step.stderr[-3000:]
    assert json.loads(step.stdout.strip().splitlines()[-1])["recipe"] == ["GPTQModifier"]

    # A packed 4-bit checkpoint: int32 codes and per-channel scales, lm_head left in full precision.
    qc = json.loads((quantized / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and "lm_head" in qc["ignore"]
    tensors = load_file(quantized / "model.safetensors")
    assert tensors["model.layers.0.mlp.down_proj.weight_packed"].dtype == torch.int32
    assert tensors["model.layers.0.mlp.down_proj.weight_scale"].shape == (64, 1)

    ev = ["--text", str(text), "--seq-len", "32"]
    ppl = {name: run_json(capsys, ["eval", str(path), *ev])["ppl"] for name, path in
           (("float", src), ("rotated", rotated), ("quantized", quantized))}
    assert ppl["rotated"] == pytest.approx(ppl["float"], rel=1e-4)  # the rotation alone changes nothing
    assert ppl["quantized"] != ppl["rotated"]                        # 4-bit weights do
    assert ppl["quantized"] < 1.5 * ppl["rotated"]                   # ... without wrecking the model

    from orthoopt.quant import load_checkpoint  # dequantized on load: at most 16 levels per output row

    model, _ = load_checkpoint(quantized)
    w = model.model.layers[0].mlp.down_proj.weight
    assert max(len(torch.unique(row)) for row in w) <= 16


def test_peer_benchmark_without_llmcompressor_says_so_and_exits_cleanly():
    if importlib.util.find_spec("llmcompressor") is not None:
        pytest.skip("llmcompressor is importable here: the benchmark would measure (a long run)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "peer_llmcompressor.py")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "nothing measured" in out.stderr and "llm-compressor is not importable" in out.stderr
    assert out.stdout == ""
