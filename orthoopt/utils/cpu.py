"""Whether this CPU computes bfloat16 natively, and the note a command prints when it does not.

PyTorch's CPU kernels for bfloat16 products are fast only with AVX512-BF16 or AMX; on an AVX2-only
CPU a bf16 ``nn.Linear`` ran at a seventh of float32 (21.5 against 154 GFLOP/s on 2 EPYC cores) and
``eval --streamed`` of a 1B-shaped bf16 checkpoint took 3.4 times as long as with ``--dtype float32``
(``docs/performance.md``, "Again on an AVX2 CPU"). :func:`bf16_note` says so once, on stderr, for the
commands that run the model's forward on the CPU in bfloat16; it changes nothing.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool | None:
    """True when the CPU flags name AVX512-BF16 or AMX-BF16, False when they name neither, None when
    they cannot be read (not Linux, or no x86 flags line)."""
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return any(f in flags for f in NATIVE_BF16_FLAGS)
    except OSError:
        return None
    return None


def bf16_note(command: str, dtype: torch.dtype, device: torch.device | str | None) -> str | None:
    """Print (and return) a one-line note when ``command`` will compute in bfloat16 on a CPU without
    native bf16 kernels, naming ``--dtype float32`` as the faster choice; None otherwise."""
    on_cpu = device is None or torch.device(device).type == "cpu"
    if dtype != torch.bfloat16 or not on_cpu or native_bf16() is not False:
        return None
    note = (f"{command}: note: this CPU has no native bfloat16 kernels (no AVX512-BF16 or AMX), so the bf16 "
            "forward is several times slower than --dtype float32 (which upcasts the weights it holds; with "
            "--streamed one layer at a time); docs/performance.md")
    print(note, file=sys.stderr)
    return note


__all__ = ["bf16_note", "native_bf16"]
