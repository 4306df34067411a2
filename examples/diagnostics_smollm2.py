"""Make the SmolLM2-135M images of ``docs/diagnostics.md``: the real model before and after rotation.

Three series, all from ``smollm2-135m`` (fetched into the orthoopt cache on first use):

* ``original``: the checkpoint as stored (RMSNorm gains separate from the linears);
* ``norm-fused``: the RMSNorm gains folded into the linears that read them, no rotation
  (``orthoopt rotate --method identity``): the same function, but each gain now scales a weight column;
* ``hadamard``: norm-fused, then random Hadamard ``R1`` (576) and ``R2`` (64 per layer), QuaRot-style
  (``orthoopt rotate --method hadamard``).

They are measured by ``orthoopt.diagnostics.compare.diagnose_models`` (what ``orthoopt diagnose``
runs), with the first ``--calib-tokens`` tokens of WikiText-2 test for the activation plots (0: weights
only). The PNGs are copied into ``--out`` as ``smollm2_<plot>.png`` (8-bit palette, small) and a
Markdown table of the overall numbers is printed.

Usage (from the repository root; 37 min on a shared 2-core machine under load, see docs/diagnostics.md)::

    python examples/diagnostics_smollm2.py [--out docs/img] [--block layers.10.mlp.gate_proj]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from diagnostics_images import MAX_PNG_BYTES, markdown_table, to_palette_png  # noqa: E402

from orthoopt.models import load_model, load_tokenizer, save_rotated  # noqa: E402
from orthoopt.diagnostics.compare import diagnose_models  # noqa: E402
from orthoopt.config import RotateConfig  # noqa: E402
from orthoopt.pipeline import rotate_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CALIB = REPO.parent / "shared" / "data" / "wikitext2-test.txt"
MODEL = "smollm2-135m"


def weights_table(summary: dict) -> str:
    """The overall weight numbers, one row per model (for a run without calibration text)."""
    lines = ["| model | mean mu | max mu | mean excess kurtosis | W4 RTN error |", "|---|---|---|---|---|"]
    for m in summary["models"]:
        o = m["overall"]
        lines.append(f"| {m['label']} | {o['incoherence_mean']:.2f} | {o['incoherence_max']:.2f} | "
                     f"{o['excess_kurtosis_mean']:.2f} | {o['rtn_error']:.4f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "img", help="image folder (default docs/img)")
    parser.add_argument("--block", default="layers.10.mlp.gate_proj",
                        help="weight block of the histogram and the per-channel max |W| plot")
    parser.add_argument("--calib", type=Path, default=DEFAULT_CALIB, help="calibration text (WikiText-2 test)")
    parser.add_argument("--calib-tokens", type=int, default=1024, help="calibration tokens (0: weights only)")
    parser.add_argument("--seed", type=int, default=0, help="Hadamard sign seed (default 0)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    progress = not args.no_progress
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    with tempfile.TemporaryDirectory(prefix="orthoopt-diag-smollm2-") as tmp:
        tmp = Path(tmp)
        paths = [MODEL]
        tokenizer = load_tokenizer(MODEL)
        for label, method in (("norm-fused", "identity"), ("hadamard", "hadamard")):
            model = load_model(MODEL)
            result = rotate_model(model, RotateConfig(method, seed=args.seed), progress=progress)
            paths.append(save_rotated(model, tokenizer, tmp / label, result.rotations, result.report))
            del model
        calib = args.calib if args.calib_tokens > 0 else None
        summary = diagnose_models(paths, tmp / "diagnose", labels=["original", "norm-fused", "hadamard"],
                                  calib=calib, calib_tokens=max(args.calib_tokens, 1), block=args.block,
                                  progress=progress)
        pngs = {f"smollm2_{name}": tmp / "diagnose" / name for name in summary["plots"] if name.endswith(".png")}
        written = [to_palette_png(src, args.out / name) for name, src in pngs.items()]

    for p in written:
        size = p.stat().st_size
        flag = "  <-- over 200 KB" if size > MAX_PNG_BYTES else ""
        print(f"{p} {size / 1000:.0f} KB{flag}")
    print(f"block: {summary['block']}; activation module: {summary['act_module']}; "
          f"{time.perf_counter() - start:.0f} s")
    print(markdown_table(summary) if calib else weights_table(summary))
    for m in summary["models"]:
        blk = next(b for b in m["weights"]["blocks"] if b["name"] == summary["block"])
        print(f"{m['label']}: {summary['block']} max |w| {blk['max_abs']:.4g}, incoherence {blk['incoherence']:.2f}, "
              f"W4 RTN error {blk['rtn_error']:.4f}")


if __name__ == "__main__":
    torch.set_num_threads(max(1, torch.get_num_threads()))
    main()
