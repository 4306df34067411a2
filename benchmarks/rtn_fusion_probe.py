"""Why does per-channel W4 RTN get worse after norm fusion and rotation on a real model? A probe.

    python benchmarks/rtn_fusion_probe.py --model-dir MODEL [--eval-tokens 4096] [--threads 1]

Prints, for one checkpoint (SmolLM2-135M in ``docs/results.md``):

1. the residual RMSNorm gains (min / median / max per norm, and the channels whose gain is below 2% of
   the norm's median) and the residual stream's largest channels per layer on calibration windows
   (the massive activations);
2. W4 RTN perplexity (per output channel, symmetric; embeddings and lm_head in full precision) of
   variants that separate the effect of fusion from the effect of rotation:
   ``original`` (nothing fused), ``fused`` (norm gains folded into the readers, no rotation),
   ``hadamard`` (fused, random Hadamard R1 + R2), ``random`` (fused, Haar-random R1 + Hadamard R2),
   ``keep-massive`` (fused, R1 = identity on the K most massive residual channels and a random
   Hadamard on the rest, K the smallest count >= 4 whose complement has a Hadamard matrix) and
   ``fused+rescale`` / ``hadamard+rescale`` (after fusion/rotation, an AWQ-style per-channel gain is
   put back into each residual norm: ``d = 1 / s``, readers ``W * s``, ``s = mean|X|^a`` with ``a``
   searched per norm on the calibration windows for the least output error; exact in float);
3. the relative output error ``||X (Q(W) - W).T|| / ||X W.T||`` of each decoder role (qkv, o,
   gate_up, down; RTN W4) per layer, for original / fused / hadamard, on calibration windows;
4. the excess NLL of the quantized model over the float one by position in the evaluation window
   (first four positions, 4-31, 32-127, 128-): whether the loss sits on the attention-sink tokens.

Every variant's float perplexity is printed too: it must equal the original's (the transforms are exact).
Calibration: windows from the first half of the text; evaluation: the second half (``_data.py``).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from orthoopt.adapters import fusion, writeback
from orthoopt.adapters.archs import locate
from orthoopt.eval import perplexity
from orthoopt.hadamard import is_hadamard_size, random_hadamard
from orthoopt.manifold import random_orthogonal
from orthoopt.quant import quantize_model
from orthoopt.quant.config import QuantizeConfig
from orthoopt.quant.quantizer import QuantSpec
from orthoopt.quant.rtn import quantize_rtn

from _data import DEFAULT_TEXT, split_halves, token_ids
from _models import load_shared

SPEC = QuantSpec(bits=4, symmetric=True, group_size=None, mse=False)
ROLES = {"qkv": ("q", ("q", "k", "v")), "o": ("o", ("o",)), "gate_up": ("gate", ("gate", "up")), "down": ("down", ("down",))}
"""role -> (the linear whose input is captured, the linears that read that input)."""


def log(msg: str) -> None:
    print(msg, flush=True)


@torch.no_grad()
def capture_inputs(model, ids: torch.Tensor) -> dict[tuple[int, str], torch.Tensor]:
    """``{(layer, linear): X [tokens, in]}`` (float64) of the q, o, gate and down projections on ``ids``."""
    m = locate(model)
    caps: dict[tuple[int, str], torch.Tensor] = {}
    hooks = []
    for L in m.layers:
        for name in ("q", "o", "gate", "down"):
            def hook(mod, inp, out, key=(L.index, name)):
                caps[key] = inp[0].reshape(-1, inp[0].shape[-1]).double()
            hooks.append(L.projs[name].register_forward_hook(hook))
    try:
        model(input_ids=ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return caps


def massive_channels(model, ids: torch.Tensor, k: int) -> list[int]:
    """The ``k`` residual channels with the largest |activation| over all layers' hidden states."""
    with torch.no_grad():
        hs = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
    peak = torch.stack([h.abs().amax(dim=(0, 1)) for h in hs]).amax(0)
    return peak.topk(k).indices.tolist()


