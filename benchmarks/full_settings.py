"""The papers' full settings on a real model: W4A4KV4 and W4A8KV8 perplexity per rotation method.

For each rotation method (no rotation, random Hadamard, OptRot, OptRot+, KurTail, DFRot, SpinQuant's
end-to-end objective) the model is rotated once (R1 and R2; calibration from the first half of the text), then quantized in
each setting with RTN and GPTQ weights and evaluated on the second half:

* weights: 4-bit symmetric per output channel, RTN or GPTQ (damp 0.01, no act-order; calibration
  windows from the first half); ``--mse-clip`` adds the per-row MSE clipping search (SpinQuant's and
  QuaRot's ``--w_clip``), left off by default for CPU time;
* activations: A4 or A8, asymmetric per token (SpinQuant's ``--a_asym``), clip 1.0, inputs of every
  decoder-layer linear; embeddings and lm_head in full precision;
* K/V cache: same bits as the activations, asymmetric, one group per head (QuaRot/SpinQuant defaults);
* online Hadamards: R4 (before down_proj) and R3 (queries/keys after RoPE) for every rotated method;
  none for "no rotation" (the plain quantized model, as the papers' RTN/GPTQ baselines).

SpinQuant trains its rotations for the W4A4KV4 setting (RTN weights, straight-through); its W4A8KV8
rows reuse those rotations. ``--gptq-seeds N`` repeats every GPTQ cell with the calibration windows
of N seeds and ``--table-only`` prints their spread. Results per method are cached as JSON under
``--cache`` so a run can be split (``--methods``) and the table printed from everything measured
(``--table-only``).

    OMP_NUM_THREADS=1 python benchmarks/full_settings.py --methods identity,hadamard,optrot,spinquant
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _data import DEFAULT_TEXT, random_windows, split_halves  # noqa: E402

from orthoopt.models import load_model, load_tokenizer  # noqa: E402
from orthoopt.eval import perplexity  # noqa: E402
from orthoopt.config import RotateConfig  # noqa: E402
from orthoopt.pipeline import rotate_model  # noqa: E402
from orthoopt.quant import quantize_model, tokenize_text  # noqa: E402
from orthoopt.quant.config import QuantizeConfig  # noqa: E402
from orthoopt.quant.act import ActQuantConfig  # noqa: E402
from orthoopt.quant.kv import KVQuantConfig  # noqa: E402
from orthoopt.quant.rotated import SimQuantConfig  # noqa: E402

NAMES = {"identity": "no rotation", "hadamard": "random Hadamard", "optrot": "OptRot", "optrot+": "OptRot+",
         "kurtosis": "KurTail (kurtosis)", "dfrot": "DFRot", "spinquant": "SpinQuant (end-to-end)"}
SETTINGS = {"W4A4KV4": 4, "W4A8KV8": 8}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--text", default=str(DEFAULT_TEXT) if DEFAULT_TEXT.is_file() else "/work/shared/data/wikitext2-test.txt")
    ap.add_argument("--methods", default="identity,hadamard,optrot,spinquant")
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--gptq-windows", type=int, default=32)
    ap.add_argument("--optrot-steps", type=int, default=100)
    ap.add_argument("--optrot-solver", default=None, help="OptRot's solver (default: the method's default)")
    ap.add_argument("--spin-steps", type=int, default=30)
    ap.add_argument("--spin-windows", type=int, default=30, help="calibration windows SpinQuant cycles through")
    ap.add_argument("--spin-batch", type=int, default=1)
    ap.add_argument("--spin-seq-len", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", default=str(Path(__file__).resolve().parent / ".cache" / "full_settings"))
    ap.add_argument("--table-only", action="store_true")
    ap.add_argument("--float-all", action="store_true", help="also evaluate every rotated float model")
    ap.add_argument("--settings", default="W4A4KV4,W4A8KV8")
    ap.add_argument("--mse-clip", action="store_true", help="per-row MSE clipping search of the weights (slow)")
    ap.add_argument("--gptq-seeds", type=int, default=1,
                    help="repeat each GPTQ cell with the calibration windows of seeds seed .. seed+N-1 (spread)")
    args = ap.parse_args()
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    methods = [m for m in args.methods.split(",") if m]

    if not args.table_only:
        split = split_halves(args.text)
        tok = load_tokenizer(args.model)
        calib_ids = tokenize_text(split.calib, tok)
        gptq_calibs = {k: random_windows(calib_ids, args.gptq_windows, args.seq_len, k)
                       for k in range(args.seed, args.seed + args.gptq_seeds)}
        gptq_calib = gptq_calibs[args.seed]
        spin_calib = random_windows(calib_ids, args.spin_windows, args.spin_seq_len, args.seed + 1)
        for method in methods:
            t0 = time.perf_counter()
            model = load_model(args.model)
            kw, calib = {}, None
            if method == "optrot":
                kw = {"solve": {"steps": args.optrot_steps, "solver": args.optrot_solver}}
            elif method in ("optrot+", "kurtosis", "dfrot"):  # their default solver and budget (orthoopt.methods.METHODS)
                calib = gptq_calib
            elif method == "spinquant":
                calib = spin_calib
                kw = {"solve": {"steps": args.spin_steps},
                      "spinquant": {"batch_size": args.spin_batch,
                                    "sim_quant": SimQuantConfig(wbits=4, act=ActQuantConfig(bits=4, symmetric=False,
                                                                                            online_hadamard=True),
                                                                kv=KVQuantConfig(bits=4, r3=True))}}
            verify = random_windows(calib_ids, 2, 32, args.seed + 2)
            res = rotate_model(model, RotateConfig(method, seed=args.seed, **kw), calib=calib, progress=False,
                               verify_ids=verify)
            rot_s = time.perf_counter() - t0
            rec = {"method": method, "rotation_s": round(rot_s, 1), "report_loss": res.report.get("loss"),
                   "invariance_error": res.report["invariance_error"], "ppl": {}, "seconds": {},
                   "settings": vars(args),
                   "machine": f"{platform.platform()}, torch {torch.__version__}, {torch.get_num_threads()} threads"}
            out_file = cache / f"{method}.json"
            if method == "identity" or args.float_all:  # rotations keep the float function (invariance_error)
                fp = perplexity(model, tok, text=split.eval, seq_len=args.seq_len, max_tokens=args.eval_tokens,
                                progress=False)
                rec["ppl"]["float"] = fp["ppl"]
                out_file.write_text(json.dumps(rec, indent=1))
            rotated = method != "identity"
            cells = [(s, "rtn", None) for s in args.settings.split(",")] + [
                (s, "gptq", k) for s in args.settings.split(",") for k in gptq_calibs]
            for setting, wq, seed in cells:
                bits = SETTINGS[setting]
                key = f"{setting} {wq}" if seed in (None, args.seed) else f"{setting} {wq} seed {seed}"
                t1 = time.perf_counter()
                q = copy.deepcopy(model)
                r = quantize_model(
                    q,
                    QuantizeConfig(
                        wq,
                        wbits=4,
                        mse_clip=args.mse_clip,
                        act=ActQuantConfig(bits=bits, symmetric=False, online_hadamard=rotated),
                        kv=KVQuantConfig(bits=bits, r3=rotated),
                    ),
                    calib=gptq_calibs[seed] if wq == "gptq" else None,
                    progress=False,
                )
                p = perplexity(q, tok, text=split.eval, seq_len=args.seq_len, max_tokens=args.eval_tokens,
                               progress=False)
                r.hooks.remove()
                rec["ppl"][key] = p["ppl"]
                rec["seconds"][key] = round(time.perf_counter() - t1, 1)
                rec["eval_tokens"] = p["tokens"]
                out_file.write_text(json.dumps(rec, indent=1))  # partial results survive an interrupted run
                del q
                print(f"{method} {key}: ppl {p['ppl']:.3f}", file=sys.stderr, flush=True)
            rec["total_s"] = round(time.perf_counter() - t0, 1)
            out_file.write_text(json.dumps(rec, indent=1))
            print(f"{method}: rotation {rot_s:.0f} s, total {rec['total_s']:.0f} s", file=sys.stderr, flush=True)
            del model

    cols = [f"{s} {w}" for s in SETTINGS for w in ("rtn", "gptq")]
    print("| method | rotation s | logit error | " + " | ".join(c.replace(" rtn", " RTN").replace(" gptq", " GPTQ")
                                                          for c in cols) + " |")
    print("|---|---:|---:|" + "---:|" * len(cols))
    notes = []
    for method in NAMES:
        f = cache / f"{method}.json"
        if not f.is_file():
            continue
        rec = json.loads(f.read_text())
        cells = [f"{rec['ppl'][c]:.2f}" if c in rec["ppl"] else "-" for c in cols]
        print(f"| {NAMES[method]} | {rec['rotation_s']:.0f} | {rec['invariance_error']:.1e} | " + " | ".join(cells) + " |")
        for c in cols:  # GPTQ cells repeated with other calibration seeds (--gptq-seeds)
            runs = [v for k, v in rec["ppl"].items() if k == c or k.startswith(c + " seed ")]
            if len(runs) > 1:
                notes.append(f"{NAMES[method]}, {c}: {len(runs)} GPTQ calibration seeds " + ", ".join(
                    f"{v:.2f}" for v in runs) + f"; mean {sum(runs) / len(runs):.2f}, max - min {max(runs) - min(runs):.2f}")
        if "float" in rec["ppl"]:
            notes.append(f"float perplexity ({NAMES[method]}): {rec['ppl']['float']:.2f} over "
                         f"{rec.get('eval_tokens')} predicted tokens")
    for n in notes:
        print(f"\n{n}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
