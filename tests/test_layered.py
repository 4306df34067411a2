"""Layer-by-layer loading (orthoopt.models.onload) and evaluation (orthoopt.eval.layered, eval --streamed).

The layered paths perform the same operations on the same tensors as the whole model, so their
figures are compared with exact equality (the arithmetic is the same by construction, on any CPU).
"""

from __future__ import annotations

import json

import pytest
import torch

from orthoopt.cli import main
from orthoopt.eval import perplexity
from orthoopt.eval.layered import perplexity_layered
from orthoopt.models.footprint import Checkpoint, eval_estimate
from orthoopt.models.io import load_model
from orthoopt.models.onload import LayeredModel
from orthoopt.testing import save_planted

from helpers import folder_tensors, run_error, sample_text_file

IDS = torch.randint(0, 259, (1500,), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    return sample_text_file(tmp_path_factory.mktemp("text") / "text.txt")


@pytest.mark.parametrize("kw", [
    {"dtype": torch.float32},
    {"dtype": torch.bfloat16, "tie_word_embeddings": True, "num_kv_heads": 2},
    {"dtype": torch.float32, "arch": "qwen2"},  # q/k/v biases
])
def test_layered_perplexity_is_bit_identical_to_the_whole_model(tmp_path, kw):
    folder = save_planted(tmp_path / "m", hidden_size=64, num_layers=3, num_heads=4, intermediate_size=128, **kw)
    whole = perplexity(load_model(folder), IDS, seq_len=64, batch_size=3, progress=False)  # 23 windows: last batch 2
    layered = LayeredModel(folder, kw["dtype"])
    assert all(p.is_meta for p in layered.layers.parameters())  # nothing of a layer is read up front
    got = perplexity_layered(layered, IDS, seq_len=64, batch_size=3, progress=False)
    assert got == whole
    assert all(p.is_meta for p in layered.layers.parameters())  # every layer released again
    assert next(layered.model.parameters()).dtype == kw["dtype"]


def test_a_loaded_layer_holds_the_files_tensors(tmp_path):
    folder = save_planted(tmp_path / "m", hidden_size=64, num_layers=2, num_heads=4, dtype=torch.bfloat16)
    whole, layered = load_model(folder), LayeredModel(folder, torch.bfloat16)
    layer = layered.load_layer(1)
    for (name, p), (_, q) in zip(layer.named_parameters(), whole.model.layers[1].named_parameters()):
        assert p.dtype == torch.bfloat16 and torch.equal(p, q), name
    layered.release_layer(1)
    assert all(p.is_meta for p in layer.parameters())


def run_json(capsys, argv):
    capsys.readouterr()
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_eval_streamed_gives_the_figures_of_eval(capsys, tmp_path, tiny_llama, text_file):
    quantized = tmp_path / "q"
    assert main(["quantize", str(tiny_llama), "--out", str(quantized), "--method", "rtn", "--wbits", "4",
                 "--abits", "8", "--online-hadamard", "--kvbits", "4", "--no-progress"]) == 0
    for folder in (tiny_llama, quantized):  # plain, and with quant.json's activation / KV / R4 hooks
        args = ["eval", str(folder), "--text", str(text_file), "--seq-len", "32", "--max-tokens", "800",
                "--batch-size", "4", "--no-progress", "--json"]
        whole, streamed = run_json(capsys, args), run_json(capsys, args + ["--streamed"])
        assert (whole["streamed"], streamed["streamed"]) == (False, True)
        for key in ("ppl", "nll", "window_nll", "windows", "tokens", "quant", "dtype"):
            assert streamed[key] == whole[key], key


def test_eval_streamed_refuses_what_it_cannot_read(capsys, tmp_path, text_file, tiny_llama):
    assert "does not combine with --streamed" in run_error(
        capsys, ["eval", str(tiny_llama), "--text", str(text_file), "--tasks", "piqa", "--streamed"])
    assert "reads a Hugging Face folder" in run_error(
        capsys, ["eval", "planted", "--text", str(text_file), "--streamed", "--no-progress"])
    ct = tmp_path / "ct"
    ct.mkdir()
    for f in tiny_llama.iterdir():
        (ct / f.name).write_bytes(f.read_bytes())
    config = json.loads((ct / "config.json").read_text())
    (ct / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "compressed-tensors"}}))
    with pytest.raises(Exception, match="compressed-tensors checkpoint"):
        LayeredModel(ct, torch.float32)


