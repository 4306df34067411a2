"""Smoke test of benchmarks/model_size.py (issue 23, item 4): the shapes are the published configs, the
tiny ``--quick`` shape builds shard by shard in bfloat16, each command's argv is valid, a command is
measured in a subprocess (``/usr/bin/time -v`` and the getrusage fallback), and a full disk is refused."""

from __future__ import annotations

import json
import shutil
import sys
from collections import namedtuple
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import model_size  # noqa: E402

from orthoopt.models import load_model  # noqa: E402
from orthoopt.models.dtypes import checkpoint_dtype  # noqa: E402
from orthoopt.cli import build_parser  # noqa: E402


def test_the_shapes_have_the_published_parameter_counts():
    """Llama-3.2-1B 1,235,814,400 parameters, Llama-3.2-3B 3,212,749,824, Llama-3-8B 8,030,261,248 (the
    model cards' safetensors totals): the written-down configs are the real ones."""
    assert model_size.SHAPES["1b"].numel() == 1_235_814_400
    assert model_size.SHAPES["3b"].numel() == 3_212_749_824
    assert model_size.SHAPES["8b"].numel() == 8_030_261_248


def test_every_command_line_parses(tmp_path):
    parser = build_parser()
    for command in model_size.COMMANDS:
        argv = model_size.command_argv(command, tmp_path / "ck", tmp_path / "out", tmp_path / "t.txt", 2, 32, True)
        parser.parse_args(argv)


def test_quick_shape_builds_and_is_measured(tmp_path):
    shape = model_size.SHAPES["tiny"]
    ckpt = model_size.build_checkpoint(shape, tmp_path)
    assert checkpoint_dtype(ckpt) == torch.bfloat16
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == shape.num_hidden_layers + 2  # embedding, layers, final
    model = load_model(ckpt)
    assert model.dtype == torch.bfloat16 and sum(p.numel() for p in model.parameters()) == shape.numel()
    assert model_size.build_checkpoint(shape, tmp_path) == ckpt  # cached
    (rec,) = model_size.run_shape(shape, ["rotate-optrot-streamed"], tmp_path, 2, 32, False, progress=lambda _: None)
    assert rec.returncode == 0 and rec.peak_rss_bytes > 100 << 20 and rec.wall_s > 0, rec
    assert set(rec.evaluations) == {"R1", "R2"} and min(rec.evaluations.values()) >= 2  # from its report.json
    assert rec.measured_by == ("/usr/bin/time -v" if Path(model_size.TIME).is_file() else "getrusage(RUSAGE_CHILDREN)")
    assert rec.resident in (None, 1.0)  # --page-cache warm (the default): read first, all of it cached
    (rec,) = model_size.run_shape(shape, ["quantize-rtn"], tmp_path, 2, 32, False, use_time=False,
                                  progress=lambda _: None)
    assert rec.returncode == 0 and rec.peak_rss_bytes > 100 << 20 and rec.measured_by.startswith("getrusage")
    assert "| tiny |" in model_size.table([rec])
    (rec,) = model_size.run_shape(shape, ["quantize-rtn-streamed"], tmp_path, 2, 32, False, progress=lambda _: None)
    assert rec.returncode == 0 and rec.peak_rss_bytes > 100 << 20, rec
    assert {p.name for p in tmp_path.iterdir() if p.is_dir()} == {ckpt.name}  # the outputs are removed


def test_a_full_disk_is_refused_with_the_reason(tmp_path, monkeypatch):
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(1 << 40, 1 << 40, 1 << 30))
    with pytest.raises(SystemExit, match="needs 3[0-9.]+ GiB of free disk.*only 1.0 GiB free"):
        model_size.build_checkpoint(model_size.SHAPES["8b"], tmp_path)
    assert not model_size.checkpoint_dir(model_size.SHAPES["8b"], tmp_path).exists()


