"""The calibration windows a data method learns from, cut from text by the run's config.

``calib.tokens`` and ``calib.seq_len`` of :class:`~orthoopt.config.RotateConfig` are read here, so that
:func:`orthoopt.pipeline.rotate_model` given text (a file, ``hf:NAME[:CONFIG]`` or a
:class:`~orthoopt.quant.calib_source.CalibSource`) and a tokenizer cuts the same windows as
``orthoopt rotate --calib`` and ``orthoopt quantize --rotate``.
"""

from __future__ import annotations

import torch

from orthoopt.config import RotateConfig
from orthoopt.errors import InvalidInputError


def rotation_calibration(config: RotateConfig, source, tokenizer, model_config=None) -> torch.Tensor | None:
    """The calibration windows of ``config``'s method from ``source`` (None for a method without data).

    Parameters
    ----------
    config : RotateConfig
        ``method``, ``calib.tokens``, ``calib.seq_len`` and ``seed`` are read.
    source : str, os.PathLike or CalibSource
        A text file, ``hf:NAME[:CONFIG]`` or a :class:`~orthoopt.quant.calib_source.CalibSource`.
    tokenizer
        The model's tokenizer.
    model_config : optional
        The model's config: a window longer than its context is refused.

    Returns
    -------
    torch.Tensor or None
        ``ceil(calib.tokens / w)`` windows ``[N, w]`` of ``w = min(calib.seq_len, calib.tokens)``
        tokens, drawn with ``config.seed``; None when the method needs no calibration.
    """
    if not config.entry.needs_calibration:
        return None
    if source is None:
        raise InvalidInputError(f"method {config.method!r} needs calibration text: --calib TEXT_FILE (or hf:NAME)")
    if tokenizer is None:
        raise InvalidInputError(f"method {config.method!r} needs a tokenizer in the model folder to read --calib")
    from orthoopt.quant.calib import calibration_batches, check_context

    seq_len = min(config.calib.seq_len, config.calib.tokens)
    nsamples = max(1, -(-config.calib.tokens // seq_len))
    check_context(model_config, seq_len, "--calib-seq-len")
    return calibration_batches(source, tokenizer, nsamples=nsamples, seq_len=seq_len, seed=config.seed)


__all__ = ["rotation_calibration"]
