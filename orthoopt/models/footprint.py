"""Estimated peak memory of each command on a Hugging Face folder, from its headers and config alone.

The figures come from the checkpoint (bytes and shapes in the safetensors headers, ``config.json``),
the dtype the command loads it in, and the path (in memory or ``--streamed``); nothing is read but
headers. Each estimate is a sum of named parts (:class:`orthoopt.utils.memory.Estimate`):

==================  ==============================================================================
part                bytes
==================  ==============================================================================
runtime             :data:`RUNTIME`: Python, torch, transformers and the tokenizer
model               the whole model in the load dtype (``numel x itemsize``): in-memory paths
non-layer weights   ``--streamed`` eval: the embedding, final norm and lm_head (``--streamed``
                    quantize: read and written as shard 0, freed before the first layer)
load                the checkpoint read while the model is built (``from_pretrained`` maps the
                    files; ``LOAD_FACTOR`` of their bytes is resident at once)
save                the output's serialization buffer (``SAVE_FACTOR`` of the model)
untie               rotate: lm_head's own copy of a tied embedding (fusion unties it)
embedding           rotate --streamed: the embedding (and lm_head) assembled in the load dtype, plus
                    its float64 row slices
layer               rotate --streamed: one layer in the load dtype, its float64 products and the
                    shard being written; quantize / eval --streamed: one layer read (and its
                    quantized copy and shard)
hidden states       eval --streamed: every evaluated window's hidden states in the load dtype
calibration         quantize --method gptq: the calibration activations of one layer's inputs and
                    outputs (float32), one layer's float32 Hessians, GPTQ's float32 work copies
activations         eval: logits of one batch (float32, three copies: logits, log-softmax, gather)
==================  ==============================================================================

The factors are calibrated on the measurements of ``benchmarks/model_size.py``
(``docs/performance.md``, where the estimates stand beside the measured peaks) and are meant to
overestimate by at most about a quarter; sources that are not folders (``planted``, ``.gguf``,
llama2.c, Hub ids) get no estimate and are not checked.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from orthoopt.models.shards import shard_write_copies
from orthoopt.utils.memory import Estimate
from orthoopt.utils.tensorfile import DTYPE_BYTES, check_safetensors, check_weight_files, read_json_object

RUNTIME = 512 << 20
"""Resident memory of the interpreter with torch, transformers and orthoopt imported (measured 0.45 GB
for the tiny shape of ``benchmarks/model_size.py``), with margin."""
LOAD_FACTOR = 1.0
SAVE_FACTOR = 1.0
STREAM_ROWS = 1 << 14
"""Rows of the embedding / lm_head the streamed store reads at once (``FusedReader.rows_per_read``)."""


@dataclass(frozen=True)
class Checkpoint:
    """What the estimates need from a folder: stored bytes, numels and the config sizes."""

    stored_bytes: int
    numel: int
    embed_numel: int
    lm_head_numel: int  # 0 when tied
    largest_numel: int
    layer_numel: int  # the largest decoder layer
    layer_tensor_numel: int  # the largest tensor of a decoder layer
    hidden: int
    intermediate: int
    vocab: int
    num_layers: int
    num_heads: int
    max_position: int | None
    embed_width: int = 0  # the embedding's columns as stored (the hidden size the weights have)
    stored_layers: int = 0  # decoder layers with weights in the files

    @property
    def nonlayer_numel(self) -> int:
        """The elements outside the decoder layers (embedding, final norm, lm_head), with every layer
        counted at the largest layer's size."""
        return self.numel - self.layer_numel * self.num_layers

    @classmethod
    def read(cls, folder: str | os.PathLike) -> "Checkpoint":
        folder = Path(folder)
        config = read_json_object(folder / "config.json")
        text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
        stored = numel = embed = head = largest = layer_largest = width = 0
        layers: dict[int, int] = {}
        import re

        for f in check_weight_files(folder):
            for name, e in check_safetensors(f).items():
                if name == "__metadata__":
                    continue
                n = 1
                for s in e["shape"]:
                    n *= s
                stored += n * DTYPE_BYTES.get(e["dtype"], 4)
                numel += n
                largest = max(largest, n)
                if name.endswith("embed_tokens.weight"):
                    embed, width = n, int(e["shape"][-1])
                elif name.endswith("lm_head.weight"):
                    head = n
                m = re.search(r"(?:^|\.)layers\.(\d+)\.", name)
                if m:
                    layers[int(m.group(1))] = layers.get(int(m.group(1)), 0) + n
                    layer_largest = max(layer_largest, n)
        hidden = int(text.get("hidden_size") or 0)
        return cls(stored, numel, embed, head, largest, max(layers.values(), default=0), layer_largest, hidden,
                   int(text.get("intermediate_size") or 4 * hidden), int(text.get("vocab_size") or 0),
                   int(text.get("num_hidden_layers") or len(layers)), int(text.get("num_attention_heads") or 1),
                   text.get("max_position_embeddings"), width, len(layers))


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _phases(est: dict[str, int], phases: dict[str, int]) -> dict[str, int]:
    """``est`` plus the largest of ``phases`` (transients that are not alive at the same time)."""
    name = max(phases, key=phases.get)
    return {**est, f"peak transient ({name})": phases[name]}


