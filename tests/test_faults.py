"""Fault injection (issue 20): the promises of docs/guarantees.md under kills, a full disk, concurrent
writers, hostile inputs, bad numbers and load, each against real processes where it matters.

The killed and concurrent runs are real processes forked from this one (``orthoopt.cli.main`` in a
child with its own pid, stdout and stderr: what ``python -m orthoopt`` runs, without its ~10 s of
imports per process on a loaded 2-core machine). A kill point is deterministic: the child pauses at a
named place (a solver step through the pipeline's callback, a function of the final write) and says so
with a file; the test then signals it. Nothing in the library is changed for this.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import resource
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from orthoopt.cli import build_parser, main

from test_resume import _partial_meta, model_dir  # noqa: F401  (model_dir: a fixture)
from test_safety import ENV, _command_argv, copy_model, digest, run_error, text, tiny  # noqa: F401  (fixtures)

STEPS = ["--steps", "40", "--checkpoint-every", "5"]


# ------------------------------------------------------------------------- forked CLI processes
def _pause_here(marker: Path) -> None:
    """Say "paused" (create ``marker``) and wait for ``marker.go`` (or a signal)."""
    marker.write_text(str(os.getpid()))
    go = marker.with_suffix(".go")
    deadline = time.monotonic() + 300
    while not go.exists():
        if time.monotonic() > deadline:
            os._exit(99)  # never left waiting
        time.sleep(0.005)


def _install_pause(pause: tuple, marker: Path) -> None:
    """``("step", phase, step)``: pause in the rotate pipeline's callback at that solver step;
    ``("after", "module:function")``: pause right after that function returns (for
    ``orthoopt.utils.atomic:follow_umask`` only when it was given a folder: every file of an output is
    in its temporary folder, before the rename)."""
    import importlib

    if pause[0] == "step":
        import orthoopt.cli.rotate_cmd as cmd

        real_rotate, (phase, step) = cmd.rotate_model, pause[1:]

        def rotate_model(*a, callback=None, **kw):
            def cb(p, s, loss, rots):
                if (p, s) == (phase, step):
                    _pause_here(marker)
                return bool(callback(p, s, loss, rots)) if callback is not None else False
            return real_rotate(*a, callback=cb, **kw)

        cmd.rotate_model = rotate_model
        return
    module_name, name = pause[1].split(":")
    module = importlib.import_module(module_name)
    real = getattr(module, name)

    def paused(*a, **kw):
        result = real(*a, **kw)
        if name != "follow_umask" or Path(a[0]).is_dir():
            _pause_here(marker)
        return result

    setattr(module, name, paused)


class Child:
    """``orthoopt ARGV`` in a forked process: ``pid``, ``wait()``, ``stdout`` / ``stderr`` after it ends."""

    def __init__(self, tmp: Path, argv: list[str], pause: tuple | None = None, name: str = "child"):
        self.argv, self.logs = [str(a) for a in argv], tmp / f"{name}.{time.monotonic_ns()}"
        self.marker, self.code = self.logs.with_suffix(".paused"), None
        self.pid = os.fork()
        if self.pid == 0:  # the child: never returns
            code = 1
            try:
                for fd, suffix in ((1, ".out"), (2, ".err")):
                    os.dup2(os.open(str(self.logs) + suffix, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
                sys.stdout, sys.stderr = open(1, "w", closefd=False), open(2, "w", closefd=False)
                signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C: KeyboardInterrupt
                torch.set_num_threads(1)
                import orthoopt.diagnostics

                # rotate's loss plots: 3.5 s of matplotlib per run, not under test here (tests/test_rotate.py)
                orthoopt.diagnostics.plot_solve_history = lambda *a, **k: None
                if pause is not None:
                    _install_pause(pause, self.marker)
                code = main(self.argv)
            except KeyboardInterrupt:
                traceback.print_exc()  # as the interpreter does, then its exit status for SIGINT
                code = 130
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)

    def _text(self, suffix: str) -> str:
        return Path(str(self.logs) + suffix).read_text(errors="replace")

    @property
    def stdout(self) -> str:
        return self._text(".out")

    @property
    def stderr(self) -> str:
        return self._text(".err")

    def poll(self) -> int | None:
        if self.code is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.code = os.waitstatus_to_exitcode(status)
        return self.code

    def wait(self, timeout: float = 300) -> int:
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() > deadline:
                self.kill(signal.SIGKILL)
                pytest.fail(f"orthoopt {' '.join(self.argv)} took more than {timeout} s")
            time.sleep(0.01)
        return self.code

    def wait_paused(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not self.marker.exists():
            if self.poll() is not None:
                pytest.fail(f"the run ended (exit {self.code}) before its pause point: {self.stderr[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"no pause within {timeout} s")
            time.sleep(0.005)

    def go(self) -> None:
        self.marker.with_suffix(".go").write_text("")

    def kill(self, sig: int) -> int:
        if self.poll() is None:
            os.kill(self.pid, sig)
        return self.wait()


@pytest.fixture(scope="module", autouse=True)
def warm(tiny):  # noqa: F811
    """Load a model here once, so that the forked children start with every lazy import done."""
    from orthoopt.models import load_model, load_tokenizer

    load_model(tiny), load_tokenizer(tiny)


@pytest.fixture
def spawn(tmp_path):
    """``spawn(argv, pause=None) -> Child``; every child still running at the end is killed."""
    children: list[Child] = []

    def start(argv, pause=None) -> Child:
        children.append(Child(tmp_path, argv, pause, name=f"child{len(children)}"))
        return children[-1]

    yield start
    for c in children:
        if c.poll() is None:
            c.kill(signal.SIGKILL)


def ok(child: Child) -> Child:
    assert child.wait() == 0, child.stderr[-3000:]
    return child


SIGNALS = [pytest.param(signal.SIGKILL, id="SIGKILL"),
           pytest.param(signal.SIGINT, id="SIGINT", marks=pytest.mark.slow)]  # Ctrl-C: the cleanup runs


def expected_status(sig: int) -> int:
    return -signal.SIGKILL if sig == signal.SIGKILL else 130


def litter(parent: Path, out: Path) -> list[str]:
    """The temporaries of output ``out`` in ``parent`` (``.OUT.<pid>@<host>...tmp``)."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{out.name}."))


