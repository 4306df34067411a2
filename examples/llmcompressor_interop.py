"""A rotation learned by orthoopt, quantized by llm-compressor, evaluated by orthoopt.

1. ``orthoopt rotate MODEL --out WORK/rotated --method optrot`` (a plain float checkpoint, rotations fused);
2. llm-compressor's ``oneshot`` with ``GPTQModifier`` (W4A16 per channel, symmetric) on that checkpoint,
   calibrated on the same windows orthoopt's GPTQ would draw (``orthoopt.quant.calibration_batches``),
   saved packed (compressed-tensors) to ``WORK/rotated-w4-llmc``;
3. ``orthoopt eval`` of the float, rotated and quantized checkpoints.

llm-compressor pins its own transformers; when it is not importable in this Python, step 2 runs in
``--peer-python`` (default ``$ORTHOOPT_PEER_PYTHON`` or /work/venvs/peer/bin/python; docs/export.md),
with this checkout first on its path. Without either, the script says what is missing and exits 2.

    python examples/llmcompressor_interop.py --work runs/interop                  # tiny planted model
    python examples/llmcompressor_interop.py smollm2-135m --work runs/interop \\
        --text ../shared/data/wikitext2-test.txt --nsamples 32 --seq-len 256 --max-tokens 16384
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PEER = "/work/venvs/peer/bin/python"


def orthoopt(*args: str) -> dict:
    """Run ``orthoopt ARGS --json`` in this Python; its JSON record."""
    out = subprocess.run([sys.executable, "-m", "orthoopt", *args, "--json", "--no-progress"],
                         check=True, capture_output=True, text=True, env=_env())
    return json.loads(out.stdout)


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def llmc_step(rotated: Path, out: Path, text: Path, nsamples: int, seq_len: int, seed: int) -> dict:
    """Step 2, in a Python where llm-compressor imports."""
    from orthoopt.interop.llmcompressor import quantize_with_llmcompressor, save_llmcompressor
    from orthoopt.quant import calibration_batches, load_checkpoint

    model, tok = load_checkpoint(rotated)
    calib = calibration_batches(text, tok, nsamples=nsamples, seq_len=seq_len, seed=seed)
    info = quantize_with_llmcompressor(model, calib, method="gptq", bits=4, group_size=None, sym=True)
    save_llmcompressor(model, tok, out)
    return {"out": str(out), **info}


def peer_python(arg: str | None) -> str | None:
    from orthoopt.interop.llmcompressor import unavailable_reason

    if unavailable_reason() is None:
        return sys.executable
    for cand in (arg, os.environ.get("ORTHOOPT_PEER_PYTHON"), DEFAULT_PEER):
        if cand and Path(cand).is_file():
            return cand
    return None


def default_text(work: Path) -> Path:
    wiki = REPO.parent / "shared" / "data" / "wikitext2-test.txt"
    if wiki.is_file():
        return wiki
    path = work / "text.txt"
    path.write_text("".join(f" Sentence {i} is about rotations , outliers and quantization .\n" for i in range(400)))
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", default=None, help="HF model folder (default: a tiny planted-outlier Llama)")
    p.add_argument("--work", required=True, help="folder for the checkpoints")
    p.add_argument("--text", default=None, help="calibration/evaluation text (default: WikiText-2 when present)")
    p.add_argument("--method", default="optrot", help="orthoopt rotate --method (default optrot)")
    p.add_argument("--steps", type=int, default=50, help="rotation solver steps (default 50)")
    p.add_argument("--nsamples", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peer-python", default=None, help="a Python where llmcompressor imports")
    p.add_argument("--llmc-step", nargs=2, metavar=("ROTATED", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    text = Path(args.text) if args.text else default_text(work)

    if args.llmc_step:  # step 2 only (called in the peer Python)
        print(json.dumps(llmc_step(Path(args.llmc_step[0]), Path(args.llmc_step[1]), text, args.nsamples,
                                   args.seq_len, args.seed)))
        return 0

    python = peer_python(args.peer_python)
    if python is None:
        from orthoopt.interop.llmcompressor import unavailable_reason

        print(f"llmcompressor_interop: {unavailable_reason()}; or pass --peer-python", file=sys.stderr)
        return 2

    src = Path(args.model) if args.model else None
    if src is None:
        from orthoopt.testing import save_planted

        src = work / "planted"
        if not src.exists():
            save_planted(src, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128)
    rotated, quantized = work / "rotated", work / "rotated-w4-llmc"
    rot = orthoopt("rotate", str(src), "--out", str(rotated), "--method", args.method, "--steps", str(args.steps),
                   "--seed", str(args.seed))
    step = subprocess.run([python, __file__, "--work", str(work), "--text", str(text), "--nsamples",
                           str(args.nsamples), "--seq-len", str(args.seq_len), "--seed", str(args.seed),
                           "--llmc-step", str(rotated), str(quantized)],
                          check=True, capture_output=True, text=True, env=_env())
    llmc = json.loads(step.stdout.strip().splitlines()[-1])
    ev = ["--text", str(text), "--seq-len", str(args.seq_len), "--max-tokens", str(args.max_tokens)]
    ppl = {name: orthoopt("eval", str(path), *ev)["ppl"] for name, path in
           (("float", src), (f"{args.method}", rotated), (f"{args.method} + llm-compressor GPTQ W4", quantized))}
    record = {"rotate": {k: rot.get(k) for k in ("method", "seconds") if k in rot}, "llmcompressor": llmc,
              "ppl": ppl, "peer_python": python}
    print(json.dumps(record))
    for name, value in ppl.items():
        print(f"{name:>40}: perplexity {value:.3f}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
