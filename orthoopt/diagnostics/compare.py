"""Diagnose several model folders side by side: statistics tables, overlaid plots, ``summary.json``.

This is what ``orthoopt diagnose`` runs. Models are measured as stored (no norm fusion, no rotation;
see :mod:`orthoopt.diagnostics.report`), one at a time, keeping only what the plots need from each.
Typical series: the original model, a Hadamard-rotated copy, an OptRot-rotated copy.

Files written into the output folder (atomically, as one folder):

====================================  ==========================================================
``weight_layers.{png,svg}``           per-layer bars: incoherence, excess kurtosis, W4 RTN error
``weight_histogram.{png,svg}``        histogram of one block's entries (``block``) per model
``weight_channels.{png,svg}``         per-input-channel max |W| of the same block (weight outliers)
``activation_channels.{png,svg}``     per-channel max |x| of one linear input (with calibration)
``activation_heatmap.{png,svg}``      |x| over tokens x channels of the same input
``activation_layers.{png,svg}``       per-layer bars: max/median channel ratio of each input role
``summary.json``                      every table (see :func:`diagnose_models`)
====================================  ==========================================================
"""

from __future__ import annotations

import gc
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

import orthoopt
from orthoopt.models.io import load_model, load_tokenizer
from orthoopt.models.sources import resolve_source
from orthoopt.diagnostics.activations import DEFAULT_MASSIVE_RATIO, channel_max_abs
from orthoopt.diagnostics.plots import (
    plot_activation_heatmap,
    plot_channel_magnitudes,
    plot_layer_bars,
    plot_weight_channels,
    plot_weight_histogram,
    save_figure,
)
from orthoopt.diagnostics.report import (
    INPUT_ROLES,
    activation_report,
    calibration_tokens,
    capture_inputs,
    input_roles,
    stored_weights,
    weight_report,
)
from orthoopt.diagnostics.stats import DEFAULT_BITS, DEFAULT_K, aggregate_blocks
from orthoopt.errors import InvalidInputError
from orthoopt.quant.quantizer import MAX_BITS, MIN_BITS
from orthoopt.quant.calib import check_context, model_context
from orthoopt.utils.atomic import atomic_dir
from orthoopt.utils.checks import check_device
from orthoopt.utils.paths import prepare_output

SUMMARY_FILE = "summary.json"
DEFAULT_SEQ_LEN = 512
"""``--calib`` tokens per forward sequence when not given (shorter when the model's context is)."""
HEATMAP_TOKENS = 128
WEIGHT_METRICS = ("incoherence_mean", "excess_kurtosis_mean", "rtn_error")
ROLE_PANELS = ("attn_in", "attn_out", "mlp_in", "mlp_hidden")
"""Input roles of the per-layer activation plot (``head_in`` has one input only; it is in the JSON)."""
RESIDUAL_ROLES = ("attn_in", "mlp_in", "head_in")


@dataclass
class _Series:
    """What the plots need from one model after its tables are made."""

    label: str
    block_weight: torch.Tensor
    channel_max: torch.Tensor | None = None
    heatmap: torch.Tensor | None = None


def check_output_folder(out_dir: str | os.PathLike, inputs: Sequence[str | os.PathLike],
                        calib: str | os.PathLike | None = None) -> None:
    """Raise ValueError unless ``out_dir`` can be replaced safely (:func:`orthoopt.utils.paths.prepare_output`):
    it must not be, contain or lie inside an input (model folders, ``calib``), must be writable, and
    an existing non-empty ``out_dir`` must hold a previous ``summary.json``."""
    prepare_output(out_dir, {"MODEL_DIR": list(inputs), "--calib": calib}, marker=SUMMARY_FILE)


def _num_layers(path: Path) -> int | None:
    """The decoder depth of a model folder from its ``config.json`` (None when unknown)."""
    config = path / "config.json" if path.is_dir() else None
    if config is None or not config.is_file():
        return None
    try:
        value = json.loads(config.read_text(encoding="utf-8")).get("num_hidden_layers")
    except (OSError, ValueError):
        return None
    return value if isinstance(value, int) else None


