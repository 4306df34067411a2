"""benchmarks/streamed_parity.py's comparisons (issue 23): a pair that differs is reported as differing,
bit for bit, and every command of the streamed run carries --streamed and parses."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import streamed_parity  # noqa: E402

from orthoopt.cli import build_parser  # noqa: E402


def _folder(path: Path, tensors: dict) -> Path:
    path.mkdir()
    (path / "config.json").write_text("{}")
    save_file(tensors, str(path / "model.safetensors"))
    return path


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_ulp_apart_is_a_difference(tmp_path, dtype):
    """The same tensors are identical; one element moved to its next float is a differing tensor, with its
    difference; -0.0 against 0.0 differs too (bits, not values)."""
    g = torch.Generator().manual_seed(0)
    a = {"w": torch.randn(8, 8, generator=g).to(dtype), "b": torch.zeros(4, dtype=dtype)}
    same = _folder(tmp_path / "a", a)
    c = streamed_parity.compare_tensors(same, _folder(tmp_path / "a2", dict(a)))
    assert c["identical"] == 2 and c["same"]
    moved = a["w"].clone()
    moved[3, 5] = torch.nextafter(moved[3, 5].float(), torch.tensor(float("inf"))).to(dtype) \
        if dtype == torch.float32 else (moved[3, 5].view(torch.int16) + 1).view(dtype)
    signed = -a["b"]  # -0.0
    c = streamed_parity.compare_tensors(same, _folder(tmp_path / "b", {"w": moved, "b": signed}))
    assert c["tensors"] == 2 and c["identical"] == 0 and not c["same"] and sorted(c["differing"]) == ["b", "w"]
    assert c["max_abs_diff"] == pytest.approx(float((moved[3, 5].double() - a["w"][3, 5].double()).abs()), rel=0)
    assert c["max_abs_diff"] > 0


def test_other_names_are_not_the_same_checkpoint(tmp_path):
    a = _folder(tmp_path / "a", {"w": torch.ones(2)})
    c = streamed_parity.compare_tensors(a, _folder(tmp_path / "b", {"v": torch.ones(2)}))
    assert c["identical"] == 0 and not c["same"] and c["names_differ"] and c["differing"] == ["v", "w"]
    assert "tensor names differ (v, w)" in streamed_parity._row({"step": "rotate", "compare": c})


def test_window_nlls_compare_exactly():
    a = {"ppl": 10.0, "window_nll": [2.0, 2.5]}
    assert streamed_parity.compare_evals(a, dict(a))["same"]
    c = streamed_parity.compare_evals(a, {"ppl": 10.0, "window_nll": [2.0, 2.5 + 2 ** -40]})
    assert not c["same"] and c["max_window_nll_diff"] == pytest.approx(2 ** -40, rel=1e-6)


@pytest.mark.parametrize("streamed", [False, True])
def test_every_step_parses_and_the_streamed_run_streams_every_command(tmp_path, streamed):
    parser = build_parser()
    for step in streamed_parity.STEPS:
        argv = streamed_parity.step_argv(step, "smollm2-135m", tmp_path, tmp_path / "t.txt", 4, 2, 64, streamed)
        args = parser.parse_args(argv)
        assert getattr(args, "streamed", False) == streamed, step
