"""Fault and misuse cases (issue 10, "data safety"): no command destroys its input, every bad input is a
clean exit-2 error before any work, interrupted saves leave no permanent litter. docs/guarantees.md
names the test behind each promise."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from orthoopt.adapters import DecoderAdapter
from orthoopt.testing import planted_outlier_model, save_planted
from orthoopt.cli import main
from orthoopt.objectives import FourthPower, HessianWeighted, WeightBlock
from orthoopt.utils import atomic
from orthoopt.utils.atomic import atomic_dir, atomic_path, remove_stale, stale_temporaries
from orthoopt.utils.paths import overlap, prepare_output

TINY = dict(arch="llama", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, seed=3)
WIKI = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2-test.txt"
ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


# --------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return save_planted(tmp_path_factory.mktemp("m") / "tiny", **TINY)


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    body = WIKI.read_text(encoding="utf-8")[:6000] if WIKI.is_file() else "".join(
        f" Sentence {i} is about rotations , outliers and quantization . \n" for i in range(100))
    path = tmp_path_factory.mktemp("t") / "text.txt"
    path.write_text(body, encoding="utf-8")
    return path


def digest(path: Path) -> str:
    """md5 over every file under ``path`` (names and bytes), or of the file itself."""
    h = hashlib.md5()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        h.update(str(f.relative_to(path) if f != path else f.name).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def run_error(capsys, argv: list[str]) -> str:
    """Run the CLI in process; it must exit 2 with one ``orthoopt CMD: error:`` message (no traceback)."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"orthoopt {argv[0]}: error: "), err
    return err


@pytest.fixture
def no_loading(monkeypatch):
    """Any attempt to load a model fails the test: the check must come before any work."""
    def boom(cls, *a, **k):
        raise AssertionError("a model was loaded before the check")
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(boom))


# ----------------------------------------------------------------- 1. outputs never overlap inputs
def _layout(case: str, tmp: Path, tiny: Path, text: Path) -> tuple[list[str], list[Path]]:
    """(argv, inputs whose md5 must not change) for one overlapping-path misuse."""
    m = copy_model(tiny, tmp / "P" / "m")
    calib = tmp / "calib.txt"
    shutil.copy(text, calib)
    if case == "rotate M --out M":
        return ["rotate", str(m), "--out", str(m), "--method", "hadamard"], [m]
    if case == "rotate P/m --out P":
        return ["rotate", str(m), "--out", str(m.parent), "--method", "hadamard"], [m]
    if case == "rotate M --out M/sub":
        return ["rotate", str(m), "--out", str(m / "sub"), "--method", "hadamard"], [m]
    if case == "rotate --out symlink to M":
        (tmp / "link").symlink_to(m, target_is_directory=True)
        return ["rotate", str(m), "--out", str(tmp / "link"), "--method", "hadamard"], [m]
    if case == "rotate via symlinked MODEL_DIR":
        (tmp / "link").symlink_to(m, target_is_directory=True)
        return ["rotate", str(tmp / "link"), "--out", str(m), "--method", "hadamard"], [m]
    if case == "rotate --out holds --calib":
        shutil.move(calib, m.parent / "calib.txt")
        return ["rotate", str(m), "--out", str(m.parent), "--method", "kurtosis", "--calib",
                str(m.parent / "calib.txt")], [m.parent]
    if case == "rotate --init is the partial checkpoint":
        init = tmp / "out.partial.safetensors"
        save_file({"R1": torch.eye(64)}, str(init))
        return ["rotate", str(m), "--out", str(tmp / "out"), "--method", "optrot", "--init", str(init)], [init]
    if case == "rotate --out holds --init":
        init = tmp / "runs" / "rotations.safetensors"
        init.parent.mkdir()
        save_file({"R1": torch.eye(64)}, str(init))
        (init.parent / "report.json").write_text("{}")
        return ["rotate", str(m), "--out", str(init.parent), "--method", "optrot", "--init", str(init)], [init]
    if case == "quantize M --out M":
        return ["quantize", str(m), "--out", str(m), "--method", "rtn"], [m]
    if case == "quantize P/m --out P":
        return ["quantize", str(m), "--out", str(m.parent), "--method", "rtn"], [m]
    if case == "quantize --out is --calib":
        return ["quantize", str(m), "--out", str(calib), "--method", "gptq", "--calib", str(calib)], [calib]
    if case == "diagnose --out holds a model":
        return ["diagnose", str(tiny), str(m), "--out", str(m.parent)], [m]
    if case == "diagnose --out holds --calib":
        out = tmp / "d"
        out.mkdir()
        (out / "summary.json").write_text("{}")
        shutil.move(calib, out / "calib.txt")
        return ["diagnose", str(m), "--out", str(out), "--calib", str(out / "calib.txt")], [out]
    if case == "rotate --out is a cache blob folder":
        # a Hugging Face cache snapshot: the folder's files are symlinks into blobs/
        blobs = tmp / "cache" / "blobs"
        snap = tmp / "cache" / "snapshots" / "abc"
        blobs.mkdir(parents=True)
        snap.mkdir(parents=True)
        for f in m.iterdir():
            shutil.copy(f, blobs / f.name)
            (snap / f.name).symlink_to(blobs / f.name)
        return ["rotate", str(snap), "--out", str(blobs), "--method", "hadamard"], [blobs]
    raise AssertionError(case)


