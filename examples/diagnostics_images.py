"""Make the images of ``docs/diagnostics.md`` from the planted-outlier model (hidden 512, 8 layers).

Three copies of ``planted_outlier_model()`` (seed 0), all with fused norms, so they differ only by
their rotations (``docs/conventions.md``):

* ``identity``: norms fused, no rotation;
* ``hadamard``: ``R1 = random_hadamard(512)`` and ``R2.i = random_hadamard(64)`` (QuaRot-style), fused
  with ``DecoderAdapter.apply_rotations``;
* ``optrot``: learned with ``orthoopt.pipeline.rotate_model(model, RotateConfig("optrot"))`` (OptRot's fourth-power
  objective, Cayley SGD from a random Hadamard start; R1, then R2 on the R1-rotated weights).

Each copy is saved to a temporary folder and all three are measured by
``orthoopt.diagnostics.compare.diagnose_models`` (what ``orthoopt diagnose`` runs) on the first 2048
tokens of WikiText-2 test. Its PNGs, and the OptRot loss curves (``plot_solve_history``), are copied
into ``--out`` with a ``diag_`` prefix, as 8-bit palette PNGs (smaller, same look); a Markdown table
of the overall numbers is printed.

Usage (from the repository root; about 5 minutes on 2 CPU cores, most of it the OptRot solve)::

    python examples/diagnostics_images.py [--out docs/img] [--steps 150]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from orthoopt.adapters import DecoderAdapter
from orthoopt.models import save_rotated
from orthoopt.testing import byte_tokenizer, planted_outlier_model
from orthoopt.diagnostics import plot_solve_history, save_figure
from orthoopt.diagnostics.compare import diagnose_models
from orthoopt.hadamard import random_hadamard
from orthoopt.config import RotateConfig
from orthoopt.pipeline import rotate_model
from orthoopt.utils.atomic import atomic_path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CALIB = REPO.parent / "shared" / "data" / "wikitext2-test.txt"
MAX_PNG_BYTES = 200_000
PALETTE_COLORS = 128


def hadamard_rotations(adapter: DecoderAdapter, seed: int) -> dict[str, torch.Tensor]:
    """``R1`` and every ``R2.i`` as random Hadamard matrices (float64), each with its own seed."""
    return {name: random_hadamard(n, seed=seed + i) for i, (name, n) in enumerate(adapter.rotation_dims().items())}


def build_models(folder: Path, steps: int, seed: int, progress: bool) -> tuple[list[Path], dict]:
    """Save the identity / hadamard / optrot copies into ``folder``; returns their paths and the
    OptRot solve results ``{phase: SolveResult}``."""
    tokenizer = byte_tokenizer()
    paths = []

    model = planted_outlier_model()
    DecoderAdapter(model).fuse_norms()
    paths.append(save_rotated(model, tokenizer, folder / "identity", {}, {"method": "identity"}))

    model = planted_outlier_model()
    adapter = DecoderAdapter(model)
    adapter.fuse_norms()
    rotations = hadamard_rotations(adapter, seed)
    adapter.apply_rotations(rotations)
    paths.append(save_rotated(model, tokenizer, folder / "hadamard", rotations, {"method": "hadamard"}))

    model = planted_outlier_model()
    result = rotate_model(model, RotateConfig("optrot", seed=seed, solve={"steps": steps}), progress=progress)
    paths.append(save_rotated(model, tokenizer, folder / "optrot", result.rotations, result.report))
    return paths, result.solves


def to_palette_png(src: Path, dst: Path) -> Path:
    """Copy a PNG as an 8-bit palette image (:data:`PALETTE_COLORS` colours, no dithering): the plots
    use few colours, so it looks the same and keeps noisy images (the heat map) under 200 KB."""
    from PIL import Image  # matplotlib's own dependency

    with Image.open(src) as im, atomic_path(dst) as tmp:
        im.convert("RGB").quantize(colors=PALETTE_COLORS, method=Image.Quantize.MEDIANCUT,
                                   dither=Image.Dither.NONE).save(tmp, format="PNG", optimize=True)
    return dst


def markdown_table(summary: dict) -> str:
    """The overall weight numbers and the chosen input's outlier-channel ratio, one row per model."""
    act = summary["act_module"]
    header = f"| model | mean mu | max mu | mean excess kurtosis | W4 RTN error | channel max / median, `{act}` input |"
    lines = [header, "|---|---|---|---|---|---|"]
    for m in summary["models"]:
        o = m["overall"]
        ratio = next(r["channel_max_ratio"] for r in m["activations"]["inputs"] if act in r["modules"])
        lines.append(f"| {m['label']} | {o['incoherence_mean']:.2f} | {o['incoherence_max']:.2f} | "
                     f"{o['excess_kurtosis_mean']:.2f} | {o['rtn_error']:.4f} | {ratio:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "img", help="image folder (default docs/img)")
    parser.add_argument("--steps", type=int, default=150, help="OptRot solver steps per phase (default 150)")
    parser.add_argument("--calib", type=Path, default=DEFAULT_CALIB, help="calibration text (WikiText-2 test)")
    parser.add_argument("--calib-tokens", type=int, default=2048, help="calibration tokens (default 2048)")
    parser.add_argument("--seed", type=int, default=0, help="Hadamard sign seed (default 0)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    progress = not args.no_progress
    args.out.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory(prefix="orthoopt-diag-") as tmp:
        tmp = Path(tmp)
        paths, solves = build_models(tmp, args.steps, args.seed, progress)
        summary = diagnose_models(paths, tmp / "diagnose", calib=args.calib, calib_tokens=args.calib_tokens,
                                  progress=progress)
        pngs = {f"diag_{name}": tmp / "diagnose" / name for name in summary["plots"] if name.endswith(".png")}
        for phase, result in solves.items():
            fig = plot_solve_history(result, title=f"OptRot (FourthPower, Cayley SGD from Hadamard): {phase}")
            pngs[f"diag_solve_{phase}.png"] = save_figure(fig, tmp / f"solve_{phase}", formats=("png",))[0]
        written = [to_palette_png(src, args.out / name) for name, src in pngs.items()]

    for p in written:
        size = p.stat().st_size
        flag = "  <-- over 200 KB" if size > MAX_PNG_BYTES else ""
        print(f"{p} {size / 1000:.0f} KB{flag}")
    print(f"histogram block: {summary['block']}; activation module: {summary['act_module']}")
    print(markdown_table(summary))


if __name__ == "__main__":
    main()
