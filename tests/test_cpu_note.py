"""The note on CPUs without native bfloat16 kernels: read from the CPU flags, printed once by the
commands that run a bf16 forward on the CPU, never when the forward is float32 or on another device."""

from __future__ import annotations

import pytest
import torch

from orthoopt.cli import main
from orthoopt.testing import save_planted
from orthoopt.utils import cpu

from helpers import sample_text_file


def test_native_bf16_reads_the_flags(tmp_path):
    f = tmp_path / "cpuinfo"
    f.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n")
    assert cpu.native_bf16(f) is False
    f.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16\n")
    assert cpu.native_bf16(f) is True
    f.write_text("processor\t: 0\nflags\t\t: fpu avx2 amx_bf16 amx_tile\n")
    assert cpu.native_bf16(f) is True
    f.write_text("Hardware\t: some arm board\n")
    assert cpu.native_bf16(f) is None
    assert cpu.native_bf16(tmp_path / "missing") is None


def test_the_note_only_for_a_bf16_forward_on_a_cpu_without_native_kernels(monkeypatch, capsys):
    monkeypatch.setattr(cpu, "native_bf16", lambda: False)
    assert "--dtype float32" in cpu.bf16_note("orthoopt eval", torch.bfloat16, None)
    assert "no native bfloat16" in capsys.readouterr().err
    assert cpu.bf16_note("orthoopt eval", torch.bfloat16, "cpu") is not None
    assert cpu.bf16_note("orthoopt eval", torch.float32, None) is None
    assert cpu.bf16_note("orthoopt eval", torch.bfloat16, "cuda") is None
    for known in (True, None):
        monkeypatch.setattr(cpu, "native_bf16", lambda known=known: known)
        assert cpu.bf16_note("orthoopt eval", torch.bfloat16, None) is None


@pytest.mark.parametrize("dtype, noted", [([], True), (["--dtype", "float32"], False)])
def test_eval_of_a_bf16_checkpoint_notes_it(tmp_path, capsys, monkeypatch, dtype, noted):
    monkeypatch.setattr(cpu, "native_bf16", lambda: False)
    model = save_planted(tmp_path / "m", hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                         dtype=torch.bfloat16)
    text = sample_text_file(tmp_path / "t.txt")
    capsys.readouterr()
    assert main(["eval", str(model), "--text", str(text), "--seq-len", "32", "--max-tokens", "64",
                 "--no-progress", *dtype]) == 0
    assert ("no native bfloat16" in capsys.readouterr().err) is noted