def test_time_v_report_is_parsed():
    report = "\tElapsed (wall clock) time (h:mm:ss or m:ss): 1:02.50\n\tMaximum resident set size (kbytes): 2048\n"
    assert model_size._parse_time_v(report) == (62.5, 2048 * 1024)
    report = "\tElapsed (wall clock) time (h:mm:ss or m:ss): 1:00:03\n\tMaximum resident set size (kbytes): 1\n"
    assert model_size._parse_time_v(report) == (3603.0, 1024)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the check would run")
def test_device_check_skips_cleanly_without_cuda(capsys):
    import device_check

    for device, says in (("cuda", "CUDA is not available"), ("cpu", "not a CUDA device")):
        assert device_check.main(["--device", device]) == 0
        out = capsys.readouterr().out
        assert out.startswith("device_check: skipped: ") and says in out


@pytest.mark.parametrize("method", [[], ["--method", "spinquant", "--steps", "1"]])
def test_device_check_runs_its_phases_on_the_cpu_when_allowed(tmp_path, capsys, method):
    """The default hadamard, and spinquant (its loss on calibration windows, the model where it is)."""
    import json

    import device_check

    out = tmp_path / "dc.json"
    assert device_check.main(["--device", "cpu", "--allow-cpu", "--shape", "tiny", "--windows", "2", "--seq-len", "16",
                              "--cache", str(tmp_path / "cache"), "--text", str(tmp_path / "absent.txt"),
                              "--json", str(out), *method]) == 0
    rec = json.loads(out.read_text())
    assert rec["method"] == (method[1] if method else "hadamard")
    assert [p["phase"] for p in rec["phases"]] == ["load", "rotate", "quantize-gptq", "eval"]
    assert all(p["seconds"] >= 0 and p["peak_rss_bytes"] > 0 and p["max_memory_allocated_bytes"] is None
               for p in rec["phases"])
    assert rec["dtype"] == "torch.bfloat16" and rec["ppl"] > 1
    assert (tmp_path / "cache" / "tiny-bf16" / "model_size.json").is_file()


def test_device_check_refuses_a_shape_and_a_model_together(capsys):
    import device_check

    with pytest.raises(SystemExit) as stop:
        device_check.main(["--shape", "tiny", "--model", "planted"])
    assert stop.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def _fs_type(path: Path) -> str:
    """The filesystem type of the mount holding ``path`` (``/proc/mounts``; "" where unknown)."""
    best, kind = "", ""
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            _, mount, fs, *_ = line.split()
            if str(path.resolve()).startswith(mount) and len(mount) > len(best):
                best, kind = mount, fs
    except OSError:
        pass
    return kind


def test_the_page_cache_share_is_read_warmed_and_evicted(tmp_path):
    """``warm`` leaves a file all in the page cache (``mincore``); ``evict`` drops it on a disk filesystem
    (a tmpfs file lives in memory and cannot be dropped); a checkpoint's files are its safetensors."""
    import _pagecache

    f = tmp_path / "model.safetensors"
    f.write_bytes(bytes(range(256)) * (16 << 12))  # 4 MiB
    (tmp_path / "config.json").write_text("{}")
    assert _pagecache.checkpoint_files(tmp_path) == [f]
    _pagecache.warm([f])
    share = _pagecache.resident_fraction([f])
    if share is None:
        pytest.skip("mincore is not available here")
    assert share == 1.0
    _pagecache.evict([f])
    if _fs_type(tmp_path) in ("tmpfs", "ramfs", "overlay"):
        pytest.skip(f"{tmp_path} is on {_fs_type(tmp_path)}: its pages are not dropped")
    assert _pagecache.resident_fraction([f]) < 0.5
    _pagecache.warm([f])
    assert _pagecache.resident_fraction([f]) == 1.0
    assert model_size.prepare_cache(tmp_path, "cold") < 0.5 and model_size.prepare_cache(tmp_path, "warm") == 1.0
    with pytest.raises(ValueError, match="page cache mode"):
        model_size.prepare_cache(tmp_path, "hot")
