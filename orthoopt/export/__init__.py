"""Export quantized models to formats other tools load (see docs/export.md).

``orthoopt.quant`` stays format-agnostic: it fake-quantizes weights and records each linear's grid
(:class:`orthoopt.quant.WeightQuantParams`); the modules here turn that into a file format.

* :mod:`orthoopt.export.compressed_tensors`: packed integer weights with scales/zero-points and a
  ``quantization_config`` in config.json (the ``compressed-tensors`` format read by transformers and
  vLLM). Needs the optional ``compressed-tensors`` package (``pip install "orthoopt[export]"``).
"""

FORMATS = ("orthoopt", "compressed-tensors")

__all__ = ["FORMATS"]
