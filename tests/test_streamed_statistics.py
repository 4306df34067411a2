"""Calibration statistics taken one decoder layer at a time (orthoopt.streaming.statistics) equal the
in-memory hooks' on the fused model, and the streamed data methods (kurtosis, dfrot, optrot+) equal
their in-memory runs through the API and the CLI."""

from __future__ import annotations

import pytest
import torch

from orthoopt.adapters import DecoderAdapter
from orthoopt.cli import main
from orthoopt.config import RotateConfig
from orthoopt.models import load_model
from orthoopt.models.safetensors_folder import SafetensorsCheckpoint
from orthoopt.pipeline import rotate_model, rotate_streamed
from orthoopt.streaming.fused import FusedReader
from orthoopt.streaming.layout import DecoderLayout
from orthoopt.streaming.statistics import FusedLayers, layer_statistics
from orthoopt.testing import save_planted

TINY = {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 96}


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("stats")
    return {"llama": save_planted(root / "llama", arch="llama", attention_bias=True, **TINY),
            "qwen2-tied": save_planted(root / "qwen2", arch="qwen2", tie_word_embeddings=True, **TINY)}


def _calib(vocab: int, n: int = 3, seq: int = 16) -> torch.Tensor:
    return torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(2))


def _fused(path, dtype=torch.float32):
    adapter = DecoderAdapter(load_model(path, dtype=dtype))
    adapter.fuse_norms()
    ckpt = SafetensorsCheckpoint(path)
    reader = FusedReader(ckpt, DecoderLayout.from_checkpoint(ckpt), dtype)
    return adapter, reader


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("case", ["llama", "qwen2-tied"])
def test_layer_by_layer_inputs_equal_the_whole_models(planted, case, dtype):
    adapter, reader = _fused(planted[case], dtype)
    calib = _calib(adapter.model.config.vocab_size)
    L = reader.layout
    roles = ["q", "gate", "o", "down"]
    modules = [L.layer_modules(i)[r] for i in range(L.num_layers) for r in roles] + [L.lm_head]
    want_rows = adapter.linear_inputs(calib, max_tokens=40, modules=modules, seed=5, progress=False)
    want_h = adapter.input_hessians(calib, modules=modules, progress=False)
    for kind, want in (("rows", want_rows), ("hessians", want_h)):
        got = {}
        for unit, inputs in layer_statistics(FusedLayers(reader), calib, roles, kind, max_tokens=40, seed=5,
                                             head=True, progress=False):
            got.update(inputs)
        assert set(got) == set(want)
        for name in want:  # the same layers on the same batch: bit for bit
            assert torch.equal(got[name], want[name]), (kind, name)
    assert want_rows[modules[0]].shape == (40, TINY["hidden_size"])  # 48 tokens, 40 kept


def test_rows_after_r1_are_the_rotated_models(planted):
    adapter, reader = _fused(planted["llama"])
    R1 = torch.linalg.qr(torch.randn(64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))[0]
    adapter.apply_rotations({"R1": R1})
    calib = _calib(adapter.model.config.vocab_size)
    o = [reader.layout.layer_modules(i)["o"] for i in range(2)]
    want = adapter.linear_inputs(calib, max_tokens=48, modules=o, progress=False)
    got = {}
    for _, inputs in layer_statistics(FusedLayers(reader, R1), calib, ["o"], "rows", max_tokens=48,
                                      progress=False):
        got.update(inputs)
    for name in o:  # the embedding is rotated in row slices here: equal up to its float64 products' rounding
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["kurtosis", "dfrot", "optrot+"])
def test_bf16_with_embeddings_equals_in_memory(planted, tmp_path, method):
    """bf16 weights and include_embeddings (lm_head's input, untied by fusion, counts in R1; for optrot+
    its weighted block and the unweighted embedding)."""
    src = planted["qwen2-tied"]
    config = RotateConfig(method, seed=1, solve={"steps": 3}, calib={"tokens": 40}, include_embeddings=True,
                          checkpoint={"dtype": "bfloat16"})
    model = load_model(src, dtype=torch.bfloat16)
    calib = _calib(model.config.vocab_size)
    mem = rotate_model(model, config, calib=calib, progress=False)
    res = rotate_streamed(src, tmp_path / "out", config, calib=calib, progress=False)
    for k, R in mem.rotations.items():
        assert torch.equal(res.rotations[k], R), k
    got, want = load_model(tmp_path / "out", dtype=torch.bfloat16).state_dict(), model.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert res.solves["R1"].history == mem.solves["R1"].history
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.name.startswith(".")) == []  # no scratch left