def assert_only_the_killed_runs_temporary(parent: Path, out: Path, child: Child, sig: int) -> None:
    """A SIGINT cleans up after itself; a SIGKILL may leave one temporary, named by its pid."""
    left = litter(parent, out)
    if sig == signal.SIGINT:
        assert left == [], left
    else:
        assert len(left) <= 1 and all(re.match(rf"\.{out.name}\.{child.pid}@", n) for n in left), left


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("orthoopt/*.safetensors")):
        out.update({f"{f.name}:{k}": v for k, v in load_file(str(f)).items()})
    return out


def assert_same_tensors(got: Path, want: Path) -> None:
    a, b = tensors(got), tensors(want)
    assert set(a) == set(b) and a
    for k in b:
        assert torch.equal(a[k], b[k]), f"{k} differs"


# ------------------------------------------------------------------------------ 1. kills of rotate
KILL_POINTS = {
    "during-R1": ("step", "R1", 12),  # the partial holds R1 after 10 steps (mid-phase solver state)
    "during-R2": ("step", "R2", 12),  # R1 fused, layer 0's R2 after 10 steps (R2 is one unit per layer)
    "right-after-R1": ("step", "R2", 0),  # the partial is the R1/R2 boundary: layer 0's R2 not begun
    "during-the-final-write": ("after", "orthoopt.models.io:save_file"),  # weights written, no report.json yet
}


@pytest.fixture(scope="module")
def rotate_reference(model_dir, tmp_path_factory) -> Path:  # noqa: F811
    """An uninterrupted run (in a forked process too, so the same code path as the resumed ones)."""
    tmp = tmp_path_factory.mktemp("ref")
    child = Child(tmp, ["rotate", model_dir, "--out", tmp / "ref", *STEPS, "--quiet", "--json"])
    ok(child)
    return tmp / "ref"


