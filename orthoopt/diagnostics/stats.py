"""Outlier statistics of weight matrices, per block and per decoder layer.

Every statistic is computed in float64 on a 2-D weight ``W`` of shape ``[out, in]`` (a linear layer's
weight as stored, or an already rotated one: ``W @ R`` / ``R.T @ W``, see ``docs/conventions.md``).
Results are plain dicts of Python floats and ints, ready for ``json.dumps``.

The statistics (``n = W.numel()``):

- ``max_abs``: ``max |w|``.
- ``incoherence``: ``mu = max|w| * sqrt(n) / ||W||_F``, the quantity OptRot's quantization-error bounds
  use. ``1 <= mu <= sqrt(n)``: 1 for a matrix of equal magnitudes (a Hadamard matrix), ``sqrt(n)``
  for a single non-zero entry. Invariant to scaling ``W``.
- ``excess_kurtosis``: ``m4 / m2**2 - 3`` of all entries, with central moments ``m_k = mean((w -
  mean(w))**k)`` (the population, "biased" estimator, as ``scipy.stats.kurtosis(bias=True)``); the
  kurtosis of :mod:`orthoopt.core.moments` minus 3.
  About 0 for Gaussian entries, -1.2 for uniform ones, large for heavy tails.
- ``fourth_power_sum``: ``sum w**4``, the OptRot objective of the block (scales as ``|W|**4``).
- ``outlier_fraction``: fraction of entries with ``|w - mean(w)| > k * std(w)`` (population std).
  Default ``k = 3``, where Gaussian entries give ``2 * (1 - Phi(3)) = 0.0027``.
- ``rtn_error``: relative Frobenius error ``||W - Q(W)||_F / ||W||_F`` of symmetric, per-output-channel
  (per row of ``W``) round-to-nearest quantization on the library's grid (:mod:`orthoopt.core.grid`) with ``bits`` bits (default 4), see :func:`rtn_error`.
  For a block that writes into the rotated space (side "out", ``R.T @ W``) this is still per row of
  the rotated ``[out, in]`` weight, i.e. per output channel of the layer as it will be quantized.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence

import torch

from orthoopt.core import WeightBlock
from orthoopt.core.grid import QuantSpec, quantize_rows
from orthoopt.core.moments import moments
from orthoopt.errors import InvalidInputError

DEFAULT_K = 3.0
"""Outlier threshold of :func:`outlier_fraction`, in standard deviations."""

DEFAULT_BITS = 4
"""Bit width of the RTN reconstruction error in :func:`weight_stats`."""

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")


STATS_CHUNK = 1 << 22
"""Entries :func:`weight_stats` converts to float64 at a time (rows of the weight): the statistics of a
0.5 GB bf16 embedding take 32 MiB of float64 work instead of several copies of 2 GB."""


def _checked(W: torch.Tensor, what: str = "weight", axes: str = "[out, in]") -> torch.Tensor:
    """``W`` detached, in its own dtype; raises InvalidInputError for other shapes or no entries."""
    if not isinstance(W, torch.Tensor):
        raise InvalidInputError(f"{what} must be a torch.Tensor, got {type(W).__name__}")
    if W.ndim != 2:
        raise InvalidInputError(f"{what} must be 2-D {axes}, got shape {tuple(W.shape)}")
    if W.numel() == 0:
        raise InvalidInputError(f"{what} has no entries (shape {tuple(W.shape)})")
    return W.detach()


def as_matrix(W: torch.Tensor, what: str = "weight", axes: str = "[out, in]") -> torch.Tensor:
    """``W`` detached as a float64 2-D tensor; raises ValueError for other shapes or no entries."""
    return _checked(W, what, axes).to(torch.float64)


def incoherence(W: torch.Tensor) -> float:
    """``max|w| * sqrt(numel) / ||W||_F`` of a 2-D ``W``; raises ValueError if ``W`` is all zeros."""
    W = as_matrix(W)
    norm = torch.linalg.matrix_norm(W).item()
    if norm == 0.0:
        raise InvalidInputError("incoherence is undefined for an all-zero matrix")
    return W.abs().max().item() * math.sqrt(W.numel()) / norm


def excess_kurtosis(x: torch.Tensor) -> float:
    """Excess kurtosis ``m4 / m2**2 - 3`` of all entries of ``x`` (any shape), in float64.

    Raises ValueError if the entries are all equal (zero variance).
    """
    x = x.detach().to(torch.float64).reshape(-1)
    if x.numel() == 0:
        raise InvalidInputError("kurtosis of an empty tensor is undefined")
    m2, m4 = (m.item() for m in moments(x, dim=0, center=True))
    if m2 == 0.0:
        raise InvalidInputError("kurtosis is undefined when all entries are equal")
    return m4 / m2**2 - 3.0


def outlier_fraction(W: torch.Tensor, k: float = DEFAULT_K) -> float:
    """Fraction of entries with ``|w - mean| > k * std`` (population std over all entries)."""
    if not k > 0:
        raise InvalidInputError(f"outlier threshold k must be positive, got {k}")
    x = W.detach().to(torch.float64).reshape(-1)
    if x.numel() == 0:
        raise InvalidInputError("outlier fraction of an empty tensor is undefined")
    c2 = (x - x.mean()).square()
    return (c2 > k * k * c2.mean()).double().mean().item()  # |w - mean| > k * std


def rtn_error(W: torch.Tensor, bits: int = DEFAULT_BITS) -> float:
    """Relative Frobenius error ``||W - Q(W)||_F / ||W||_F`` of round-to-nearest quantization.

    ``Q`` is :func:`orthoopt.core.grid.quantize_rows` with ``QuantSpec(bits)`` (what
    ``orthoopt.quant.quantize_rtn`` does): symmetric, one scale per output channel (row of ``W``),
    ``scale = max|W[r]| / (2**(bits-1) - 1)``, no clipping; computed in float64. Raises ValueError if ``W`` is all zeros or ``bits`` is outside 2..8.
    """
    W = as_matrix(W)
    norm = torch.linalg.matrix_norm(W).item()
    if norm == 0.0:
        raise InvalidInputError("relative RTN error is undefined for an all-zero matrix")
    return torch.linalg.matrix_norm(W - quantize_rows(W, QuantSpec(bits=bits))).item() / norm


def weight_stats(W: torch.Tensor, k: float = DEFAULT_K, bits: int = DEFAULT_BITS) -> dict:
    """All statistics of one 2-D weight (see the module docstring), as a JSON-able dict.

    Keys: ``shape`` ([out, in]), ``numel``, ``frobenius_norm``, ``max_abs``, ``incoherence``,
    ``excess_kurtosis``, ``fourth_power_sum``, ``outlier_fraction``, ``outlier_k``, ``rtn_bits``,
    ``rtn_error``. The same values as :func:`incoherence`, :func:`excess_kurtosis`,
    :func:`outlier_fraction` and :func:`rtn_error`, computed with shared intermediate tensors.
    Raises ValueError for a non-2-D, empty, all-zero or constant matrix.
    """
    if not k > 0:
        raise InvalidInputError(f"outlier threshold k must be positive, got {k}")
    W = _checked(W)
    rows, cols = W.shape
    step = max(1, STATS_CHUNK // cols)
    chunks = [slice(i, min(i + step, rows)) for i in range(0, rows, step)]

    def f64(c):
        return W[c].to(torch.float64)

    total = sq_sum = fourth = rtn_sq = 0.0
    max_abs = 0.0
    spec = QuantSpec(bits=bits)
    for c in chunks:  # pass 1: sums, largest |w|, fourth powers, RTN error (per row)
        x = f64(c)
        sq = x.square()
        total += x.sum().item()
        sq_sum += sq.sum().item()
        fourth += sq.square().sum().item()
        max_abs = max(max_abs, x.abs().max().item())
        rtn_sq += (x - quantize_rows(x, spec)).square().sum().item()
    norm = math.sqrt(sq_sum)
    if norm == 0.0:
        raise InvalidInputError("statistics are undefined for an all-zero matrix")
    n = W.numel()
    mean = total / n
    m2 = m4 = 0.0
    for c in chunks:  # pass 2: central moments about the mean
        c2 = (f64(c) - mean).square()
        m2 += c2.sum().item()
        m4 += c2.square().sum().item()
    m2, m4 = m2 / n, m4 / n
    if m2 == 0.0:
        raise InvalidInputError("kurtosis is undefined when all entries are equal")
    outliers = sum(int(((f64(c) - mean).square() > k * k * m2).sum()) for c in chunks)  # pass 3
    return {
        "shape": [rows, cols],
        "numel": n,
        "frobenius_norm": norm,
        "max_abs": max_abs,
        "incoherence": max_abs * math.sqrt(n) / norm,
        "excess_kurtosis": m4 / m2**2 - 3.0,
        "fourth_power_sum": fourth,
        "outlier_fraction": outliers / n,
        "outlier_k": float(k),
        "rtn_bits": bits,
        "rtn_error": math.sqrt(rtn_sq) / norm,
    }


def block_stats(
    block: WeightBlock,
    rotation: torch.Tensor | Mapping[str, torch.Tensor] | None = None,
    k: float = DEFAULT_K,
    bits: int = DEFAULT_BITS,
) -> dict:
    """:func:`weight_stats` of a :class:`WeightBlock`, optionally after rotating it.

    ``rotation`` is an ``[n, n]`` matrix ``R`` (``n == block.dim``) or a dict of named rotations (the
    block's ``block.rotation`` entry is used). With it the statistics are of ``block.rotated(R)``
    (``W @ R`` for side "in", ``R.T @ W`` for side "out"); without it, of the weight as stored.
    Adds the keys ``name``, ``rotation`` (the block's rotation name) and ``side``.
    """
    if isinstance(rotation, Mapping):
        if block.rotation not in rotation:
            raise InvalidInputError(f"block {block.name!r} meets rotation {block.rotation!r}, which is not given")
        rotation = rotation[block.rotation]
    if rotation is not None:
        if tuple(rotation.shape) != (block.dim, block.dim):
            raise InvalidInputError(
                f"block {block.name!r} meets a rotation of size {block.dim}, got shape {tuple(rotation.shape)}"
            )
        W = block.rotated(rotation.detach().to(torch.float64))
    else:
        W = block.weight
    try:
        stats = weight_stats(W, k=k, bits=bits)
    except ValueError as e:
        raise InvalidInputError(f"block {block.name!r}: {e}") from None
    return {"name": block.name, "rotation": block.rotation, "side": block.side, **stats}


def layer_of(name: str) -> int | None:
    """Decoder-layer index parsed from a module name (``"model.layers.3.mlp.up_proj"`` -> 3), else None."""
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def group_of(name: str) -> str:
    """The per-layer group a block belongs to: ``"layers.3"`` for decoder layer 3, else the name
    itself without a leading ``"model."`` (``"embed_tokens"``, ``"lm_head"``)."""
    i = layer_of(name)
    if i is not None:
        return f"layers.{i}"
    return name.removeprefix("model.")


POOLED_KEYS = ("max_abs", "incoherence_mean", "incoherence_max", "excess_kurtosis_mean", "excess_kurtosis_max",
               "fourth_power_sum", "outlier_fraction", "rtn_error")
"""The statistics :func:`aggregate_blocks` pools (besides ``blocks`` and ``numel``)."""

STAT_KEYS = ("frobenius_norm", "max_abs", "incoherence", "excess_kurtosis", "fourth_power_sum",
             "outlier_fraction", "rtn_error")
"""The statistics of one :func:`weight_stats` row that are undefined (None) for an all-zero or constant block."""


def undefined_stats(W: torch.Tensor, error: str, k: float = DEFAULT_K, bits: int = DEFAULT_BITS) -> dict:
    """The :func:`weight_stats` row of a block whose statistics are undefined (all-zero or constant):
    ``shape``, ``numel``, ``outlier_k``, ``rtn_bits``, every statistic None, and ``error`` saying why."""
    return {"shape": list(W.shape), "numel": W.numel(), **{key: None for key in STAT_KEYS}, "outlier_k": float(k),
            "rtn_bits": bits, "error": error}


def aggregate_blocks(rows: Sequence[dict]) -> dict:
    """Pool :func:`weight_stats` rows (one per block) into one summary.

    Rows with an ``error`` (:func:`undefined_stats`) are left out of the pooled figures and listed in
    ``undefined_blocks``; when no row is defined every figure is None and ``error`` says so.

    Exact statistics of all entries together: ``numel``, ``max_abs``, ``fourth_power_sum`` (sum),
    ``outlier_fraction`` (entry-weighted mean of the blocks' fractions, each about its own block's
    mean and std), ``rtn_error`` (``sqrt(sum ||W - Q||^2 / sum ||W||^2)``). Per-block shape-dependent
    statistics as mean and max over the blocks: ``incoherence_mean`` / ``incoherence_max`` and
    ``excess_kurtosis_mean`` / ``excess_kurtosis_max``. Plus ``blocks`` (the rows' names, if any).
    """
    if not rows:
        raise InvalidInputError("aggregate_blocks needs at least one row")
    names = [r.get("name", "") for r in rows]
    undefined = [r.get("name", "") for r in rows if r.get("error") is not None]
    rows = [r for r in rows if r.get("error") is None]
    if not rows:
        return {"blocks": names, "numel": None, **{k: None for k in POOLED_KEYS},
                "undefined_blocks": undefined, "error": "no block of this group has defined statistics"}
    numel = sum(r["numel"] for r in rows)
    sq_norm = sum(r["frobenius_norm"] ** 2 for r in rows)
    sq_err = sum((r["rtn_error"] * r["frobenius_norm"]) ** 2 for r in rows)
    inc = [r["incoherence"] for r in rows]
    kurt = [r["excess_kurtosis"] for r in rows]
    return {
        "blocks": names,
        **({"undefined_blocks": undefined} if undefined else {}),
        "numel": numel,
        "max_abs": max(r["max_abs"] for r in rows),
        "incoherence_mean": sum(inc) / len(inc),
        "incoherence_max": max(inc),
        "excess_kurtosis_mean": sum(kurt) / len(kurt),
        "excess_kurtosis_max": max(kurt),
        "fourth_power_sum": sum(r["fourth_power_sum"] for r in rows),
        "outlier_fraction": sum(r["outlier_fraction"] * r["numel"] for r in rows) / numel,
        "rtn_error": math.sqrt(sq_err / sq_norm),
    }


def aggregate_layers(block_table: Iterable[dict]) -> list[dict]:
    """:func:`aggregate_blocks` per decoder layer, grouping rows by :func:`group_of` of their ``name``.

    Groups keep the order of their first block. Each row adds ``group`` (``"layers.3"``,
    ``"embed_tokens"``, ``"lm_head"``...) and ``layer`` (int, or None outside the decoder layers).
    """
    groups: dict[str, list[dict]] = {}
    for row in block_table:
        groups.setdefault(group_of(row["name"]), []).append(row)
    return [{"group": g, "layer": layer_of(g), **aggregate_blocks(rows)} for g, rows in groups.items()]
