"""Weight quantization (RTN, GPTQ), activation fake quantization, calibration data.

See ``docs/quantization.md``. Only decoder-layer linears are quantized; embeddings and ``lm_head``
stay in full precision.
"""

from orthoopt.quant.act import (
    ActQuantConfig,
    ActQuantHooks,
    install_act_quant,
    online_hadamard_matrix,
    quantize_activations,
    rotate_down_proj_weights,
)
from orthoopt.quant.calib import calibration_batches, read_text, tokenize_text
from orthoopt.quant.gptq import GPTQResult, HessianAccumulator, gptq_quantize
from orthoopt.quant.model import (
    LoadedModel,
    QuantResult,
    load_checkpoint,
    load_quantized,
    quantize_model,
    read_quant_settings,
    save_quantized,
)
from orthoopt.quant.quantizer import QuantSpec, fake_quantize, find_params, quantize_rows
from orthoopt.quant.rtn import quantize_rtn
from orthoopt.quant.sequential import gptq_quantize_model

__all__ = [
    "ActQuantConfig",
    "ActQuantHooks",
    "GPTQResult",
    "HessianAccumulator",
    "LoadedModel",
    "QuantResult",
    "QuantSpec",
    "calibration_batches",
    "fake_quantize",
    "find_params",
    "gptq_quantize",
    "gptq_quantize_model",
    "install_act_quant",
    "load_checkpoint",
    "load_quantized",
    "online_hadamard_matrix",
    "quantize_activations",
    "quantize_model",
    "quantize_rows",
    "quantize_rtn",
    "read_quant_settings",
    "read_text",
    "rotate_down_proj_weights",
    "save_quantized",
    "tokenize_text",
]
