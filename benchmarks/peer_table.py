"""Peer table with intervals: every model against several references, from `orthoopt compare --json` records.

`orthoopt compare REF MODEL ... --json` keeps each model's per-window NLLs; this script pairs any two
models of one or more such records (all scored on the same windows: their references' window NLLs
must agree) with the same paired bootstrap as `orthoopt compare` (``orthoopt.eval.paired_bootstrap``,
10,000 resamples, seed 0) and prints a markdown table: for each model, its perplexity and, against
each reference of its quantization method, the ratio, its 95% interval and the verdict.

Models are named by their folder's name; a name ending in ``-rtn`` or ``-gptq`` is compared with
the references of the same ending (``--refs oo-none,oo-hadamard,oo-optrot`` means
``oo-none-rtn`` for RTN rows and ``oo-none-gptq`` for GPTQ rows)::

    python benchmarks/peer_table.py runs/peer-brevitas/compare-orthoopt.json \\
        runs/peer-brevitas/compare-peers.json --refs oo-none,oo-hadamard,oo-optrot
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orthoopt.eval import paired_bootstrap  # noqa: E402

QUANT_SUFFIXES = ("rtn", "gptq")


def load_windows(records: list[dict]) -> tuple[dict[str, list[float]], dict[str, float]]:
    """``({name: window_nll}, {name: ppl})`` over ``orthoopt compare --json`` records.

    Raises ValueError when two records' references were scored on other windows (different window
    NLLs, counts or lengths) or one name has two different window sets.
    """
    if not records:
        raise ValueError("no compare record given")
    first = records[0]
    nll: dict[str, list[float]] = {}
    ppl: dict[str, float] = {}
    for rec in records:
        if (rec["windows"], rec["seq_len"]) != (first["windows"], first["seq_len"]) or not np.array_equal(
                rec["reference"]["window_nll"], first["reference"]["window_nll"]):
            raise ValueError(f"records disagree on the reference's windows ({rec['reference']['model']}, "
                             f"{rec['windows']} x {rec['seq_len']}): not the same evaluation")
        for entry in [rec["reference"], *rec["models"]]:
            name = Path(entry["model"]).name
            if name in nll and not np.array_equal(nll[name], entry["window_nll"]):
                raise ValueError(f"{name} appears twice with different window NLLs")
            nll[name], ppl[name] = entry["window_nll"], entry["ppl"]
    return nll, ppl


def quant_of(name: str) -> str | None:
    """``"rtn"`` or ``"gptq"`` from the name's last ``-`` part, else None."""
    tail = name.rsplit("-", 1)[-1]
    return tail if tail in QUANT_SUFFIXES else None


def pair_table(nll: dict[str, list[float]], ppl: dict[str, float], refs: list[str],
               resamples: int = 10_000, seed: int = 0) -> list[dict]:
    """One row per quantized model: ``{"model", "quant", "ppl", "vs": {ref: {"ratio", "ci95", "verdict"}}}``.

    ``ref`` is a prefix (``oo-optrot``); the model ``oo-optrot-gptq`` is compared with it when the
    model's name ends in ``-gptq``. A model is not compared with itself; a missing reference is left out.
    """
    rows = []
    for name in nll:
        quant = quant_of(name)
        if quant is None:
            continue
        row = {"model": name, "quant": quant, "ppl": ppl[name], "vs": {}}
        for ref in refs:
            ref_name = f"{ref}-{quant}"
            if ref_name == name or ref_name not in nll:
                continue
            interval = paired_bootstrap(nll[ref_name], nll[name], resamples, seed)
            row["vs"][ref] = {"ratio": interval.ratio, "ci95": list(interval.ci95), "verdict": interval.verdict}
        rows.append(row)
    return rows


def render(rows: list[dict], refs: list[str], reference_ppl: tuple[str, float] | None = None) -> str:
    """Markdown table of :func:`pair_table` rows (RTN rows first, then GPTQ)."""
    head = "| model | W4 | ppl | " + " | ".join(f"vs {r}: ratio [95% CI], verdict" for r in refs) + " |"
    lines = [head, "|---|---|---:|" + "---|" * len(refs)]
    if reference_ppl is not None:
        lines.append(f"| {reference_ppl[0]} | float | {reference_ppl[1]:.2f} |" + " - |" * len(refs))
    for quant in QUANT_SUFFIXES:
        for row in (r for r in rows if r["quant"] == quant):
            cells = []
            for ref in refs:
                v = row["vs"].get(ref)
                cells.append("-" if v is None else
                             f"{v['ratio']:.3f} [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}] {v['verdict']}")
            lines.append(f"| {row['model']} | {quant.upper()} | {row['ppl']:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("records", nargs="+", type=Path, help="orthoopt compare --json outputs")
    p.add_argument("--refs", default="oo-none,oo-hadamard,oo-optrot", help="reference name prefixes")
    p.add_argument("--resamples", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the rows as JSON instead of markdown")
    args = p.parse_args(argv)
    records = [json.loads(path.read_text(encoding="utf-8")) for path in args.records]
    try:
        nll, ppl = load_windows(records)
    except ValueError as exc:
        print(f"peer_table: error: {exc}", file=sys.stderr)
        return 2
    refs = [r for r in args.refs.split(",") if r]
    rows = pair_table(nll, ppl, refs, args.resamples, args.seed)
    ref = records[0]["reference"]
    if args.json:
        print(json.dumps({"windows": records[0]["windows"], "seq_len": records[0]["seq_len"], "rows": rows}, indent=2))
    else:
        print(f"{records[0]['windows']} windows x {records[0]['seq_len']} tokens; paired bootstrap, "
              f"{args.resamples} resamples, seed {args.seed}\n")
        print(render(rows, refs, (Path(ref["model"]).name, ref["ppl"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