def keep_channels_r1(n: int, keep: list[int], Q: torch.Tensor) -> torch.Tensor:
    """``[n, n]`` orthogonal: the identity on channels ``keep``, ``Q`` on the others (in order)."""
    rest = torch.tensor([i for i in range(n) if i not in set(keep)])
    R = torch.eye(n, dtype=torch.float64)
    R[rest[:, None], rest[None, :]] = Q.to(torch.float64)
    return R


@torch.no_grad()
def variant(base, r1: str, seed: int = 0, keep: list[int] | None = None):
    """A fused copy of ``base`` with R1 of kind ``r1`` (none | hadamard | random | keep) and, unless
    ``r1 == "none"``, random Hadamard R2s."""
    model = copy.deepcopy(base)
    m = locate(model)
    fusion.fuse_norms(model, m)
    n, rots = m.hidden, {}
    if r1 == "hadamard":
        rots["R1"] = random_hadamard(n, seed=seed).double()
    elif r1 == "random":
        rots["R1"] = random_orthogonal(n, seed=seed, dtype=torch.float64)
    elif r1 == "keep":
        rots["R1"] = keep_channels_r1(n, keep, random_hadamard(n - len(keep), seed=seed).double())
    if r1 != "none":
        for L in m.layers:
            rots[f"R2.{L.index}"] = random_hadamard(m.head_dim, seed=seed + 1 + L.index).double()
    writeback.validate_rotations(m, rots)
    writeback.apply_rotations(m, rots)
    return model


@torch.no_grad()
def rescale_norms(model, ids: torch.Tensor, grid: int = 11) -> list[float]:
    """AWQ-style gains put back into the (fused, possibly rotated) residual norms; returns the chosen
    exponents. Exact in float: the norm's output is divided by ``s`` and its readers' columns multiplied."""
    m = locate(model)
    caps = capture_inputs(model, ids)
    chosen = []
    for L in m.layers:
        for norm, names, key in ((L.norms["input_norm"], ("q", "k", "v"), "q"), (L.norms["post_attn_norm"], ("gate", "up"), "gate")):
            X, lins = caps[(L.index, key)], [L.projs[n] for n in names]
            stat = X.abs().mean(0).clamp_min(1e-12)
            best = None
            for a in torch.linspace(0, 1, grid).tolist():
                s = stat ** a
                s = s / s.log().mean().exp()
                err = sum(float((((X / s) @ quantize_rtn((lin.weight.double() * s).to(lin.weight.dtype), SPEC).double().T
                                  - X @ lin.weight.double().T) ** 2).sum()) for lin in lins)
                if best is None or err < best[0]:
                    best = (err, a, s)
            _, a, s = best
            chosen.append(a)
            for lin in lins:
                lin.weight.copy_((lin.weight.double() * s).to(lin.weight.dtype))
            norm.weight.copy_((norm.weight.double() / s).to(norm.weight.dtype))
    return chosen


@torch.no_grad()
def role_errors(model, ids: torch.Tensor) -> dict[tuple[int, str], float]:
    """``{(layer, role): ||X (Q(W) - W).T||_F / ||X W.T||_F}`` summed over the role's linears (W4 RTN)."""
    m = locate(model)
    caps = capture_inputs(model, ids)
    out = {}
    for L in m.layers:
        for role, (key, names) in ROLES.items():
            X = caps[(L.index, key)]
            num = den = 0.0
            for name in names:
                W = L.projs[name].weight
                Wd = W.double()
                num += float(((X @ (quantize_rtn(W, SPEC).double() - Wd).T) ** 2).sum())
                den += float(((X @ Wd.T) ** 2).sum())
            out[(L.index, role)] = (num / den) ** 0.5
    return out


