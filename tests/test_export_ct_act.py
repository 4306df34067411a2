"""compressed-tensors export of dynamic int8 activations (W4A8, W8A8) and the online Hadamard (R4).

The exported folder is loaded by ``examples/ct_transformers_load.py`` in a subprocess that never
imports orthoopt (plain transformers + compressed-tensors) and its logits are compared twice
(docs/export.md, "Activations and R4", states and justifies both tolerances):

* with orthoopt's weights run through compressed-tensors' own arithmetic, written out here (dense
  ``x @ H / sqrt(n)`` in float32, its int8 grid ``absmax / 127.5`` with codes clamped to
  ``[-128, 127]`` before rounding): the same operations in the same order, so to float32 noise;
* with orthoopt's own fake-quantized model (``absmax / 127``, codes ``[-127, 127]``, the fast
  Walsh-Hadamard transform): to the stated, looser tolerance, since the two int8 grids differ.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("compressed_tensors", reason="compressed-tensors not installed (pip install 'orthoopt[export]')")

from compressed_tensors.quantization import QuantizationConfig  # noqa: E402
from compressed_tensors.transform import TransformConfig  # noqa: E402

from orthoopt.testing import save_planted  # noqa: E402
from orthoopt.adapters.archs import locate  # noqa: E402
from orthoopt.cli import main  # noqa: E402
from orthoopt.export.compressed_tensors import save_compressed_tensors, unrepresentable  # noqa: E402
from orthoopt.hadamard import hadamard_matrix  # noqa: E402
from orthoopt.quant import load_checkpoint, quantize_model  # noqa: E402
from orthoopt.quant.config import QuantizeConfig  # noqa: E402
from orthoopt.quant.act import ActQuantConfig  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ct_transformers_load.py"

TIGHT = 1e-4
"""Same arithmetic as compressed-tensors: max |difference| <= TIGHT * max |logit|."""
LOOSE_MAX, LOOSE_MEAN = 0.1, 0.01
"""Against orthoopt's own model: max |difference| <= LOOSE_MAX * max |logit| and mean |difference| <=
LOOSE_MEAN * max |logit| (measured on this model: 5.5e-2 and 3.5e-3, docs/export.md)."""


@pytest.fixture(scope="module")
def tiny(tiny_llama) -> Path:
    """A tiny llama whose intermediate size (128) is a power of two."""
    return tiny_llama


@pytest.fixture(scope="module")
def tiny96(tmp_path_factory) -> Path:
    """Intermediate size 96 = 12 * 8: orthoopt has a Hadamard matrix for it, compressed-tensors' is Sylvester's."""
    return save_planted(tmp_path_factory.mktemp("m96") / "tiny", hidden_size=64, num_layers=2, num_heads=4,
                        intermediate_size=96)


def run_example(out: Path, ids: torch.Tensor, tmp: Path, *extra: str) -> torch.Tensor:
    """The logits of ``examples/ct_transformers_load.py OUT`` in a fresh Python that never imports
    orthoopt (the example checks ``sys.modules`` at the end)."""
    torch.save(ids, tmp / "ids.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, str(EXAMPLE), str(out), "--ids", str(tmp / "ids.pt"),
                           "--out", str(tmp / "logits.pt"), *extra], capture_output=True, text=True, env=env,
                          cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(tmp / "logits.pt")


def ct_int8(x: torch.Tensor) -> torch.Tensor:
    """compressed-tensors 0.20.1's dynamic symmetric int8 per-token fake quantization (calculate_qparams
    and _quantize_dequantize): scale = absmax / (255 / 2), clamp to [-128, 127], then round."""
    amax = x.abs().amax(-1, keepdim=True)
    scale = amax / (torch.tensor(255.0) / 2)
    scale = torch.where(scale == 0, torch.finfo(scale.dtype).eps, scale)
    return torch.round(torch.clamp(x / scale, -128, 127)) * scale


def ct_hadamard(x: torch.Tensor) -> torch.Tensor:
    """compressed-tensors' online ``hadamard`` transform: dense ``x @ S`` in float32, divided by sqrt(n)."""
    n = x.shape[-1]
    return (x.float() @ hadamard_matrix(n, dtype=torch.float32)) / torch.tensor(n, dtype=torch.float64).sqrt()


def ct_arithmetic_logits(model, ids, r4: bool) -> torch.Tensor:
    """orthoopt's (already fake-quantized, R4-rotated) weights, with compressed-tensors' activation
    arithmetic on the inputs of every decoder-layer linear (orthoopt's own hooks must be off)."""
    m = locate(model)
    handles = []
    for L in m.layers:
        for role, lin in L.quant_linears(m.spec).items():
            rotate = r4 and role == m.spec.r4_role
            handles.append(lin.register_forward_pre_hook(
                lambda mod, a, rotate=rotate: (ct_int8(ct_hadamard(a[0]) if rotate else a[0]),)))
    try:
        with torch.no_grad():
            return model(input_ids=ids).logits
    finally:
        for h in handles:
            h.remove()


