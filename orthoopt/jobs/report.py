"""``report.md``: what a quantize / oneshot run did, for a person, with its pictures (PNG).

Written into the output folder (with the checkpoint, atomically) by :func:`orthoopt.jobs.oneshot.oneshot`:

* the settings (model, rotation, scheme and quantizer, calibration, format and why),
* perplexity of the float input and of the quantized model on ``--eval-text`` (when given), with the
  ratio and its paired-bootstrap 95% interval (:func:`orthoopt.eval.paired_bootstrap`),
* seconds per phase,
* pictures, "input" (the model as given) next to "rotated" (after the rotation, when there is one):
  ``weight_channels.png`` (per-input-channel max |W| of the decoder block with the largest incoherence in
  the input), ``weight_layers.png`` (per decoder layer: mean incoherence and the RTN error at the run's
  weight bits) and ``loss_R1.png`` / ``loss_R2.png`` (the solver's loss curve, learned methods only).

The statistics are :func:`orthoopt.diagnostics.incoherence` and :func:`orthoopt.diagnostics.rtn_error`
of the decoder layers' weights (the embedding and ``lm_head`` stay in full precision and are left
out), so the pictures cost two passes over the quantized weights (about 4 s each for SmolLM2-135M on
one core).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from orthoopt.diagnostics.plots import plot_layer_bars, plot_solve_history, plot_weight_channels, save_figure
from orthoopt.diagnostics.report import stored_weights
from orthoopt.diagnostics.stats import DEFAULT_BITS, group_of, incoherence, layer_of, rtn_error

REPORT_FILE = "report.md"
PICTURES = ("weight_channels.png", "weight_layers.png")
"""Pictures every report has (plus ``loss_<phase>.png`` for a learned rotation)."""


@dataclass
class WeightSnapshot:
    """The weight statistics of a model at one moment (before or after rotation).

    label: the series name (``"input"``, ``"rotated"``); layers: per decoder layer ``{"group",
    "incoherence_mean", "rtn_error"}``; blocks: ``{name: incoherence}``; channels: ``{block name:
    per-input-channel max |W|}`` of the blocks asked for.
    """

    label: str
    layers: list[dict]
    blocks: dict[str, float]
    channels: dict[str, torch.Tensor]


def snapshot(model, label: str, bits: int = DEFAULT_BITS, channel_blocks: tuple[str, ...] = ()) -> WeightSnapshot:
    """Per-layer incoherence and ``bits``-bit RTN error of ``model``'s decoder weights (as stored).

    The layer's ``rtn_error`` pools its blocks (``sqrt(sum ||W - Q||^2 / sum ||W||^2)``, as
    :func:`orthoopt.diagnostics.aggregate_blocks`); ``channel_blocks`` names the blocks whose
    per-input-channel max |W| is kept (default: the one with the largest incoherence).
    """
    weights = {n: W for n, W in stored_weights(model).items() if layer_of(n) is not None}
    groups: dict[str, dict] = {}
    blocks: dict[str, float] = {}
    for name, W in weights.items():
        g = groups.setdefault(group_of(name), {"inc": [], "sq": 0.0, "err": 0.0})
        try:
            inc, err = incoherence(W), rtn_error(W, bits)
        except ValueError:  # an all-zero block: no figures
            continue
        sq = float(W.detach().double().square().sum())
        blocks[name] = inc
        g["inc"].append(inc)
        g["sq"] += sq
        g["err"] += err * err * sq
    layers = [{"group": k, "incoherence_mean": sum(v["inc"]) / len(v["inc"]) if v["inc"] else None,
               "rtn_error": math.sqrt(v["err"] / v["sq"]) if v["sq"] else None} for k, v in groups.items()]
    wanted = channel_blocks or ((max(blocks, key=blocks.get),) if blocks else ())
    channels = {n: weights[n].detach().abs().amax(dim=0).float().clone() for n in wanted if n in weights}
    return WeightSnapshot(label, layers, blocks, channels)


def _fmt(v, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def _table(rows: list[tuple[str, object]]) -> list[str]:
    return ["| setting | value |", "|---|---|", *(f"| {k} | {_fmt(v)} |" for k, v in rows)]


def write_report(folder: Path, *, title: str, settings: list[tuple[str, object]], evaluation: dict | None,
                 phases: dict[str, float], snapshots: list[WeightSnapshot], bits: int,
                 solves: dict | None = None, notes: list[str] = ()) -> list[str]:
    """Write ``report.md`` and its pictures into ``folder``; returns the file names written.

    Parameters
    ----------
    folder : Path
        The output folder (its temporary, while the run writes it).
    title : str
        The first heading.
    settings : list of (str, value)
        The settings table, in order.
    evaluation : dict or None
        ``{"text", "windows", "seq_len", "tokens", "float": ppl, "quantized": ppl, "ratio", "ci95",
        "verdict", "resamples"}``; None: no ``--eval-text``.
    phases : dict
        ``{phase: seconds}``.
    snapshots : list of WeightSnapshot
        ``input`` first, then ``rotated`` when there was a rotation; empty when the weights were never
        in memory at once (``--streamed``: the report says so instead of drawing them).
    bits : int
        The RTN error's weight bits (shown in the picture).
    solves : dict, optional
        ``{phase: SolveResult}`` of a learned rotation (loss curves).
    notes : list of str
        Lines added under "Notes" (e.g. why the format was chosen).
    """
    written: list[str] = []
    lines = [f"# {title}", "", "## Settings", "", *_table(settings), ""]
    lines += ["## Perplexity", ""]
    if evaluation is None:
        lines += ["Not measured: pass `--eval-text TEXT_FILE` to compare the float and the quantized model.", ""]
    else:
        e = evaluation
        ci = e.get("ci95")
        lines += [f"On `{e['text']}`: {e['windows']} windows of {e['seq_len']} tokens ({e['tokens']} predicted "
                  "tokens); the ratio's 95% interval is a paired bootstrap over the windows "
                  f"({e['resamples']} resamples).", "",
                  "| model | perplexity |", "|---|---:|", f"| float (input) | {_fmt(e['float'], 6)} |",
                  f"| quantized | {_fmt(e['quantized'], 6)} |", "",
                  f"Quantized / float: **{_fmt(e['ratio'], 5)}**"
                  + (f", 95% interval [{_fmt(ci[0], 5)}, {_fmt(ci[1], 5)}] ({e['verdict']})" if ci else ""), ""]
    lines += ["## Time", "", "| phase | seconds |", "|---|---:|",
              *(f"| {k} | {v:.1f} |" for k, v in phases.items()), f"| total | {sum(phases.values()):.1f} |", ""]

    lines += ["## Pictures", ""]
    if not snapshots:
        lines += ["Weight statistics not measured: the run held one decoder layer at a time (`--streamed`).", ""]
    else:
        written += _weight_pictures(folder, lines, snapshots, bits)
    for phase, res in (solves or {}).items():
        if not res.history:
            continue
        fig = plot_solve_history(res, title=f"Rotation {phase}: solver loss per step")
        name = f"loss_{phase}"
        written += [p.name for p in save_figure(fig, folder / name, formats=("png",))]
        lines += [f"Solver loss of {phase} ({len(res.history)} steps, {_fmt(res.history[0])} -> "
                  f"{_fmt(res.final_loss)}):", "", f"![loss {phase}]({name}.png)", ""]
    if notes:
        lines += ["## Notes", "", *(f"- {n}" for n in notes), ""]
    (folder / REPORT_FILE).write_text("\n".join(lines), encoding="utf-8")
    return [REPORT_FILE, *written]


def _weight_pictures(folder: Path, lines: list[str], snapshots: list, bits: int) -> list[str]:
    """The weight-channel and per-layer pictures of ``snapshots`` (their lines appended to ``lines``)."""
    written: list[str] = []
    first = snapshots[0]
    block = next(iter(first.channels), None)
    labels = ", ".join(f"`{s.label}`" for s in snapshots)
    if block is not None:
        fig = plot_weight_channels({s.label: _as_matrix(s.channels.get(block)) for s in snapshots if block in s.channels},
                                   block, title=f"Per-input-channel max |W| of {block} ({labels})")
        written += [p.name for p in save_figure(fig, folder / "weight_channels", formats=("png",))]
        lines += [f"Per-input-channel max |W| of `{block}` (the decoder block with the largest incoherence in the "
                  "input): a tall column sets the quantization scale of every row it meets.", "",
                  "![per-channel max |W|](weight_channels.png)", ""]
    fig = plot_layer_bars({s.label: s.layers for s in snapshots}, ("incoherence_mean", "rtn_error"),
                          title=f"Per decoder layer: incoherence and W{bits} RTN error ({labels})",
                          metric_labels={"rtn_error": (f"W{bits} RTN relative error ||W - Q(W)|| / ||W|| "
                                                       "(symmetric, per output channel; pooled over the layer)",
                                                       "error (unitless)")})
    written += [p.name for p in save_figure(fig, folder / "weight_layers", formats=("png",))]
    lines += ["Per decoder layer: mean incoherence `max|w| sqrt(n) / ||W||_F` of its blocks (1 = flat) and the "
              f"relative error of {bits}-bit round-to-nearest, per output channel.", "",
              "![per-layer incoherence and RTN error](weight_layers.png)", ""]
    return written


def _as_matrix(v: torch.Tensor) -> torch.Tensor:
    """A channel vector as the ``[1, in]`` weight :func:`plot_weight_channels` takes (max over one row is itself)."""
    return v.reshape(1, -1)


__all__ = ["PICTURES", "REPORT_FILE", "WeightSnapshot", "snapshot", "write_report"]
