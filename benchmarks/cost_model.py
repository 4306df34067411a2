"""A cost model of the layer-by-layer commands, checked against measured wall times (issue 23, item 5).

    python benchmarks/cost_model.py --measured ms1b.json ms3b.json ms8b.json   # check, then project
    python benchmarks/cost_model.py                                          # projections only
    python benchmarks/cost_model.py --rates cost.json --cpu-compute float32  # an earlier run's rates, float32 layers

Each command is split into phases whose work is a function of the Llama shape and the settings alone
(:func:`phases`): FLOPs of the dense products in the dtype they run in, bytes read and written,
elements quantized, GPTQ's per-linear solve. A phase's time is its work divided by a **rate** of this
machine, and the rates are measured here by microbenchmarks of the kernels the commands run
(:func:`measure_rates`: float64 / float32 matmuls and a bfloat16 ``nn.Linear`` at the commands' shapes, a safetensors
read and write of 256 MiB, ``quantize_rtn`` of a 4096 x 4096 bf16 weight, GPTQ's Hessian factorization
at each input width of :data:`GPTQ_WIDTHS` (per ``c^3``), its lazy block updates (per ``r c^2``) and its
column loop (``gptq_quantize`` at three sizes less those two, fitted to ``b r c + g c``), the float64
write-back ``rotate_rows`` at two widths fitted to ``a 2 r h^2 + b r h``, the fast write-back of a random
Hadamard R1 per element at each hidden size of :data:`FAST_HIDDEN`) plus each command's fixed cost, its wall time on ``model_size``'s tiny shape.
Nothing is fitted to the commands' timings at size, so ``--measured`` (records of ``benchmarks/model_size.py --json``) is a check:
predicted vs measured wall time per command and shape.

The projections give an OptRot + GPTQ W4 run (R1 and R2 learned with ``--steps`` loss-and-gradient
evaluations each, GPTQ true sequential on ``--windows`` x ``--seq-len`` tokens, evaluation of
``--eval-tokens``) for Llama-3-8B and Llama-3-70B on this CPU (measured rates) and on one H100-class
GPU (the assumed rates of :data:`H100`, stated in the output). The OptRot phase is modelled, not
measured at these sizes: one loss-and-gradient evaluation of the fused fourth-power objective forms
``W R`` for every weight that touches the residual stream and its gradient ``W^T G``: ``4 h P``
FLOPs in float32 (``h`` hidden size, ``P`` those weights' count).

Reads: the share of the checkpoint in the page cache (``model_size``'s ``resident`` record; 1 without
one) is read at the cached rate, the rest at the rate of an evicted file (``--disk-read`` sets it: a
virtual machine's host cache can serve an evicted file faster than its disk). In the projections a
checkpoint that fits the page cache (the machine's memory less 4 GiB) is read from it; one that does
not (70B on this 24 GiB machine) is read from disk on every pass, OptRot's R1 evaluations included.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for _p in (REPO, Path(__file__).resolve().parent):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from model_size import SHAPES, Shape  # noqa: E402  (benchmarks/ is on sys.path when a benchmark runs)
from _measure import best_time  # noqa: E402

MODELLED = ("quantize-rtn-streamed", "quantize-gptq-streamed", "eval-streamed", "rotate-streamed",
            "rotate-optrot-streamed")
# hidden sizes at which the fast Hadamard write-back is timed: the measured and the projected shapes
FAST_HIDDEN = (2048, 3072, 4096, 8192)
# input widths at which GPTQ's Hessian factorization is timed: the hidden and MLP sizes of the measured
# shapes (8192 is also 70B's hidden size); 70B's 28672 (about 4 minutes, 3 GB a matrix) takes 14336's rate
GPTQ_WIDTHS = (2048, 3072, 4096, 8192, 14336)
PROJECTED = {
    "8b": SHAPES["8b"],
    # meta-llama/Meta-Llama-3-70B: hidden 8192, 80 layers, 64 heads, 8 kv heads, MLP 28672, vocab 128256, untied
    "70b": Shape("llama-3-70b", 8192, 80, 64, 8, 28672, 128256, False, max_position_embeddings=8192),
}


@dataclass(frozen=True)
class Rates:
    """Throughputs of one machine: FLOP/s per dtype, bytes/s, RTN elements/s, GPTQ coefficients, start-up s."""

    f64: float
    f32: float
    bf16: float
    read: float
    write: float
    rtn: float
    gptq_rc2: float  # seconds per r c^2 FLOPs of GPTQ's lazy block updates (Err1 @ U[block, rest]), float32
    gptq_rc: float   # seconds per r c of GPTQ's column loop (the per-column updates inside a block)
    gptq_c: float    # seconds per column of that loop (the per-column launch / interpreter cost)
    rot_rh2: float   # seconds per 2 r h^2 of the float64 write-back W @ R of an [r, h] bf16 weight
    rot_rh: float    # seconds per r h (its casts to float64 and back)
    fixed: dict      # seconds of each command on a tiny model (start-up, skeleton, files, checks)
    note: str = ""
    # seconds per weight element of the fast write-back of a random Hadamard R1 (orthoopt.hadamard.fast_rotation)
    # at each hidden size {str(h): s}: measured on a reader [r, h] and a writer [h, r] bf16 weight (the
    # cast to float64, signs, one product per Kronecker factor of h, cast back); None or a missing h (a
    # rates file from before the fast write-back): the dense products
    rot_fast: dict | None = None
    # seconds per element of the norm fusion (orthoopt.adapters.fusion.fold_scale: W * w in float64, cast
    # back) of a bf16 reader weight; None (an older rates file): not counted
    fold: float | None = None
    # seconds per c^3 of GPTQ's factorization of a [c, c] Hessian (Cholesky, cholesky_inverse, Cholesky of
    # the inverse: orthoopt.quant.gptq) at each input width {str(c): s}; a width not measured takes the
    # nearest measured one below it; None (a rates file from before): not counted apart (older files
    # fitted it into gptq_rc2)
    gptq_factor: dict | None = None
    # bytes/s of a read the page cache does not hold (a file evicted first, benchmarks/_pagecache.py); None
    # (an older rates file): every read at ``read``. Under a virtual machine the host's cache can serve
    # an evicted file, so this can exceed the disk's rate (--disk-read sets it)
    disk: float | None = None
    # bytes of page cache a command's checkpoint may take (the machine's memory less 4 GiB for the
    # command itself): a checkpoint larger than this is read from disk on every pass; None: no limit
    cache_bytes: float | None = None


def _hadamard_passes(h: int) -> int:
    """Passes over a weight of the fast Hadamard write-back (the assumed GPU rate counts them): one per
    Kronecker factor, and 2 around them (cast to float64 and signs in one product, the cast back)."""
    from orthoopt.hadamard import factor_orders

    return len(factor_orders(h)) + 2


# One H100-class GPU (SXM), assumed, not measured: half of the peak dense rates (FP64 tensor 67,
# FP32 67, BF16 989 TFLOP/s), layers arriving over PCIe at 20 GB/s from page-cached files, and
# GPTQ's per-column step costing ~12 kernel launches (~0.1 ms per column).
H100 = Rates(f64=33e12, f32=33e12, bf16=400e12, read=20e9, write=5e9, rtn=50e9,
             gptq_rc2=1 / 33e12, gptq_rc=2 / 1.5e12, gptq_c=1e-4, rot_rh2=1 / 33e12, rot_rh=20 / 1.5e12,
             fixed={}, note="assumed: 50% of H100 SXM peak FP64/FP32, 40% of BF16, PCIe 20 GB/s in, 5 GB/s out, "
                            "0.1 ms per GPTQ column, 10 s fixed per command, 1.5 TB/s for the fast Hadamard write-back "
                            "(16 B per element per pass: factors + 2) and the norm fusion (4 B per element), GPTQ's Hessian "
                            "factorization (4/3 c^3 FLOPs) at 10 TFLOP/s; the host of the lent H100 "
                            "machine: 128 GiB (124 for the page cache), an NVMe disk read at 2 GB/s",
             rot_fast={str(h): _hadamard_passes(h) * 16 / 1.5e12 for h in FAST_HIDDEN}, fold=4 / 1.5e12,
             gptq_factor={str(c): (4 / 3) / 10e12 for c in GPTQ_WIDTHS}, disk=2e9, cache_bytes=124 * 2 ** 30)
FIXED_DEFAULT = 10.0


def _save_synced(save_file, w, path: Path) -> None:
    save_file({"w": w}, str(path))
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def measure_rates() -> Rates:
    """The rates of this machine, from microbenchmarks of the commands' own kernels (~1 minute)."""
    import torch
    from safetensors.torch import save_file

    from orthoopt.core.grid import QuantSpec
    from orthoopt.models.safetensors_folder import SafetensorsCheckpoint
    from orthoopt.quant.gptq import gptq_quantize
    from orthoopt.quant.rtn import quantize_rtn

    from orthoopt.utils.heap import release_large_blocks

    release_large_blocks()  # the allocator setting of the commands it models (orthoopt.utils.heap)
    g = torch.Generator().manual_seed(0)
    gemm = {}
    for dtype, (m, k, n) in {torch.float64: (2048, 2048, 2048), torch.float32: (2048, 2048, 2048)}.items():
        a, b = torch.randn(m, k, generator=g).to(dtype), torch.randn(k, n, generator=g).to(dtype)
        gemm[dtype] = 2 * m * k * n / best_time(lambda: a @ b)
    # bf16 runs in the layers' nn.Linear: x [tokens, in] times a weight stored [out, in] (F.linear), one
    # window of 256 tokens at a time. The layout matters where bf16 has no native kernel: on an AVX2 CPU
    # (no AVX512-BF16 / AMX) F.linear ran at 7.8 GFLOP/s and x @ B with B stored [in, out] at 0.2
    x, w = torch.randn(256, 2048, generator=g).to(torch.bfloat16), torch.randn(8192, 2048, generator=g).to(torch.bfloat16)
    gemm[torch.bfloat16] = 2 * 256 * 2048 * 8192 / best_time(lambda: torch.nn.functional.linear(x, w))
    with tempfile.TemporaryDirectory() as d:
        w = torch.randn(8192, 16384, generator=g).to(torch.bfloat16)  # 256 MiB
        path = Path(d) / "model.safetensors"
        # sustained: a command writes gigabytes, more than the page cache holds dirty, so the file is
        # synced (without it 256 MiB land in the cache: 1.48 GB/s measured, while the 3B rotate's 7.2 GB
        # were written at 0.53 GB/s)
        write = w.numel() * 2 / best_time(lambda: _save_synced(save_file, w, path), repeats=2)
        (Path(d) / "config.json").write_text("{}")
        ck = SafetensorsCheckpoint(d)
        read = w.numel() * 2 / best_time(lambda: ck.read(["w"], torch.bfloat16)["w"].clone(), repeats=2)
        import _pagecache

        def evicted():
            _pagecache.evict([path])
            return ck.read(["w"], torch.bfloat16)["w"].clone()

        # evicting is inside the timed call: an fadvise of a synced file, microseconds
        disk = w.numel() * 2 / best_time(evicted, repeats=2)
    spec = QuantSpec(bits=4)
    x = torch.randn(4096, 4096, generator=g).to(torch.bfloat16)
    rtn = x.numel() / best_time(lambda: quantize_rtn(x, spec))
    # GPTQ, in its three parts: the factorization of each [c, c] Hessian at the widths the shapes have
    # (its time per c^3 grows with c: 33 G c^3/s at 2048, 92 G at 14336 on this machine), the lazy block
    # updates (r c^2 FLOPs, at the rate of their own product), and the column loop (r c and c), fitted on
    # whole solves less the other two parts
    factor = {str(c): _time_factor(_spd(c, g)) / c ** 3 for c in GPTQ_WIDTHS}
    gptq_lazy = _time_lazy(4096, 4096, g)
    samples = []
    for r, c in ((8192, 2048), (4096, 4096), (1024, 8192)):
        W, H = torch.randn(r, c, generator=g), _spd(c, g)
        t = best_time(lambda: gptq_quantize(W, H, spec), repeats=1, warmup=0)
        samples.append((r, c, t - factor[str(c)] * c ** 3 - gptq_lazy * r * c * c))
    gptq_loop = _fit([[r * c, c] for r, c, _ in samples], [t for *_, t in samples])
    from orthoopt.streaming.layer_rotation import rotate_rows

    rot = []
    for h in (2048, 4096):
        W = torch.randn(4096, h, generator=g).to(torch.bfloat16)
        R = torch.linalg.qr(torch.randn(h, h, generator=g, dtype=torch.float64))[0]
        rot.append((4096, h, best_time(lambda: rotate_rows(W, R), repeats=2)))
    rot_coef = _fit([[2 * r * h * h, r * h] for r, h, _ in rot], [t for *_, t in rot])
    from orthoopt.hadamard import fast_rotation, random_hadamard

    from orthoopt.adapters.fusion import fold_scale

    W, w = torch.randn(8192, 2048, generator=g).to(torch.bfloat16), torch.rand(2048, generator=g, dtype=torch.float64)
    fold = best_time(lambda: fold_scale(W, w), repeats=2) / W.numel()
    fast = {}
    for h in FAST_HIDDEN:  # a reader W @ R1 and a writer R1^T W, as rotate_layer forms them: 2^24 elements each
        r = (1 << 24) // h
        reader, writer = torch.randn(r, h, generator=g).to(torch.bfloat16), torch.randn(h, r, generator=g).to(torch.bfloat16)
        op = fast_rotation(random_hadamard(h))
        t = best_time(lambda: (op.right(reader, torch.float64).to(torch.bfloat16),
                               op.left_t(writer, torch.float64).to(torch.bfloat16)), repeats=2)
        fast[str(h)] = t / (2 * r * h)
    return Rates(f64=gemm[torch.float64], f32=gemm[torch.float32], bf16=gemm[torch.bfloat16], read=read,
                 write=write, rtn=rtn, gptq_rc2=gptq_lazy, gptq_rc=gptq_loop[0], gptq_c=gptq_loop[1],
                 rot_rh2=rot_coef[0], rot_rh=rot_coef[1], fixed=fixed_costs(),
                 note=f"measured here, {torch.get_num_threads()} torch threads",
                 rot_fast=fast, fold=fold, gptq_factor=factor, disk=disk, cache_bytes=_cache_bytes())