def _layer_index(name: str) -> int | None:
    m = re.search(r"(?:^|\.)layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def diagnose_models(
    paths: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    labels: Sequence[str] | None = None,
    calib: str | os.PathLike | None = None,
    calib_tokens: int = 2048,
    seq_len: int | None = None,
    block: str | None = None,
    act_module: str | None = None,
    k: float = DEFAULT_K,
    bits: int = DEFAULT_BITS,
    massive_ratio: float = DEFAULT_MASSIVE_RATIO,
    massive_min_abs: float = 0.0,
    dtype: str | torch.dtype = "auto",
    progress: bool = True,
    streamed: bool = False,
    device: str | torch.device | None = None,
) -> dict:
    """Measure each model folder in ``paths``, write plots and ``summary.json`` into ``out_dir``.

    labels:      one series label per model (default: the folder names; must be unique).
    calib:       text file; with it, the first ``calib_tokens`` tokens (each model's own tokenizer),
                 cut into sequences of ``seq_len``, feed every linear layer and the activation
                 statistics and plots are added.
    seq_len:     at most each model's context (ValueError otherwise); default
                 :data:`DEFAULT_SEQ_LEN` or the model's context if shorter.
    block:       weight block of the histogram (default: the block with the largest incoherence in
                 the first model among the layers every model has); must exist in every model.
    act_module:  linear layer whose input the channel plot and heat map show (default: among the
                 layers reading the normalized residual stream, which R1 rotates (q/k/v, gate/up,
                 lm_head; see :data:`~orthoopt.diagnostics.report.INPUT_ROLES`), the one whose input
                 has the largest max/median channel magnitude in the first model).
    dtype:       the dtype each model is loaded (and its activations computed) in; ``"auto"``, the
                 default, is each checkpoint's own (:mod:`orthoopt.models.dtypes`), so a bfloat16
                 model is not upcast whole. The statistics are computed in float64 per tensor.
    streamed:    hold one decoder layer at a time (:class:`~orthoopt.diagnostics.report.LayeredWeights`
                 and, with ``calib``, :func:`~orthoopt.diagnostics.layered_acts.layered_activation_report`;
                 Hugging Face folders with safetensors weights): the same summary as without it.
    device:      where each model computes its statistics and calibration forward (default: the CPU):
                 the whole model is moved there after loading, or with ``streamed`` one layer at a
                 time; the captured inputs and the plots' data come back to the host. Refused before
                 any work when the device cannot compute.

    Returns the summary (also written as ``summary.json``)::

        {"orthoopt_version", "settings": {...}, "block", "act_module", "plots": [file names],
         "models": [{"label", "path", "model_type", "num_layers", "hidden_size",
                     "overall": aggregate_blocks(all blocks),
                     "weights": {"blocks": [...], "layers": [...]},
                     "activations": {"inputs": [...], "layers": [...]}   # with calib only
                    }, ...]}
    """
    if not paths:
        raise InvalidInputError("diagnose needs at least one model folder")
    from orthoopt.models.dtypes import parse_dtype

    parse_dtype(dtype)  # a bad name or device is refused before any work
    device = check_device(device, "device")
    sources = [resolve_source(p, progress=progress) for p in paths]  # fetches registered names if needed
    if labels is None:
        labels = [Path(s.spec).resolve().name if s.path is not None else s.spec for s in sources]
    labels = list(labels)
    paths = [s.path if s.path is not None else s.spec for s in sources]
    if len(labels) != len(paths):
        raise InvalidInputError(f"got {len(labels)} labels for {len(paths)} models")
    if len(set(labels)) != len(labels):
        raise InvalidInputError(f"series labels must be unique, got {labels} (pass labels explicitly)")
    if calib is not None and not Path(calib).is_file():
        raise FileNotFoundError(f"calibration text not found: {calib}")
    if calib_tokens < 1 or (seq_len is not None and seq_len < 1):
        raise InvalidInputError(f"calib_tokens and seq_len must be >= 1, got {calib_tokens} and {seq_len}")
    if streamed:
        not_folders = [str(s.spec) for s in sources if s.folder is None]
        if not_folders:
            raise InvalidInputError(f"--streamed reads Hugging Face folders with safetensors weights, got {not_folders}")
    if act_module is not None and calib is None:
        raise InvalidInputError("an activation module was chosen but no calibration text was given (--calib)")
    if not k > 0:
        raise InvalidInputError(f"outlier threshold k must be positive, got {k}")
    if not MIN_BITS <= bits <= MAX_BITS:
        raise InvalidInputError(f"RTN bits must be in [{MIN_BITS}, {MAX_BITS}], got {bits}")
    check_output_folder(out_dir, [s.path for s in sources if s.path is not None], calib)

    depths = [_num_layers(p) if isinstance(p, Path) else None for p in paths]
    common_depth = min(depths) if all(d is not None for d in depths) else None
    records, series = [], []
    for path, label in zip(paths, labels):
        record, s, block, act_module = _diagnose_one(
            path, label, calib=calib, calib_tokens=calib_tokens, seq_len=seq_len, block=block,
            act_module=act_module, k=k, bits=bits, massive_ratio=massive_ratio,
            massive_min_abs=massive_min_abs, progress=progress, common_depth=common_depth, dtype=dtype,
            streamed=streamed, device=device,
        )
        records.append(record)
        series.append(s)
        gc.collect()

    summary = {
        "orthoopt_version": orthoopt.__version__,
        "settings": {
            "outlier_k": k, "rtn_bits": bits, "calib": None if calib is None else str(calib),
            "calib_tokens": calib_tokens if calib is not None else None,
            "seq_len": (seq_len or DEFAULT_SEQ_LEN) if calib is not None else None,
            "massive_ratio": massive_ratio, "massive_min_abs": massive_min_abs, "dtype": str(dtype),
            "streamed": streamed,
        },
        "block": block,
        "act_module": act_module if calib is not None else None,
        "plots": [],
        "models": records,
    }
    with atomic_dir(out_dir) as tmp:
        summary["plots"] = _write_plots(tmp, records, series, block, act_module if calib else None)
        text = json.dumps(summary, indent=1, allow_nan=False)
        (tmp / SUMMARY_FILE).write_text(text + "\n")
    return summary


