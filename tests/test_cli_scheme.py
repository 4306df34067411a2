"""``orthoopt quantize --scheme NAME``: the scheme's settings, explicit flags winning, the record in
quant.json, refusals, and the compressed-tensors export of a scheme matching compressed-tensors' preset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from orthoopt.testing import save_planted
from orthoopt.cli import main
from orthoopt.quant import load_checkpoint, quantize_model
from orthoopt.quant.config import QuantizeConfig
from orthoopt.quant.schemes import SCHEMES


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A one-layer Llama whose linears' inputs (128, 256) divide the schemes' group size."""
    sizes = {g for s in SCHEMES.values() if (g := s.group_size)}
    hidden = max(sizes)
    return save_planted(tmp_path_factory.mktemp("m") / "tiny", hidden_size=hidden, num_layers=1, num_heads=4,
                        intermediate_size=2 * hidden)


def quantize(capsys, argv: list[str]) -> dict:
    capsys.readouterr()
    assert main(["quantize", *argv, "--method", "rtn", "--json", "--no-progress"]) == 0
    return json.loads(capsys.readouterr().out)


def test_scheme_sets_the_quantizer_like_the_flags(capsys, tmp_path, model_dir):
    scheme = SCHEMES["W4A16"]
    record = quantize(capsys, [str(model_dir), "--out", str(tmp_path / "s"), "--scheme", "w4a16",
                               "--format", "orthoopt"])  # fake-quantized weights, compared below
    saved = json.loads((tmp_path / "s" / "quant.json").read_text())
    assert saved["scheme"] == {"name": "W4A16", "overrides": {}} == record["scheme"]
    assert (saved["wbits"], saved["group_size"], saved["sym"], saved["abits"]) == (
        scheme.wbits, scheme.group_size, scheme.sym, scheme.abits)
    model, _ = load_checkpoint(model_dir)  # the same grid in memory, flag by flag
    quantize_model(model, QuantizeConfig("rtn", wbits=scheme.wbits, group_size=scheme.group_size, sym=scheme.sym), progress=False)
    stored = load_file(tmp_path / "s" / "model.safetensors")
    for name, p in model.state_dict().items():
        assert torch.equal(stored[name], p), name


def test_explicit_flags_win_over_the_scheme(capsys, tmp_path, model_dir):
    scheme = SCHEMES["W4A8"]
    saved = quantize(capsys, [str(model_dir), "--out", str(tmp_path / "o"), "--scheme", "W4A8", "--wbits", "3",
                              "--group-size", "-1", "--asym", "--abits", str(scheme.abits)])
    assert (saved["wbits"], saved["group_size"], saved["sym"], saved["abits"]) == (3, None, False, scheme.abits)
    assert saved["act"]["bits"] == scheme.abits and saved["act"]["symmetric"] == scheme.act_sym
    assert saved["scheme"] == {"name": "W4A8", "overrides": {  # --abits equals the scheme's: no override
        "wbits": {"scheme": scheme.wbits, "flag": 3}, "sym": {"scheme": scheme.sym, "flag": False},
        "group_size": {"scheme": scheme.group_size, "flag": None}}}


def test_without_a_scheme_the_defaults_are_unchanged(capsys, tmp_path, model_dir):
    saved = quantize(capsys, [str(model_dir), "--out", str(tmp_path / "d")])
    assert saved["scheme"] is None
    assert (saved["wbits"], saved["group_size"], saved["sym"], saved["abits"]) == (4, None, True, 16)