def test_streamed_eval_estimate_holds_one_layer(tmp_path):
    folder = save_planted(tmp_path / "m", hidden_size=64, num_layers=8, num_heads=4, intermediate_size=256)
    ck = Checkpoint.read(folder)
    whole = eval_estimate(ck, torch.float32, 64)
    streamed = eval_estimate(ck, torch.float32, 64, streamed_tokens=4096)
    layer_bytes = ck.layer_numel * 4
    assert whole.parts["model"] == ck.numel * 4
    assert streamed.parts["non-layer weights"] == (ck.numel - 8 * ck.layer_numel) * 4
    assert streamed.parts["hidden states"] == 4096 * 64 * 4
    assert streamed.total < whole.total - 5 * layer_bytes
    assert any(flags.startswith("--streamed") for flags, _ in whole.alternatives)



@pytest.mark.parametrize("dtype,method,extra", [
    (torch.float32, "rtn", {"group_size": 32, "sym": False}),
    (torch.bfloat16, "rtn", {"act": {"bits": 8, "online_hadamard": True}}),
    (torch.float32, "gptq", {"act": {"bits": 8, "online_hadamard": True}}),
    (torch.bfloat16, "gptq", {"gptq": {"true_sequential": False}, "group_size": 32}),
])
def test_layered_quantize_writes_the_weights_of_the_in_memory_path(tmp_path, dtype, method, extra):
    from orthoopt.quant import ActQuantConfig, load_checkpoint, quantize_model, save_quantized
    from orthoopt.quant.config import GPTQConfig, QuantizeConfig
    from orthoopt.quant.layered import quantize_layered

    folder = save_planted(tmp_path / "m", hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2,
                          intermediate_size=128, tie_word_embeddings=dtype == torch.bfloat16, dtype=dtype)
    kw = dict(extra)
    if "act" in kw:
        kw["act"] = ActQuantConfig(**kw["act"])
    if "gptq" in kw:
        kw["gptq"] = GPTQConfig(**kw["gptq"])
    config = QuantizeConfig(method, wbits=4, **kw)
    calib = torch.randint(0, 259, (6, 48), generator=torch.Generator().manual_seed(1)) if method == "gptq" else None
    model, tok = load_checkpoint(folder)
    whole = quantize_model(model, config, calib, progress=False)
    save_quantized(model, tok, tmp_path / "whole", whole.settings)
    got = quantize_layered(folder, tmp_path / "layered", config, calib, progress=False)
    a, b = folder_tensors(tmp_path / "whole"), folder_tensors(tmp_path / "layered")
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype == dtype and torch.equal(a[name], b[name]), name
    assert got.losses == whole.losses
    strip = lambda s: {k: v for k, v in s.items() if k != "seconds"}  # noqa: E731
    assert strip(got.settings) == strip(whole.settings)
    saved = json.loads((tmp_path / "layered" / "quant.json").read_text())
    assert strip(saved) == strip(whole.settings)
    # the layered output is a checkpoint like any other: it evaluates to the in-memory output's figures
    ids = IDS[:640]
    from orthoopt.quant import load_quantized
    want = perplexity(load_quantized(tmp_path / "whole").model, ids, seq_len=32, progress=False)
    assert perplexity(load_quantized(tmp_path / "layered").model, ids, seq_len=32, progress=False) == want


@pytest.mark.parametrize("method,tie", [("rtn", False), ("gptq", True)])
def test_layered_quantize_frees_the_nonlayer_weights_before_the_first_layer(tmp_path, monkeypatch, method, tie):
    # the embedding and lm_head are written (as read) and freed before any layer is loaded, so they
    # are not resident beside the layers; GPTQ has embedded its windows by then
    from orthoopt.models.safetensors_folder import SafetensorsCheckpoint
    from orthoopt.quant.config import QuantizeConfig
    from orthoopt.quant.layered import write_layered

    folder = save_planted(tmp_path / "m", hidden_size=64, num_layers=3, num_heads=4, intermediate_size=128,
                          tie_word_embeddings=tie)
    layered = LayeredModel(folder, torch.float32)
    nonlayer = sorted(layered.nonlayer_state())
    load, seen = LayeredModel.load_layer, []

    def spy(self, i):
        kept = [n for n, t in self.nonlayer_state().items() if not t.is_meta]
        seen.append((i, kept, (out / "model-00001-of-00004.safetensors").is_file()))
        return load(self, i)

    monkeypatch.setattr(LayeredModel, "load_layer", spy)
    out = tmp_path / "out"
    out.mkdir()
    calib = torch.randint(0, 259, (2, 16), generator=torch.Generator().manual_seed(1)) if method == "gptq" else None
    write_layered(layered, None, out, QuantizeConfig(method, wbits=4), calib, progress=False)
    assert seen == [(0, [], True), (1, [], True), (2, [], True)]
    source, written = SafetensorsCheckpoint(folder), SafetensorsCheckpoint(out)
    assert nonlayer == [n for n in written.keys() if not n.startswith("model.layers.")]
    for name in nonlayer:
        assert torch.equal(written.read([name])[name], source.read([name])[name]), name


