"""Calibration data: random fixed-length token windows from one text (a file, or a cached Hugging
Face dataset: :mod:`orthoopt.quant.calib_source`).

As in the GPTQ / QuaRot / SpinQuant code: the whole text is tokenized once (with the tokenizer's
default special tokens, e.g. one BOS at the start for Llama) and ``nsamples`` windows of ``seq_len``
consecutive tokens start at seeded random offsets. Windows may overlap.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from orthoopt.errors import InvalidInputError


def read_text(path: str | os.PathLike) -> str:
    """The text of a UTF-8 file with universal newlines (``\\r\\n`` -> ``\\n``).

    ``../shared/data/wikitext2-test.txt`` is the raw WikiText-2 test split joined with ``"\\n\\n"``
    (the rotation papers' ``"\\n\\n".join(testdata["text"])``) stored with CRLF line ends, so reading
    it this way gives exactly the papers' evaluation string. Raises FileNotFoundError / ValueError
    for a missing file or one that holds no non-blank text.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InvalidInputError(f"text file {path} is not UTF-8: byte {e.object[e.start]:#04x} at offset {e.start} "
                         f"({e.reason}); convert it to UTF-8") from None
    if not text.strip():
        raise InvalidInputError(f"text file is empty: {path}")
    return text


def source_text(source) -> str:
    """The text of a calibration source: a file path, ``hf:NAME[:CONFIG]`` or a
    :class:`~orthoopt.quant.calib_source.CalibSource` (:mod:`orthoopt.quant.calib_source`)."""
    from orthoopt.quant.calib_source import CalibSource

    return CalibSource.of(source).text()


def model_context(model_or_config) -> int | None:
    """The model's context length (``config.max_position_embeddings``), or None when it has none."""
    config = getattr(model_or_config, "config", model_or_config)
    ctx = getattr(config, "max_position_embeddings", None)
    return int(ctx) if isinstance(ctx, int) and ctx > 0 else None


def check_context(model_or_config, seq_len: int, what: str = "seq_len") -> None:
    """Raise ValueError when windows of ``seq_len`` tokens are longer than the model's context (a
    model or its config; nothing is checked when the context is unknown)."""
    ctx = model_context(model_or_config)
    if ctx is not None and seq_len > ctx:
        raise InvalidInputError(f"{what} {seq_len} is longer than the model's context of {ctx} tokens "
                         f"(max_position_embeddings); use at most {ctx}")


def tokenize_text(text: str, tokenizer) -> torch.Tensor:
    """Token ids of ``text`` as a 1-D LongTensor (default special tokens, no truncation)."""
    if not text.strip():
        raise InvalidInputError("text is empty")
    ids = tokenizer(text, return_tensors="pt", verbose=False)["input_ids"]
    return ids.reshape(-1).long()


def calibration_batches(
    text_file: str | os.PathLike,
    tokenizer,
    nsamples: int = 128,
    seq_len: int = 2048,
    seed: int = 0,
) -> torch.Tensor:
    """``[nsamples, seq_len]`` LongTensor of token windows from ``text_file``.

    ``text_file`` is a text file, an ``hf:NAME[:CONFIG]`` string or a
    :class:`~orthoopt.quant.calib_source.CalibSource` (a Hugging Face dataset from the local cache).

    Window starts are drawn uniformly from ``[0, tokens - seq_len]`` with
    ``torch.Generator().manual_seed(seed)``: the same file, tokenizer and seed give the same batches.
    Raises FileNotFoundError for a missing file, ValueError for an empty text, a text shorter than
    ``seq_len`` tokens, or non-positive sizes.
    """
    if nsamples < 1:
        raise InvalidInputError(f"nsamples must be positive, got {nsamples}")
    if seq_len < 1:
        raise InvalidInputError(f"seq_len must be positive, got {seq_len}")
    ids = tokenize_text(source_text(text_file), tokenizer)
    if ids.numel() < seq_len:
        raise InvalidInputError(
            f"calibration text {getattr(text_file, 'spec', text_file)} has {ids.numel()} tokens, fewer than seq_len={seq_len}"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len + 1, (nsamples,), generator=gen)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])
