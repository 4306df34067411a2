"""Working with other quantization tools (optional dependencies; see docs/export.md).

* :mod:`orthoopt.interop.llmcompressor`: quantize an (orthoopt-rotated) model with llm-compressor's
  ``oneshot`` (GPTQ or RTN, optionally after its SpinQuant Hadamard rotations).
"""
