"""Hugging Face decoders <-> weight blocks: the architecture table, norm fusion, rotation write-back,
calibration inputs.

Supported: every entry of the architecture table ``ARCHS`` (Llama, Mistral, Qwen2, Qwen3, Gemma 2/3, Phi-3,
OLMo-2, Mixtral, Qwen2-MoE, Qwen3-MoE). See ``docs/adapters.md``;
conventions (row vectors, sides) are in ``docs/conventions.md``. Loading and saving models (every
model source, the registry, GGUF, llama2.c) is :mod:`orthoopt.models`; the planted-outlier toy model
is :mod:`orthoopt.testing`.
"""

from orthoopt.adapters.arch_table import ARCHS, ArchSpec, Norm, Proj
from orthoopt.adapters.archs import UnsupportedModelError, locate
from orthoopt.adapters.decoder import DecoderAdapter
from orthoopt.adapters.verify import logits_relative_error
from orthoopt.adapters.writeback import orthogonality_tolerance

__all__ = [
    "ARCHS", "ArchSpec", "DecoderAdapter", "Norm", "Proj", "UnsupportedModelError", "locate",
    "logits_relative_error", "orthogonality_tolerance",
]
