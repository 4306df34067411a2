"""Perplexity on non-overlapping windows (the WikiText-2 protocol of GPTQ, QuaRot and SpinQuant).

The whole text is tokenized once (``tokenizer(text)``, default special tokens). The token ids are cut
into ``windows = tokens // seq_len`` consecutive, non-overlapping windows of ``seq_len`` tokens; the
tail is dropped. Each window is scored independently: positions ``1 .. seq_len - 1`` are predicted
from the tokens before them in the same window. With ``N = windows * (seq_len - 1)`` predicted tokens,

    nll = (1 / N) * sum over windows and positions of -log p(token | window prefix)
    ppl = exp(nll)

which equals the reference ``exp(mean over windows of the window's mean NLL)`` since all windows have
the same length. For WikiText-2 the text is ``read_text("../shared/data/wikitext2-test.txt")`` (see
:func:`orthoopt.quant.calib.read_text`).
"""

from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from orthoopt.core.checks import check_not_meta
from orthoopt.errors import InvalidInputError
from orthoopt.quant.calib import check_context, tokenize_text

MAX_DEFAULT_SEQ_LEN = 2048


def default_seq_len(model: nn.Module) -> int:
    """The model's context (``config.max_position_embeddings``), capped at 2048."""
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None) or MAX_DEFAULT_SEQ_LEN
    return min(int(context), MAX_DEFAULT_SEQ_LEN)


@torch.no_grad()
def perplexity(
    model: nn.Module,
    tokenizer_or_ids,
    text: str | None = None,
    seq_len: int | None = None,
    max_tokens: int | None = None,
    batch_size: int = 1,
    progress: bool = True,
) -> dict:
    """Perplexity of a causal LM on ``text`` (tokenized with a tokenizer) or on given token ids.

    tokenizer_or_ids: a tokenizer (then ``text`` is required) or a LongTensor of ids (``[N]`` or
                      ``[1, N]``; then ``text`` must be None).
    seq_len:          window length (default :func:`default_seq_len`); at least 2.
    max_tokens:       use only the first ``max_tokens`` ids (before windowing).
    batch_size:       windows per forward pass.

    Log-probabilities are computed from float32 logits (float64 for a float64 model) and summed in
    float64. The model runs in eval
    mode (its previous mode is restored). Returns ``{"ppl", "nll", "tokens", "windows", "seq_len",
    "window_nll"}`` with ``tokens`` the number of predicted tokens ``windows * (seq_len - 1)``, ``nll``
    their mean negative log-likelihood (nats) and ``window_nll`` a list of ``windows`` floats, the mean
    NLL of each window in text order (float64 mean of its ``seq_len - 1`` terms), so that
    ``exp(mean(window_nll)) == ppl`` up to the float32 rounding of the per-batch sum behind ``nll``
    (about 1e-7 relative). ``ppl`` is ``inf`` when ``exp(nll)`` overflows float64 and NaN when
    the model's logits are not finite (``orthoopt eval --json`` writes such figures as null).
    Raises ValueError for windows longer than the model's context.
    """
    seq_len = default_seq_len(model) if seq_len is None else seq_len
    check_context(model, seq_len, "seq_len")
    for name, p in model.named_parameters():
        check_not_meta(p, f"weight {name!r}")
    ids = window_ids(tokenizer_or_ids, text, seq_len, max_tokens, batch_size)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        return score_windows(lambda b, batch: model(input_ids=batch.to(device), use_cache=False).logits,
                             ids, batch_size, progress)
    finally:
        model.train(was_training)


def window_ids(tokenizer_or_ids, text: str | None, seq_len: int, max_tokens: int | None,
               batch_size: int = 1) -> torch.Tensor:
    """The ``[windows, seq_len]`` token ids :func:`perplexity` scores (arguments and errors as there)."""
    if isinstance(tokenizer_or_ids, torch.Tensor):
        if text is not None:
            raise InvalidInputError("give either token ids or a tokenizer with text, not ids and text")
        ids = tokenizer_or_ids
        if ids.ndim == 2 and ids.shape[0] == 1:
            ids = ids[0]
        if ids.ndim != 1 or ids.dtype not in (torch.int64, torch.int32):
            raise InvalidInputError(f"token ids must be an integer tensor [N] or [1, N], got {ids.dtype} {tuple(tokenizer_or_ids.shape)}")
        ids = ids.long()
    else:
        if text is None:
            raise InvalidInputError("perplexity with a tokenizer needs text=...")
        ids = tokenize_text(text, tokenizer_or_ids)
    if seq_len < 2:
        raise InvalidInputError(f"seq_len must be at least 2, got {seq_len}")
    if batch_size < 1:
        raise InvalidInputError(f"batch_size must be positive, got {batch_size}")
    if max_tokens is not None:
        if max_tokens < 1:
            raise InvalidInputError(f"max_tokens must be positive, got {max_tokens}")
        ids = ids[:max_tokens]
    windows = ids.numel() // seq_len
    if windows == 0:
        raise InvalidInputError(f"the text has {ids.numel()} tokens, fewer than one window of seq_len={seq_len}")
    return ids[: windows * seq_len].reshape(windows, seq_len)


def score_windows(logits_of, ids: torch.Tensor, batch_size: int, progress: bool = True) -> dict:
    """:func:`perplexity`'s result from ``logits_of(b, batch)``, the logits of the ``b``-th batch
    ``batch = ids[b * batch_size : (b + 1) * batch_size]`` (``[B, seq_len, vocab]``, any device)."""
    windows, seq_len = ids.shape
    total = torch.zeros((), dtype=torch.float64)
    window_nll: list[float] = []
    with tqdm(total=windows, desc="perplexity", unit="window", disable=not progress, file=sys.stderr) as bar:
        for b, start in enumerate(range(0, windows, batch_size)):
            batch = ids[start : start + batch_size]
            logits = logits_of(b, batch)
            if logits.dtype != torch.float64:
                logits = logits.float()
            # cross_entropy is nll_loss(log_softmax): the same sum as before, plus the per-token terms
            logp = torch.log_softmax(logits[:, :-1].reshape(-1, logits.shape[-1]), dim=1)
            target = batch[:, 1:].reshape(-1).to(logp.device)
            total += F.nll_loss(logp, target, reduction="sum").double().cpu()
            per_token = F.nll_loss(logp, target, reduction="none").double().cpu()
            window_nll.extend(per_token.reshape(batch.shape[0], seq_len - 1).mean(dim=1).tolist())
            bar.update(batch.shape[0])
    tokens = windows * (seq_len - 1)
    nll = float(total) / tokens
    try:
        ppl = math.exp(nll)  # NaN stays NaN
    except OverflowError:  # nll above ~709.8 nats: the perplexity is beyond float64
        ppl = math.inf
    return {"ppl": ppl, "nll": nll, "tokens": tokens, "windows": windows, "seq_len": seq_len,
            "window_nll": window_nll}
