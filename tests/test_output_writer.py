"""The one output writer (orthoopt.pipeline.output.run_and_write): rotate_model(out=...) and
rotate_streamed write the same folder layout through it, and a failed check leaves no folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from orthoopt.models import load_model, load_rotations
from orthoopt.testing import save_planted
from orthoopt.config import RotateConfig
from orthoopt.pipeline import rotate_model, rotate_streamed

from helpers import folder_tensors

TINY = dict(arch="llama", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, seed=3)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_planted(tmp_path_factory.mktemp("m") / "tiny", **TINY)


def _ids() -> torch.Tensor:
    return torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))



def test_rotate_model_writes_through_the_writer_what_the_streamed_store_writes(model_dir, tmp_path):
    memory_out, streamed_out = tmp_path / "memory", tmp_path / "streamed"
    model = load_model(model_dir)
    seen = []
    result = rotate_model(
        model,
        RotateConfig("hadamard", seed=2),
        out=memory_out,
        report_extra={"model": "tiny"},
        extras=lambda folder, res: seen.append((folder.name, sorted(res.rotations))),
    )
    streamed = rotate_streamed(model_dir, streamed_out, RotateConfig("hadamard", seed=2), progress=False)
    # the extras ran in the temporary folder, before the rename
    assert seen and seen[0][0] != memory_out.name and seen[0][1] == sorted(result.rotations)
    # the rotations and the report are the writer's, the same for both stores
    for name, R in load_rotations(memory_out).items():
        assert torch.equal(R, result.rotations[name]) and torch.equal(R, streamed.rotations[name])
    report = json.loads((memory_out / "report.json").read_text())
    assert report["model"] == "tiny" and report["method"] == "hadamard"
    assert json.loads((streamed_out / "report.json").read_text())["method"] == "hadamard"
    # the weights are the rotated model's (in memory) and equal the streamed ones to float32 rounding
    mem, st = folder_tensors(memory_out), folder_tensors(streamed_out)
    for k, v in model.state_dict().items():
        if k in mem:
            assert torch.equal(mem[k], v), k
    assert set(mem) == set(st)
    for k in mem:
        torch.testing.assert_close(st[k], mem[k], rtol=1e-5, atol=1e-6, msg=k)
    # and the folder loads as a model with the rotated model's logits
    with torch.no_grad():
        torch.testing.assert_close(load_model(memory_out)(input_ids=_ids()).logits, model(input_ids=_ids()).logits,
                                   rtol=0, atol=0)


def test_a_failed_invariance_check_leaves_no_output(model_dir, tmp_path):
    out = tmp_path / "o"
    with pytest.raises(ValueError, match="the write-back is wrong"):
        rotate_model(load_model(model_dir), RotateConfig("hadamard"), out=out, verify_ids=_ids(), verify_tol=0.0)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # no temporary folder left either


def test_without_out_nothing_is_written(model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rotate_model(load_model(model_dir), RotateConfig("random", seed=0))
    assert list(tmp_path.iterdir()) == []
