"""Weight quantization (RTN, GPTQ), activation fake quantization, calibration data.

See ``docs/quantization.md``. Only decoder-layer linears are quantized; embeddings and ``lm_head``
stay in full precision.
"""

from importlib import import_module

from orthoopt.quant.calib import calibration_batches, read_text, tokenize_text
from orthoopt.quant.gptq import GPTQFactor, GPTQResult, HessianAccumulator, gptq_factor, gptq_quantize
from orthoopt.quant.quantizer import QuantSpec, WeightQuantParams, fake_quantize, find_params, quantize_rows
from orthoopt.quant.rtn import quantize_rtn, quantize_rtn_params

# Whole-model pieces import transformers (through the adapters): loaded on first use, so that the
# tensor-level quantizers above stay cheap to import (diagnostics and objectives use them).
_LAZY = {
    "ActQuantConfig": "act", "ActQuantHooks": "act", "install_act_quant": "act",
    "online_hadamard_matrix": "act", "quantize_activations": "act", "rotate_down_proj_weights": "act",
    "GPTQConfig": "config", "QuantizeConfig": "config",
    "KVQuantConfig": "kv", "KVQuantHooks": "kv", "install_kv_quant": "kv",
    "LoadedModel": "model", "QuantResult": "model", "load_checkpoint": "model", "load_quantized": "model",
    "quantize_model": "model", "read_quant_settings": "model", "save_quantized": "model",
    "gptq_quantize_model": "sequential",
    "load_layered": "model", "quantize_layered": "layered", "write_layered": "layered",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f"orthoopt.quant.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'orthoopt.quant' has no attribute {name!r}")


__all__ = [
    "load_layered",
    "quantize_layered",
    "write_layered",
    "ActQuantConfig",
    "ActQuantHooks",
    "GPTQConfig",
    "GPTQFactor",
    "GPTQResult",
    "HessianAccumulator",
    "KVQuantConfig",
    "KVQuantHooks",
    "LoadedModel",
    "QuantResult",
    "QuantizeConfig",
    "QuantSpec",
    "WeightQuantParams",
    "calibration_batches",
    "fake_quantize",
    "find_params",
    "gptq_factor",
    "gptq_quantize",
    "gptq_quantize_model",
    "install_act_quant",
    "install_kv_quant",
    "load_checkpoint",
    "load_quantized",
    "online_hadamard_matrix",
    "quantize_activations",
    "quantize_model",
    "quantize_rows",
    "quantize_rtn",
    "quantize_rtn_params",
    "read_quant_settings",
    "read_text",
    "rotate_down_proj_weights",
    "save_quantized",
    "tokenize_text",
]
