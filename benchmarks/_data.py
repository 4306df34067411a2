"""Benchmark text data: the calibration / evaluation split of one text file, and random token windows.

``../shared/README.md`` asks benchmarks to calibrate on the first half of
``wikitext2-test.txt`` and evaluate on the second half, so that no evaluated text is ever seen by a
calibrated (or, for the fallback model, trained) step.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from orthoopt.quant import read_text, tokenize_text

SHARED = Path(__file__).resolve().parents[2] / "shared"
"""The checkout's sibling ``../shared`` (data and, when present, real models)."""

DEFAULT_TEXT = SHARED / "data" / "wikitext2-test.txt"


@dataclass(frozen=True)
class TextSplit:
    """The two halves of a text file.

    ``calib``: characters ``[0, cut)``, used for training the fallback model, rotation calibration and
    GPTQ calibration. ``eval``: characters ``[cut, end)``, used only for perplexity and logit errors.
    ``cut`` is the first position after a newline at or past the middle, so no line is split.
    ``sha256`` identifies the whole text (it keys the trained-model cache).
    """

    path: Path
    calib: str
    eval: str
    cut: int
    sha256: str

    def describe(self) -> str:
        total = len(self.calib) + len(self.eval)
        return (f"{self.path.name}: characters [0, {self.cut}) for calibration/training, "
                f"[{self.cut}, {total}) for evaluation")


def split_halves(path: str | Path = DEFAULT_TEXT) -> TextSplit:
    """Read ``path`` (universal newlines, :func:`orthoopt.quant.read_text`) and cut it in two halves
    at the first line end at or after the middle. Raises FileNotFoundError for a missing file and
    ValueError for an empty one or one whose second half would be empty."""
    path = Path(path)
    text = read_text(path)
    newline = text.find("\n", len(text) // 2)
    cut = len(text) if newline < 0 else newline + 1
    if cut >= len(text) or not text[cut:].strip():
        raise ValueError(f"{path}: the text has no second half to evaluate on (it needs a line break past "
                         "the middle)")
    sha = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return TextSplit(path, text[:cut], text[cut:], cut, sha)


def token_ids(text: str, tokenizer) -> torch.Tensor:
    """``[N]`` LongTensor of the ids of ``text`` (the tokenizer's default special tokens)."""
    return tokenize_text(text, tokenizer)


def random_windows(ids: torch.Tensor, n: int, seq_len: int, seed: int) -> torch.Tensor:
    """``[n, seq_len]`` windows of ``ids`` (``[N]``) starting at uniform offsets in ``[0, N - seq_len]``.

    Drawn exactly as :func:`orthoopt.quant.calibration_batches` draws them from a file
    (``torch.Generator().manual_seed(seed)``, one ``randint``), so the same ids and seed give the
    same windows. Raises ValueError when ``ids`` is shorter than one window or a size is not positive.
    """
    if n < 1 or seq_len < 1:
        raise ValueError(f"need n >= 1 and seq_len >= 1, got n={n}, seq_len={seq_len}")
    if ids.ndim != 1:
        raise ValueError(f"ids must be 1-D, got shape {tuple(ids.shape)}")
    if ids.numel() < seq_len:
        raise ValueError(f"{ids.numel()} tokens are fewer than one window of seq_len={seq_len}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len + 1, (n,), generator=gen)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])
