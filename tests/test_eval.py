"""Perplexity: the non-overlapping-window protocol against a hand computation, and its inputs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from orthoopt.testing import byte_tokenizer, planted_outlier_model
from orthoopt.eval import default_seq_len, perplexity
from orthoopt.quant import read_text, tokenize_text

SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(scope="module")
def model():
    return planted_outlier_model(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, dtype=torch.float64)


def hand_nll(model, ids: torch.Tensor, seq_len: int) -> tuple[float, int]:
    """Sum of -log p(token_t | tokens before t in its window) over full windows, and the count."""
    total, count = 0.0, 0
    for w in range(ids.numel() // seq_len):
        window = ids[w * seq_len : (w + 1) * seq_len]
        with torch.no_grad():
            logp = torch.log_softmax(model(window[None]).logits[0], dim=-1)
        for t in range(1, seq_len):
            total -= float(logp[t - 1, window[t]])
            count += 1
    return total, count


def test_perplexity_is_exp_of_mean_window_nll(model):
    ids = torch.randint(0, 256, (3 * 16 + 5,), generator=torch.Generator().manual_seed(0))
    total, count = hand_nll(model, ids, 16)
    got = perplexity(model, ids, seq_len=16, progress=False)
    assert (got["windows"], got["tokens"], got["seq_len"]) == (3, count, 16) and count == 3 * 15
    assert got["nll"] == pytest.approx(total / count, rel=1e-12)
    assert got["ppl"] == pytest.approx(math.exp(total / count), rel=1e-12)
    # the 5-token tail is dropped; batching windows changes nothing; [1, N] ids are accepted
    tail = ids.clone()
    tail[-5:] = (tail[-5:] + 1) % 256
    assert perplexity(model, tail, seq_len=16, progress=False)["nll"] == pytest.approx(got["nll"], rel=1e-12)
    assert perplexity(model, ids[None], seq_len=16, batch_size=2, progress=False)["nll"] == pytest.approx(
        got["nll"], rel=1e-12
    )


def test_uniform_model_has_perplexity_vocab_size():
    m = planted_outlier_model(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    with torch.no_grad():
        m.lm_head.weight.zero_()  # logits all 0: p = 1 / vocab for every token
    ids = torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(1))
    got = perplexity(m, ids, seq_len=8, progress=False)
    assert got["ppl"] == pytest.approx(m.config.vocab_size, rel=1e-6)


def test_text_with_tokenizer_equals_ids_and_max_tokens_truncates(model):
    tok = byte_tokenizer()
    text = "The quick brown fox jumps over the lazy dog. " * 4
    ids = tokenize_text(text, tok)
    from_text = perplexity(model, tok, text=text, seq_len=16, progress=False)
    assert from_text == perplexity(model, ids, seq_len=16, progress=False)
    cut = perplexity(model, tok, text=text, seq_len=16, max_tokens=40, progress=False)
    assert cut == perplexity(model, ids[:40], seq_len=16, progress=False) and cut["windows"] == 2


def test_default_seq_len_is_context_capped_at_2048(model):
    assert model.config.max_position_embeddings == 2048 and default_seq_len(model) == 2048
    small = planted_outlier_model(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    small.config.max_position_embeddings = 24
    ids = torch.randint(0, 256, (50,), generator=torch.Generator().manual_seed(2))
    assert perplexity(small, ids, progress=False)["seq_len"] == 24


def test_restores_training_mode(model):
    model.train()
    perplexity(model, torch.arange(20), seq_len=10, progress=False)
    assert model.training
    model.eval()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(seq_len=16), "fewer than one window"),
        (dict(seq_len=1), "at least 2"),
        (dict(seq_len=4, max_tokens=0), "max_tokens"),
        (dict(seq_len=4, batch_size=0), "batch_size"),
        (dict(seq_len=4, text="hello"), "not ids and text"),
    ],
)
def test_bad_arguments(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        perplexity(model, torch.arange(10), progress=False, **kwargs)


def test_tokenizer_needs_text_and_text_must_not_be_empty(model):
    tok = byte_tokenizer()
    with pytest.raises(ValueError, match="needs text"):
        perplexity(model, tok, progress=False)
    with pytest.raises(ValueError, match="empty"):
        perplexity(model, tok, text="  \n", progress=False)
    with pytest.raises(ValueError, match="integer tensor"):
        perplexity(model, torch.zeros(10), seq_len=4, progress=False)


def test_read_text_normalizes_newlines(tmp_path):
    path = tmp_path / "crlf.txt"
    path.write_bytes(b"\r\n = Title = \r\n\r\n Body . \r\n")
    assert read_text(path) == "\n = Title = \n\n Body . \n"
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        read_text(tmp_path / "nope.txt")


@pytest.mark.skipif(not (SHARED / "data" / "wikitext2-test.txt").is_file(), reason="shared WikiText-2 not present")
def test_wikitext2_file_reads_as_the_papers_joined_string():
    """The papers evaluate "\\n\\n".join(test rows), where a row is "" or a line ending in " \\n". The
    first rows are "", " = Robert Boulter = \\n", "", " Robert Boulter is ...": joined, the heading is
    followed by 1 + 2 + 2 = 5 newlines. No CR survives reading."""
    text = read_text(SHARED / "data" / "wikitext2-test.txt")
    assert "\r" not in text
    assert text.startswith("\n\n = Robert Boulter = \n\n\n\n\n Robert Boulter is an English")
    assert text.endswith(" \n\n\n")
