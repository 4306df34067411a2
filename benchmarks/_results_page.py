"""The page of the rotation quality benchmark, rendered from the record ``rotation_quality.py --json``
saves (settings, header, rows): :func:`render_record` gives its markdown body, :func:`publish` prints
it and :func:`write_results` writes ``docs/results.md`` (keeping the hand-written findings). Nothing
here computes a perplexity: ``rotation_quality.py --render ROWS_JSON`` is this module on a saved record.
"""

from __future__ import annotations

import math
import statistics
import sys
from pathlib import Path
from types import SimpleNamespace

from orthoopt.utils.atomic import atomic_file

from _claims import claims_section
from _models import PlantedLMSpec, PreparedModel
from _rq_rows import (EXPENSIVE, FULL, METHOD_LABELS, REGISTRY, SPINQUANT_ROWS, MethodResult,
                      Settings, _mean)


def fmt(x: float | None, digits: int = 4) -> str:
    if x is None:
        return "-"
    return f"{x:.{digits}f}" if math.isfinite(x) and abs(x) < 1e5 else f"{x:.3e}"


def settings_section(settings: Settings, prepared: PreparedModel, split, n_eval: int,
                     skipped: list[str] = ()) -> list[str]:
    s = settings
    windows = min(s.eval_tokens, n_eval) // s.seq_len
    def base(m: str) -> str:
        return "spinquant" if m in SPINQUANT_ROWS else m

    learned = ", ".join(f"{m} {REGISTRY[base(m)].solver} {REGISTRY[base(m)].steps if s.steps is None else s.steps} steps"
                        for m in s.methods if base(m) in REGISTRY and REGISTRY[base(m)].learned)
    out = ["## Settings", "", f"- model: {prepared.description}"]
    if prepared.source == "planted":
        info, tr = prepared.info, prepared.info["train"]
        before, after = info["outliers_before"], info["outliers_after"]
        where = f"loaded from cache {info['cache']}" if info["cached"] else "trained in this run"
        per_layer = lambda xs: "[" + ", ".join(f"{x:.1f}" for x in xs) + "]"  # noqa: E731
        out.append(
            f"- fallback model: {info['parameters'] / 1e6:.2f}M parameters; training loss {tr['loss_first']:.3f} "
            f"-> {tr['loss_last']:.3f} nats/byte, {tr['seconds']:.0f} s ({where}). The default size, hidden "
            f"{FULL['hidden']} / {FULL['layers']} layers, is below the planted model's 512 / 8 so that the whole "
            "run, training included, stays well under 30 minutes on a shared 2-core CPU (--hidden, --layers)")
        out.append(
            f"- planted outlier channels {info['channels']} (ratio to the median other channel, before -> after "
            f"training): embedding columns {before['embedding']:.1f} -> {after['embedding']:.1f}, o_proj rows "
            f"{before['o_rows']:.1f} -> {after['o_rows']:.1f}, down_proj rows {before['down_rows']:.1f} -> "
            f"{after['down_rows']:.1f}, residual RMS per layer {per_layer(before['residual'])} -> "
            f"{per_layer(after['residual'])}")
    out += [
        f"- text: {split.describe()}",
        "- rotation s: wall time of `rotate_model` (norm fusion, calibration capture, solve, write-back)",
        f"- rotations: R1 and R2; learned methods: solver and steps per phase ({learned}), "
        f"start at the random Hadamard matrix",
        f"- draws: {s.draws} of every method ({s.expensive_draws} of {', '.join(EXPENSIVE)}); draw d uses seed "
        f"{s.seed} + d for GPTQ's calibration windows, the rotation calibration windows and the random "
        "rotation (random, hadamard, the Hadamard start of learned methods); norm fusion alone and the "
        "unrotated original are the same model in every draw (their RTN cells too)",
        *([f"- SpinQuant rows: R1 and R2 learned jointly on the causal-LM loss of the rotated model with its "
           f"decoder linears W4 RTN-quantized (straight-through), per output channel or per group of 64 as the "
           f"row says, activations in full precision; Cayley SGD lr 1.5, cosine decay, {s.spin_batch} windows "
           f"of {s.seq_len} tokens per step from {s.spin_windows} windows of the first half (seed 1000 + the draw's)"]
          if any(m in SPINQUANT_ROWS for m in s.methods) else []),
        f"- calibration: {s.calib_samples} windows x {s.seq_len} tokens = {s.calib_samples * s.seq_len} tokens "
        f"from the first half (optrot+ Hessians, GPTQ); kurtosis/dfrot use {s.calib_tokens} activation rows "
        "of them",
        f"- evaluation: {windows} windows x {s.seq_len} tokens = {windows * s.seq_len} tokens "
        f"({windows * (s.seq_len - 1)} predicted) of the second half; logit errors on its first "
        f"{s.logit_windows} windows",
        "- quantization: weights symmetric per output channel or per group of 128 / 64 input columns (g128: "
        "the W4A16 scheme llm-compressor and vLLM use by default; RTN or GPTQ, damp 0.01, no act-order); A8 = "
        "8-bit symmetric per-token activations of every decoder linear, no online Hadamard; embeddings and "
        "lm_head in full precision",
        *(f"- {note} (`-` in the tables)" for note in skipped),
    ]
    return out