@pytest.mark.parametrize("sig", SIGNALS)
@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_a_killed_rotate_leaves_no_output_and_resumes_bit_identically(point, sig, model_dir, rotate_reference,  # noqa: F811
                                                                      tmp_path, spawn):
    before = digest(model_dir)
    out = tmp_path / "runs" / "rot"
    out.parent.mkdir()
    partial = out.with_name("rot.partial.safetensors")
    argv = ["rotate", model_dir, "--out", out, *STEPS, "--quiet", "--json"]
    child = spawn(argv, pause=KILL_POINTS[point])
    child.wait_paused()
    assert child.kill(sig) == expected_status(sig)
    assert not out.exists()  # no half-written output
    assert digest(model_dir) == before  # the input is unchanged
    assert_only_the_killed_runs_temporary(out.parent, out, child, sig)
    meta = _partial_meta(partial)  # the last partial checkpoint is whole
    last = f"R2.{json.loads((Path(model_dir) / 'config.json').read_text())['num_hidden_layers'] - 1}"
    want = {"during-R1": ("R1", "10"), "during-R2": ("R2.0", "10"), "right-after-R1": ("R2.0", "0"),
            "during-the-final-write": (last, "40")}[point]
    assert (meta["phase"], meta["step"]) == want

    resumed = ok(spawn([*argv, "--resume"]))
    report = json.loads(resumed.stdout)
    assert report["resumed"]["phase"] == want[0]
    assert_same_tensors(out, rotate_reference)  # rotations and every weight, torch.equal
    ref_report = json.loads((rotate_reference / "report.json").read_text())
    for p in ("R1", "R2"):
        assert report["loss"][p]["curve"] == ref_report["loss"][p]["curve"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["rot"]  # partial and temporaries gone
    assert digest(model_dir) == before


@pytest.mark.slow
def test_a_real_interpreter_interrupted_by_sigint_cleans_up(model_dir, tmp_path):  # noqa: F811
    """A Ctrl-C of ``python -m orthoopt`` itself (its own SIGINT handling, no fork), sent once the
    partial checkpoint shows R1 under way (observed from outside): no output, no temporary, a whole
    partial checkpoint."""
    out = tmp_path / "rot"
    partial = out.with_name("rot.partial.safetensors")
    argv = [sys.executable, "-m", "orthoopt", "rotate", str(model_dir), "--out", str(out), "--steps", "200",
            "--checkpoint-every", "5", "--quiet"]
    env = {**ENV, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not ((meta := _partial_meta(partial)) and meta.get("phase") == "R1" and int(meta["step"]) > 0):
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "no R1 checkpoint"
            time.sleep(0.005)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGINT, err[-3000:]  # Python's own: KeyboardInterrupt, then death by SIGINT
    assert "KeyboardInterrupt" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rot.partial.safetensors"]  # no output, no temporary
    assert _partial_meta(partial)["phase"] in ("R1", "R2")  # whole, for --resume (tested above)


# ------------------------------------------------------------------- 2. kills of quantize, diagnose
@pytest.mark.parametrize("command, sig", [  # diagnose's SIGINT would take quantize's atomic_dir path
    pytest.param("quantize", signal.SIGKILL, id="quantize-SIGKILL"),
    pytest.param("quantize", signal.SIGINT, id="quantize-SIGINT", marks=pytest.mark.slow),
    pytest.param("diagnose", signal.SIGKILL, id="diagnose-SIGKILL")])
def test_a_kill_during_the_final_write_keeps_the_previous_output(command, sig, tiny, tmp_path, spawn):  # noqa: F811
    before = digest(tiny)
    out = tmp_path / "runs" / "o"
    flag = {"quantize": "--wbits", "diagnose": "--bits"}[command]
    first, second = [flag, "4"], [flag, "3"]
    argv = [command, tiny, "--out", out, "--no-progress"]
    ok(spawn([*argv, *first]))
    previous = digest(out)
    child = spawn([*argv, *second], pause=("after", "orthoopt.utils.atomic:follow_umask"))
    child.wait_paused()  # every file of the new output is in its temporary folder, not yet renamed
    assert len(litter(out.parent, out)) == 1
    assert child.kill(sig) == expected_status(sig)
    assert digest(out) == previous  # the previous output, whole and untouched
    assert digest(tiny) == before
    assert_only_the_killed_runs_temporary(out.parent, out, child, sig)
    if command == "quantize":  # the next run replaces it and removes the litter
        ok(spawn([*argv, *second]))
        assert sorted(p.name for p in out.parent.iterdir()) == ["o"] and digest(out) != previous


# --------------------------------------------------------------------------------- 3. a full disk
@pytest.fixture
def small_disk(tmp_path):
    """A 300 KiB tmpfs (the tiny model's weights alone are 420 KiB), or skip."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(disk)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


@pytest.mark.parametrize("command", ["rotate", "quantize", "diagnose"])
def test_a_full_disk_is_a_clean_error_leaving_nothing_behind(command, tiny, text, small_disk, capsys):  # noqa: F811
    before = digest(tiny)
    out = small_disk / "out"
    argv = {"rotate": ["rotate", str(tiny), "--out", str(out), "--steps", "6", "--checkpoint-every", "2"],
            # orthoopt's format: its float weights overflow the disk (the default, packed 4-bit weights, fit)
            "quantize": ["quantize", str(tiny), "--out", str(out), "--format", "orthoopt"],
            "diagnose": ["diagnose", str(tiny), "--out", str(out)]}[command]
    if command == "diagnose":  # its plots and summary are smaller: leave it about 40 KiB
        (small_disk / "filler").write_bytes(b"x" * 260 * 1024)
    if command != "diagnose":  # past the disk check (which refuses these up front: tests/test_disk_check.py)
        argv.append("--force")
    err = run_error(capsys, [*argv, "--no-progress"])  # exit 2, one line, no traceback
    assert "No space left on device" in err and f"--out {out} was left as it was" in err
    assert not out.exists() and digest(tiny) == before
    left = [p.name for p in small_disk.iterdir() if p.name != "filler"]
    # no temporaries; rotate keeps its last whole partial checkpoint (free space, then --resume)
    assert left in ([], ["out.partial.safetensors"]) if command == "rotate" else left == [], left
    if left:
        assert _partial_meta(small_disk / left[0])["phase"] in ("R1", "R2")


# ------------------------------------------------------------------- 4. two writers of one output
@pytest.mark.parametrize("command", ["quantize", "rotate"])
def test_two_processes_writing_one_out_one_wins_whole_the_other_exits_2(command, tiny, tmp_path, spawn):  # noqa: F811
    out = tmp_path / "o"
    extra = {"quantize": (["--wbits", "4"], ["--wbits", "3"]),
             "rotate": (["--method", "hadamard", "--seed", "1"], ["--method", "hadamard", "--seed", "2"])}[command]
    argv = [command, tiny, "--out", out, "--no-progress"]
    alone = tmp_path / "alone"  # what the first run writes when it runs alone
    ok(spawn([command, tiny, "--out", alone, "--no-progress", *extra[0]]))
    first = spawn([*argv, *extra[0]], pause=("after", "orthoopt.utils.atomic:follow_umask"))
    first.wait_paused()  # its output is complete in its temporary folder, not yet renamed
    second = spawn([*argv, *extra[1]])
    assert second.wait() == 2
    assert second.stderr.strip().splitlines() == [
        f"orthoopt {command}: error: --out {out} is being written by another orthoopt process (pid {first.pid}); "
        f"wait for it to finish or choose another --out"]
    first.go()
    ok(first)
    assert_same_tensors(out, alone)  # the winner's output, whole
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".o.")) == []


@pytest.mark.slow
def test_two_racing_writers_never_mix_an_output(tiny, tmp_path, spawn):  # noqa: F811
    """Unsynchronised: each either finishes or exits 2 with the message; the folder is one run's whole."""
    refs = {bits: tmp_path / f"alone{bits}" for bits in ("3", "4")}
    for bits, ref in refs.items():
        ok(spawn(["quantize", tiny, "--out", ref, "--no-progress", "--wbits", bits]))
    out = tmp_path / "o"
    racers = [spawn(["quantize", tiny, "--out", out, "--no-progress", "--wbits", bits]) for bits in refs]
    codes = [r.wait() for r in racers]
    assert 0 in codes and set(codes) <= {0, 2}
    for r, code in zip(racers, codes):
        assert code == 0 or "is being written by another orthoopt process" in r.stderr
    bits = str(json.loads((out / "quant.json").read_text())["wbits"])
    assert_same_tensors(out, refs[bits])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".o.")]