@pytest.mark.parametrize("name,reason", [("W9A3", "unknown scheme 'W9A3'"), ("FP8", "cannot be represented")])
def test_unknown_or_unrepresentable_schemes_exit_2_listing_the_supported(capsys, tmp_path, model_dir, name, reason):
    if name == "FP8":
        pytest.importorskip("compressed_tensors", reason="the reason comes from compressed-tensors' preset")
    capsys.readouterr()
    assert main(["quantize", str(model_dir), "--out", str(tmp_path / "x"), "--scheme", name, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("orthoopt quantize: error: ") and reason in err
    assert f"supported schemes: {', '.join(SCHEMES)}" in err
    assert not (tmp_path / "x").exists()


def test_compressed_tensors_export_of_a_scheme_is_the_preset(capsys, tmp_path, model_dir):
    pytest.importorskip("compressed_tensors", reason="compressed-tensors not installed (pip install 'orthoopt[export]')")
    from compressed_tensors.quantization import preset_name_to_scheme

    out = tmp_path / "ct"
    quantize(capsys, [str(model_dir), "--out", str(out), "--scheme", "W4A16", "--format", "compressed-tensors"])
    group = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    preset = preset_name_to_scheme("W4A16", ["Linear"])
    assert {"type", "num_bits", "strategy", "group_size", "symmetric", "dynamic"} <= set(group["weights"])
    assert group["weights"] == {k: v for k, v in preset.weights.model_dump(mode="json").items() if k in group["weights"]}
    assert group["input_activations"] is None and preset.input_activations is None

    for name in ("W4A8", "W8A8"):  # dynamic int8 activations: weights and input_activations are the preset's
        out = tmp_path / name
        quantize(capsys, [str(model_dir), "--out", str(out), "--scheme", name, "--format", "compressed-tensors"])
        group = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
        preset = preset_name_to_scheme(name, ["Linear"])
        for part in ("weights", "input_activations"):
            want = getattr(preset, part).model_dump(mode="json")
            assert {"type", "num_bits", "strategy", "symmetric", "dynamic"} <= set(group[part])
            assert group[part] == {k: v for k, v in want.items() if k in group[part]}, (name, part)

    capsys.readouterr()  # int4 activations are refused before any work
    assert main(["quantize", str(model_dir), "--out", str(tmp_path / "w4a4"), "--scheme", "W4A4",
                 "--format", "compressed-tensors", "--no-progress"]) == 2
    assert "A4 activations" in capsys.readouterr().err and not (tmp_path / "w4a4").exists()


def test_the_default_format_is_compressed_tensors_when_it_carries_the_scheme(capsys, tmp_path, model_dir):
    pytest.importorskip("compressed_tensors", reason="compressed-tensors not installed (pip install 'orthoopt[export]')")
    from orthoopt.export.compressed_tensors import unrepresentable

    quantize(capsys, [str(model_dir), "--out", str(tmp_path / "w4a16"), "--scheme", "W4A16"])
    config = json.loads((tmp_path / "w4a16" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    assert json.loads((tmp_path / "w4a16" / "quant.json").read_text())["export"]["format"] == "compressed-tensors"
    assert "--format auto wrote orthoopt's format" not in (tmp_path / "w4a16" / "report.md").read_text()
    # W4A8's dynamic int8 activations are carried (issue 24): compressed-tensors by default too
    quantize(capsys, [str(model_dir), "--out", str(tmp_path / "w4a8"), "--scheme", "W4A8"])
    assert json.loads((tmp_path / "w4a8" / "quant.json").read_text())["export"]["format"] == "compressed-tensors"
    # W4A4's int4 activations are not (their grid differs): orthoopt's format, and the report says why
    reasons = unrepresentable({"wbits": 4, "abits": 4, "group_size": 128, "act": {"bits": 4}})
    assert reasons and reasons[0].startswith("A4 activations")
    quantize(capsys, [str(model_dir), "--out", str(tmp_path / "w4a4"), "--scheme", "W4A4"])
    assert "quantization_config" not in json.loads((tmp_path / "w4a4" / "config.json").read_text())
    assert "export" not in json.loads((tmp_path / "w4a4" / "quant.json").read_text())
    report = (tmp_path / "w4a4" / "report.md").read_text()
    assert "--format auto wrote orthoopt's format, since compressed-tensors cannot carry this" in report
    assert reasons[0] in report