def perplexity_table(float_ppl: dict, rows: dict[str, MethodResult], names: list[str]) -> list[str]:
    out = ["## Perplexity", "", "Mean over the draws; the spread is in the next table.", "",
           "| method | rotation s | " + " | ".join(names) + " |",
           "|---|---:|" + "---:|" * len(names),
           "| float (unquantized) | - | " + " | ".join(fmt(float_ppl["ppl"]) for _ in names) + " |"]
    for m, r in rows.items():
        cells = " | ".join(fmt(r.mean_ppl(n)) for n in names)
        out.append(f"| {METHOD_LABELS[m]} | {_mean(r.rotation_seconds):.1f} | {cells} |")
    return out


def logit_table(rows: dict[str, MethodResult], names: list[str]) -> list[str]:
    out = ["## Relative logit error vs the float model", "",
           "`||L_q - L_float||_F / ||L_float||_F`, mean over the draws; `rotated float` is the rotated, "
           "unquantized model (rotation invariance check, largest over the draws).", "",
           "| method | rotated float | " + " | ".join(names) + " | solver loss R1 (start -> end) |",
           "|---|---:|" + "---:|" * len(names) + "---|"]
    for m, r in rows.items():
        loss = r.loss.get("R1")
        loss_s = f"{loss[0]:.4g} -> {loss[1]:.4g}" if loss and loss[0] is not None else "-"
        cells = " | ".join(fmt(_mean(r.logit_error[n]) if n in r.logit_error else None, 4) for n in names)
        out.append(f"| {METHOD_LABELS[m]} | {r.invariance_error:.1e} | {cells} | {loss_s} |")
    return out


def spread_table(rows: dict[str, MethodResult], names: list[str]) -> list[str]:
    """Per cell: the perplexity's max - min and standard deviation (ddof 1) over the draws."""
    if all(len(r.seeds) < 2 for r in rows.values()):
        return []
    out = ["## Perplexity spread over draws", "",
           "Per cell `max - min / standard deviation` of the perplexity over the method's draws (`draws` "
           "column; one draw: `-`).", "",
           "| method | draws | " + " | ".join(names) + " |", "|---|---:|" + "---:|" * len(names)]
    for m, r in rows.items():
        cells = " | ".join(_spread(r.ppl.get(n, [])) for n in names)
        out.append(f"| {METHOD_LABELS[m]} | {len(r.seeds)} | {cells} |")
    return out


def _spread(xs: list[float]) -> str:
    if len(xs) < 2:
        return "-"
    return f"{max(xs) - min(xs):.4f} / {statistics.stdev(xs):.4f}"


