"""``--device`` on ``quantize``, ``eval`` and ``diagnose`` (issue 23, item 3; rotate's in test_streamed): ``--device cpu`` gives the same
result as no device, and an unavailable device is refused before any work. No GPU needed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from orthoopt.models import load_model
from orthoopt.testing import save_planted
from orthoopt.cli import main

from helpers import run_error, sample_text_file

Q = ["--no-progress"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_planted(tmp_path_factory.mktemp("dev") / "m", hidden_size=64, num_layers=2, num_heads=4,
                        intermediate_size=128, dtype=torch.bfloat16)


def test_device_cpu_equals_no_device(model_dir, tmp_path, capsys):
    text = sample_text_file(tmp_path / "t.txt")
    gptq = ["--method", "gptq", "--calib", str(text), "--nsamples", "2", "--seq-len", "32"]
    assert main(["quantize", str(model_dir), "--out", str(tmp_path / "a"), *gptq, *Q]) == 0
    assert main(["quantize", str(model_dir), "--out", str(tmp_path / "b"), *gptq, "--device", "cpu", *Q]) == 0
    a, b = load_model(tmp_path / "a").state_dict(), load_model(tmp_path / "b").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    ppl = []
    for device in ([], ["--device", "cpu"]):
        capsys.readouterr()
        assert main(["eval", str(tmp_path / "a"), "--text", str(text), "--seq-len", "32", "--max-tokens", "128",
                     "--json", *device, *Q]) == 0
        ppl.append(json.loads(capsys.readouterr().out)["ppl"])
    assert ppl[0] == ppl[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_an_unavailable_device_is_refused_before_any_work(model_dir, tmp_path, capsys):
    text = sample_text_file(tmp_path / "t.txt")
    for device, says in (("cuda", "CUDA is not available"), ("meta", "cannot compute"), ("nodevice", "not a device")):
        err = run_error(capsys, ["quantize", str(model_dir), "--out", str(tmp_path / "q"), "--device", device, *Q])
        assert "--device" in err and says in err
        err = run_error(capsys, ["eval", str(model_dir), "--text", str(text), "--device", device, *Q])
        assert "--device" in err and says in err
        err = run_error(capsys, ["diagnose", str(model_dir), "--out", str(tmp_path / "d"), "--device", device, *Q])
        assert "device" in err and says in err
    assert not (tmp_path / "q").exists() and not (tmp_path / "d").exists()


def test_diagnose_device_cpu_equals_no_device(model_dir, tmp_path):
    """Streamed, the path where layers move to the device one at a time (in memory it is one ``.to``)."""
    text = sample_text_file(tmp_path / "t.txt")
    common = ["--calib", str(text), "--calib-tokens", "96", "--seq-len", "32", "--streamed", *Q]
    assert main(["diagnose", str(model_dir), "--out", str(tmp_path / "a"), *common]) == 0
    assert main(["diagnose", str(model_dir), "--out", str(tmp_path / "b"), "--device", "cpu", *common]) == 0
    a, b = (json.loads((tmp_path / x / "summary.json").read_text()) for x in "ab")
    assert a["models"] == b["models"] and a["act_module"] == b["act_module"] and a["models"][0]["activations"]


def test_every_learned_method_takes_a_device(model_dir, tmp_path):
    """The objectives follow the rotations' device, and spinquant's (whose loss runs the whole model)
    the model's, which goes to the device for its solve; ``sample_fraction`` stays OptRot's;
    ``device="cpu"`` gives what no device gives."""
    from orthoopt.config import RotateConfig
    from orthoopt.pipeline import rotate_model

    for name in ("optrot", "optrot+", "kurtosis", "dfrot", "spinquant"):
        assert RotateConfig(name, compute={"device": "cpu"}).compute.device == "cpu"
    with pytest.raises(ValueError, match="sample_fraction is supported by method 'optrot' only"):
        RotateConfig("kurtosis", compute={"sample_fraction": 0.5})
    calib = torch.randint(0, 259, (2, 16), generator=torch.Generator().manual_seed(0))
    runs = [rotate_model(load_model(model_dir, dtype=torch.float32), RotateConfig("kurtosis", solve={"steps": 2},
                                                                                   calib={"tokens": 32}, **kw),
                         calib=calib, progress=False) for kw in ({}, {"compute": {"device": "cpu"}})]
    a, b = (r.rotations for r in runs)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_spinquant_on_a_device_moves_the_model_there_for_its_solve_and_back(model_dir, monkeypatch):
    """In memory, spinquant's loss runs where the model is: with a device the model is moved there
    before its objective is built and back to where it was once its rotations are fused; the result is
    the one without a device (cpu to cpu: the same arithmetic)."""
    from orthoopt.config import RotateConfig
    from orthoopt.pipeline import rotate_model

    calib = torch.randint(0, 259, (2, 16), generator=torch.Generator().manual_seed(0))
    runs, moves = [], []
    for kw in ({}, {"compute": {"device": "cpu"}}):
        model = load_model(model_dir, dtype=torch.float32)
        real = type(model).to
        monkeypatch.setattr(model, "to", lambda *a, _m=model, **k: moves.append(a or tuple(k.values())) or real(_m, *a, **k),
                            raising=False)
        config = RotateConfig("spinquant", solve={"steps": 2}, calib={"tokens": 32}, **kw)
        runs.append(rotate_model(model, config, calib=calib, progress=False))
        assert next(model.parameters()).device == torch.device("cpu")
    assert moves == [("cpu",), (torch.device("cpu"),)]  # only the run with a device: there, then home
    a, b = (r.rotations for r in runs)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