def rotate_estimate(ck: Checkpoint, dtype: torch.dtype, streamed: bool, learned: bool = False,
                    can_stream: bool = False, calib_tokens: int = 0, statistics: str = "activations") -> Estimate:
    """Peak of ``orthoopt rotate`` in memory or ``--streamed``; ``learned``: a learned method's
    objective holds a float32 copy of the weights (in memory); ``can_stream``: offer ``--streamed``;
    ``calib_tokens``: a streamed data method's layer-by-layer pass over the calibration windows, with
    ``statistics`` (its registry kind) ``"activations"``: the rows it keeps (R1: two input groups
    per layer, float32); ``"hessians"``: one layer's float64 input Hessians, the eigendecomposition
    of the largest, and the layer's weighted blocks (written to disk, not kept)."""
    b = _itemsize(dtype)
    if streamed:
        big = max(ck.embed_numel, ck.lm_head_numel)
        slice_rows = min(STREAM_ROWS * ck.hidden, big)
        resident = {"runtime": RUNTIME}
        transients = {
            # the assembled embedding (or lm_head), its float64 row slice and product, the shard's buffer
            "embedding": big * b * 2 + slice_rows * 8 * 2,
            # one layer read, fused and being written, and the float64 product of its largest tensor
            "layer": ck.layer_numel * b * 3 + ck.layer_tensor_numel * (8 * 2 + b)}
        if calib_tokens:
            # the model's non-layer weights (a rotated embedding beside the read one), one layer loaded
            # and fused, the windows' hidden states and one layer's activations
            stats = (ck.nonlayer_numel * b + big * b + ck.layer_numel * b * 3
                     + calib_tokens * (ck.hidden * 4 * 6 + ck.intermediate * 4 * 3))
            if statistics == "hessians":
                widest = max(ck.hidden, ck.intermediate) ** 2 * 8
                stats += (3 * ck.hidden ** 2 * 8 + ck.intermediate ** 2 * 8 + widest * 3 + ck.layer_numel * 4
                          + ck.layer_tensor_numel * 8 * 2)
            else:
                rows = calib_tokens * ck.hidden * 2 * ck.num_layers
                resident["calibration rows"] = rows * 4
                # a solver step: the rotated rows and two more of their size, in the rotations' float64
                transients["objective step"] = rows * 8 * 3
            transients["statistics pass"] = stats
        est = Estimate(_phases(resident, transients),
                       f"--streamed holds one layer and the {_name(dtype)} embedding"
                       + (f", and {calib_tokens} calibration tokens' rows" if calib_tokens else ""))
    else:
        untie = ck.embed_numel * b if ck.lm_head_numel == 0 else 0
        est = Estimate(_phases({"runtime": RUNTIME, "model": ck.numel * b, "untie": untie}, {
            "load": int(LOAD_FACTOR * ck.stored_bytes),
            "float64 write-back of the largest tensor": ck.largest_numel * (8 * 2 + b),
            "save": int(SAVE_FACTOR * ck.numel * b),
            "objective's float32 copy": ck.numel * 4 if learned else 0}),
            f"in memory holds the whole {_name(dtype)} model")
    if not streamed and can_stream:
        est.alternatives.append(("--streamed", rotate_estimate(ck, dtype, True, calib_tokens=calib_tokens,
                                                                    statistics=statistics).total))
    if b > 2:
        smaller = rotate_estimate(ck, torch.bfloat16, streamed, learned, calib_tokens=calib_tokens,
                                  statistics=statistics)
        est.alternatives.append(("--dtype bfloat16", smaller.total))
    return est


