"""Hugging Face decoders <-> weight blocks: norm fusion, rotation write-back, calibration inputs, I/O.

Supported: every entry of the architecture table ``ARCHS`` (Llama, Mistral, Qwen2, Qwen3, Gemma 2/3, Phi-3,
OLMo-2, Mixtral, Qwen2-MoE, Qwen3-MoE). See ``docs/adapters.md``;
conventions (row vectors, sides) are in ``docs/conventions.md``.
"""

from orthoopt.adapters.arch_table import ARCHS, ArchSpec, Norm, Proj
from orthoopt.adapters.archs import UnsupportedModelError, locate
from orthoopt.adapters.decoder import DecoderAdapter
from orthoopt.adapters.io import load_model, load_rotations, load_tokenizer, save_rotated
from orthoopt.adapters.llama2c import read_llama2c, write_llama2c
from orthoopt.adapters.registry import REGISTRY, ModelFetchError, cached_model, fetch_model
from orthoopt.adapters.sources import ModelSource, resolve_source
from orthoopt.adapters.tiny import BYTE_VOCAB_SIZE, byte_tokenizer, planted_outlier_model, save_planted
from orthoopt.adapters.verify import logits_relative_error
from orthoopt.adapters.writeback import orthogonality_tolerance

__all__ = [
    "ARCHS", "ArchSpec", "BYTE_VOCAB_SIZE", "DecoderAdapter", "ModelFetchError", "ModelSource", "Norm", "Proj", "REGISTRY",
    "UnsupportedModelError", "byte_tokenizer", "cached_model", "fetch_model",
    "load_model", "load_rotations", "load_tokenizer", "locate", "logits_relative_error",
    "orthogonality_tolerance", "planted_outlier_model", "read_llama2c", "resolve_source", "save_planted",
    "save_rotated", "write_llama2c",
]
