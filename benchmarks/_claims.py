"""The claims of the rotation quality benchmark, each with a 95% interval over draws and windows.

A claim compares two methods in one quantization column: ``ppl(method) / ppl(reference)``, the ratio
of their geometric-mean perplexities over draws, with the two-level bootstrap interval of
:func:`orthoopt.eval.draws_interval` (draws resampled, then windows; windows paired, since every
model is scored on the same evaluation windows; draws paired by index, since draw ``k`` of every
method uses seed ``seed + k``, over the draws both methods have). ``best`` stands for the rotated
method (not the unrotated original, nor norm fusion alone) with the lowest mean perplexity in the
column: chosen on the same numbers, so its interval is biased towards ``lower``.
"""

from __future__ import annotations

import numpy as np

from orthoopt.eval import MIN_WINDOWS, draws_interval

BEST = "best"
"""Claim method meaning the best rotation of the column."""
CLAIMS = (
    ("optrot", "hadamard", "W4 GPTQ"),
    ("optrot", "hadamard", "W4 GPTQ g128"),
    ("optrot", "hadamard", "W4 GPTQ g64"),
    ("optrot", "original", "W4 GPTQ"),
    ("optrot", "original", "W4 GPTQ g128"),
    ("optrot", "original", "W4 GPTQ g64"),
    ("optrot+", "optrot", "W4 GPTQ"),
    ("optrot+", "optrot", "W4 GPTQ g128"),
    ("optrot+", "optrot", "W4 GPTQ g64"),
    (BEST, "original", "W4 RTN"),
    (BEST, "original", "W4 RTN g128"),
    (BEST, "original", "W4 RTN g64"),
    ("optrot", "hadamard", "W4A4KV4 GPTQ"),
    ("optrot+", "hadamard", "W4A4KV4 GPTQ"),
    ("optrot", "hadamard", "W4A4KV4 RTN"),
)
"""``(method, reference, column)``: the claim is that ``method`` has the lower perplexity."""
NOT_ROTATIONS = ("original", "identity")
RESAMPLES = 10_000
NO_A4 = ("W4A4KV4 (OptRot's weight/activation trade-off) is claimed only in a run with `--columns` naming "
         "its columns (`W4A4KV4 RTN`, `W4A4KV4 GPTQ`).")


def best_rotation(rows: dict, column: str) -> str | None:
    """The rotated method with the lowest mean perplexity in ``column`` (None without one)."""
    rotated = [m for m in rows if m not in NOT_ROTATIONS and column in rows[m].ppl]
    return min(rotated, key=lambda m: rows[m].mean_ppl(column)) if rotated else None


def claim_interval(a, b, column: str, seed: int = 0):
    """``(draws used, PairedInterval)`` of ``ppl(a) / ppl(b)`` in ``column`` over their common draws."""
    k = min(len(a.seeds), len(b.seeds))
    ref = np.asarray(b.window_nll[column][:k])
    return k, draws_interval(ref, np.asarray(a.window_nll[column][:k]), RESAMPLES, seed)


def claims_section(rows: dict, labels: dict[str, str]) -> list[str]:
    """The markdown claims table (a line per claim; a claim missing a method says so)."""
    out = ["## Claims", "",
           "Each claim: the first method's perplexity below the second's in one column. `ratio` is the ratio "
           "of their geometric-mean perplexities over draws; the 95% interval is a two-level bootstrap "
           f"({RESAMPLES} resamples, seed 0) over draws (paired by seed, over the draws both have) and "
           "evaluation windows (paired), `orthoopt.eval.draws_interval`; `lower` = the whole interval below 1. "
           "`best` is picked on these numbers (biased towards `lower`).", "",
           "| claim | column | draws | mean ppl | mean ppl (reference) | ratio | 95% interval | verdict |",
           "|---|---|---:|---:|---:|---:|---|---|"]
    a4_run = False
    for method, ref, column in CLAIMS:
        if column.startswith("W4A4KV4"):
            if not any(column in r.ppl for r in rows.values()):
                continue  # an opt-in column (--columns), not run here: NO_A4 says so
            a4_run = True
        m = best_rotation(rows, column) if method == BEST else method
        why = ("column not run for this model" if ref in rows and column not in rows[ref].ppl
               else "needs both methods" if m not in rows or ref not in rows else None)
        if why:
            out.append(f"| {labels.get(method, method)} vs {labels.get(ref, ref)} | {column} | - | - | - | - | - | "
                       f"skipped: {why} |")
            continue
        name = f"{'best rotation (' + labels[m] + ')' if method == BEST else labels[m]} vs {labels[ref]}"
        a, b = rows[m], rows[ref]
        k = min(len(a.seeds), len(b.seeds))
        means = f"| {name} | {column} | {k} | {a.mean_ppl(column):.4f} | {b.mean_ppl(column):.4f} |"
        if len(b.window_nll[column][0]) < MIN_WINDOWS:
            out.append(f"{means} - | - | no interval: fewer than {MIN_WINDOWS} evaluation windows |")
            continue
        k, iv = claim_interval(a, b, column)
        low, high = iv.ci95
        out.append(f"{means} {iv.ratio:.4f} | [{low:.4f}, {high:.4f}] | {iv.verdict} |")
    return out + ([] if a4_run else ["", NO_A4])