OVERLAPS = ["rotate M --out M", "rotate P/m --out P", "rotate M --out M/sub", "rotate --out symlink to M",
            "rotate via symlinked MODEL_DIR", "rotate --out holds --calib", "rotate --init is the partial checkpoint",
            "rotate --out holds --init", "quantize M --out M", "quantize P/m --out P", "quantize --out is --calib",
            "diagnose --out holds a model", "diagnose --out holds --calib", "rotate --out is a cache blob folder"]


@pytest.mark.parametrize("case", OVERLAPS)
def test_an_output_overlapping_an_input_is_refused_before_any_work(case, tmp_path, tiny, text, capsys, no_loading):
    argv, inputs = _layout(case, tmp_path, tiny, text)
    before = [digest(p) for p in inputs]
    err = run_error(capsys, [*argv, "--no-progress"])
    assert re.search(r"(is|contains|is inside) the input", err), err
    assert [digest(p) for p in inputs] == before
    assert all(p.exists() for p in inputs)


def test_an_existing_folder_that_is_not_a_previous_output_is_not_replaced(tmp_path, tiny, capsys, no_loading):
    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    before = digest(precious)
    for argv in (["rotate", str(tiny), "--out", str(precious), "--method", "hadamard"],
                 ["quantize", str(tiny), "--out", str(precious), "--method", "rtn"],
                 ["diagnose", str(tiny), "--out", str(precious)]):
        assert "not a previous output" in run_error(capsys, [*argv, "--no-progress"])
    assert digest(precious) == before


