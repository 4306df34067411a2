"""Evaluation: perplexity on non-overlapping windows (docs/quantization.md, "Perplexity")."""

from orthoopt.eval.perplexity import default_seq_len, perplexity

__all__ = ["default_seq_len", "perplexity"]