@torch.no_grad()
def nll_by_position(model, windows: torch.Tensor) -> torch.Tensor:
    """Mean NLL per predicted position ``[L - 1]`` over ``windows`` ``[N, L]``."""
    rows = []
    for w in windows:
        logits = model(input_ids=w[None], use_cache=False).logits[0].float()
        rows.append(F.cross_entropy(logits[:-1], w[1:], reduction="none"))
    return torch.stack(rows).mean(0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--calib-windows", type=int, default=4, help="calibration windows (rescale, errors, massive channels)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    base = load_shared(args.model_dir)
    model, tok = base.model, base.tokenizer
    split = split_halves(args.text)
    calib_ids, eval_ids = token_ids(split.calib, tok), token_ids(split.eval, tok)
    L = args.seq_len
    calib = calib_ids[: args.calib_windows * L].reshape(args.calib_windows, L)
    windows = eval_ids[: (args.eval_tokens // L) * L].reshape(-1, L)
    m = locate(model)

    log("## 1. Norm gains and massive activations")
    for layer in m.layers:
        for name, norm in (("input_norm", layer.norms["input_norm"]), ("post_attn_norm", layer.norms["post_attn_norm"])):
            g = norm.weight.detach().abs().float()
            small = (g < 0.02 * g.median()).nonzero().flatten().tolist()
            log(f"layer {layer.index:2d} {name:15s} gain min {g.min():.2e} median {g.median():.3f} max {g.max():.3f}"
                f"  channels below 2% of the median: {small}")
    with torch.no_grad():
        hs = model(input_ids=calib, output_hidden_states=True, use_cache=False).hidden_states
    for i, h in enumerate(hs):
        peak = h.abs().amax(dim=(0, 1))
        top = peak.topk(4)
        pos = h.abs().amax(dim=2).argmax(dim=1).tolist()
        log(f"hidden state {i:2d}: largest channels {top.indices.tolist()} |x| {[round(v, 1) for v in top.values.tolist()]}"
            f", median |x| {h.abs().median():.3f}, position of each window's max {pos}")

    k = next(k for k in range(4, m.hidden) if is_hadamard_size(m.hidden - k))
    keep = massive_channels(model, calib, k)
    log(f"\n## 2. W4 RTN perplexity ({windows.numel()} tokens of the second half, windows of {L})")
    variants = {
        "original": lambda: copy.deepcopy(model),
        "fused": lambda: variant(model, "none"),
        "hadamard": lambda: variant(model, "hadamard", args.seed),
        "random": lambda: variant(model, "random", args.seed),
        f"keep-massive {keep}": lambda: variant(model, "keep", args.seed, keep),
        "fused+rescale": lambda: variant(model, "none"),
        "hadamard+rescale": lambda: variant(model, "hadamard", args.seed),
    }
    log("| variant | float ppl | W4 RTN ppl |\n|---|---:|---:|")
    for name, make in variants.items():
        v = make()
        if name.endswith("+rescale"):
            rescale_norms(v, calib)
        fp = perplexity(v, windows.flatten(), seq_len=L, progress=False)["ppl"]
        quantize_model(v, QuantizeConfig("rtn", wbits=4), progress=False)
        qp = perplexity(v, windows.flatten(), seq_len=L, progress=False)["ppl"]
        log(f"| {name} | {fp:.3f} | {qp:.3f} |")

    log(f"\n## 3. Relative output error of W4 RTN per role and layer (calibration, {calib.numel()} tokens)")
    errs = {name: role_errors(v, calib) for name, v in
            (("original", model), ("fused", variant(model, "none")), ("hadamard", variant(model, "hadamard", args.seed)))}
    log("| role | " + " | ".join(f"{n} mean (min-max over layers)" for n in errs) + " |\n|---|" + "---|" * len(errs))
    for role in ROLES:
        cells = []
        for e in errs.values():
            vals = [e[(i, role)] for i in range(len(m.layers))]
            cells.append(f"{sum(vals) / len(vals):.3f} ({min(vals):.3f}-{max(vals):.3f})")
        log(f"| {role} | " + " | ".join(cells) + " |")

    log("\n## 4. Excess NLL of W4 RTN over float, by position in the window")
    ref = nll_by_position(model, windows)
    for name, v in (("original", copy.deepcopy(model)), ("hadamard", variant(model, "hadamard", args.seed))):
        quantize_model(v, QuantizeConfig("rtn", wbits=4), progress=False)
        d = nll_by_position(v, windows) - ref
        log(f"{name}: positions 1-4 {[round(x, 3) for x in d[:4].tolist()]}, 5-32 {d[4:32].mean():.3f}, "
            f"33-128 {d[32:128].mean():.3f}, 129- {d[128:].mean():.3f}")
    log(f"\nwall time {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