def _report_perplexity(folder):
    lines = (folder / "report.md").read_text().splitlines()
    return [ln for ln in lines if ln.startswith("| float (input)") or ln.startswith("| quantized") or "Quantized / float" in ln]


def test_quantize_streamed_writes_and_scores_what_quantize_does(tmp_path, tiny_llama, text_file):
    import orthoopt

    q = {"method": "gptq", "nsamples": 4, "seq_len": 32, "abits": 8, "online_hadamard": True, "format": "orthoopt"}
    common = dict(calib=text_file, quantize=q, eval_text=text_file, eval_seq_len=32, eval_max_tokens=800, progress=False)
    whole = orthoopt.oneshot(str(tiny_llama), out=tmp_path / "whole", **common)
    streamed = orthoopt.oneshot(str(tiny_llama), out=tmp_path / "streamed", streamed=True, **common)
    a, b = folder_tensors(tmp_path / "whole"), folder_tensors(tmp_path / "streamed")
    assert sorted(a) == sorted(b) and all(torch.equal(a[n], b[n]) for n in a)
    assert {k: v for k, v in streamed.evaluation.items()} == whole.evaluation
    assert _report_perplexity(tmp_path / "streamed") == _report_perplexity(tmp_path / "whole")
    assert "Weight statistics not measured" in (tmp_path / "streamed" / "report.md").read_text()
    strip = lambda s: {k: v for k, v in s.items() if k != "seconds"}  # noqa: E731
    assert strip(streamed.settings) == strip(whole.settings)
    assert sorted(p.name for p in (tmp_path / "streamed").iterdir() if p.name.endswith(".tmp")) == []


def test_quantize_streamed_after_a_streamed_rotation(tmp_path, tiny_llama, text_file):
    import orthoopt

    q = {"method": "rtn", "wbits": 4, "format": "orthoopt"}
    # the reference: orthoopt rotate --streamed, then quantize the rotated folder in memory
    assert main(["rotate", str(tiny_llama), "--out", str(tmp_path / "rot"), "--method", "hadamard", "--streamed",
                 "--quiet"]) == 0
    orthoopt.oneshot(str(tmp_path / "rot"), out=tmp_path / "ref", quantize=q, progress=False)
    got = orthoopt.oneshot(str(tiny_llama), out=tmp_path / "one", rotate="hadamard", quantize=q, streamed=True,
                           progress=False)
    a, b = folder_tensors(tmp_path / "ref"), folder_tensors(tmp_path / "one")
    assert sorted(a) == sorted(b) and all(torch.equal(a[n], b[n]) for n in a)
    assert got.settings["rotation"]["method"] == "hadamard"
    assert not any(p.name == "rotated.tmp" for p in (tmp_path / "one").iterdir())


def test_quantize_streamed_formats(capsys, tmp_path, tiny_llama):
    # compressed-tensors layer by layer, R4 included: tests/test_ct_layered.py; orthoopt's format on request
    assert main(["quantize", str(tiny_llama), "--out", str(tmp_path / "ct"), "--scheme", "W4A8", "--group-size", "32",
                 "--online-hadamard",
                 "--format", "compressed-tensors", "--streamed", "--no-progress"]) == 0
    assert "transform_config" in json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    # the CLI flag runs without --rotate, and its memory estimate is the layer-by-layer one
    assert main(["quantize", str(tiny_llama), "--out", str(tmp_path / "cli"), "--wbits", "4", "--format", "orthoopt",
                 "--streamed", "--no-progress"]) == 0
    assert (tmp_path / "cli" / "model.safetensors.index.json").is_file()


