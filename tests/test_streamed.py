"""Streamed OptRot (orthoopt.streaming) against the in-memory pipeline, on tiny saved planted models."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from orthoopt.adapters import DecoderAdapter
from orthoopt.models import load_model
from orthoopt.testing import save_planted
from orthoopt.methods import METHODS
from orthoopt.objectives import FourthPower
from orthoopt.config import RotateConfig
from orthoopt.pipeline import rotate_model, rotate_streamed
from orthoopt.streaming import (
    DecoderLayout,
    FusedReader,
    SafetensorsCheckpoint,
    ShardedWriter,
    StreamedFourthPower,
)
from orthoopt.models.safetensors_folder import INDEX_FILE
from orthoopt.streaming.layer_rotation import r2_blocks

from helpers import assert_streamed_r1_blocks_match

STEPS = 5
TINY = {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 96}
CASES = {
    # GQA with attention biases (the v bias rotates with R2, the o bias with R1)
    "llama-gqa-bias": dict(arch="llama", attention_bias=True, **TINY),
    # tied embedding and a final norm != 1: fusion unties lm_head
    "qwen2-tied": dict(arch="qwen2", tie_word_embeddings=True, **TINY),
    # tied embedding and all norms == 1 (exp(0)): lm_head stays tied and has no block
    "qwen3-tied-unit-norms": dict(arch="qwen3", tie_word_embeddings=True, norm_log_std=0.0, **TINY),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("planted")
    return {name: save_planted(root / name, **kw) for name, kw in CASES.items()}


def state(path: Path) -> dict[str, torch.Tensor]:
    return load_model(path).state_dict()


def _streamed_and_in_memory(src: Path, tmp_path: Path, method: str, solver: str | None = None, exact: bool = True):
    """Rotate ``src`` in memory and streamed with the same settings; assert the weights, rotations and
    loss curves (R2: summed over layers) are equal bit for bit (``exact``; else to rtol 1e-5, atol 1e-5:
    a ``summed_by_layer`` entry adds its terms in another order); return ``(model, mem, res, out)``."""
    model = load_model(src)
    config = RotateConfig(method, seed=3, solve={"steps": STEPS, "solver": solver}, calib={"tokens": 40})
    calib = None  # a data method's windows (3 x 16 tokens: more than calib.tokens, so rows are sampled)
    if METHODS[method].needs_calibration:
        calib = torch.randint(0, model.config.vocab_size, (3, 16), generator=torch.Generator().manual_seed(1))
    mem = rotate_model(model, config, calib=calib, progress=False)
    out = tmp_path / "out"
    res = rotate_streamed(src, out, config, calib=calib, progress=False)
    got, want = state(out), model.state_dict()
    assert set(got) == set(want)
    same = torch.equal if exact else (lambda a, b: torch.allclose(a, b, rtol=1e-5, atol=1e-5))
    for k in want:
        assert same(got[k], want[k]), k
    assert set(res.rotations) == set(mem.rotations) == {"R1", "R2.0", "R2.1"}
    for k, R in mem.rotations.items():
        assert same(res.rotations[k], R), k
    assert set(res.solves) == set(mem.solves)
    for phase in res.solves:
        assert res.solves[phase].history == (mem.solves[phase].history if exact else
                                             pytest.approx(mem.solves[phase].history, rel=1e-5))
    return model, mem, res, out


@pytest.mark.parametrize("solver", [None, "cayley-sgd"], ids=["default-solver", "cayley-sgd"])
@pytest.mark.parametrize("case", list(CASES))
def test_streamed_equals_in_memory(saved, tmp_path, case, solver):
    """Bit for bit, with the method's default solver too (cayley-lbfgs: one line search per unit, so
    the in-memory R2 must be solved layer by layer as the streamed one is; issue 22)."""
    model, mem, res, out = _streamed_and_in_memory(saved[case], tmp_path, "optrot", solver)
    assert set(res.solves) == {"R1", "R2"}
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] == model.config.tie_word_embeddings
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "optrot" and report["streamed"]["world_size"] == 1
    assert (out / "tokenizer.json").is_file() and (out / "orthoopt" / "rotations.safetensors").is_file()


STREAMED = [name for name, m in METHODS.items() if m.supports_streamed]  # a new streamed method enrols itself


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("method", STREAMED)
def test_every_streamed_method_equals_in_memory(saved, tmp_path, case, method):
    """Every method the registry streams (fixed: drawn per unit with derived seeds, no solve; learned:
    its default solver) gives the in-memory run's weights, rotations and loss curves bit for bit."""
    assert {"identity", "random", "hadamard", "optrot"} <= set(STREAMED)
    assert all(METHODS[m].streams_bit_for_bit for m in ("identity", "random", "hadamard", "optrot"))
    _, mem, res, out = _streamed_and_in_memory(saved[case], tmp_path, method,
                                               exact=METHODS[method].streams_bit_for_bit)
    assert set(res.solves) == ({"R1", "R2"} if METHODS[method].learned else set())
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == method and report["solver"] == mem.report["solver"]
    rounded = () if METHODS[method].streams_bit_for_bit else ("loss", "invariance_error")
    assert {k: v for k, v in report.items() if k not in ("seconds", "streamed", *rounded)} == \
        {k: v for k, v in mem.report.items() if k not in ("seconds", *rounded)}