def quantized(tiny, wbits, group, r4):
    model, tok = load_checkpoint(tiny)
    res = quantize_model(model, QuantizeConfig("rtn", wbits=wbits, group_size=group, act=ActQuantConfig(bits=8, online_hadamard=r4)), progress=False)
    ids = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    return model, tok, res, ids


CASES = [(4, 32, True), (8, None, True), (4, 32, False)]  # W4A8 g32 + R4, W8A8 per channel + R4, W4A8


@pytest.mark.parametrize("wbits,group,r4", CASES)
def test_act_export_loads_in_plain_transformers_with_orthoopt_logits(tmp_path, tiny, wbits, group, r4):
    model, tok, res, ids = quantized(tiny, wbits, group, r4)
    with torch.no_grad():
        ref = model(input_ids=ids).logits  # orthoopt's fake-quant model: weights, R4, int8 activations
    out = save_compressed_tensors(model, tok, tmp_path / "ct", res, progress=False)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, ref)  # given back unchanged
    assert not any(hasattr(m, "quantization_scheme") or hasattr(m, "R4_input") for m in model.modules())
    assert "transform_config" not in vars(model)

    got = run_example(out, ids, tmp_path)
    top = ref.abs().max().item()
    res.hooks.remove()
    same_ops = ct_arithmetic_logits(model, ids, r4)
    err = (got - same_ops).abs().max().item()
    assert err <= TIGHT * top, f"transformers vs compressed-tensors' arithmetic on orthoopt's weights: {err:.3g}"
    diff = (got - ref).abs()
    assert diff.max().item() <= LOOSE_MAX * top and diff.mean().item() <= LOOSE_MEAN * top, (
        f"transformers vs orthoopt's fake-quant model: max {diff.max().item():.3g}, mean {diff.mean().item():.3g}, "
        f"max |logit| {top:.3g}")

    # on disk: int-quantized (int8 codes [out, in]), per-token dynamic int8 inputs, the R4 matrix once
    tensors = load_file(out / "model.safetensors")
    key = "model.layers.1.mlp.down_proj"
    assert tensors[f"{key}.weight"].dtype == torch.int8 and tuple(tensors[f"{key}.weight"].shape) == (64, 128)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    group0 = qc["config_groups"]["group_0"]
    assert qc["format"] == "int-quantized" and group0["weights"]["num_bits"] == wbits
    assert {k: group0["input_activations"][k] for k in ("num_bits", "type", "symmetric", "strategy", "dynamic")} == {
        "num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}
    r4_keys = sorted(k for k in tensors if "R4_input" in k)
    if r4:
        assert r4_keys == ["model.layers.0.mlp.down_proj.R4_input.weight"]  # shared by the layers, stored once
        assert torch.equal(tensors[r4_keys[0]].double(), hadamard_matrix(128))
        (scheme,) = qc["transform_config"]["config_groups"].values()
        assert scheme["type"] == "hadamard" and scheme["head_dim"] is None
        assert [(a["location"], a["inverse"], sorted(a["targets"])) for a in scheme["apply"]] == [
            ("input", False, [f"model.layers.{i}.mlp.down_proj" for i in range(2)])]
        # transformers alone ignores transform_config: down_proj then reads unrotated inputs
        plain = run_example(out, ids, tmp_path, "--no-transforms")
        assert (plain - ref).abs().max().item() > 0.1 * top
    else:
        assert r4_keys == [] and not qc.get("transform_config")  # compressed-tensors writes {}


def test_exported_configs_round_trip_through_compressed_tensors_models(tmp_path, tiny):
    model, tok, res, _ = quantized(tiny, 4, 32, True)
    out = save_compressed_tensors(model, tok, tmp_path / "ct", res, progress=False)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    tc = TransformConfig.model_validate(qc["transform_config"])
    assert tc.model_dump(mode="json") == qc["transform_config"]
    parsed = QuantizationConfig.model_validate(qc)
    again = parsed.model_dump(mode="json")
    assert {k: again[k] for k in ("config_groups", "format", "ignore", "quant_method")} == {
        k: qc[k] for k in ("config_groups", "format", "ignore", "quant_method")}
    record = json.loads((out / "quant.json").read_text())["export"]
    assert record["compression_format"] == "int-quantized" and record["transform_config"] == qc["transform_config"]


def test_a_hadamard_compressed_tensors_would_apply_differently_is_refused(tmp_path, tiny, monkeypatch):
    """The exporter checks compressed-tensors' R4 against orthoopt's matrix before writing: a
    different matrix or a missing 1/sqrt(n) is refused, with nothing written and the model unchanged."""
    from compressed_tensors.transform.factory import hadamard as ct_hadamard_factory

    model, tok, res, ids = quantized(tiny, 4, 32, True)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    real_matrix = ct_hadamard_factory.deterministic_hadamard_matrix
    real_init = ct_hadamard_factory.HadamardTransform.__init__

    def flipped(size, dtype, device):
        H = real_matrix(size, dtype, device).clone()
        H[:, 0] *= -1  # still a Hadamard matrix, but not orthoopt's
        return H

    def unnormalized(self, *a, **kw):
        real_init(self, *a, **kw)
        self._scale = torch.tensor(1.0, dtype=torch.float64)

    for patch, attr, why in ((flipped, "deterministic_hadamard_matrix", "is not orthoopt's"),
                             (unnormalized, "HadamardTransform.__init__", "normalization")):
        with monkeypatch.context() as mp:
            if attr == "deterministic_hadamard_matrix":
                mp.setattr(ct_hadamard_factory, attr, patch)
            else:
                mp.setattr(ct_hadamard_factory.HadamardTransform, "__init__", patch)
            with pytest.raises(RuntimeError, match=why):
                save_compressed_tensors(model, tok, tmp_path / "ct", res, progress=False)
        assert not (tmp_path / "ct").exists()
        assert not any(hasattr(m, "quantization_scheme") or hasattr(m, "R4_input") for m in model.modules())
        with torch.no_grad():
            assert torch.equal(model(input_ids=ids).logits, ref)


def test_r4_of_a_size_that_is_not_a_power_of_two_is_refused(tmp_path, tiny96, capsys):
    settings = {"wbits": 4, "abits": 8, "act": {"bits": 8, "online_hadamard": True}, "online_hadamard": {"size": 96}}
    (why,) = unrepresentable(settings)
    assert "size 96, not a power of two" in why and "--format orthoopt" in why
    assert unrepresentable({**settings, "online_hadamard": {"size": 128}}) == []

    model, tok, res, _ = quantized(tiny96, 4, 32, True)
    with pytest.raises(ValueError, match="not a power of two"):
        save_compressed_tensors(model, tok, tmp_path / "ct", res, progress=False)
    assert not (tmp_path / "ct").exists()

    out = tmp_path / "cli"  # the CLI refuses before quantizing and writes nothing
    capsys.readouterr()
    assert main(["quantize", str(tiny96), "--out", str(out), "--scheme", "W4A8", "--group-size", "32",
                 "--online-hadamard", "--format", "compressed-tensors", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "cannot export to compressed-tensors" in err and "not a power of two" in err, err
    assert not out.exists()


@pytest.mark.parametrize("extra,reason", [
    (["--abits", "4"], "only int8 activations are exported"),
    (["--abits", "8", "--act-asym"], "asymmetric per-token activations"),
    (["--abits", "8", "--act-clip", "0.9"], "activation clipping"),
])
def test_activation_settings_without_a_compressed_tensors_equivalent_are_refused(tmp_path, tiny, capsys,
                                                                                 extra, reason):
    capsys.readouterr()
    assert main(["quantize", str(tiny), "--out", str(tmp_path / "x"), "--format", "compressed-tensors",
                 "--no-progress", *extra]) == 2
    err = capsys.readouterr().err
    assert "cannot export to compressed-tensors" in err and reason in err, err
    assert not (tmp_path / "x").exists()


def test_cli_w4a8_r4_export_then_orthoopt_eval_matches_the_orthoopt_format(tmp_path, tiny, capsys):
    text = tmp_path / "t.txt"
    text.write_text("".join(f" line {i} of rotations and outliers .\n" for i in range(80)), encoding="utf-8")
    ppl = {}
    for fmt in ("orthoopt", "compressed-tensors"):
        out = tmp_path / fmt
        assert main(["quantize", str(tiny), "--out", str(out), "--scheme", "W4A8", "--group-size", "32",
                     "--online-hadamard", "--format", fmt, "--json", "--no-progress"]) == 0
        capsys.readouterr()
        assert main(["eval", str(out), "--text", str(text), "--seq-len", "32", "--json", "--no-progress"]) == 0
        captured = capsys.readouterr()
        assert "it/s" not in captured.err
        ppl[fmt] = json.loads(captured.out)["ppl"]
    qc = json.loads((tmp_path / "compressed-tensors" / "config.json").read_text())["quantization_config"]
    assert "transform_config" in qc and qc["config_groups"]["group_0"]["input_activations"]["dynamic"] is True
    # orthoopt's loader reads quant.json and re-installs its own hooks: exactly its fake-quant model
    assert ppl["compressed-tensors"] == pytest.approx(ppl["orthoopt"], rel=1e-5)
