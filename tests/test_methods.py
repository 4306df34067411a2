"""The method registry (``orthoopt.methods``, issue 22 item 2): one entry per method, everything else derived.

A new data-free objective becomes a ``--method`` by one registry entry plus its class: a throwaway
entry (a sixth-power objective defined here, as a contributor's file would) shows up in the CLI's choices and help and in the docs table, and runs end
to end in memory and streamed through the CLI, ``rotate_model`` and ``rotate_streamed``.
"""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from orthoopt.adapters import DecoderAdapter
from orthoopt.models import load_model
from orthoopt.testing import save_planted
from orthoopt.cli import build_parser, main
from orthoopt.config import RotateConfig
from orthoopt.methods import METHODS, Method, method_table_markdown, names, summed_by_layer
from orthoopt.objectives import Objective
from orthoopt.pipeline import build_objective, rotate_model, rotate_streamed

TINY = dict(arch="llama", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, seed=3)
NAME = "sixth-power"


class SixthPower(Objective):
    """A new data-free objective, written as a contributor would in its own file: the sum over blocks of
    ``mean((W R)**6)``; the gradient comes from the base class (autograd)."""

    def __init__(self, blocks) -> None:
        self.blocks = list(blocks)

    @property
    def dims(self) -> dict[str, int]:
        return {b.rotation: b.dim for b in self.blocks}

    def loss(self, rotations) -> torch.Tensor:
        return sum(b.rotated(rotations[b.rotation]).double().pow(6).mean() for b in self.blocks)


def sixth_power(inputs):
    return SixthPower(inputs.blocks)


ENTRY = Method(NAME, "sixth power of the rotated weights (test-only `SixthPower`)", "", "learned",
               objective=sixth_power, solver="cayley-sgd", steps=7, streamed=summed_by_layer(sixth_power))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_planted(tmp_path_factory.mktemp("m") / "tiny", **TINY)


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(METHODS, NAME, ENTRY)
    return ENTRY


def _rotate_options(parser):
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    rotate = sub.choices["rotate"]
    return {a.dest: a for a in rotate._actions}


def test_the_tables_of_the_config_are_views_of_the_registry():
    for name, m in METHODS.items():
        c = RotateConfig(method=name)
        assert c.learned == m.learned and c.solve.steps == m.steps and c.solver_name == m.solver
        assert c.effective_lr == m.lr and (c.spinquant.sim_quant is not None) == m.simulates_quantization
    assert names(lambda m: m.supports_streamed) == ("identity", "random", "hadamard", "optrot", "optrot+", "kurtosis",
                                                   "dfrot")
    assert names(lambda m: m.needs_calibration) == ("optrot+", "kurtosis", "dfrot", "spinquant")
    assert METHODS["kurtosis"].solver == "cayley-lbfgs"  # the module doc of the pipeline once said radam
    with pytest.raises(ValueError, match="a fixed method names an init kind"):
        Method("broken", "no objective", "", "learned", solver="cayley-sgd")


def test_a_new_entry_is_a_method_of_the_cli_and_the_docs(registered):
    options = _rotate_options(build_parser())
    assert NAME in options["method"].choices and tuple(options["method"].choices) == tuple(METHODS)
    assert f"{NAME} 7" in options["steps"].help and f"{NAME} cayley-sgd" in options["solver"].help
    assert NAME in options["streamed"].help and NAME not in options["calib"].help
    row = [line for line in method_table_markdown().splitlines() if line.startswith(f"| {NAME} |")]
    assert row == [f"| {NAME} | learned | {ENTRY.description} | no | `cayley-sgd` | 7 | solver's | yes | - |"]


def test_a_new_entry_runs_in_memory_and_streamed(registered, model_dir, tmp_path):
    model = load_model(model_dir)
    adapter = DecoderAdapter(load_model(model_dir))
    adapter.fuse_norms()
    objective = build_objective(RotateConfig(NAME), adapter, "R1")
    assert isinstance(objective, SixthPower) and set(objective.dims) == {"R1"}
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    mem = rotate_model(model, RotateConfig(NAME, seed=1), progress=False, verify_ids=ids)
    assert mem.report["method"] == NAME and mem.report["steps"] == {"R1": 7, "R2": 7}
    assert mem.report["solver"] == "cayley-sgd" and mem.solves["R1"].history[-1] < mem.solves["R1"].history[0]
    res = rotate_streamed(model_dir, tmp_path / "s", RotateConfig(NAME, seed=1), progress=False)
    # the streamed R1 objective sums the layers' terms: equal up to the order of the float sums
    assert not registered.streams_bit_for_bit and METHODS["optrot"].streams_bit_for_bit
    for phase in ("R1", "R2"):
        assert res.solves[phase].history == pytest.approx(mem.solves[phase].history, rel=1e-5)
    for k, R in mem.rotations.items():
        assert torch.allclose(res.rotations[k], R, atol=1e-5), k


def test_a_new_entry_runs_through_the_cli(registered, model_dir, tmp_path):
    for extra in ([], ["--streamed"]):
        out = tmp_path / f"out{len(extra)}"
        assert main(["rotate", str(model_dir), "--out", str(out), "--method", NAME, "--steps", "2", *extra,
                     "--quiet"]) == 0
        report = json.loads((out / "report.json").read_text())
        assert report["method"] == NAME and report["loss"]["R1"]["steps"] == 2
        assert ("streamed" in report) == bool(extra)


def test_the_distributed_entry_point_takes_every_streamed_method(model_dir, tmp_path):
    from orthoopt.distributed_rotate import build_parser as distributed_parser
    from orthoopt.distributed_rotate import main as distributed_main

    choices = next(a for a in distributed_parser()._actions if a.dest == "method").choices
    assert tuple(choices) == names(lambda m: m.supports_streamed and not m.needs_calibration)
    assert distributed_main([str(model_dir), "--out", str(tmp_path / "d"), "--method", "hadamard", "--quiet"]) == 0
    rotate_streamed(model_dir, tmp_path / "s", RotateConfig("hadamard"), progress=False)
    want, got = load_model(tmp_path / "s").state_dict(), load_model(tmp_path / "d").state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert json.loads((tmp_path / "d" / "report.json").read_text())["method"] == "hadamard"