def quantize_estimate(ck: Checkpoint, dtype: torch.dtype, method: str, nsamples: int = 0, seq_len: int = 0,
                      streamed: bool = False, packed: bool = False) -> Estimate:
    """Peak of ``orthoopt quantize``: the whole model held (GPTQ adds one layer's calibration), or with
    ``streamed`` the larger of the non-layer weights (read and written as shard 0, then freed) and one
    layer (read, quantized and its shard being written) with its work; ``packed``: a compressed-tensors
    output (its packing adds the packed codes and a float32 dequantized check of the largest linear)."""
    b = _itemsize(dtype)
    grid = ck.layer_tensor_numel * 4 * 4  # float32 weight, grid, codes and error of the largest linear
    phases = {"float32 grid of the largest linear": grid + (ck.layer_tensor_numel * 4 * 2 if packed else 0)}
    if method == "gptq":
        tokens = nsamples * seq_len
        phases["calibration"] = (tokens * ck.hidden * 4 * 3 + tokens * ck.intermediate * 4 * 2
                                 + (3 * ck.hidden ** 2 + ck.intermediate ** 2) * 4 + ck.num_heads * seq_len ** 2 * 4 * 2
                                 # the solve of the widest linear: two [n, n] beside its Hessian
                                 # (gptq_quantize frees its copy, L and H^-1 as it goes)
                                 + 2 * ck.intermediate ** 2 * 4 + grid)
    if streamed:
        # the non-layer weights are written as shard 0 and freed before the first layer is read; a
        # shard's write may hold a serialized copy (shard_write_copies)
        copies = shard_write_copies()
        nonlayer = ck.nonlayer_numel
        work = max(phases, key=phases.get)
        est = Estimate(_phases({"runtime": RUNTIME}, {
            "non-layer weights (read, written, freed)": nonlayer * b * (1 + copies),
            f"layer (read, quantized, shard) and {work}": ck.layer_numel * b * (2 + copies) + phases[work]}),
            f"--streamed holds one {_name(dtype)} layer")
    else:
        phases.update({"load": int(LOAD_FACTOR * ck.stored_bytes), "save": int(SAVE_FACTOR * ck.numel * b)})
        est = Estimate(_phases({"runtime": RUNTIME, "model": ck.numel * b}, phases),
                       f"holds the whole {_name(dtype)} model")
        est.alternatives.append(("--streamed",
                                 quantize_estimate(ck, dtype, method, nsamples, seq_len, True, packed).total))
    if b > 2:
        smaller = quantize_estimate(ck, torch.bfloat16, method, nsamples, seq_len, streamed, packed)
        est.alternatives.append(("--dtype bfloat16", smaller.total))
    if method == "gptq" and nsamples > 8:
        est.alternatives.append((f"--nsamples {nsamples // 4}",
                                 quantize_estimate(ck, dtype, method, nsamples // 4, seq_len, streamed, packed).total))
    return est


def eval_estimate(ck: Checkpoint, dtype: torch.dtype, seq_len: int, batch_size: int = 1,
                  streamed_tokens: int | None = None) -> Estimate:
    """Peak of ``orthoopt eval`` (perplexity: the model held whole, one batch of logits); with
    ``streamed_tokens`` (the evaluated tokens), of ``eval --streamed``: the non-layer weights, one
    layer (read and its copy), every window's hidden states and one batch's logits and layer work."""
    b = _itemsize(dtype)
    batch = batch_size * seq_len * (ck.vocab * 4 * 3 + ck.intermediate * 4 * 4)
    if streamed_tokens is not None:
        nonlayer = ck.nonlayer_numel
        est = Estimate(_phases({"runtime": RUNTIME, "non-layer weights": nonlayer * b,
                                "hidden states": streamed_tokens * ck.hidden * b}, {
            "layer": ck.layer_numel * b * 2 + batch_size * seq_len * ck.intermediate * 4 * 4,
            "activations": batch}),
            f"--streamed holds one {_name(dtype)} layer and the windows' hidden states")
    else:
        est = Estimate(_phases({"runtime": RUNTIME, "model": ck.numel * b}, {
            "load": int(LOAD_FACTOR * ck.stored_bytes), "activations": batch}),
            f"holds the whole {_name(dtype)} model")
        est.alternatives.append((f"--streamed --max-tokens {seq_len * 64}",
                                 eval_estimate(ck, dtype, seq_len, batch_size, seq_len * 64).total))
    if b > 2:
        est.alternatives.append(("--dtype bfloat16", eval_estimate(ck, torch.bfloat16, seq_len, batch_size,
                                                                   streamed_tokens).total))
    if batch_size > 1:
        est.alternatives.append(("--batch-size 1", eval_estimate(ck, dtype, seq_len, 1, streamed_tokens).total))
    return est


DISK_SLACK = 1 << 20
"""Bytes added to every disk estimate for the safetensors headers, ``config.json``, the tokenizer's
files and the report."""


def disk_estimate(ck: Checkpoint, dtype: torch.dtype, rotations: bool = False, scratch: bool = False) -> dict[str, int]:
    """Bytes a command writes on the disk of ``--out`` (named parts, for
    :func:`orthoopt.utils.disk.check_disk`): the output, at most the whole model in ``dtype`` plus
    lm_head's own copy of a tied embedding (fusion unties it), and :data:`DISK_SLACK`; with
    ``rotations``, ``R1`` and every layer's ``R2`` in float64; with ``scratch``, a streamed OptRot+'s
    Hessian-weighted blocks kept beside it until the end: every layer's R1 blocks and each layer's
    ``R2`` value/output blocks (at most ``2 hidden^2``) in at least float32, and lm_head's."""
    b = _itemsize(dtype)
    head = ck.lm_head_numel or ck.embed_numel
    parts = {"output": ck.numel * b + (ck.embed_numel * b if ck.lm_head_numel == 0 else 0) + DISK_SLACK}
    if rotations:
        # sized from the stored weights, not config.json (a wrong config is refused later, by name)
        h, layers = ck.embed_width or ck.hidden, ck.stored_layers or ck.num_layers
        parts["rotations"] = (h ** 2 + layers * (h // ck.num_heads) ** 2) * 8
    if scratch:
        w = max(b, 4)
        parts["weighted blocks (scratch)"] = (ck.layer_numel * ck.num_layers + head
                                              + 2 * ck.hidden ** 2 * ck.num_layers) * w
    return parts


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


__all__ = ["Checkpoint", "RUNTIME", "disk_estimate", "eval_estimate", "quantize_estimate", "rotate_estimate"]