# ---------------------------------------------------------------------------- 5. hostile inputs
READERS = ["rotate", "rotate --streamed", "quantize", "eval", "diagnose"]  # the model-reading commands

@pytest.mark.parametrize("length", [2**64 - 1, 100 * 1024 * 1024 + 1, "size-7"])
def test_a_safetensors_header_length_beyond_the_file_is_refused(length, tiny, tmp_path, capsys):  # noqa: F811
    m = copy_model(tiny, tmp_path / "m")
    f = m / "model.safetensors"
    data = f.read_bytes()
    n = len(data) - 7 if length == "size-7" else length  # one byte more than the file holds after the length
    f.write_bytes(n.to_bytes(8, "little") + data[8:])
    err = run_error(capsys, ["quantize", str(m), "--out", str(tmp_path / "o"), "--no-progress"])
    assert str(f) in err and f"header claims {n} bytes" in err
    assert not (tmp_path / "o").exists()


ABSURD = [  # (field, value, words of the message)
    ("hidden_size", 10**9, "hidden_size is 1000000000 but the weights have 64"),
    ("num_hidden_layers", 0, "num_hidden_layers must be a positive integer, got 0"),
    ("num_hidden_layers", 10**6, "num_hidden_layers is 1000000 but the weights have 2"),
    ("vocab_size", 1, "vocab_size is 1 but the weights have 259"),
    ("intermediate_size", -5, "intermediate_size must be a positive integer, got -5"),
]


