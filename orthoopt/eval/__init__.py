"""Evaluation: perplexity on non-overlapping windows and paired comparisons of models on them
(docs/quantization.md, "Perplexity", "Comparing models: paired bootstrap" and "Comparing methods over draws")."""

from orthoopt.eval.bootstrap import MIN_WINDOWS, PairedInterval, paired_bootstrap
from orthoopt.eval.compare import compare_models
from orthoopt.eval.draws import draws_interval
from orthoopt.eval.layered import perplexity_layered
from orthoopt.eval.perplexity import default_seq_len, perplexity

__all__ = [
    "MIN_WINDOWS", "PairedInterval", "compare_models", "default_seq_len", "draws_interval", "paired_bootstrap",
    "perplexity", "perplexity_layered",
]