def _diagnose_one(path: Path | str, label: str, *, calib, calib_tokens: int, seq_len: int, block: str | None,
                  act_module: str | None, k: float, bits: int, massive_ratio: float, massive_min_abs: float,
                  progress: bool, common_depth: int | None = None,
                  dtype: str | torch.dtype = "auto", streamed: bool = False,
                  device: torch.device | None = None) -> tuple[dict, _Series, str, str | None]:
    """One model's summary record and plot data; ``block`` / ``act_module`` are chosen here when None
    (from the first model, among its first ``common_depth`` layers) and returned for the next models."""
    if streamed:
        from orthoopt.diagnostics.report import LayeredWeights
        from orthoopt.models.dtypes import resolve_model_dtype
        from orthoopt.models.onload import LayeredModel

        source = resolve_source(path, progress=progress)
        layered = LayeredModel(source.folder, resolve_model_dtype(source, dtype), device=device)
        model, weights = layered.model, LayeredWeights(layered)
    else:
        model = load_model(path, dtype=dtype)
        if device is not None:
            model.to(device)
        weights = stored_weights(model)
    if calib is not None and seq_len is not None:
        check_context(model, seq_len, "seq_len")  # before the (slow) weight statistics
    wrep = weight_report(weights, k=k, bits=bits, progress=progress)
    if block is None:
        shared = [r for r in wrep["blocks"] if common_depth is None or (_layer_index(r["name"]) or 0) < common_depth]
        defined = [r for r in (shared or wrep["blocks"]) if r["incoherence"] is not None] or wrep["blocks"]
        block = max(defined, key=lambda r: r["incoherence"] or 0.0)["name"]
    if block not in weights:
        raise InvalidInputError(f"block {block!r} is not a weight of {path} (e.g. {list(weights)[:3]})")
    overall = aggregate_blocks(wrep["blocks"])
    overall.pop("blocks")
    config = model.config
    record = {
        "label": label, "path": str(path), "model_type": getattr(config, "model_type", None),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "num_layers": getattr(config, "num_hidden_layers", None),
        "hidden_size": getattr(config, "hidden_size", None),
        "overall": overall, "weights": wrep,
    }
    s = _Series(label, weights[block].detach().to("cpu", copy=True))
    if streamed:
        weights.release()
    if calib is not None:
        tokenizer = load_tokenizer(path)
        if tokenizer is None:
            raise InvalidInputError(f"--calib needs a tokenizer in the model folder {path}")
        ids = calibration_tokens(calib, tokenizer, calib_tokens)
        if seq_len is None:
            seq_len = min(DEFAULT_SEQ_LEN, model_context(model) or DEFAULT_SEQ_LEN)
        if streamed:
            from orthoopt.diagnostics.layered_acts import layered_activation_report

            arep, inputs = layered_activation_report(layered, ids, seq_len, massive_ratio, massive_min_abs,
                                                     keep_rows=HEATMAP_TOKENS, progress=progress)
        else:
            inputs = capture_inputs(model, ids, seq_len=seq_len, progress=progress)
            arep = activation_report(inputs, massive_ratio, massive_min_abs, roles=input_roles(model),
                                     progress=progress)
        if act_module is None:
            candidates = [r for r in arep["inputs"] if r["role"] in RESIDUAL_ROLES and r["channel_max_ratio"] is not None]
            act_module = max(candidates or arep["inputs"], key=lambda r: r["channel_max_ratio"] or 0.0)["name"]
        if act_module not in inputs:
            raise InvalidInputError(f"act_module {act_module!r} is not a linear layer of {path} (e.g. {list(inputs)[:3]})")
        record["activations"] = arep
        if streamed:
            s.channel_max, s.heatmap = (x.cpu() for x in inputs[act_module])
        else:  # the captured inputs are on the host already
            s.channel_max = channel_max_abs(inputs[act_module])
            s.heatmap = inputs[act_module][:HEATMAP_TOKENS].clone()
        del inputs
    del model, weights
    return record, s, block, act_module


