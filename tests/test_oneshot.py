"""``orthoopt quantize MODEL --rotate METHOD`` / ``orthoopt.oneshot``: the same files and numbers as
``orthoopt rotate`` followed by ``orthoopt quantize``, refusals before any work, no half output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import orthoopt
from orthoopt.testing import save_planted
from orthoopt.cli import main

from helpers import run_error, sample_text_file

QUIET = ["--no-progress"]
VOLATILE = {"source", "seconds", "rotation"}
"""quant.json keys that differ between the two routes: the input path, the time, the rotation record
(only the one command has it: the separate quantize read a plain rotated folder)."""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """One layer, widths 128 and 256: the schemes' groups of 128 divide every linear's input."""
    return save_planted(tmp_path_factory.mktemp("m") / "tiny", hidden_size=128, num_layers=1, num_heads=4,
                        intermediate_size=256)


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    return sample_text_file(tmp_path_factory.mktemp("t") / "calib.txt", chars=6000)


def files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def assert_same_output(one: Path, two: Path) -> None:
    """Every file of the two-command output is in the one-command output with equal content: tensors
    torch.equal, JSON equal (quant.json apart from :data:`VOLATILE`); report.md and its pictures differ
    only by their timings, so they are only required to exist."""
    report = {"report.md", "weight_channels.png", "weight_layers.png", "loss_R1.png", "loss_R2.png"}
    assert files(two) - report <= files(one), files(two) - files(one)
    assert files(one) - files(two) - report == {"orthoopt/rotations.safetensors"}
    assert {"report.md", "weight_channels.png", "weight_layers.png"} <= files(one) & files(two)
    for name in sorted(files(two) - report):
        a, b = one / name, two / name
        if name.endswith(".safetensors"):
            ta, tb = load_file(a), load_file(b)
            assert ta.keys() == tb.keys(), name
            for k in ta:
                assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), f"{name}: {k}"
        elif name == "quant.json":
            qa, qb = json.loads(a.read_text()), json.loads(b.read_text())
            assert {k: v for k, v in qa.items() if k not in VOLATILE} == {k: v for k, v in qb.items() if k not in VOLATILE}
        else:
            assert a.read_bytes() == b.read_bytes(), name


ROUTES = [  # (rotate flags, quantize flags, format written)
    pytest.param(["--rotate", "optrot", "--steps", "4"], ["--scheme", "W4A16"], "compressed-tensors", id="optrot-W4A16"),
    pytest.param(["--rotate", "dfrot", "--steps", "2", "--calib-tokens", "256", "--calib-seq-len", "64"],
                 ["--scheme", "W4A16_ASYM", "--method", "gptq", "--nsamples", "4", "--seq-len", "64"],
                 "compressed-tensors", id="dfrot-gptq"),
    pytest.param(["--rotate", "spinquant", "--steps", "2", "--calib-tokens", "128", "--calib-seq-len", "64",
                  "--dtype", "float64"], ["--scheme", "W4A8"], "compressed-tensors", id="spinquant-W4A8-float64"),
]


@pytest.mark.parametrize("rotate,quantize,fmt", ROUTES)
def test_one_command_equals_rotate_then_quantize(capsys, tmp_path, model_dir, text, rotate, quantize, fmt):
    calib = ["--calib", str(text)]
    method = rotate[1]
    rotate_only = ["--method" if a == "--rotate" else a for a in rotate]
    if method == "spinquant":  # the rotate command's simulated quantization, matching --scheme W4A8
        rotate_only += ["--wbits", "4", "--abits", "8"]
    seed = ["--seed", "3"]
    assert main(["rotate", str(model_dir), "--out", str(tmp_path / "rot"), *rotate_only, *calib, *seed, *QUIET]) == 0
    assert main(["quantize", str(tmp_path / "rot"), "--out", str(tmp_path / "two"), *quantize, *calib, *seed,
                 *QUIET]) == 0
    capsys.readouterr()
    assert main(["quantize", str(model_dir), "--out", str(tmp_path / "one"), *rotate, *quantize, *calib, *seed,
                 "--json", *QUIET]) == 0
    record = json.loads(capsys.readouterr().out)
    one, two = tmp_path / "one", tmp_path / "two"
    assert_same_output(one, two)
    saved = json.loads((one / "quant.json").read_text())
    assert (saved.get("export") or {}).get("format", "orthoopt") == fmt
    assert saved["rotation"]["method"] == method and saved["source"] == str(model_dir)
    assert record["out"] == str(one) and record["rotation"] == saved["rotation"]
    rot_a = load_file(tmp_path / "rot" / "orthoopt" / "rotations.safetensors")
    rot_b = load_file(one / "orthoopt" / "rotations.safetensors")
    assert rot_a.keys() == rot_b.keys() and all(torch.equal(rot_a[k], rot_b[k]) for k in rot_a)
    assert not (tmp_path / "one.partial.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "rot", "two"]  # no temporaries left


def test_python_oneshot_is_what_the_command_runs(capsys, tmp_path, model_dir):
    assert main(["quantize", str(model_dir), "--out", str(tmp_path / "cli"), "--rotate", "optrot", "--steps", "3",
                 "--scheme", "W4A16", *QUIET]) == 0
    result = orthoopt.oneshot(str(model_dir), out=tmp_path / "py", rotate={"method": "optrot",
                                                                         "solve": {"steps": 3, "checkpoint_every": 25}},
                              scheme="W4A16", progress=False)
    assert result.format == "compressed-tensors" and result.out == tmp_path / "py"
    assert set(result.seconds) >= {"load", "rotate", "quantize", "write", "report"}
    ta, tb = load_file(tmp_path / "cli" / "model.safetensors"), load_file(tmp_path / "py" / "model.safetensors")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_a_rotated_quantized_model_keeps_its_function_up_to_quantization(tmp_path, model_dir):
    """The orthoopt-format output of a rotation at W8 is the float model up to 8-bit rounding (the
    rotation was fused correctly): logits within 5% relative (Frobenius), and closer than without
    the rotation would be no claim; W16 (no weight quantization) is not a scheme, so W8 stands in."""
    from orthoopt.quant import load_quantized

    orthoopt.oneshot(str(model_dir), out=tmp_path / "q", rotate="hadamard", quantize={"wbits": 8, "format": "orthoopt"},
                     progress=False)
    ref = load_quantized(model_dir).model
    got = load_quantized(tmp_path / "q").model
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ref(ids).logits, got(ids).logits
    err = float((a - b).norm() / a.norm())
    assert 0 < err < 0.05, err


def test_a_data_method_without_calib_is_refused_before_loading(capsys, tmp_path, model_dir, monkeypatch):
    import orthoopt.quant.model as qm

    monkeypatch.setattr(qm, "load_checkpoint", lambda *a, **k: pytest.fail("loaded before refusing"))
    err = run_error(capsys, ["quantize", str(model_dir), "--out", str(tmp_path / "o"), "--rotate", "dfrot",
                             "--scheme", "W4A16", *QUIET])
    assert "--rotate dfrot learns from calibration text: pass --calib" in err and "optrot" in err
    err = run_error(capsys, ["quantize", str(model_dir), "--out", str(tmp_path / "o"), "--rotate", "optrot",
                             "--method", "gptq", *QUIET])
    assert "--method gptq needs calibration text" in err and "--method rtn" in err
    err = run_error(capsys, ["quantize", str(model_dir), "--out", str(tmp_path / "o"), "--rotate", "optrot",
                             "--scheme", "W4A4", "--format", "compressed-tensors", *QUIET])
    assert "cannot export to compressed-tensors" in err and "A4 activations" in err and "--format orthoopt" in err
    err = run_error(capsys, ["quantize", str(model_dir), "--out", str(tmp_path / "o"), "--steps", "5", *QUIET])
    assert "--steps are rotation options: give --rotate METHOD" in err
    assert not (tmp_path / "o").exists() and list(tmp_path.iterdir()) == []


def test_an_interrupted_run_leaves_no_output_and_keeps_the_previous_one(capsys, tmp_path, model_dir, monkeypatch):
    import orthoopt.quant.model as qm

    out = tmp_path / "o"
    argv = ["quantize", str(model_dir), "--out", str(out), "--rotate", "optrot", "--steps", "2", "--scheme", "W4A16",
            *QUIET]
    assert main(argv) == 0
    before = {n: (out / n).read_bytes() for n in files(out)}

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(qm, "quantize_model", interrupted)
    with pytest.raises(KeyboardInterrupt):
        main(argv)
    assert {n: (out / n).read_bytes() for n in files(out)} == before  # the previous output, untouched
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name != "o")
    assert leftovers == ["o.partial.safetensors"]  # the finished rotation, for --resume; no half folder
    monkeypatch.undo()
    assert main([*argv, "--resume"]) == 0
    assert not (tmp_path / "o.partial.safetensors").exists()


def test_a_group_size_the_model_cannot_take_is_refused_before_the_rotation(capsys, tmp_path, monkeypatch):
    """SmolLM2's widths 576 and 1536 are not multiples of W4A16's 128: refused at once, naming 64."""
    import orthoopt.pipeline as pipeline

    model = save_planted(tmp_path / "m", hidden_size=96, num_layers=1, num_heads=4, intermediate_size=192)
    monkeypatch.setattr(pipeline, "rotate_model", lambda *a, **k: pytest.fail("rotated before refusing"))
    err = run_error(capsys, ["quantize", str(model), "--out", str(tmp_path / "o"), "--rotate", "optrot",
                             "--scheme", "W4A16", *QUIET])
    assert "--scheme W4A16's group size 128 does not divide" in err and "96 input columns" in err
    assert "(--group-size 32)" in err and "--group-size -1" in err
    assert not (tmp_path / "o").exists()
