"""Quantize a Hugging Face model with llm-compressor (``oneshot``), e.g. one that orthoopt rotated.

llm-compressor (``pip install llmcompressor``, the ``[peer]`` extra) pins its own transformers and
compressed-tensors versions, which may not match orthoopt's environment; install it in a separate
virtual environment when pip would change them (docs/export.md). Nothing here is imported by the
rest of orthoopt.

Settings mirror ``orthoopt quantize``: weight-only int ``bits`` per output channel (``group_size``
None) or per group, symmetric or not, on every decoder ``Linear`` except those the architecture
table keeps in full precision (``lm_head`` and MoE routers: :func:`ignore_list`); ``method``
"gptq" (``GPTQModifier``, dampening ``percdamp``, block 128, no act-order) or "rtn"
(``QuantizationModifier``, min-max observer). ``spinquant=True`` first applies llm-compressor's
``SpinQuantModifier`` with R1 and R2 as (block-diagonal) Hadamard transforms fused into the weights.
Note llm-compressor's int grid differs slightly from orthoopt's: symmetric codes span ``[-2^(b-1),
2^(b-1) - 1]`` with ``scale = max|w| / ((2^b - 1) / 2)``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from orthoopt.errors import InvalidInputError
from orthoopt.utils.atomic import atomic_dir

MISSING = (
    "llm-compressor is not importable in this Python ({error}); it pins transformers and compressed-tensors "
    "versions that may differ from orthoopt's, so install it in its own virtual environment: "
    "python -m venv /work/venvs/peer && /work/venvs/peer/bin/pip install torch==2.13.0 -e '.[peer]'"
)


def unavailable_reason() -> str | None:
    """None when ``llmcompressor`` imports here, else a message saying why not and how to install it."""
    try:
        import llmcompressor  # noqa: F401
    except Exception as e:  # ImportError, or a broken install raising something else
        return MISSING.format(error=f"{type(e).__name__}: {e}")
    return None


def _scheme(bits: int, group_size: int | None, sym: bool) -> dict:
    weights = {"num_bits": bits, "type": "int", "symmetric": sym,
               "strategy": "group" if group_size else "channel", "group_size": group_size}
    return {"group_0": {"targets": ["Linear"], "weights": weights}}


def ignore_list(spec) -> list[str]:
    r"""llm-compressor's ``ignore`` for an architecture: the linears orthoopt's quantizers keep in full
    precision (:attr:`orthoopt.adapters.arch_table.ArchSpec.full_precision`), as module names or
    ``re:`` patterns over the model's full module names: ``lm_head`` and each projection with
    ``quantize=False`` (MoE routers, ``re:.*layers\.\d+\.mlp\.gate$``). The embedding is no Linear."""
    import re

    out = [spec.lm_head]
    for p in spec.projs:
        if not p.quantize:
            out.append(f"re:.*{re.escape(spec.layers)}\\.\\d+\\.{re.escape(p.path)}$")
    return out


def spinquant_block_size(model, block_size: int | None = None) -> int:
    """The Hadamard block for SpinQuant's R1: ``block_size`` if given, else the hidden size when it is a
    power of two, else the head dimension (block-diagonal Hadamard; SmolLM2-135M: 576 -> 64)."""
    if block_size is not None:
        return block_size
    hidden = model.config.hidden_size
    if hidden & (hidden - 1) == 0:
        return hidden
    return getattr(model.config, "head_dim", None) or hidden // model.config.num_attention_heads


def quantize_with_llmcompressor(
    model,
    calib: torch.Tensor | None,
    *,
    method: str = "gptq",
    bits: int = 4,
    group_size: int | None = None,
    sym: bool = True,
    percdamp: float = 0.01,
    spinquant: bool = False,
    spinquant_block: int | None = None,
) -> dict:
    """Quantize ``model`` in place with llm-compressor's ``oneshot``; returns ``{"seconds", "recipe"}``.

    calib: ``[nsamples, seq_len]`` token ids (the same windows orthoopt's GPTQ would use); needed for
    GPTQ, unused by RTN. Raises ValueError when llm-compressor is not importable.
    """
    reason = unavailable_reason()
    if reason:
        raise InvalidInputError(reason)
    if method not in ("gptq", "rtn"):
        raise InvalidInputError(f"method must be 'gptq' or 'rtn', got {method!r}")
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    recipe = []
    if spinquant:
        from llmcompressor.modifiers.transform import SpinQuantModifier

        recipe.append(SpinQuantModifier(rotations=["R1", "R2"], transform_type="hadamard",
                                        transform_block_size=spinquant_block_size(model, spinquant_block)))
    from orthoopt.adapters.archs import locate

    groups, ignore = _scheme(bits, group_size, sym), ignore_list(locate(model).spec)
    if method == "gptq":
        if calib is None:
            raise InvalidInputError("GPTQ needs calibration token ids")
        recipe.append(GPTQModifier(config_groups=groups, ignore=ignore, dampening_frac=percdamp, actorder=None))
    else:
        recipe.append(QuantizationModifier(config_groups=groups, ignore=ignore))

    kwargs = {}
    if calib is not None and (method == "gptq" or spinquant):
        from datasets import Dataset

        ids = calib.long().tolist()
        kwargs = dict(
            dataset=Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(r) for r in ids]}),
            num_calibration_samples=len(ids), max_seq_length=calib.shape[1], shuffle_calibration_samples=False,
        )
    start = time.perf_counter()
    oneshot(model=model, recipe=recipe, **kwargs)
    return {"seconds": time.perf_counter() - start, "recipe": [type(m).__name__ for m in recipe]}


def save_llmcompressor(model, tokenizer, out_dir: str | os.PathLike) -> Path:
    """Save a model quantized by :func:`quantize_with_llmcompressor` as a packed compressed-tensors
    checkpoint (llm-compressor's ``save_pretrained(save_compressed=True)``), atomically."""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, save_compressed=True)
        tokenizer.save_pretrained(tmp)
    return out_dir