def _write_plots(folder: Path, records: list[dict], series: list[_Series], block: str,
                 act_module: str | None) -> list[str]:
    """Draw every figure and save it as PNG + SVG into ``folder``; returns the file names."""
    figures = {
        "weight_layers": plot_layer_bars({r["label"]: r["weights"]["layers"] for r in records}, WEIGHT_METRICS),
        "weight_histogram": plot_weight_histogram({s.label: s.block_weight for s in series}, block),
        "weight_channels": plot_weight_channels({s.label: s.block_weight for s in series}, block),
    }
    if act_module is not None:
        figures["activation_channels"] = plot_channel_magnitudes(
            {s.label: s.channel_max for s in series}, act_module)
        figures["activation_heatmap"] = plot_activation_heatmap(
            {s.label: s.heatmap for s in series}, act_module, max_tokens=HEATMAP_TOKENS)
        figures["activation_layers"] = plot_layer_bars(
            {r["label"]: _role_table(r["activations"]["layers"]) for r in records}, ROLE_PANELS,
            title="Outlier channels per layer input: largest / median per-channel max |x|",
            metric_labels={role: (INPUT_ROLES[role], "ratio (unitless)") for role in ROLE_PANELS})
    return [p.name for stem, fig in figures.items() for p in save_figure(fig, folder / stem)]


def _role_table(layers: list[dict]) -> list[dict]:
    """``[{"group", role: channel_max_ratio or None}]`` of the decoder layers (groups with a layer index)."""
    return [{"group": row["group"],
             **{role: row["by_role"].get(role, {}).get("channel_max_ratio") for role in ROLE_PANELS}}
            for row in layers if row["layer"] is not None]