@pytest.mark.parametrize("method", ["dfrot", "optrot+"])
def test_cli_streamed_data_method_equals_in_memory(planted, tmp_path, method):
    src = planted["llama"]
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    common = ["--method", method, "--calib", str(text), "--calib-tokens", "64", "--steps", "2", "--quiet"]
    assert main(["rotate", str(src), "--out", str(tmp_path / "mem"), *common]) == 0
    assert main(["rotate", str(src), "--out", str(tmp_path / "str"), "--streamed", *common]) == 0
    got, want = load_model(tmp_path / "str").state_dict(), load_model(tmp_path / "mem").state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_a_streamed_data_method_needs_calibration(planted, tmp_path, capsys):
    with pytest.raises(ValueError, match="needs calibration text"):
        rotate_streamed(planted["llama"], tmp_path / "o", RotateConfig("kurtosis"), progress=False)
    assert not (tmp_path / "o").exists()
    assert main(["rotate", str(planted["llama"]), "--out", str(tmp_path / "c"), "--method", "kurtosis", "--streamed",
                 "--quiet"]) == 2
    assert "needs calibration text" in capsys.readouterr().err and not (tmp_path / "c").exists()


@pytest.mark.parametrize("method", ["kurtosis", "optrot+"])
def test_interrupted_streamed_data_method_resumes_bit_identical(planted, tmp_path, method):
    """Stopped inside a layer's R2 and resumed: the statistics are taken again (R1 re-applied first)
    and the run ends as an uninterrupted one, with no scratch or partial file left."""
    src = planted["llama"]
    config = RotateConfig(method, seed=2, solve={"steps": 4, "checkpoint_every": 1}, calib={"tokens": 40})
    calib = _calib(259)
    ref = rotate_streamed(src, tmp_path / "ref", config, calib=calib, progress=False,
                          checkpoint=tmp_path / "ref.partial.safetensors")
    partial = tmp_path / "run.partial.safetensors"
    calls = []

    def stop(phase, step, loss, rots):
        calls.append(phase)
        if phase == "R2" and calls.count("R2") == 6:  # inside the second layer's R2
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        rotate_streamed(src, tmp_path / "out", config, calib=calib, progress=False, callback=stop, checkpoint=partial)
    assert partial.is_file() and not (tmp_path / "out").exists()
    res = rotate_streamed(src, tmp_path / "out", config, calib=calib, progress=False, checkpoint=partial, resume=True)
    assert "resumed" in res.report
    for k, R in ref.rotations.items():
        assert torch.equal(res.rotations[k], R), k
    got, want = load_model(tmp_path / "out").state_dict(), load_model(tmp_path / "ref").state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert not any(p.name.startswith(".") for p in (tmp_path / "out").iterdir())
    assert not any(p.name.startswith("out.") or p.name.startswith(".out") for p in tmp_path.iterdir())


def test_linear_inputs_of_several_batches_keep_the_bottom_k_tokens(planted):
    """Several batches: the kept rows are all tokens' rows at the ``max_tokens`` smallest keys (drawn
    batch by batch with the seed), in position order; all rows when ``max_tokens`` covers them."""
    adapter, _ = _fused(planted["llama"])
    batches = [_calib(259, 2, 16), _calib(259, 1, 8), _calib(259, 3, 16)]
    module = "layers.1.mlp.gate_proj"
    full = adapter.linear_inputs(batches, max_tokens=10 ** 6, modules=[module], progress=False)[module]
    singles = [adapter.linear_inputs([b], max_tokens=10 ** 6, modules=[module], progress=False)[module] for b in batches]
    assert torch.equal(full, torch.cat(singles)) and full.shape[0] == 88
    gen = torch.Generator().manual_seed(4)
    keys = torch.cat([torch.rand(b.numel(), generator=gen, dtype=torch.float64) for b in batches])
    idx = torch.topk(keys, 30, largest=False).indices.sort().values
    got = adapter.linear_inputs(batches, max_tokens=30, modules=[module], seed=4, progress=False)[module]
    assert torch.equal(got, full[idx])