@pytest.mark.parametrize("command", READERS)
@pytest.mark.parametrize("field, value, words", ABSURD, ids=[f"{f}={v}" for f, v, _ in ABSURD])
def test_absurd_config_sizes_are_refused_before_allocating(field, value, words, command, tiny, text, tmp_path,  # noqa: F811
                                                          capsys):
    m = copy_model(tiny, tmp_path / "m")
    config = json.loads((m / "config.json").read_text())
    config[field] = value
    (m / "config.json").write_text(json.dumps(config))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    began = time.monotonic()
    err = run_error(capsys, [*_command_argv(command, m, tmp_path / "o", text), "--no-progress"])
    assert str(m / "config.json") in err and words in err
    assert time.monotonic() - began < 20
    # the model (hidden 1e9 x vocab 259 floats: 1 TB) was never allocated
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 200 * 1024  # KiB
    assert not (tmp_path / "o").exists()


class _Marker:
    """Unpickling this creates the file ``path`` (what a malicious pickle would do, harmlessly)."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("command", READERS)
def test_a_pickle_checkpoint_is_never_unpickled(command, tiny, text, tmp_path, capsys):  # noqa: F811
    marker = tmp_path / "UNPICKLED"
    m = copy_model(tiny, tmp_path / "m")
    weights = load_file(str(m / "model.safetensors"))
    (m / "model.safetensors").unlink()
    with open(m / "pytorch_model.bin", "wb") as f:
        pickle.dump({"marker": _Marker(str(marker)), **weights}, f)
    pickle.loads(pickle.dumps(_Marker(str(tmp_path / "probe"))))  # the marker works
    assert (tmp_path / "probe").exists()
    err = run_error(capsys, [*_command_argv(command, m, tmp_path / "o", text), "--no-progress"])
    assert "pytorch_model.bin" in err and "pickle" in err
    assert not marker.exists()
    # a --init rotations file that is a pickle is not unpickled either
    (m / "pytorch_model.bin").rename(tmp_path / "init.bin")
    err = run_error(capsys, ["rotate", str(tiny), "--out", str(tmp_path / "o"), "--method", "optrot", "--init",
                             str(tmp_path / "init.bin"), "--no-progress"])
    assert "damaged" in err and not marker.exists()


EVIL = """open({marker!r}, "w").write("ran")
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
class EvilConfig(LlamaConfig):
    model_type = "evil"
class EvilModel(LlamaForCausalLM):
    config_class = EvilConfig
class EvilTokenizer(PreTrainedTokenizerFast):
    pass
