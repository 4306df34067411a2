"""The layer-by-layer paths against the in-memory ones on a real model: same tensors, same window NLLs
(issue 23: "the 135M results do not change: the SmolLM2 tables reproduce with the layer-by-layer paths").

    python benchmarks/streamed_parity.py                          # SmolLM2-135M (orthoopt fetch smollm2-135m)
    python benchmarks/streamed_parity.py --model FOLDER --windows 4 --calib-windows 4
    python benchmarks/streamed_parity.py --quick                  # a planted model (the smoke test)

One pipeline -- ``rotate --method hadamard`` (R1 and R2, seed 0), then ``quantize`` with RTN and GPTQ
W4 (per output channel, orthoopt's format), then ``eval`` of each -- runs twice, each command as its own
subprocess under ``/usr/bin/time -v`` (``benchmarks/model_size.py``'s :func:`measure`): once in memory,
once with ``--streamed`` on every command (the streamed quantize reads the streamed rotation). The
report compares, per step, the written tensors of the two runs (how many are bit-identical, the
largest absolute difference of the others) and the evaluations' per-window NLLs (largest difference,
and the two perplexities), beside each command's wall time and peak RSS. Both runs use the same
calibration and evaluation windows (the text's first ``--calib-windows`` / ``--windows`` windows of
``--seq-len`` tokens), so any difference is the paths'. ``--json PATH`` writes the records.

Exit status 0 when every pair is bit-identical, 1 when some differ (the report says where), 2 when a
command fails.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import model_size  # noqa: E402  (this directory's benchmark: the measuring subprocess)

STEPS = ("rotate", "quantize-rtn", "quantize-gptq", "eval-rtn", "eval-gptq")


def step_argv(step: str, model: str, work: Path, text: Path, windows: int, calib_windows: int, seq_len: int,
              streamed: bool) -> list[str]:
    """``orthoopt`` arguments of ``step`` of the pipeline, reading and writing under ``work``."""
    tail = ["--no-progress"] + (["--streamed"] if streamed else [])
    rot = work / "rotated"
    if step == "rotate":
        return ["rotate", model, "--out", str(rot), "--method", "hadamard", "--seed", "0", *tail]
    if step == "quantize-rtn":
        return ["quantize", str(rot), "--out", str(work / "rtn"), "--method", "rtn", "--wbits", "4",
                "--format", "orthoopt", *tail]
    if step == "quantize-gptq":
        return ["quantize", str(rot), "--out", str(work / "gptq"), "--method", "gptq", "--wbits", "4", "--calib",
                str(text), "--nsamples", str(calib_windows), "--seq-len", str(seq_len), "--seed", "0",
                "--format", "orthoopt", *tail]
    if step in ("eval-rtn", "eval-gptq"):
        return ["eval", str(work / step.removeprefix("eval-")), "--text", str(text), "--seq-len", str(seq_len),
                "--max-tokens", str(windows * seq_len), "--json", *tail]
    raise ValueError(f"unknown step {step!r}")


def _tensors(folder: Path) -> dict:
    from orthoopt.models.safetensors_folder import SafetensorsCheckpoint

    ck = SafetensorsCheckpoint(folder)
    return ck.read(ck.keys())


def _bits(t):
    return t.reshape(-1).view(torch.uint8)


def compare_tensors(a: Path, b: Path) -> dict:
    """``{"tensors", "identical", "same", "max_abs_diff", "differing"}`` of the safetensors of two folders
    (read by :class:`orthoopt.models.safetensors_folder.SafetensorsCheckpoint`): a tensor is identical when
    its dtype, shape and bits are (``-0.0`` is not ``0.0``); ``same`` when every tensor is; ``differing``
    names the first five that are not. Both folders are read whole (meant for the 135M model, not the 8B
    shape)."""
    ta, tb = _tensors(a), _tensors(b)
    if set(ta) != set(tb):
        return {"tensors": len(ta), "identical": 0, "same": False, "max_abs_diff": None,
                "differing": sorted(set(ta) ^ set(tb))[:5], "names_differ": True}
    identical, worst, differing = 0, 0.0, []
    for name, x in ta.items():
        y = tb[name]
        if x.dtype == y.dtype and x.shape == y.shape and _bits(x).equal(_bits(y)):
            identical += 1
            continue
        differing.append(name)
        if x.shape == y.shape and x.is_floating_point():
            worst = max(worst, float((x.double() - y.double()).abs().max()))
    return {"tensors": len(ta), "identical": identical, "same": identical == len(ta), "max_abs_diff": worst,
            "differing": differing[:5]}


def compare_evals(a: dict, b: dict) -> dict:
    """The largest per-window NLL difference and both perplexities of two ``eval --json`` records."""
    wa, wb = a["window_nll"], b["window_nll"]
    diff = max(abs(x - y) for x, y in zip(wa, wb)) if len(wa) == len(wb) else None
    return {"windows": len(wa), "max_window_nll_diff": diff, "ppl": a["ppl"], "ppl_streamed": b["ppl"],
            "same": diff == 0.0 and a["ppl"] == b["ppl"]}


def run(model: str, windows: int, calib_windows: int, seq_len: int, text: Path, cache: Path | None = None,
        use_time: bool | None = None, progress=print) -> list[dict]:
    """Both pipelines, step by step: one record per step (module doc)."""
    root = Path(tempfile.mkdtemp(prefix="streamed-parity-", dir=cache))
    records = []
    try:
        works = {False: root / "in-memory", True: root / "streamed"}
        for w in works.values():
            w.mkdir()
        for step in STEPS:
            rec = {"step": step}
            outputs = {}
            for streamed, work in works.items():
                argv = step_argv(step, model, work, text, windows, calib_windows, seq_len, streamed)
                record = work / f"{step}.json" if step.startswith("eval-") else None
                rc, wall, rss, how, stderr = model_size.measure(argv, use_time, stdout=record)
                key = "streamed" if streamed else "in_memory"
                rec[key] = {"argv": argv, "returncode": rc, "wall_s": round(wall, 2), "peak_rss_bytes": rss,
                            "measured_by": how}
                if rc != 0:
                    rec[key]["message"] = model_size._error_line(stderr)
                    records.append(rec)
                    progress(_row(rec))
                    return records
                outputs[streamed] = None if record is None else json.loads(record.read_text())
            if step.startswith("eval-"):
                rec["compare"] = compare_evals(outputs[False], outputs[True])
            else:
                out = {"rotate": "rotated", "quantize-rtn": "rtn", "quantize-gptq": "gptq"}[step]
                rec["compare"] = compare_tensors(works[False] / out, works[True] / out)
            records.append(rec)
            progress(_row(rec))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return records


def _gb(b) -> str:
    return "-" if b is None else f"{b / 1e9:.2f}"


HEADER = ("| step | in memory s | streamed s | in memory GB | streamed GB | same |\n"
          "|---|---:|---:|---:|---:|---|")


def _row(rec: dict) -> str:
    a, b = rec.get("in_memory", {}), rec.get("streamed", {})
    c = rec.get("compare")
    if c is None:
        same = "failed: " + (b.get("message") or a.get("message") or "")
    elif "windows" in c:
        same = ("bit-identical" if c["same"] else f"window NLL max diff {c['max_window_nll_diff']:.3g}") + \
            f" (ppl {c['ppl']:.4f} / {c['ppl_streamed']:.4f}, {c['windows']} windows)"
    else:
        same = f"{c['identical']} of {c['tensors']} tensors bit-identical" + \
            ("" if c["same"] else ", tensor names differ" if c.get("names_differ")
             else f", max abs diff {c['max_abs_diff']:.3g}") + ("" if c["same"] else f" ({', '.join(c['differing'])})")
    return (f"| {rec['step']} | {a.get('wall_s', '-')} | {b.get('wall_s', '-')} | {_gb(a.get('peak_rss_bytes'))} "
            f"| {_gb(b.get('peak_rss_bytes'))} | {same} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="registered name or folder (default smollm2-135m)")
    ap.add_argument("--windows", type=int, default=None, help="evaluation windows (default 64; --quick 2)")
    ap.add_argument("--calib-windows", type=int, default=None, help="GPTQ calibration windows (default 16; --quick 2)")
    ap.add_argument("--seq-len", type=int, default=None, help="window length (default 256; --quick 32)")
    ap.add_argument("--quick", action="store_true", help="a planted Llama (seconds): the smoke test")
    ap.add_argument("--cache", type=Path, default=None, help="where the outputs are written (deleted after)")
    ap.add_argument("--no-time", action="store_true", help="measure with getrusage instead of /usr/bin/time -v")
    ap.add_argument("--json", type=Path, default=None, help="also write the records to this file")
    args = ap.parse_args(argv)
    cache = args.cache
    if args.quick:
        cache = cache or Path(tempfile.mkdtemp(prefix="streamed-parity-quick-"))
        model = str(_planted(cache))
    else:
        model = args.model
    windows = args.windows or (2 if args.quick else 64)
    calib = args.calib_windows or (2 if args.quick else 16)
    seq_len = args.seq_len or (32 if args.quick else 256)
    text = model_size.text_file(cache or model_size.CACHE, 4 * (windows + calib) * seq_len + 1000)
    print(f"streamed_parity: {model}; {calib} calibration and {windows} evaluation windows of {seq_len} tokens; "
          "each command under /usr/bin/time -v, one at a time")
    print(HEADER)
    records = run(model, windows, calib, seq_len, text, cache, False if args.no_time else None)
    if args.json:
        args.json.write_text(json.dumps(records, indent=1) + "\n")
    if any(r.get("compare") is None for r in records):
        return 2
    return 0 if all(r["compare"]["same"] for r in records) else 1


def _planted(cache: Path) -> Path:
    """A small planted Llama saved as a Hugging Face folder (float32)."""
    from orthoopt.testing import save_planted

    folder = cache / "planted"
    return folder if (folder / "config.json").is_file() else save_planted(folder)


if __name__ == "__main__":
    sys.exit(main())
