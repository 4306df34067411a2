"""Exact resume (issue 10, item 2): a run killed with SIGKILL after a partial checkpoint and resumed
gives bit-identical rotations to an uninterrupted run; a partial checkpoint of another run is refused
with a message naming the difference; every solver's state round-trips bit for bit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from orthoopt.adapters import planted_outlier_model, save_planted
from orthoopt.cli import main
from orthoopt.objectives import FourthPower, WeightBlock
from orthoopt.pipeline import rotate_model
from orthoopt.solvers import SOLVERS, initial_rotations, make_solver

SMALL = dict(arch="llama", hidden_size=96, num_layers=2, num_heads=4, num_kv_heads=2, seed=5)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_planted(tmp_path_factory.mktemp("m") / "small", **SMALL)


def _cli(model_dir: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "orthoopt", "rotate", str(model_dir), "--out", str(out), "--quiet", "--json",
            "--checkpoint-every", "5", *extra]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _partial_meta(path: Path) -> dict | None:
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata()
    except Exception:  # not there yet, or being renamed into place
        return None


def _kill_after_checkpoint(cmd: list[str], partial: Path, phase: str, timeout: float = 120.0) -> dict:
    """Start ``cmd``, wait for a partial checkpoint of ``phase`` with at least one step, SIGKILL it."""
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            meta = _partial_meta(partial)
            if meta and meta.get("phase") == phase and int(meta.get("step", "0")) > 0:
                break
            if proc.poll() is not None:
                pytest.fail(f"the run ended before a {phase} checkpoint: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.002)
        else:
            pytest.fail(f"no {phase} checkpoint within {timeout} s")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL  # really killed, not finished
    return _partial_meta(partial)


@pytest.mark.parametrize("extra, kill_phases", [
    ([], ("R1", "R2")),  # the default solver of optrot (L-BFGS memory, cached gradient)
    (["--solver", "cayley-sgd", "--sample-fraction", "0.5"], ("R2",)),  # momentum, row-sampling generators
], ids=["default", "cayley-sgd-sampled"])
def test_kill9_then_resume_is_bit_identical(model_dir, tmp_path, extra, kill_phases):
    steps = ["--steps", "150"]
    ref_out = tmp_path / "ref"
    done = subprocess.run(_cli(model_dir, ref_out, *steps, *extra), env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    ref = load_file(str(ref_out / "rotations.safetensors"))
    ref_report = json.loads((ref_out / "report.json").read_text())

    for phase in kill_phases:  # several kill points: during R1, and during R2 after R1 was fused
        out = tmp_path / f"killed_{phase}"
        partial = out.with_name(out.name + ".partial.safetensors")
        meta = _kill_after_checkpoint(_cli(model_dir, out, *steps, *extra), partial, phase)
        assert not out.exists()  # a killed run leaves no output
        assert meta["phase"] == phase
        resumed = subprocess.run(_cli(model_dir, out, *steps, *extra, "--resume"), env=_env(),
                                 capture_output=True, text=True)
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        report = json.loads(resumed.stdout)
        assert report["resumed"]["phase"] == phase and report["resumed"]["steps_done"] > 0
        got = load_file(str(out / "rotations.safetensors"))
        assert set(got) == set(ref)
        for k in ref:
            assert torch.equal(got[k], ref[k]), f"{k} differs after a kill in {phase} and --resume"
        for p in ("R1", "R2"):  # the whole loss history, not just the end point
            assert report["loss"][p]["curve"] == ref_report["loss"][p]["curve"]
            assert report["loss"][p]["final"] == ref_report["loss"][p]["final"]
        assert not partial.exists()


def _interrupted_partial(model, tmp_path: Path, **kw) -> Path:
    """Run optrot until the first R2 checkpoint, then stop it (as a kill would), leaving the file."""
    path = tmp_path / "p.partial.safetensors"

    class Stop(Exception):
        pass

    def cb(phase, step, loss, rots):
        if phase == "R2" and step == 3:
            raise Stop

    with pytest.raises(Stop):
        rotate_model(model, "optrot", steps=8, progress=False, callback=cb, checkpoint=path, checkpoint_every=2, **kw)
    return path


@pytest.mark.parametrize("change, named", [
    (dict(solver="radam"), "solver"),
    (dict(seed=1), "seed"),
    (dict(steps=9), "steps"),
    (dict(lr=0.1, solver="cayley-sgd"), "lr"),
    (dict(dtype=torch.float64), "dtype"),
    (dict(method="hadamard-model"), "model"),
])
def test_resume_refuses_a_partial_checkpoint_of_another_run(tmp_path, change, named):
    path = _interrupted_partial(planted_outlier_model(**SMALL), tmp_path)
    before = path.read_bytes()
    kw = dict(steps=8, progress=False, checkpoint=path, checkpoint_every=2, resume=True)
    model = planted_outlier_model(**SMALL)
    if change.get("method") == "hadamard-model":  # another model: different weights, same shapes
        model = planted_outlier_model(**{**SMALL, "seed": SMALL["seed"] + 1})
        change = {}
    with pytest.raises(ValueError, match=named) as e:
        rotate_model(model, "optrot", **{**kw, **change})
    assert "different run" in str(e.value)
    assert path.read_bytes() == before  # a refused resume leaves the file alone


def test_cli_resume_refusals_exit_2_and_name_the_difference(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    partial = out.with_name(out.name + ".partial.safetensors")
    model = planted_outlier_model(**SMALL)
    # the checkpoint of an interrupted CLI-equivalent run (same defaults as `orthoopt rotate`)
    import orthoopt.cli.rotate_cmd as cmd

    real = cmd.rotate_model

    def interrupted(*a, callback=None, **kw):
        def cb(phase, step, loss, rots):
            if phase == "R1" and step == 4:
                raise KeyboardInterrupt
        return real(*a, callback=cb, **kw)

    args = ["rotate", str(model_dir), "--out", str(out), "--steps", "8", "--checkpoint-every", "2", "--quiet"]
    cmd.rotate_model = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            main(args)
    finally:
        cmd.rotate_model = real
    assert partial.is_file()
    capsys.readouterr()
    for change, word in ((["--method", "random"], "method"), (["--solver", "radam"], "solver"), (["--seed", "3"], "seed"), (["--steps", "12"], "steps")):
        assert main([*args, "--resume", *change]) == 2
        err = capsys.readouterr().err
        assert "different run" in err and word in err, err
        assert not out.exists()
    # a file that is not a partial checkpoint of this format (e.g. a streamed run's) is refused too
    save_file({"R1": torch.eye(SMALL["hidden_size"])}, str(partial), metadata={"phase": "R1", "step": "2"})
    assert main([*args, "--resume"]) == 2
    assert "not an orthoopt partial checkpoint" in capsys.readouterr().err
    partial.write_bytes(b"garbage")
    assert main([*args, "--resume"]) == 2
    assert "cannot read the partial checkpoint" in capsys.readouterr().err
    del model


@pytest.mark.parametrize("name", sorted(set(SOLVERS) - {"procrustes"}))
def test_solver_state_dict_continues_bit_for_bit(name):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(192, 24, generator=g)
    W[:, [2, 11]] *= 15
    objective = FourthPower([WeightBlock(W, "R1", "in"), WeightBlock(torch.randn(40, 8, generator=g), "R2", "in")],
                            normalize=True)
    start = initial_rotations({"R1": 24, "R2": 8}, "hadamard", seed=1)
    a = make_solver(name)
    a.init(start)
    for _ in range(5):
        a.step(objective)
    state = a.state_dict()
    json.dumps(state["meta"])  # JSON-able
    b = make_solver(name)
    b.load_state_dict({"tensors": {k: v.clone() for k, v in state["tensors"].items()}, "meta": state["meta"]})
    for _ in range(6):
        la, lb = a.step(objective), b.step(objective)
        assert la == lb
    for k in start:
        assert torch.equal(a.rotations[k], b.rotations[k])
    assert (a.num_steps, a.num_evaluations) == (b.num_steps, b.num_evaluations)
    other = make_solver(name, **({"memory": 3} if name == "cayley-lbfgs" else {"ortho_tol": 1e-3}))
    with pytest.raises(ValueError, match="other settings"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="solver"):
        make_solver("procrustes").load_state_dict(state)