def test_sharded_output_loads_and_keeps_logits(saved, tmp_path):
    src = saved["llama-gqa-bias"]
    out = tmp_path / "out"
    rotate_streamed(src, out, RotateConfig(seed=0, solve={"steps": 2}, checkpoint={"layers_per_shard": 1}), progress=False)
    index = json.loads((out / INDEX_FILE).read_text())
    assert sorted(set(index["weight_map"].values())) == [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]
    rotated = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    original = load_model(src)
    ids = torch.randint(0, 259, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = original(ids).logits.double(), rotated(ids).logits.double()
    assert float((b - a).norm() / a.norm()) <= 1e-4  # float32 model: rotation keeps the function
    # and the rotation did change the weights
    up_rotated, up_original = rotated.model.layers[0].mlp.up_proj.weight, original.model.layers[0].mlp.up_proj.weight
    assert float((up_rotated - up_original).detach().abs().max()) > 1e-2


def test_interrupted_write_leaves_nothing(saved, tmp_path, monkeypatch):
    src = saved["llama-gqa-bias"]
    out = tmp_path / "out"
    calls = {"n": 0}
    real_write = ShardedWriter.write

    def failing_write(self, i, tensors):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated interruption")
        return real_write(self, i, tensors)

    monkeypatch.setattr(ShardedWriter, "write", failing_write)
    with pytest.raises(KeyboardInterrupt):
        rotate_streamed(src, out, RotateConfig(solve={"steps": 1}), progress=False)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # no temporary sibling left either
    # a previous output survives a failed run untouched
    out.mkdir()
    (out / "marker").write_text("old")
    calls["n"] = 0
    with pytest.raises(KeyboardInterrupt):
        rotate_streamed(src, out, RotateConfig(solve={"steps": 1}), progress=False)
    assert [p.name for p in out.iterdir()] == ["marker"]


def test_streamed_objective_matches_in_memory_blocks_and_numbers(saved):
    src = saved["qwen2-tied"]
    ckpt = SafetensorsCheckpoint(src)
    layout = DecoderLayout.from_checkpoint(ckpt)
    reader = FusedReader(ckpt, layout, rows_per_read=100)  # embedding read in 3 slices of its 259 rows
    adapter = DecoderAdapter(load_model(src))
    adapter.fuse_norms()
    assert_streamed_r1_blocks_match(reader, layout, adapter)
    blocks = adapter.weight_blocks("R1")
    R = {"R1": torch.linalg.qr(torch.randn(64, 64, generator=torch.Generator().manual_seed(1)))[0]}
    for chunk_rows in (None, 50):
        v_mem, g_mem = FourthPower(blocks, chunk_rows=chunk_rows).value_and_grad(R)
        v_str, g_str = StreamedFourthPower(reader, chunk_rows=chunk_rows).value_and_grad(R)
        assert float(v_str) == float(v_mem) and torch.equal(g_str["R1"], g_mem["R1"])
    # the R2 blocks of a layer are the adapter's
    t = reader.layer(1)
    ours = r2_blocks(t, layout, 1)
    theirs = adapter.weight_blocks("R2.1")
    assert [(b.name, b.side) for b in ours] == [(b.name, b.side) for b in theirs]
    assert all(torch.equal(a.weight, b.weight) for a, b in zip(ours, theirs))


def test_streamed_with_embeddings_and_sampling_equals_in_memory(saved, tmp_path):
    src = saved["llama-gqa-bias"]
    model = load_model(src)
    rotate_model(
        model, RotateConfig("optrot", rotations=("R1",), seed=1, include_embeddings=True, solve={"steps": 3}), progress=False
    )
    rotate_streamed(
        src, tmp_path / "out", RotateConfig(rotations=("R1",), seed=1, include_embeddings=True, solve={"steps": 3}), progress=False
    )
    got, want = state(tmp_path / "out"), model.state_dict()
    assert max(float((got[k] - want[k]).abs().max()) for k in want) <= 1e-6
    # sampled steps: the streamed objective draws the rows the in-memory one draws
    ckpt = SafetensorsCheckpoint(src)
    reader = FusedReader(ckpt, DecoderLayout.from_checkpoint(ckpt))
    adapter = DecoderAdapter(load_model(src))
    adapter.fuse_norms()
    R = {"R1": torch.eye(64)}
    a = FourthPower(adapter.weight_blocks("R1"), sample_fraction=0.3, seed=5, chunk_rows=40)
    b = StreamedFourthPower(reader, sample_fraction=0.3, seed=5, chunk_rows=40)
    for _ in range(2):
        (va, ga), (vb, gb) = a.value_and_grad(R), b.value_and_grad(R)
        assert float(va) == float(vb) and torch.equal(ga["R1"], gb["R1"])


def test_bad_inputs(saved, tmp_path):
    src = saved["llama-gqa-bias"]
    for name, m in METHODS.items():  # every method that needs the whole model is refused, by name
        if not m.supports_streamed:
            with pytest.raises(ValueError, match=rf"streamed mode supports methods identity, random, hadamard, "
                                                 rf"optrot, optrot\+, kurtosis, dfrot .*method '{re.escape(name)}' reads "):
                rotate_streamed(src, tmp_path / "o", RotateConfig(name))
    with pytest.raises(ValueError, match="would replace the input"):
        rotate_streamed(src, src, progress=False)
    with pytest.raises(FileNotFoundError, match="not found"):
        rotate_streamed(tmp_path / "missing", tmp_path / "o")
    bin_only = tmp_path / "bin_only"
    bin_only.mkdir()
    (bin_only / "config.json").write_text((src / "config.json").read_text())
    (bin_only / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="safetensors only"):
        rotate_streamed(bin_only, tmp_path / "o")
    with pytest.raises(ValueError, match="layers_per_shard"):
        rotate_streamed(src, tmp_path / "o", RotateConfig(checkpoint={"layers_per_shard": 0}))