def test_streamed_quantize_estimate_holds_one_layer(tmp_path, monkeypatch):
    from orthoopt.models.footprint import quantize_estimate

    folder = save_planted(tmp_path / "m", hidden_size=64, num_layers=8, num_heads=4, intermediate_size=256)
    ck = Checkpoint.read(folder)
    whole = quantize_estimate(ck, torch.float32, "gptq", 16, 64)
    streamed = quantize_estimate(ck, torch.float32, "gptq", 16, 64, streamed=True)
    layer = [v for k, v in streamed.parts.items() if k.startswith("peak transient (layer (read, quantized, shard)")]
    assert layer and layer[0] > ck.layer_numel * 4 * 2 and "model" not in streamed.parts
    # RTN's peak is the non-layer phase here (a wide vocabulary): the weights, and a serialized copy of
    # shard 0 where the installed safetensors builds one
    import orthoopt.models.footprint as footprint

    wide = Checkpoint.read(save_planted(tmp_path / "wide", hidden_size=64, num_layers=2, num_heads=4,
                                        intermediate_size=256, vocab_size=8192))
    nonlayer = (wide.numel - 2 * wide.layer_numel) * 4
    for copies in (0, 1):
        monkeypatch.setattr(footprint, "shard_write_copies", lambda: copies)
        rtn = quantize_estimate(wide, torch.float32, "rtn", streamed=True)
        assert rtn.parts["peak transient (non-layer weights (read, written, freed))"] == nonlayer * (1 + copies)
    assert streamed.total < whole.total and ("--streamed", streamed.total) in whole.alternatives


@pytest.mark.parametrize("kw", [{"dtype": torch.float32}, {"dtype": torch.bfloat16, "tie_word_embeddings": True}])
def test_diagnose_streamed_gives_the_summary_of_diagnose(capsys, tmp_path, kw, text_file):
    """The weight statistics read layer by layer are the whole model's, to the last digit; each layer is read
    once in forward order and released; --calib (the whole model's activations) is refused with --streamed."""
    from orthoopt.diagnostics.report import LayeredWeights, stored_weights

    folder = save_planted(tmp_path / "m", hidden_size=64, num_layers=3, num_heads=4, intermediate_size=128, **kw)
    base = ["diagnose", str(folder), "--no-progress", "--json"]
    whole = run_json(capsys, base + ["--out", str(tmp_path / "d1")])
    streamed = run_json(capsys, base + ["--out", str(tmp_path / "d2"), "--streamed"])
    assert (whole["settings"].pop("streamed"), streamed["settings"].pop("streamed")) == (False, True)
    assert streamed == whole
    layered = LayeredModel(folder, kw["dtype"])
    reads = []
    original = layered.load_layer
    layered.load_layer = lambda i: reads.append(i) or original(i)
    lazy, eager = LayeredWeights(layered), stored_weights(load_model(folder))
    assert list(lazy) == list(eager)
    for name, W in lazy.items():
        assert torch.equal(W, eager[name]), name
    lazy.release()
    assert reads == [0, 1, 2] and all(p.is_meta for p in layered.layers.parameters())
    # the activations, layer by layer: the same statistics to the last digit, the same plots' data
    acts = ["--calib", str(text_file), "--calib-tokens", "300", "--seq-len", "64"]
    whole = run_json(capsys, base + acts + ["--out", str(tmp_path / "a1")])
    streamed = run_json(capsys, base + acts + ["--out", str(tmp_path / "a2"), "--streamed"])
    assert (whole["settings"].pop("streamed"), streamed["settings"].pop("streamed")) == (False, True)
    assert len(whole["models"][0]["activations"]["inputs"]) == 3 * 4 + 1  # qkv, o, gate/up, down per layer; head
    assert streamed == whole
    assert any(p.startswith("activation") and p.endswith(".png") for p in whole["plots"]), whole["plots"]
    for plot in whole["plots"]:  # drawn from the same per-channel maxima and heat-map rows
        if plot.endswith(".png"):
            assert (tmp_path / "a1" / plot).read_bytes() == (tmp_path / "a2" / plot).read_bytes(), plot


@pytest.mark.parametrize("method", ["kurtosis", "optrot+"])
def test_quantize_streamed_with_a_data_method_rotation(tmp_path, tiny_llama, text_file, method):
    """``quantize --rotate METHOD --calib TEXT --streamed``: the rotation's statistics are taken layer by
    layer and the written weights equal the in-memory one-command run's."""
    import orthoopt

    q = {"method": "rtn", "wbits": 4, "format": "orthoopt"}
    rotate = {"method": method, "solve": {"steps": 2}, "calib": {"tokens": 64, "seq_len": 32}}
    common = dict(rotate=rotate, calib=text_file, quantize=q, progress=False)
    whole = orthoopt.oneshot(str(tiny_llama), out=tmp_path / "whole", **common)
    streamed = orthoopt.oneshot(str(tiny_llama), out=tmp_path / "streamed", streamed=True, **common)
    a, b = folder_tensors(tmp_path / "whole"), folder_tensors(tmp_path / "streamed")
    assert sorted(a) == sorted(b) and all(torch.equal(a[n], b[n]) for n in a)
    assert streamed.settings["rotation"]["method"] == whole.settings["rotation"]["method"] == method