def _cache_bytes() -> float | None:
    """This machine's memory (``MemTotal``) less 4 GiB: the page cache a command's checkpoint may take."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024 - 4 * 2 ** 30
    except OSError:
        pass
    return None


def _spd(c: int, g):
    """A symmetric positive definite ``[c, c]`` float32 matrix, cheaply (diagonally dominant: the Cholesky
    kernels' time does not depend on the values)."""
    import torch

    a = torch.rand(c, c, generator=g)
    a = a + a.T
    a.diagonal().add_(2 * c)
    return a


def _time_factor(H) -> float:
    """Seconds of GPTQ's factorization of ``H`` (``orthoopt.quant.gptq._inverse_factor``, the call
    :func:`orthoopt.quant.gptq.gptq_quantize` makes: ``L``, ``H^-1``, the upper Cholesky factor of
    ``H^-1``); it consumes ``H``, so each timed call factors a fresh copy (``c^2`` to copy, against ``c^3``)."""
    from orthoopt.quant.gptq import _inverse_factor

    return best_time(lambda: _inverse_factor(H.clone()), repeats=1, warmup=0)


def _time_lazy(r: int, c: int, g, block: int = 128) -> float:
    """Seconds per ``r c^2`` of GPTQ's lazy block updates of an ``[r, c]`` weight, its own in-place product
    per block of ``block`` columns (``2 r block (c - i2)`` FLOPs each: about ``r c^2`` in all)."""
    import torch

    W, E, U = torch.randn(r, c, generator=g), torch.randn(r, block, generator=g), torch.randn(c, c, generator=g)

    def lazy():
        for i1 in range(0, c, block):
            W[:, i1 + block:].addmm_(E, U[i1:i1 + block, i1 + block:], alpha=-1)

    return best_time(lazy, repeats=2) / (r * c * c)


def _fit(rows, times) -> list[float]:
    """Coefficients of ``times ~ rows @ coef``, least squares in relative error (each sample's row and time
    divided by its time), clamped at 0; as many samples as coefficients: solved."""
    import torch

    A, t = torch.tensor(rows, dtype=torch.float64), torch.tensor(times, dtype=torch.float64)
    w = 1 / t.abs().clamp(min=1e-9)
    return [float(v) for v in torch.linalg.lstsq(A * w[:, None], (t * w)[:, None]).solution.squeeze(1).clamp(min=0)]


def fixed_costs() -> dict:
    """Wall seconds of each modelled command on ``model_size``'s tiny shape (2 layers, hidden 64): what a
    command costs besides its work (interpreter start-up, imports, the skeleton, config and tokenizer
    files, the memory check), measured the way ``model_size`` measures the real shapes."""
    import model_size

    with tempfile.TemporaryDirectory() as d:
        records = model_size.run_shape(SHAPES["tiny"], MODELLED, Path(d), 4, 256, False, use_time=False,
                                       progress=lambda _: None)
    return {r.command: r.wall_s for r in records if r.returncode == 0}


# the work ---------------------------------------------------------------------------------------

def linears(s: Shape) -> list[tuple[str, int, int]]:
    """``(name, rows, cols)`` of one decoder layer's linears."""
    h, d = s.hidden_size, s.hidden_size // s.num_attention_heads
    kv = s.num_key_value_heads * d
    return [("q", h, h), ("k", kv, h), ("v", kv, h), ("o", h, h),
            ("gate", s.intermediate_size, h), ("up", s.intermediate_size, h), ("down", h, s.intermediate_size)]


def counts(s: Shape) -> dict[str, int]:
    """Parameter counts: per layer, all layers, embedding (and untied lm_head), total."""
    layer = sum(r * c for _, r, c in linears(s))
    embed = s.vocab_size * s.hidden_size
    heads = embed * (1 if s.tie_word_embeddings else 2)
    return {"layer": layer, "layers": layer * s.num_hidden_layers, "embed": embed, "heads": heads,
            "total": layer * s.num_hidden_layers + heads}


def _gptq_seconds(s: Shape, r: Rates) -> float:
    """GPTQ's solves, one per linear of every layer: the factorization of its ``[c, c]`` Hessian, the lazy
    block updates and the column loop of an ``[m, c]`` weight."""
    return s.num_hidden_layers * sum(_factor_seconds(c, r) + r.gptq_rc2 * m * c * c + r.gptq_rc * m * c
                                     + r.gptq_c * c for _, m, c in linears(s))


def _factor_seconds(c: int, r: Rates) -> float:
    """The factorization of a ``[c, c]`` Hessian: ``c^3`` times the seconds per ``c^3`` measured at ``c``, or
    at the nearest measured width below it (the smallest measured when none is below; 0 without
    measurements)."""
    if not r.gptq_factor:
        return 0.0
    widths = sorted(int(k) for k in r.gptq_factor)
    below = [w for w in widths if w <= c]
    return r.gptq_factor[str(below[-1] if below else widths[0])] * c ** 3


def _rotate_seconds(s: Shape, r: Rates) -> float:
    """The float64 write-back of R1 into every weight touching the residual stream (``2 h`` FLOPs per
    weight, ``W @ R`` or ``R^T @ W``) and the casts around each product."""
    n, h = counts(s), s.hidden_size
    return (n["layers"] + n["heads"]) * (2 * h * r.rot_rh2 + r.rot_rh)


def _fold_seconds(s: Shape, r: Rates) -> float:
    """The norm fusion: each layer's two pre-norms folded into their readers (q, k, v; gate, up) and the
    final norm into lm_head, one float64 product per element (:func:`orthoopt.adapters.fusion.fold_scale`)."""
    if r.fold is None:
        return 0.0
    readers = sum(rows * cols for name, rows, cols in linears(s) if name in ("q", "k", "v", "gate", "up"))
    return (readers * s.num_hidden_layers + counts(s)["embed"]) * r.fold


def _hadamard_rotate_seconds(s: Shape, r: Rates) -> float:
    """The R1 write-back of a random Hadamard R1: the fast transform's measured seconds per element at this
    hidden size when the rates have it, else the dense float64 products of :func:`_rotate_seconds`."""
    per_element = (r.rot_fast or {}).get(str(s.hidden_size))
    if per_element is None:
        return _rotate_seconds(s, r)
    n = counts(s)
    return (n["layers"] + n["heads"]) * per_element


def _read_seconds(nbytes: float, rates: Rates, cached: float) -> float:
    """Reading ``nbytes`` of which the share ``cached`` is in the page cache, the rest on disk."""
    disk = rates.disk or rates.read
    return nbytes * (cached / rates.read + (1 - cached) / disk)


def fits_cache(s: Shape, rates: Rates) -> bool:
    """Whether the bf16 checkpoint of ``s`` fits in the page cache ``rates.cache_bytes`` leaves it."""
    return rates.cache_bytes is None or 2 * counts(s)["total"] <= rates.cache_bytes


def phases(s: Shape, command: str, rates: Rates, windows: int = 4, seq_len: int = 256,
           steps: int = 150, evaluations: dict | None = None, cached: float = 1.0) -> dict[str, float]:
    """Seconds per phase of ``command`` (a ``model_size`` command name, or ``optrot``) on ``rates``;
    OptRot makes ``steps`` loss-and-gradient evaluations for R1 and for each layer's R2, or those
    ``evaluations`` (``{"R1": n, "R2": all layers' n}``, from a run's report) when given.

    ``cached`` is the share of the checkpoint in the page cache as the command starts (``model_size``'s
    record of it); its first read takes the rest from disk (``rates.disk``). A second read of the same
    bytes (OptRot's passes, the embedding read again) finds them cached when the checkpoint fits the
    page cache (:func:`fits_cache`), else reads the disk again."""
    n = counts(s)
    again = 1.0 if fits_cache(s, rates) else 0.0
    h, L = s.hidden_size, s.num_hidden_layers
    disk = 2 * n["total"]  # bf16 bytes
    tokens = windows * seq_len
    # a rotation folds the final norm into lm_head, which unties a tied one (the random checkpoints'
    # norms are not ones): the embedding and lm_head are both rotated and written
    untied = replace(s, tie_word_embeddings=False)
    extra = counts(untied)["heads"] - n["heads"]
    forward = 2 * tokens * n["layers"] + 4 * tokens * seq_len * h * L // 2  # linears + causal attention
    out: dict[str, float] = {"fixed": rates.fixed.get("rotate-streamed" if command == "optrot" else command,
                                                        FIXED_DEFAULT)}
    if command == "quantize-rtn-streamed":
        out |= {"read": _read_seconds(disk, rates, cached), "RTN": n["layers"] / rates.rtn, "write": disk / rates.write,
                "reload embedding": _read_seconds(2 * n["heads"], rates, again)}
    elif command == "quantize-gptq-streamed":
        hessians = 2 * tokens * L * (3 * h * h + s.intermediate_size ** 2)  # X^T X of the four inputs, float32
        out |= {"read": _read_seconds(disk, rates, cached), "calibration forwards": 2 * forward / rates.bf16,
                "Hessians": hessians / rates.f32, "GPTQ solve": _gptq_seconds(s, rates),
                "write": disk / rates.write, "reload embedding": _read_seconds(2 * n["heads"], rates, again)}
    elif command in ("eval-streamed", "eval-float32-streamed"):  # the layers compute in bf16 or float32
        rate = rates.bf16 if command == "eval-streamed" else rates.f32
        out |= {"read": _read_seconds(disk, rates, cached), "layers": forward / rate, "lm_head": 2 * tokens * n["embed"] / rate}
    elif command == "rotate-streamed":  # hadamard: every tensor W R1 (or R1^T W) in float64, by the fast transform
        r2 = 2 * (h // s.num_attention_heads) * 2 * h * h * L  # v rows and o columns per head
        out |= {"read": _read_seconds(disk, rates, cached), "fuse norms": _fold_seconds(s, rates),
                "R1 products": _hadamard_rotate_seconds(untied, rates),
                "R2 products": r2 / rates.f64, "write": (disk + 2 * extra) / rates.write}
    elif command in ("optrot", "rotate-optrot-streamed"):
        # R1 and R2 learned, data-free: each R1 evaluation reads the layers (streamed) and forms W R and
        # W^T G for every layer weight (4 h P float32 FLOPs; the embedding and lm_head are not in the
        # objective by default); each R2 evaluation 4 d per v/o weight of its layer
        d = h // s.num_attention_heads
        e1 = steps if evaluations is None else evaluations.get("R1", 0)
        e2 = steps * L if evaluations is None else evaluations.get("R2", 0)
        out |= {"read": _read_seconds(disk, rates, cached) + _read_seconds(disk + e1 * 2 * n["layers"], rates, again),
                "R1 objective": e1 * 4 * h * n["layers"] / rates.f32,
                "R2 objective": e2 * 4 * d * 2 * h * h / rates.f32,
                "fuse norms": _fold_seconds(s, rates), "write-back": _rotate_seconds(untied, rates),
                "write": (disk + 2 * extra) / rates.write}
    else:
        raise ValueError(f"no cost model for {command!r}")
    return out


def pipeline(s: Shape, rates: Rates, windows: int, seq_len: int, steps: int, eval_tokens: int) -> dict[str, float]:
    """An OptRot + GPTQ W4 run with evaluation, phase by phase (seconds). Each command reads its input from
    the page cache when the checkpoint fits it (:func:`fits_cache`; the rotation's input read once
    before), else from disk."""
    cached = 1.0 if fits_cache(s, rates) else 0.0
    rot = phases(s, "optrot", rates, steps=steps, cached=cached)
    gptq = phases(s, "quantize-gptq-streamed", rates, windows, seq_len, cached=cached)
    ev = phases(s, "eval-streamed", rates, eval_tokens // seq_len, seq_len, cached=cached)
    return {"fixed (3 commands)": rot["fixed"] + gptq["fixed"] + ev["fixed"], "rotate: read, fuse, write-back, write": rot["read"] + rot["fuse norms"] + rot["write-back"] + rot["write"],
            "rotate: R1 objective": rot["R1 objective"], "rotate: R2 objective": rot["R2 objective"],
            "GPTQ: read + write": gptq["read"] + gptq["write"] + gptq["reload embedding"],
            "GPTQ: calibration + Hessians": gptq["calibration forwards"] + gptq["Hessians"],
            "GPTQ: solve": gptq["GPTQ solve"], "eval": ev["layers"] + ev["lm_head"] + ev["read"]}


def _gbps(v: float | None, unit: str = "GB/s") -> str:
    if v is None:
        return "-"
    return f"{v / 2 ** 30:.0f} GiB" if unit == "GiB" else f"{v / 1e9:.2f} {unit}"


def _per_c3(r: Rates) -> str:
    if not r.gptq_factor:
        return "(not apart)"
    return ", ".join(f"{1 / v / 1e9:.0f} G c^3/s at {c}" for c, v in r.gptq_factor.items())


def _fmt(sec: float) -> str:
    return f"{sec:.0f} s" if sec < 600 else f"{sec / 60:.0f} min" if sec < 36000 else f"{sec / 3600:.1f} h"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--measured", nargs="*", default=[], help="model_size.py --json records to check against")
    ap.add_argument("--steps", type=int, default=150, help="OptRot evaluations per phase in the projection [150]")
    ap.add_argument("--windows", type=int, default=128, help="GPTQ calibration windows in the projection [128]")
    ap.add_argument("--seq-len", type=int, default=2048, help="window length in the projection [2048]")
    ap.add_argument("--eval-tokens", type=int, default=1 << 18, help="evaluated tokens in the projection [262144]")
    ap.add_argument("--json", default=None, help="also write rates, checks and projections here")
    ap.add_argument("--rates", default=None, help="take this machine's rates from an earlier run's --json "
                    "instead of measuring them (checks against --measured then hold only for that machine)")
    ap.add_argument("--disk-read", type=float, default=None, metavar="GB/s",
                    help="this machine's read rate for what the page cache does not hold, instead of the measured "
                         "rate of an evicted file (which a virtual machine's host cache can serve faster than its disk)")
    ap.add_argument("--cpu-compute", choices=("bf16", "float32"), default="bf16",
                    help="dtype the layers' forwards run in on this CPU in the projection: bf16 (the checkpoint's, "
                         "the default) or float32 (--dtype float32; faster where the CPU has no native bf16 kernels)")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    rates = Rates(**json.loads(Path(args.rates).read_text())["rates"]) if args.rates else measure_rates()
    if args.disk_read is not None:
        rates = replace(rates, disk=args.disk_read * 1e9, note=rates.note + f"; disk read {args.disk_read} GB/s given")
    print(f"rates ({rates.note}): float64 {rates.f64 / 1e9:.1f}, float32 {rates.f32 / 1e9:.1f}, bf16 "
          f"{rates.bf16 / 1e9:.1f} GFLOP/s; read {rates.read / 1e9:.2f} (cached), {_gbps(rates.disk)} (evicted), write "
          f"{rates.write / 1e9:.2f} GB/s; page cache for a checkpoint {_gbps(rates.cache_bytes, 'GiB')}; RTN "
          f"{rates.rtn / 1e6:.0f} M elements/s; GPTQ factorization {_per_c3(rates)} + {rates.gptq_rc2:.3g} s/(r c^2) + "
          f"{rates.gptq_rc:.3g} s/(r c) + "
          f"{rates.gptq_c:.3g} s/column; write-back {rates.rot_rh2:.3g} s/(2 r h^2) + {rates.rot_rh:.3g} s/(r h); "
          f"fixed s per command {rates.fixed}")
    by_name = {s.name: s for s in [*SHAPES.values(), *PROJECTED.values()]}
    checks = []
    records = [r for f in args.measured for r in json.loads(Path(f).read_text())]
    if records:
        print("\n| shape | command | cached | measured s | model s | model / measured | largest phase |")
        print("|---|---|---:|---:|---:|---:|---|")
    for rec in records:
        if rec.get("wall_s") is None or rec["shape"] not in by_name:
            continue
        w = s = by_name[rec["shape"]]
        argv = rec["argv"]
        windows = int(argv[argv.index("--nsamples") + 1]) if "--nsamples" in argv else 4
        seq_len = int(argv[argv.index("--seq-len") + 1]) if "--seq-len" in argv else 256
        try:
            ph = phases(w, rec["command"], rates, windows, seq_len, evaluations=rec.get("evaluations"),
                        cached=1.0 if rec.get("resident") is None else rec["resident"])
        except ValueError:
            continue
        total = sum(ph.values())
        top = max(ph, key=ph.get)
        checks.append({"shape": s.name, "command": rec["command"], "measured_s": rec["wall_s"], "model_s": total,
                       "cached": rec.get("resident"), "phases": ph})
        cached = "-" if rec.get("resident") is None else f"{rec['resident']:.2f}"
        print(f"| {s.name} | {rec['command']} | {cached} | {rec['wall_s']:.1f} | {total:.1f} | {total / rec['wall_s']:.2f} | "
              f"{top} ({ph[top]:.1f} s) |")

    print(f"\nOptRot ({args.steps} evaluations per phase) + GPTQ W4 ({args.windows} x {args.seq_len} tokens, true "
          f"sequential) + eval ({args.eval_tokens} tokens), layer by layer:")
    cpu = rates if args.cpu_compute == "bf16" else replace(rates, bf16=rates.f32)
    machines = {f"this CPU{'' if args.cpu_compute == 'bf16' else ', float32 layers'}": cpu, "H100 (assumed)": H100}
    projections = {}
    for key, s in PROJECTED.items():
        for mname, r in machines.items():
            ph = pipeline(s, r, args.windows, args.seq_len, args.steps, args.eval_tokens)
            projections[f"{s.name} / {mname}"] = ph
    names = list(next(iter(projections.values())))
    print("\n| phase | " + " | ".join(projections) + " |")
    print("|---|" + "---:|" * len(projections))
    for p in names:
        print(f"| {p} | " + " | ".join(_fmt(ph[p]) for ph in projections.values()) + " |")
    print("| **total** | " + " | ".join(f"**{_fmt(sum(ph.values()))}**" for ph in projections.values()) + " |")
    print(f"\nH100 rates: {H100.note}")
    print(f"wall time {time.perf_counter() - t0:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"rates": asdict(rates), "h100": asdict(H100), "checks": checks,
                                               "projections": projections}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
