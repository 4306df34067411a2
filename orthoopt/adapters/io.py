"""Loading models (Hugging Face folders, llama2.c ``.bin``) and saving rotated ones atomically.

A rotated checkpoint folder holds ``save_pretrained`` output (safetensors weights, config), the
tokenizer when there is one, ``rotations.safetensors`` (``{"R1": [hidden, hidden], "R2.i": [d, d]}``)
and ``report.json``. It is written to a temporary sibling and renamed into place.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from orthoopt.adapters import llama2c
from orthoopt.utils.atomic import atomic_dir

ROTATIONS_FILE = "rotations.safetensors"
REPORT_FILE = "report.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def _llama2c_file(path: Path) -> Path | None:
    """``path`` itself or the single llama2.c ``.bin`` inside folder ``path`` (None if there is none)."""
    if path.is_file():
        return path if llama2c.is_llama2c(path) else None
    found = [p for p in sorted(path.glob("*.bin")) if llama2c.is_llama2c(p)]
    if len(found) > 1:
        raise ValueError(f"{path} holds several llama2.c checkpoints: {[p.name for p in found]}; pass one file")
    return found[0] if found else None


def _quantized_load_kwargs(path: Path) -> dict:
    """``from_pretrained`` keyword arguments for a folder whose config.json has a ``quantization_config``:
    compressed-tensors checkpoints load dequantized (``dequantize=True``: dense weights, and the only
    route by which transformers 5.2x loads asymmetric packed zero points)."""
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    method = (config.get("quantization_config") or {}).get("quant_method")
    if method != "compressed-tensors":
        return {}
    try:
        import compressed_tensors  # noqa: F401
    except ImportError as e:
        raise ValueError(
            f"{path} is a compressed-tensors checkpoint; install the compressed-tensors package "
            '(pip install "orthoopt[export]") to load it'
        ) from e
    from transformers import CompressedTensorsConfig

    return {"quantization_config": CompressedTensorsConfig(dequantize=True)}


def load_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> PreTrainedModel:
    """An eval-mode ``*ForCausalLM`` from a Hugging Face folder (``config.json`` + weights) or a
    llama2.c checkpoint (a ``.bin`` file, or a folder without ``config.json`` holding one).

    A compressed-tensors checkpoint (packed integer weights, e.g. from ``orthoopt quantize --format
    compressed-tensors`` or llm-compressor) is dequantized to dense float weights while loading
    (needs the ``compressed-tensors`` package), so adapters and evaluation see ordinary linears.

    Raises FileNotFoundError when ``path`` does not exist or holds neither.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model path not found: {path}")
    if path.is_dir() and (path / "config.json").is_file():
        with warnings.catch_warnings():  # "quantization_config from the model will be used" (it is; we set dequantize)
            warnings.filterwarnings("ignore", message="You passed `quantization_config`", category=UserWarning)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **_quantized_load_kwargs(path))
    else:
        bin_file = _llama2c_file(path)
        if bin_file is None:
            raise FileNotFoundError(f"{path}: no config.json (Hugging Face folder) and no llama2.c .bin checkpoint")
        model = llama2c.read_llama2c(bin_file, dtype)
    return model.to(device).eval()


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer saved in folder ``path`` (``AutoTokenizer``), or None when it holds none."""
    path = Path(path)
    if not path.is_dir() or not any((path / f).is_file() for f in TOKENIZER_FILES):
        return None
    return AutoTokenizer.from_pretrained(path)


def _report_json(report: Mapping) -> str:
    try:
        return json.dumps(report, indent=2, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"report is not strict JSON: {e}") from e


def save_rotated(model: PreTrainedModel, tokenizer, out_dir: str | os.PathLike,
                 rotations: Mapping[str, torch.Tensor], report: Mapping,
                 extras: Callable[[Path], None] | None = None) -> Path:
    """Write ``model`` (safetensors), ``tokenizer`` (if not None), ``rotations.safetensors`` and
    ``report.json`` into ``out_dir`` atomically (a previous ``out_dir`` is replaced only on success).
    ``extras(folder)`` may add files (plots) to the temporary folder before it is renamed.

    Raises ValueError before writing anything if ``report`` is not JSON-serializable (NaN included)
    or a rotation is not a tensor.
    """
    text = _report_json(report)
    tensors = {}
    for name, R in rotations.items():
        if not isinstance(R, torch.Tensor):
            raise ValueError(f"rotation {name!r} is not a tensor ({type(R).__name__})")
        tensors[name] = R.detach().to("cpu").contiguous()
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)  # safetensors (the default)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        save_file(tensors, str(tmp / ROTATIONS_FILE))
        (tmp / REPORT_FILE).write_text(text + "\n")
        if extras is not None:
            extras(tmp)
    return Path(out_dir)


def load_rotations(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The rotations of a folder written by :func:`save_rotated` (or a ``rotations.safetensors`` file)."""
    path = Path(path)
    f = path / ROTATIONS_FILE if path.is_dir() else path
    if not f.is_file():
        raise FileNotFoundError(f"no {ROTATIONS_FILE} at {path}")
    return load_file(str(f))
