"""Test and benchmark fixtures: the planted-outlier toy Llama (also the ``planted`` model source) and
its byte-level tokenizer (:mod:`orthoopt.testing.tiny`)."""

from orthoopt.testing.tiny import BYTE_VOCAB_SIZE, byte_tokenizer, planted_outlier_model, save_planted

__all__ = ["BYTE_VOCAB_SIZE", "byte_tokenizer", "planted_outlier_model", "save_planted"]