def time_section(rows: dict[str, MethodResult], float_ppl: dict, timings: dict) -> list[str]:
    rotation = sum(sum(r.rotation_seconds) for r in rows.values())
    quant = sum(sum(r.quant_seconds.values()) for r in rows.values())
    evaluation = sum(sum(r.eval_seconds.values()) for r in rows.values()) + float_ppl["seconds"]
    jobs = timings.get("jobs", 1)
    workers = f" (methods in {jobs} worker processes; the per-part sums below add up their times)" if jobs > 1 else ""
    return ["## Time", "",
            f"total {timings['total']:.0f} s{workers}: model {timings['model']:.0f} s, float baseline "
            f"{timings['baseline']:.0f} s, methods {timings['methods']:.0f} s (all draws: rotation {rotation:.0f} s, "
            f"quantization {quant:.0f} s, evaluation {evaluation:.0f} s)"] + (
        ["", f"Read from the record of an earlier run with the same settings (their seconds are that run's): "
              f"{', '.join(METHOD_LABELS[m] for m in timings['resumed'])}."] if timings.get("resumed") else [])


def render(settings: Settings, prepared: PreparedModel, split, float_ppl: dict, rows: dict[str, MethodResult],
           n_eval: int, timings: dict, skipped: list[str] = ()) -> str:
    """The markdown report (also printed): settings, tables, the claims with their intervals, times;
    ``skipped``: why some quantization columns were not run."""
    names = list(settings.column_configs())
    sections = [settings_section(settings, prepared, split, n_eval, skipped), perplexity_table(float_ppl, rows, names),
                spread_table(rows, names), logit_table(rows, names), claims_section(rows, METHOD_LABELS),
                time_section(rows, float_ppl, timings)]
    return "\n\n".join("\n".join(sec) for sec in sections if sec) + "\n"


FINDINGS_MARKER = "<!-- findings: written by hand, kept when the benchmark rewrites this page -->"
"""Everything from this line on in an existing results page is kept: the analysis of the numbers
(how they were made is stated there) is not the benchmark's to overwrite."""


def kept_findings(path: Path) -> str:
    """The hand-written findings of an existing page (from :data:`FINDINGS_MARKER` on, after a blank
    line), or "" when the page or its marker is missing."""
    old = path.read_text(encoding="utf-8") if path.is_file() else ""
    return "\n" + old[old.index(FINDINGS_MARKER):] if FINDINGS_MARKER in old else ""


def write_results(path: Path, body: str, command: str, header: list[str]) -> None:
    """``path`` <- a markdown page with the command, date, machine and ``body``, atomically; the
    hand-written findings of an existing page (from :data:`FINDINGS_MARKER` on) are carried over."""
    findings = kept_findings(path)
    text = "\n".join(["# Rotation quality benchmark", "",
                      "Written by `benchmarks/rotation_quality.py` down to the findings marker; rerun it rather "
                      "than editing the tables by hand.", "",
                      "```", command, "```", ""] + header + ["", body]) + findings
    with atomic_file(path) as f:
        f.write(text)


def render_record(record: dict) -> str:
    """The markdown body of a run saved by ``--json`` (:func:`render` on the objects rebuilt from it)."""
    s = dict(record["settings"], planted=PlantedLMSpec(**record["settings"]["planted"]),
             methods=tuple(record["settings"]["methods"]), text=Path(record["settings"]["text"]),
             cache_dir=Path(record["settings"]["cache_dir"]))
    s["model_dir"] = None if s["model_dir"] is None else Path(s["model_dir"])
    if s.get("columns") is not None:
        s["columns"] = tuple(s["columns"])
    rows = {r["method"]: MethodResult(**dict(r, seeds=tuple(r["seeds"]))) for r in record["rows"]}
    split = SimpleNamespace(describe=lambda: record["split"])
    return render(Settings(**s), SimpleNamespace(**record["model"]), split, record["float_ppl"], rows,
                  record["n_eval"], record["timings"], record["skipped"])


def publish(record: dict, out_path: Path | None) -> None:
    """Print the page of ``record`` (the run's header, then the body) and write it to ``out_path``."""
    body = render_record(record)
    print("\n".join(record["header"]) + "\n\n" + body)
    if out_path is not None:
        write_results(out_path, body, record["command"], record["header"])
        log(f"wrote {out_path}")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
