"""An output that cannot fit on the disk of --out is refused before any work (issue 23): the bytes the
run writes (the output; a streamed OptRot+'s weighted blocks beside it) against the free space, exit 2
naming both, nothing written; ``--force`` runs anyway. The free space is set low with
``ORTHOOPT_DISK_LIMIT``, never by filling a disk."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from orthoopt.cli import main
from orthoopt.models.footprint import Checkpoint, disk_estimate
from orthoopt.testing import save_planted
from orthoopt.utils.disk import DISK_LIMIT_ENV, free_disk

from helpers import run_error, sample_text_file

TINY = dict(hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2, intermediate_size=96)


@pytest.fixture(scope="module")
def bf16(tmp_path_factory) -> Path:
    return save_planted(tmp_path_factory.mktemp("disk") / "bf16", dtype=torch.bfloat16, **TINY)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_free_disk_is_the_nearest_folder_or_the_limit(tmp_path, monkeypatch):
    monkeypatch.delenv(DISK_LIMIT_ENV, raising=False)
    free, where = free_disk(tmp_path / "not" / "yet" / "there")
    assert free == shutil.disk_usage(tmp_path).free or abs(free - shutil.disk_usage(tmp_path).free) < 1 << 26
    assert str(tmp_path) in where
    monkeypatch.setenv(DISK_LIMIT_ENV, "3M")
    assert free_disk(tmp_path / "x") == (3 << 20, f"{DISK_LIMIT_ENV}=3M")
    monkeypatch.setenv(DISK_LIMIT_ENV, "lots")
    with pytest.raises(ValueError, match=DISK_LIMIT_ENV):
        free_disk(tmp_path)


@pytest.mark.parametrize("argv", [["rotate", "--method", "hadamard", "--streamed"], ["rotate", "--method", "hadamard"],
                                  ["quantize", "--method", "rtn", "--wbits", "4", "--group-size", "32"]])
def test_an_output_larger_than_the_free_disk_is_refused_before_any_work(bf16, tmp_path, capsys, monkeypatch, argv):
    cmd, *rest = argv
    before = _files(bf16)
    need = sum(disk_estimate(Checkpoint.read(bf16), torch.bfloat16, rotations=cmd == "rotate").values())
    monkeypatch.setenv(DISK_LIMIT_ENV, str(need // 2))
    out = tmp_path / "out"
    err = run_error(capsys, [cmd, str(bf16), "--out", str(out), *rest, "--no-progress"])
    assert "would write about" in err and f"{DISK_LIMIT_ENV}=" in err and "--force" in err and err.count("\n") == 1
    assert not out.exists() and list(tmp_path.iterdir()) == []  # no temporary folder either
    assert _files(bf16) == before
    monkeypatch.setenv(DISK_LIMIT_ENV, str(need + (1 << 20)))  # the estimate fits: the run goes through
    assert main([cmd, str(bf16), "--out", str(out), *rest, "--no-progress"]) == 0
    written = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    assert written <= need  # the estimate bounds what was written (the output, side files included)
    monkeypatch.setenv(DISK_LIMIT_ENV, "1K")
    assert main([cmd, str(bf16), "--out", str(tmp_path / "forced"), *rest, "--no-progress", "--force"]) == 0


def test_a_streamed_optrot_plus_counts_its_weighted_blocks(bf16, tmp_path, capsys, monkeypatch):
    """The scratch estimate bounds the weighted blocks the run writes, and a disk that holds the output
    but not the blocks refuses the run."""
    import orthoopt.streaming.rotate as streaming_rotate

    ck = Checkpoint.read(bf16)
    plain = disk_estimate(ck, torch.bfloat16, rotations=True)
    parts = disk_estimate(ck, torch.bfloat16, rotations=True, scratch=True)
    assert parts["output"] == plain["output"] and parts["weighted blocks (scratch)"] > 0
    text = sample_text_file(tmp_path / "calib.txt")
    common = ["--method", "optrot+", "--streamed", "--calib", str(text), "--calib-tokens", "64", "--steps", "1",
              "--no-progress"]
    monkeypatch.setenv(DISK_LIMIT_ENV, str(sum(plain.values()) + (1 << 10)))
    err = run_error(capsys, ["rotate", str(bf16), "--out", str(tmp_path / "o"), *common])
    assert "weighted blocks (scratch)" in err and not (tmp_path / "o").exists()

    sizes: list[int] = []
    save = streaming_rotate.save_blocks

    def measured(path, blocks):
        save(path, blocks)
        sizes.append(Path(path).stat().st_size)

    monkeypatch.setattr(streaming_rotate, "save_blocks", measured)
    monkeypatch.delenv(DISK_LIMIT_ENV)
    assert main(["rotate", str(bf16), "--out", str(tmp_path / "o"), *common]) == 0
    assert sizes and sum(sizes) <= parts["weighted blocks (scratch)"]


def test_quantize_streamed_with_rotate_counts_the_rotated_checkpoint(bf16):
    """``quantize --rotate M --streamed`` writes the rotated checkpoint before quantizing it (and, for
    OptRot+, the weighted blocks), so the estimate holds two models and the scratch; in memory, one."""
    from orthoopt.cli.quantize_cmd import _disk
    from orthoopt.config import RotateConfig

    ck = Checkpoint.read(bf16)
    one = disk_estimate(ck, torch.bfloat16, rotations=True)
    assert _disk(ck, torch.bfloat16, RotateConfig("optrot"), streamed=False) == one
    assert _disk(ck, torch.bfloat16, None, streamed=True) == disk_estimate(ck, torch.bfloat16)
    two = _disk(ck, torch.bfloat16, RotateConfig("optrot"), streamed=True)
    assert two["rotated checkpoint (until quantized)"] == one["output"] and "weighted blocks (scratch)" not in two
    assert "weighted blocks (scratch)" in _disk(ck, torch.bfloat16, RotateConfig("optrot+"), streamed=True)
