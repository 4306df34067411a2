"""A run that cannot fit says so before it starts (issue 23): the estimated peak against the available
memory, exit 2 naming what to pass instead, ``--force`` to run anyway. The limit is set low with
``ORTHOOPT_MEMORY_LIMIT``, never by exhausting memory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from orthoopt.testing import save_planted
from orthoopt.models.footprint import Checkpoint, eval_estimate, quantize_estimate, rotate_estimate
from orthoopt.cli import main
from orthoopt.utils import memory
from orthoopt.utils.memory import LIMIT_ENV, available_memory, parse_size

from helpers import run_error, sample_text_file

TINY = dict(hidden_size=64, num_layers=6, num_heads=4, num_kv_heads=2, intermediate_size=128)  # streaming pays off


@pytest.fixture(scope="module")
def bf16(tmp_path_factory) -> Path:
    return save_planted(tmp_path_factory.mktemp("mem") / "bf16", dtype=torch.bfloat16, **TINY)


def between(a: int, b: int) -> str:
    """A limit strictly between two estimates, as ORTHOOPT_MEMORY_LIMIT."""
    lo, hi = sorted((a, b))
    assert lo < hi
    return str((lo + hi) // 2)


def test_parse_size_and_the_smallest_source_wins(monkeypatch):
    assert parse_size("8G") == 8 << 30 and parse_size("512M") == 512 << 20 and parse_size("1.5K") == 1536
    assert parse_size("4GiB") == 4 << 30 and parse_size("123") == 123
    with pytest.raises(ValueError, match=LIMIT_ENV):
        parse_size("lots")
    monkeypatch.setenv(LIMIT_ENV, "1M")
    assert available_memory() == (1 << 20, f"{LIMIT_ENV}=1M")
    monkeypatch.setenv(LIMIT_ENV, "1000T")  # above MemAvailable: the machine's figure wins
    _, source = available_memory()
    assert source != f"{LIMIT_ENV}=1000T"


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_the_cgroup_limit_is_read(tmp_path, version):
    root, cg = tmp_path / "sys", tmp_path / "cgroup"
    if version == "v2":
        (root / "grp").mkdir(parents=True)
        (root / "grp" / "memory.max").write_text("3000000\n")
        (root / "grp" / "memory.current").write_text("1000000\n")
        cg.write_text("0::/grp\n")
    else:
        (root / "memory" / "grp").mkdir(parents=True)
        (root / "memory" / "grp" / "memory.limit_in_bytes").write_text("5000000\n")
        (root / "memory" / "grp" / "memory.usage_in_bytes").write_text("1000000\n")
        cg.write_text("4:memory:/grp\n1:cpu:/\n")
    assert memory._cgroup_free(root, cg) == (2000000 if version == "v2" else 4000000)
    (root / "x").mkdir()
    (root / "x" / "memory.max").write_text("max\n")  # v2 without a limit
    cg.write_text("0::/x\n")
    assert memory._cgroup_free(root, cg) is None


def test_estimates_grow_with_the_model_and_streaming_is_smaller(bf16):
    ck = Checkpoint.read(bf16)
    files = sum(f.stat().st_size for f in bf16.glob("*.safetensors"))
    assert 0.9 * files < ck.stored_bytes <= files  # the data, without the headers
    assert ck.num_layers == 6 and ck.hidden == 64
    mem_bf16 = rotate_estimate(ck, torch.bfloat16, streamed=False).total
    assert rotate_estimate(ck, torch.float32, streamed=False).total > mem_bf16
    assert rotate_estimate(ck, torch.bfloat16, streamed=True).total < mem_bf16
    rows = 2048 * ck.hidden * 4 * 2 * ck.num_layers  # a streamed data method keeps its R1 rows resident
    assert rotate_estimate(ck, torch.bfloat16, streamed=True, calib_tokens=2048).total >= \
        rotate_estimate(ck, torch.bfloat16, streamed=True).total + rows
    assert quantize_estimate(ck, torch.bfloat16, "gptq", 128, 2048).total > quantize_estimate(ck, torch.bfloat16, "rtn").total


def test_rotate_in_memory_is_refused_naming_streamed(bf16, tmp_path, capsys, monkeypatch):
    ck = Checkpoint.read(bf16)
    inmem = rotate_estimate(ck, torch.bfloat16, streamed=False, can_stream=True)
    streamed = rotate_estimate(ck, torch.bfloat16, streamed=True)
    monkeypatch.setenv(LIMIT_ENV, between(inmem.total, streamed.total))
    import orthoopt.cli.rotate_cmd as rotate_cmd

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the memory check")

    monkeypatch.setattr(rotate_cmd, "load_default_or", no_load)
    out = tmp_path / "out"
    err = run_error(capsys, ["rotate", str(bf16), "--out", str(out), "--method", "hadamard", "--no-progress"])
    assert "estimated peak memory" in err and f"{LIMIT_ENV}=" in err and "--streamed (estimated" in err
    assert "--force" in err and err.count("\n") == 1
    assert not out.exists()
    monkeypatch.undo()
    monkeypatch.setenv(LIMIT_ENV, between(inmem.total, streamed.total))
    assert main(["rotate", str(bf16), "--out", str(out), "--method", "hadamard", "--streamed", "--no-progress"]) == 0
    assert main(["rotate", str(bf16), "--out", str(tmp_path / "forced"), "--method", "hadamard", "--force",
                 "--no-progress"]) == 0


def test_quantize_and_eval_are_refused_naming_the_smaller_dtype(bf16, tmp_path, capsys, monkeypatch):
    ck = Checkpoint.read(bf16)
    q32, q16 = (quantize_estimate(ck, dt, "rtn").total for dt in (torch.float32, torch.bfloat16))
    monkeypatch.setenv(LIMIT_ENV, between(q32, q16))
    err = run_error(capsys, ["quantize", str(bf16), "--out", str(tmp_path / "q"), "--dtype", "float32", "--no-progress"])
    assert "--dtype bfloat16 (estimated" in err and "float32 model" in err
    assert not (tmp_path / "q").exists()
    assert main(["quantize", str(bf16), "--out", str(tmp_path / "q"), "--no-progress"]) == 0  # auto: bf16 fits
    text = sample_text_file(tmp_path / "t.txt")
    e32, e16 = (eval_estimate(ck, dt, 32).total for dt in (torch.float32, torch.bfloat16))
    monkeypatch.setenv(LIMIT_ENV, between(e32, e16))
    err = run_error(capsys, ["eval", str(bf16), "--text", str(text), "--seq-len", "32", "--dtype", "float32",
                             "--no-progress"])
    assert "--dtype bfloat16 (estimated" in err


def test_nothing_fits_says_so(bf16, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(LIMIT_ENV, "1M")
    err = run_error(capsys, ["rotate", str(bf16), "--out", str(tmp_path / "o"), "--method", "hadamard", "--streamed",
                             "--no-progress"])
    assert "estimated peak memory" in err and "or --force to run anyway" in err


def test_the_peak_rss_is_the_process_own_not_its_parent(tmp_path):
    """peak_rss_bytes reads VmHWM: a small child of a large process reports its own peak, where
    getrusage's ru_maxrss (carried across execve on Linux) reports at least the parent's."""
    import subprocess
    import sys

    from orthoopt.utils.memory import peak_rss_bytes

    status = tmp_path / "status"
    status.write_text("Name:\tpython\nVmPeak:\t  99999 kB\nVmHWM:\t    1234 kB\nVmRSS:\t  1000 kB\n")
    assert peak_rss_bytes(status) == 1234 * 1024
    from orthoopt.utils.memory import memory_status

    status.write_text("Name:\tpython\nVmHWM:\t    1234 kB\nRssAnon:\t  7 kB\nRssFile:\t 9 kB\nThreads:\t3\n")
    assert memory_status(status) == {"VmHWM": 1234 * 1024, "RssAnon": 7 * 1024, "RssFile": 9 * 1024}
    assert memory_status(tmp_path / "missing") == {}
    assert peak_rss_bytes(tmp_path / "missing") > 0  # getrusage where /proc is not there
    ballast = bytearray(400 << 20)  # this process now holds 400 MiB more than the child will
    ballast[:: 4096] = b"\1" * len(ballast[:: 4096])
    code = ("import resource; from orthoopt.utils.memory import peak_rss_bytes; "
            "print(peak_rss_bytes(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)")
    own, maxrss = map(int, subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                          check=True).stdout.split())
    parent = peak_rss_bytes()
    assert parent > 400 << 20 and own < 200 << 20, (own, parent)
    del ballast
    assert maxrss >= own  # what the old reading gave: never less than the process's own peak