"""


@pytest.mark.parametrize("model_type", ["llama", "evil"])
@pytest.mark.parametrize("command", READERS)
def test_custom_code_in_a_model_folder_is_never_run(command, model_type, tiny, text, tmp_path, capsys,  # noqa: F811
                                                   monkeypatch):
    monkeypatch.setattr("builtins.input", lambda *a: "y")  # a user who would answer yes to "run the custom code?"
    marker = tmp_path / "RAN"
    m = copy_model(tiny, tmp_path / "m")
    (m / "evil.py").write_text(EVIL.format(marker=str(marker)))
    config = json.loads((m / "config.json").read_text())
    config.update(model_type=model_type, auto_map={"AutoConfig": "evil.EvilConfig",
                                                   "AutoModelForCausalLM": "evil.EvilModel"})
    (m / "config.json").write_text(json.dumps(config))
    tok = json.loads((m / "tokenizer_config.json").read_text())
    tok["auto_map"] = {"AutoTokenizer": [None, "evil.EvilTokenizer"]}
    (m / "tokenizer_config.json").write_text(json.dumps(tok))
    argv = [*_command_argv(command, m, tmp_path / "o", text), "--no-progress"]
    argv += {"eval": ["--seq-len", "32", "--max-tokens", "256"], "rotate --streamed": ["--steps", "2"]}.get(command, [])
    if model_type == "llama":  # transformers has the code: the folder's own is ignored
        capsys.readouterr()
        assert main(argv) == 0, capsys.readouterr().err
    else:  # only the folder's code could build it: refused, without asking
        err = run_error(capsys, argv)
        assert "custom code" in err or "evil" in err, err
    assert not marker.exists()


# ------------------------------------------------------------------------ 6. every numeric flag
BAD_VALUES = ["0", "-1", "nan", "inf", "-inf", "1e300", str(10**30)]
HUGE = {"1e300", str(10**30)}  # huge: for an integer flag past int64, for a float one finite

# The values of BAD_VALUES each flag legitimately accepts (every other one must be refused, exit 2,
# naming the flag). A flag missing here accepts none of them; a new numeric flag is covered at once.
VALID = {
    ("rotate", "--steps"): {"0"},  # 0 steps: the initial rotations (docs/solvers.md)
    ("rotate", "--seed"): {"0"},
    ("rotate", "--checkpoint-every"): {"0"},  # 0: no partial checkpoints
    ("rotate", "--lr"): HUGE,  # a huge step is the user's choice (cayley-sgd runs; L-BFGS takes no --lr)
    ("quantize", "--seed"): {"0"},
    ("quantize", "--steps"): {"0"},  # quantize --rotate takes rotate's options (from the same definitions)
    ("quantize", "--checkpoint-every"): {"0"},
    ("quantize", "--lr"): HUGE,
    ("quantize", "--damp"): {"0"},
    ("quantize", "--group-size"): {"-1"},  # -1: one scale per output channel (AutoGPTQ's convention)  # no dampening: GPTQ says so if the Hessian is then singular
    ("eval", "--num-fewshot"): {"0"},  # zero-shot
    ("eval", "--limit"): HUGE,  # more examples than any task has: all of them
    ("diagnose", "--k"): HUGE,  # no entry is an outlier
    ("diagnose", "--massive-ratio"): HUGE,  # no token is massive
    ("diagnose", "--massive-min-abs"): {"0", *HUGE},  # 0 is the default
    ("compare", "--seed"): {"0"},
    ("distributed_rotate", "--steps"): {"0"},
    ("distributed_rotate", "--seed"): {"0"},
    ("distributed_rotate", "--checkpoint-every"): {"0"},
    ("distributed_rotate", "--lr"): HUGE,
}


def numeric_flags() -> list[tuple[str, str]]:
    """``(command, flag)`` of every option of every parser that takes a number: an ``int`` / ``float``
    type or one of :mod:`orthoopt.utils.argtypes`'s."""
    from orthoopt import distributed_rotate

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    parsers = {**sub.choices, "distributed_rotate": distributed_rotate.build_parser()}
    found = []
    for command, parser in parsers.items():
        for action in parser._actions:
            kind = getattr(action.type, "__name__", None)
            if action.option_strings and (action.type in (int, float) or kind in ("integer", "real")):
                found.append((command, action.option_strings[0]))
    return found


class _Reached(Exception):
    """Raised where the command would load the model: the value passed every check before the work."""