def test_overlap_helper_relations(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    assert overlap(tmp_path / "a", tmp_path / "a") == "is"
    assert overlap(tmp_path / "a", tmp_path / "a" / "b") == "contains"
    assert overlap(tmp_path / "a" / "b" / "new", tmp_path / "a") == "is inside"
    assert overlap(tmp_path / "a" / "bb", tmp_path / "a" / "b") is None  # a prefix is not a parent
    assert overlap(tmp_path / "a.partial.safetensors", tmp_path / "a") is None


# -------------------------------------------------------------------- 3. non-finite weights refused
@pytest.fixture(scope="module")
def nan_model(tiny, tmp_path_factory) -> Path:
    path = copy_model(tiny, tmp_path_factory.mktemp("nan") / "nan")
    tensors = load_file(str(path / "model.safetensors"))
    tensors["model.layers.1.mlp.down_proj.weight"][3, 5] = float("nan")
    tensors["model.layers.1.mlp.down_proj.weight"][4, 5] = float("inf")
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


@pytest.mark.parametrize("argv", [
    ["rotate", "{m}", "--out", "{o}", "--method", "hadamard"],
    ["rotate", "{m}", "--out", "{o}", "--method", "optrot", "--steps", "2", "--streamed"],
    ["quantize", "{m}", "--out", "{o}", "--method", "rtn"],
    ["eval", "{m}", "--text", "{t}", "--seq-len", "32", "--max-tokens", "256"],
    ["diagnose", "{m}", "--out", "{o}"],
], ids=lambda a: " ".join(a[:1] + a[4:6]))
def test_non_finite_weights_are_refused_with_the_tensor_name(argv, nan_model, text, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [a.format(m=nan_model, o=out, t=text) for a in argv]
    err = run_error(capsys, [*argv, "--no-progress"])
    assert "model.layers.1.mlp.down_proj.weight" in err and "non-finite" in err and "1 NaN, 1 inf" in err
    assert not out.exists()


def test_quantize_model_api_refuses_non_finite_and_meta_weights():
    from orthoopt.quant import quantize_model
    from orthoopt.quant.config import QuantizeConfig

    model = planted_outlier_model(**TINY)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"layers\.0\.self_attn\.q_proj\.weight.*non-finite"):
        quantize_model(model, QuantizeConfig("rtn", wbits=4))
    with pytest.raises(ValueError, match="meta device"):
        quantize_model(planted_outlier_model(**TINY).to("meta"), QuantizeConfig("rtn", wbits=4))


def strict_json(text: str) -> dict:
    def refuse(token):
        raise AssertionError(f"not strict JSON: {token}")
    return json.loads(text, parse_constant=refuse)


def test_eval_json_is_strict_when_perplexity_overflows(tiny, text, tmp_path, capsys):
    big = copy_model(tiny, tmp_path / "big")
    tensors = load_file(str(big / "model.safetensors"))
    tensors["model.norm.weight"] *= 1e6  # finite weights, logits ~1e6: exp(nll) overflows float64
    save_file(tensors, str(big / "model.safetensors"), metadata={"format": "pt"})
    capsys.readouterr()
    assert main(["eval", str(big), "--text", str(text), "--seq-len", "32", "--max-tokens", "256", "--json",
                 "--no-progress"]) == 0
    record = strict_json(capsys.readouterr().out)
    assert record["ppl"] is None and record["nll"] > 709.8 and "overflows" in record["error"]


def test_eval_json_is_strict_when_the_loss_is_nan(tiny, text, capsys, monkeypatch):
    import orthoopt.cli.eval_cmd as eval_cmd

    monkeypatch.setattr(eval_cmd, "perplexity", lambda *a, **k: {"ppl": math.nan, "nll": math.nan, "tokens": 31,
                                                                  "windows": 1, "seq_len": 32,
                                                                  "window_nll": [math.nan]})
    capsys.readouterr()
    assert main(["eval", str(tiny), "--text", str(text), "--json", "--no-progress"]) == 0
    record = strict_json(capsys.readouterr().out)
    assert record["ppl"] is None and record["nll"] is None and "not finite" in record["error"]
    assert record["window_nll"] == [None]


# ------------------------------------------------------------ 4. damaged safetensors: clean exit 2
def _damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncated":
        data = data[:-1000]
    elif how == "header":
        data[10:20] = b"\x00" * 10
    elif how == "length":
        data[:8] = (len(data) * 4).to_bytes(8, "little")
    elif how == "empty":
        data = bytearray()
    elif how == "offsets":  # a header entry pointing past the data
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + n])
        name = next(k for k in header if k != "__metadata__")
        header[name]["data_offsets"][1] += 4
        raw = json.dumps(header).encode()
        data = bytearray(len(raw).to_bytes(8, "little")) + raw + data[8 + n:]
    path.write_bytes(bytes(data))


DAMAGES = ["truncated", "header", "length", "empty", "offsets"]


def _command_argv(command: str, m, out, text) -> list[str]:
    """The argv of one of the five model-reading commands on model folder ``m`` writing ``out``."""
    return {
        "rotate": ["rotate", str(m), "--out", str(out), "--method", "hadamard"],
        "rotate --streamed": ["rotate", str(m), "--out", str(out), "--method", "optrot", "--streamed"],
        "quantize": ["quantize", str(m), "--out", str(out), "--method", "rtn"],
        "eval": ["eval", str(m), "--text", str(text)],
        "diagnose": ["diagnose", str(m), "--out", str(out)],
    }[command]


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("command", ["rotate", "rotate --streamed", "quantize", "eval", "diagnose"])
def test_a_damaged_model_file_is_a_clean_error_naming_it(command, how, tiny, text, tmp_path, capsys):
    m = copy_model(tiny, tmp_path / "m")
    _damage(m / "model.safetensors", how)
    out = tmp_path / "out"
    argv = _command_argv(command, m, out, text)
    err = run_error(capsys, [*argv, "--no-progress"])
    assert str(m / "model.safetensors") in err and "damaged" in err
    assert not out.exists()