def test_every_numeric_flag_refuses_bad_values_naming_the_flag(tiny, text, tmp_path, capsys, monkeypatch):  # noqa: F811
    flags = numeric_flags()
    assert len(flags) >= 40 and ("quantize", "--damp") in flags and ("eval", "--limit") in flags
    assert set(VALID) <= set(flags)  # the table names real flags
    base = {"rotate": ["rotate", str(tiny), "--out", str(tmp_path / "r"), "--no-progress"],
            "quantize": ["quantize", str(tiny), "--out", str(tmp_path / "q"), "--rotate", "optrot", "--no-progress"],
            "eval": ["eval", str(tiny), "--text", str(text), "--no-progress"],
            "diagnose": ["diagnose", str(tiny), "--out", str(tmp_path / "d"), "--no-progress"],
            "compare": ["compare", str(tiny), str(tiny), "--text", str(text), "--no-progress"]}

    def reached(*a, **k):
        raise _Reached
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(reached))
    from orthoopt import distributed_rotate

    wrong = []
    for command, flag in flags:
        for value in BAD_VALUES:
            valid = value in VALID.get((command, flag), set())
            if command == "distributed_rotate":  # its main needs a process group: the parser alone
                try:
                    distributed_rotate.build_parser().parse_args([str(tiny), "--out", "x", flag, value])
                    code, err = 0, ""
                except SystemExit as e:
                    code, err = e.code, capsys.readouterr().err
                if (code == 0) != valid or (not valid and f"argument {flag}" not in err):
                    wrong.append(f"{command} {flag} {value}: exit {code} {err.strip()[-200:]}")
                continue
            capsys.readouterr()
            try:
                code = main([*base[command], flag, value])
            except _Reached:
                code = None
            err = capsys.readouterr().err
            if valid and code is not None:
                wrong.append(f"{command} {flag} {value}: refused although valid: {err.strip()}")
            elif not valid and not (code == 2 and err.startswith(f"orthoopt {command}: error: argument {flag}: ")
                                    and err.count("\n") == 1):
                wrong.append(f"{command} {flag} {value}: exit {code}, {err.strip()[-300:]!r}")
    assert not wrong, "\n".join(wrong)


def test_a_size_no_machine_holds_is_a_clean_error(tiny, text, tmp_path, capsys):  # noqa: F811
    """Counts within int64 pass the parser; one whose allocation fails is exit 2, not a traceback."""
    argv = ["quantize", str(tiny), "--out", str(tmp_path / "q"), "--method", "gptq", "--calib", str(text),
            "--nsamples", str(10**15), "--seq-len", "32", "--no-progress"]
    # refused by the memory estimate before loading ...
    err = run_error(capsys, argv)
    assert "estimated peak memory" in err and err.count("\n") == 1
    assert not (tmp_path / "q").exists()
    # ... and, past it with --force, the failed allocation itself is the same clean exit 2
    err = run_error(capsys, [*argv, "--force"])
    assert "not enough memory" in err and err.count("\n") == 1
    assert not (tmp_path / "q").exists()


def test_the_edge_values_the_table_accepts_do_run(tiny, text, tmp_path, capsys, monkeypatch):  # noqa: F811
    import orthoopt.diagnostics

    monkeypatch.setattr(orthoopt.diagnostics, "plot_solve_history", lambda *a, **k: None)  # rotate's loss plots
    capsys.readouterr()
    for argv in (["rotate", str(tiny), "--out", str(tmp_path / "r"), "--steps", "0", "--checkpoint-every", "0",
                  "--seed", "0"],
                 ["rotate", str(tiny), "--out", str(tmp_path / "r2"), "--steps", "3", "--solver", "cayley-sgd", "--lr",
                  "1e300"]):  # (diagnose's huge --k / --massive-*: thresholds nothing exceeds; 6 s of plots, not run)
        assert main([*argv, "--no-progress"]) == 0, capsys.readouterr().err


# ------------------------------------------------------------------------------- 7. under load
@pytest.mark.slow
def test_ten_concurrent_quantize_and_eval_processes_match_their_runs_alone(tiny, text, tmp_path, spawn):  # noqa: F811
    gptq = ["--method", "gptq", "--calib", text, "--nsamples", "8", "--seq-len", "64"]
    jobs = [["quantize", tiny, "--out", "{o}", "--wbits", str(b), "--no-progress", *(gptq if b in (3, 4) else [])]
            for b in (2, 3, 4, 8, 16)]
    jobs += [["eval", tiny, "--text", text, "--seq-len", str(s), "--max-tokens", "512", "--json", "--no-progress"]
             for s in (16, 32, 48, 64, 128)]

    def start(i: int, where: str):
        return spawn([str(a).format(o=tmp_path / f"{where}{i}") for a in jobs[i]])

    alone = [ok(start(i, "alone")) for i in range(len(jobs))]  # one after the other
    together = [start(i, "together") for i in range(len(jobs))]  # all at once
    for i, child in enumerate(together):
        ok(child)
        if jobs[i][0] == "quantize":
            assert_same_tensors(tmp_path / f"together{i}", tmp_path / f"alone{i}")
        else:
            a, b = json.loads(alone[i].stdout), json.loads(child.stdout)
            assert (a["nll"], a["ppl"], a["tokens"]) == (b["nll"], b["ppl"], b["tokens"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