@pytest.mark.parametrize("how", DAMAGES)
def test_damaged_init_and_resume_files_are_clean_errors(how, tiny, tmp_path, capsys):
    init = tmp_path / "init.safetensors"
    save_file({"R1": torch.eye(64)}, str(init))
    _damage(init, how)
    err = run_error(capsys, ["rotate", str(tiny), "--out", str(tmp_path / "a"), "--method", "optrot", "--steps", "1",
                             "--init", str(init), "--no-progress"])
    assert str(init) in err and "damaged" in err
    partial = tmp_path / "b.partial.safetensors"
    save_file({"R1": torch.eye(64)}, str(partial), metadata={"phase": "R1", "step": "1"})
    _damage(partial, how)
    err = run_error(capsys, ["rotate", str(tiny), "--out", str(tmp_path / "b"), "--method", "optrot", "--steps", "1",
                             "--resume", "--no-progress"])
    assert str(partial) in err and "damaged" in err


def test_a_damaged_file_gives_no_traceback_from_the_real_command(tiny, tmp_path):
    m = copy_model(tiny, tmp_path / "m")
    _damage(m / "model.safetensors", "truncated")
    proc = subprocess.run([sys.executable, "-m", "orthoopt", "quantize", str(m), "--out", str(tmp_path / "o"),
                           "--method", "rtn", "--no-progress"], capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "damaged" in proc.stderr and str(m / "model.safetensors") in proc.stderr


# --------------------------------------------------------------- 5. unwritable outputs, before work
@pytest.mark.parametrize("command", ["rotate", "quantize", "diagnose"])
def test_an_output_under_a_file_is_refused_before_any_work(command, tiny, tmp_path, capsys, no_loading):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    for out, words in ((blocker / "out", "is a file"), (blocker, "not a folder")):
        argv = [command, str(tiny), "--out", str(out)] + {"rotate": ["--method", "hadamard"],
                                                          "quantize": ["--method", "rtn"], "diagnose": []}[command]
        assert words in run_error(capsys, [*argv, "--no-progress"])
    assert blocker.read_text() == "x"


def _read_only_parent(tmp_path: Path) -> Path:
    """A folder this process cannot create entries in, or skip."""
    if os.geteuid() != 0:
        parent = tmp_path / "ro"
        parent.mkdir()
        parent.chmod(0o555)
        return parent
    # root ignores permission bits: use a read-only file system if there is one
    for candidate in (Path("/sys"), Path("/proc/sys")):
        try:
            os.rmdir(tempfile.mkdtemp(dir=candidate))
        except OSError:
            if candidate.is_dir():
                return candidate
    pytest.skip("running as root with no read-only file system to write into")


@pytest.mark.parametrize("command", ["rotate", "quantize", "diagnose"])
def test_a_read_only_parent_is_refused_before_any_work(command, tiny, tmp_path, capsys, no_loading):
    parent = _read_only_parent(tmp_path)
    try:
        argv = [command, str(tiny), "--out", str(parent / "orthoopt-out")] + {
            "rotate": ["--method", "hadamard"], "quantize": ["--method", "rtn"], "diagnose": []}[command]
        assert "not writable" in run_error(capsys, [*argv, "--no-progress"])
    finally:
        if parent.is_relative_to(tmp_path):
            parent.chmod(0o755)


def test_prepare_output_leaves_nothing_behind(tmp_path):
    prepare_output(tmp_path / "new" / "deeper" / "out", {"MODEL_DIR": tmp_path / "model"})
    assert list(tmp_path.iterdir()) == []  # the probe is removed, nothing is created


# ------------------------------------------------------------------------ 6. litter after a kill
def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temporaries_of_dead_processes_are_removed_and_live_ones_kept(tmp_path):
    out = tmp_path / "out"
    host = atomic._HOST
    dead = _dead_pid()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = tmp_path / f".out.{dead}@{host}.abc123.tmp"
        live = tmp_path / f".out.{sleeper.pid}@{host}.def456.tmp"
        remote = tmp_path / f".out.{dead}@{host}x-other.ghi789.tmp"
        other_output = tmp_path / f".out2.{dead}@{host}.jkl012.tmp"
        for p in (stale, live, remote, other_output):
            p.mkdir()
            (p / "model.safetensors").write_bytes(b"x" * 100)
        stale_file = tmp_path / f".out.partial.safetensors.{dead}@{host}.mno345.tmp"
        stale_file.write_bytes(b"x")
        assert stale_temporaries(out) == [stale]
        with atomic_dir(out) as tmp:
            (tmp / "a").write_text("new")
        assert not stale.exists() and live.exists() and remote.exists() and other_output.exists()
        assert (out / "a").read_text() == "new"
        with atomic_path(tmp_path / "out.partial.safetensors") as tmp:
            tmp.write_bytes(b"p")
        assert not stale_file.exists()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_parked_previous_output_is_put_back_when_the_kill_fell_between_the_renames(tmp_path):
    out = tmp_path / "out"
    parked = tmp_path / f".out.{_dead_pid()}@{atomic._HOST}.old.tmp"
    parked.mkdir()
    (parked / "report.json").write_text("{}")
    assert remove_stale(out) == [parked]
    assert (out / "report.json").is_file() and not parked.exists()


DRIVER = """
import sys, time
import orthoopt.models.io as io
original = io.save_file
def slow_save(*args, **kwargs):          # the model weights are already in the temporary folder
    original(*args, **kwargs)
    print("SAVING", flush=True)
    time.sleep(120)
io.save_file = slow_save
from orthoopt.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_kill_9_during_the_final_save_keeps_the_old_output_and_the_next_run_cleans_up(tiny, tmp_path, capsys):
    out = tmp_path / "runs" / "rot"
    argv = ["rotate", str(tiny), "--out", str(out), "--method", "hadamard", "--no-progress"]
    assert main([*argv, "--seed", "1"]) == 0
    before = digest(out)
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, *argv, "--seed", "2"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=ENV)
    try:
        assert proc.stdout.readline().strip() == "SAVING"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=60)
    litter = [p for p in out.parent.iterdir() if p.name.startswith(".rot.")]
    assert [p.name for p in litter] == [p.name for p in litter if re.match(rf"\.rot\.{proc.pid}@", p.name)]
    assert len(litter) == 1 and (litter[0] / "model.safetensors").is_file()  # a whole model, left by the kill
    assert digest(out) == before  # the previous output is untouched
    assert main([*argv, "--seed", "2"]) == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["rot"]  # the next run removed the litter
    assert digest(out) != before


def test_written_files_follow_the_umask(tiny, tmp_path):
    old = os.umask(0o027)
    try:
        assert main(["rotate", str(tiny), "--out", str(tmp_path / "r"), "--method", "hadamard", "--no-progress"]) == 0
        assert main(["quantize", str(tiny), "--out", str(tmp_path / "q"), "--method", "rtn", "--no-progress"]) == 0
        with atomic_path(tmp_path / "x.safetensors") as tmp:
            save_file({"a": torch.zeros(2)}, str(tmp))  # safetensors itself writes 0600
    finally:
        os.umask(old)
    for f in [tmp_path / "r" / "model.safetensors", tmp_path / "r" / "orthoopt" / "rotations.safetensors",
              tmp_path / "q" / "model.safetensors", tmp_path / "x.safetensors"]:
        assert f.stat().st_mode & 0o777 == 0o640, f
    for d in (tmp_path / "r", tmp_path / "r" / "orthoopt"):
        assert d.stat().st_mode & 0o777 == 0o750, d


# ------------------------------------------------------------------------------- 7. smaller items
def test_calib_tokens_zero_is_an_error(tiny, text, tmp_path, capsys):
    err = run_error(capsys, ["rotate", str(tiny), "--out", str(tmp_path / "o"), "--method", "kurtosis",
                             "--calib", str(text), "--calib-tokens", "0", "--no-progress"])
    assert "--calib-tokens" in err


@pytest.mark.parametrize("argv", [
    ["rotate", "{m}", "--out", "{o}", "--method", "kurtosis", "--calib", "{t}", "--calib-tokens", "4096",
     "--calib-seq-len", "4096"],
    ["quantize", "{m}", "--out", "{o}", "--method", "gptq", "--calib", "{t}", "--seq-len", "4096"],
    ["eval", "{m}", "--text", "{t}", "--seq-len", "4096"],
    ["diagnose", "{m}", "--out", "{o}", "--calib", "{t}", "--seq-len", "4096"],
], ids=lambda a: a[0])
def test_windows_longer_than_the_context_are_refused(argv, tiny, text, tmp_path, capsys):
    argv = [a.format(m=tiny, o=tmp_path / "o", t=text) for a in argv]
    err = run_error(capsys, [*argv, "--no-progress"])
    assert "4096 is longer than the model's context of 2048" in err
    assert not (tmp_path / "o").exists()


def test_steps_below_the_steps_already_done_says_so(tiny, tmp_path, capsys, monkeypatch):
    import orthoopt.pipeline.output

    out = tmp_path / "o"

    def fail(*a, **k):
        raise KeyboardInterrupt  # "killed" after the last partial checkpoint, before the final save

    monkeypatch.setattr(orthoopt.pipeline.output, "write_run_files", fail)
    with pytest.raises(KeyboardInterrupt):
        main(["rotate", str(tiny), "--out", str(out), "--method", "optrot", "--rotations", "R1", "--steps", "6",
              "--checkpoint-every", "3", "--no-progress"])
    monkeypatch.undo()
    assert out.with_name("o.partial.safetensors").is_file()
    err = run_error(capsys, ["rotate", str(tiny), "--out", str(out), "--method", "optrot", "--rotations", "R1",
                             "--steps", "2", "--resume", "--no-progress"])
    assert "--steps 2" in err and "6" in err and "non-negative" not in err


def test_meta_tensors_are_clear_errors(tiny, tmp_path, capsys):
    from orthoopt.config import RotateConfig
    from orthoopt.pipeline import rotate_model

    meta = planted_outlier_model(**TINY).to("meta")
    with pytest.raises(ValueError, match="meta device"):
        DecoderAdapter(meta)
    with pytest.raises(ValueError, match="meta device"):
        FourthPower([WeightBlock(torch.empty(8, 8, device="meta"), "R1", "in", "w")])
    with pytest.raises(ValueError, match="meta"):
        rotate_model(planted_outlier_model(**TINY), RotateConfig("optrot", solve={"steps": 1}, compute={"device": "meta"}), progress=False)
    err = run_error(capsys, ["rotate", str(tiny), "--out", str(tmp_path / "o"), "--method", "optrot",
                             "--device", "meta", "--no-progress"])
    assert "meta" in err and "--device" in err
    assert not (tmp_path / "o").exists()


def test_a_text_that_is_not_utf8_names_the_file(tiny, tmp_path, capsys):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 au lait ".encode("latin-1") * 50)
    err = run_error(capsys, ["eval", str(tiny), "--text", str(bad), "--no-progress"])
    assert str(bad) in err and "UTF-8" in err


def test_hessian_weighted_without_blocks_names_itself():
    with pytest.raises(ValueError, match="^HessianWeighted needs at least one weight block"):
        HessianWeighted([], [])


def test_diagnose_models_of_different_depth_on_the_default_histogram_block(tiny, tmp_path, capsys):
    deeper = save_planted(tmp_path / "deeper", **{**TINY, "num_layers": 3, "seed": 4})
    tensors = load_file(str(deeper / "model.safetensors"))
    tensors["model.layers.2.mlp.down_proj.weight"][0, 0] = 1e3  # the most incoherent block is in layer 2
    save_file(tensors, str(deeper / "model.safetensors"), metadata={"format": "pt"})
    capsys.readouterr()
    assert main(["diagnose", str(deeper), str(tiny), "--out", str(tmp_path / "d"), "--json", "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert "layers.2." not in summary["block"], summary["block"]  # a block both models have
    assert [m["num_layers"] for m in summary["models"]] == [3, 2]


def test_non_finite_init_rotations_are_refused(tiny, tmp_path, capsys):
    init = tmp_path / "init.safetensors"
    R = torch.eye(64)
    R[0, 1] = float("nan")
    save_file({"R1": R}, str(init))
    err = run_error(capsys, ["rotate", str(tiny), "--out", str(tmp_path / "o"), "--method", "optrot", "--init",
                             str(init), "--no-progress"])
    assert str(init) in err and "'R1'" in err and "non-finite" in err


@pytest.mark.parametrize("command", ["rotate", "rotate --streamed", "quantize", "eval", "diagnose"])
def test_a_damaged_config_json_is_a_clean_error_naming_it(command, tiny, text, tmp_path, capsys):
    m = copy_model(tiny, tmp_path / "m")
    (m / "config.json").write_text('{"model_type": "llama", ')
    out = tmp_path / "out"
    argv = _command_argv(command, m, out, text)
    err = run_error(capsys, [*argv, "--no-progress"])
    assert "config.json" in err and str(m) in err
    assert not out.exists()


def test_every_test_named_in_the_guarantees_page_exists():
    page = (ROOT / "docs" / "guarantees.md").read_text(encoding="utf-8")
    named = set(re.findall(r"`(test_\w+)`", page))
    defined = {name for f in (ROOT / "tests").glob("test_*.py")  # most live here; a few in other test files
               for name in re.findall(r"^def (test_\w+)", f.read_text(encoding="utf-8"), re.M)}
    assert len(named) >= 20
    assert named <= defined, sorted(named - defined)


def test_the_finite_check_sums_a_narrow_tensor_chunk_by_chunk(monkeypatch):
    """A bf16/fp16 tensor wider than one chunk is summed through one float32 buffer (no whole-tensor
    float32 copy): the sum matches float64's, and a NaN or inf in the last, partial chunk is caught."""
    from orthoopt.core import checks

    monkeypatch.setattr(checks, "_CHUNK", 64)
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float16, torch.bfloat16):
        x = torch.randn(33, 7, generator=g).to(dtype)  # 231 elements: 3 full chunks and one of 39
        got = checks._sum(x, torch.float32)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), x.double().sum(), rtol=1e-5, atol=1e-5)
        checks.check_finite_tensor(x, "w")
        for bad in (float("nan"), float("inf")):
            y = x.clone()
            y[-1, -1] = bad
            with pytest.raises(ValueError, match=r"^w has 1 non-finite value\(s\) of 231"):
                checks.check_finite_tensor(y, "w")
    t = x[:, ::2]  # not contiguous: reshape copies, the sum is the same
    torch.testing.assert_close(checks._sum(t, torch.float32).double(), t.double().sum(), rtol=1e-5, atol=1e-5)


def test_large_blocks_go_back_to_the_os_on_glibc(monkeypatch):
    """The CLI fixes glibc's mmap threshold (orthoopt.utils.heap); a user's MALLOC_MMAP_THRESHOLD_ stands."""
    import platform

    from orthoopt.utils import heap

    monkeypatch.setenv(heap.ENV, "65536")
    assert heap.release_large_blocks() is False
    monkeypatch.delenv(heap.ENV)
    expected = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert heap.release_large_blocks() is expected


def test_the_finite_check_counts_exactly_and_passes_huge_finite_values():
    from orthoopt.core.checks import check_finite_tensor

    check_finite_tensor(torch.full((10,), 3e38), "huge")  # the fast path's sum overflows; the values are finite
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        x = torch.ones(100, dtype=dtype)
        x[[3, 7]] = float("nan")
        x[9], x[11] = float("inf"), -float("inf")  # +inf and -inf sum to NaN: still caught
        with pytest.raises(ValueError, match=r"^w has 4 non-finite value\(s\) of 100 \(2 NaN, 2 inf\)"):
            check_finite_tensor(x, "w")
