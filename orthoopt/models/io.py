"""Loading models (any source of :mod:`orthoopt.models.sources`) and saving rotated ones atomically.

A rotated checkpoint folder holds ``save_pretrained`` output (safetensors weights, config), the
tokenizer when there is one, ``orthoopt/rotations.safetensors`` (``{"R1": [hidden, hidden], "R2.i":
[d, d]}``) and ``report.json``. It is written to a temporary sibling and renamed into place.

The rotations live in the ``orthoopt/`` subfolder because serving engines (vLLM, SGLang, TGI) load
every top-level ``*.safetensors`` file of a folder without a weight index as model weights, and
refuse unknown tensor names such as ``R1``: the top level holds the model's weights and nothing
else. :func:`load_rotations` also reads the top-level ``rotations.safetensors`` of folders written
before this layout.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from orthoopt.models import llama2c
from orthoopt.errors import InvalidInputError
from orthoopt.models.dtypes import resolve_model_dtype
from orthoopt.utils.atomic import atomic_dir
from orthoopt.utils.checks import check_model_weights
from orthoopt.utils.tensorfile import check_weight_files, read_json_object, read_safetensors

ROTATIONS_FILE = "orthoopt/rotations.safetensors"  # relative to the checkpoint folder (module doc)
LEGACY_ROTATIONS_FILE = "rotations.safetensors"
REPORT_FILE = "report.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def _quantized_load_kwargs(path: Path) -> dict:
    """``from_pretrained`` keyword arguments for a folder whose config.json has a ``quantization_config``:
    compressed-tensors checkpoints load dequantized (``dequantize=True``: dense weights, and the only
    route by which transformers 5.2x loads asymmetric packed zero points)."""
    config = read_json_object(path / "config.json")
    method = (config.get("quantization_config") or {}).get("quant_method")
    if method != "compressed-tensors":
        return {}
    try:
        import compressed_tensors  # noqa: F401
    except ImportError as e:
        raise InvalidInputError(
            f"{path} is a compressed-tensors checkpoint; install the compressed-tensors package "
            '(pip install "orthoopt[export]") to load it'
        ) from e
    from transformers import CompressedTensorsConfig

    return {"quantization_config": CompressedTensorsConfig(dequantize=True)}


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
"""Weight files that are Python pickles: orthoopt never unpickles them (unpickling can run code)."""

SIZE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "max_position_embeddings")
"""config.json sizes that must be positive integers (checked by :func:`check_model_folder`)."""


def check_model_folder(folder: str | os.PathLike) -> list[Path]:
    """Check a Hugging Face model folder before anything is built from it; returns its safetensors files.

    Raises ValueError (naming the file or field) when its weights are only pickle files
    (:data:`PICKLE_SUFFIXES`, never loaded), a safetensors file is damaged
    (:func:`~orthoopt.utils.tensorfile.check_weight_files`), a :data:`SIZE_FIELDS` entry of config.json
    is not a positive integer, or config.json's ``vocab_size`` / ``hidden_size`` disagree with the
    embedding's shape in the weight files' headers, or ``num_hidden_layers`` asks for more layers than
    they hold (a config asking for sizes the weights do not have would make transformers allocate, and
    randomly initialise, the difference)."""
    folder = Path(folder)
    files = check_weight_files(folder)
    if not files:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        if pickles:
            raise InvalidInputError(f"{folder} holds its weights only as pickle files ({', '.join(pickles)}), which orthoopt "
                             "does not load (unpickling can run code); convert them to safetensors first")
    config_file = folder / "config.json"
    config = read_json_object(config_file)
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    for field in SIZE_FIELDS:
        value = text.get(field, config.get(field))
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise InvalidInputError(f"{config_file}: {field} must be a positive integer, got {value!r}")
    from orthoopt.utils.tensorfile import check_safetensors

    shapes = {k: v["shape"] for f in files for k, v in check_safetensors(f).items() if k != "__metadata__"}
    embed = next((s for k, s in shapes.items() if k.endswith("embed_tokens.weight") and len(s) == 2), None)
    layers = {int(m.group(1)) for k in shapes for m in [re.search(r"(?:^|\.)layers\.(\d+)\.", k)] if m}
    found = {"vocab_size": embed and embed[0], "hidden_size": embed and embed[1],
             "num_hidden_layers": (max(layers) + 1) if layers else None}
    for field, have in found.items():
        want = text.get(field, config.get(field))
        # more layers in the weights than in the config may be legitimate (multi-token-prediction heads)
        if have is not None and want is not None and (want > have if field == "num_hidden_layers" else want != have):
            raise InvalidInputError(f"{config_file}: {field} is {want} but the weights have {have}; refusing to build a "
                             "model the weights do not fill")
    return files


def load_model(path: str | os.PathLike, dtype: torch.dtype | str = "auto", device: str | torch.device = "cpu",
               progress: bool = True) -> PreTrainedModel:
    """An eval-mode ``*ForCausalLM`` in ``dtype`` from any model source (:mod:`orthoopt.models.sources`): a
    Hugging Face folder, a ``.gguf`` file (or a folder holding one; dequantized, loaded as a plain
    float model), a llama2.c ``.bin`` (or a folder holding one), ``planted`` (the planted-outlier toy
    Llama), a registered name such as ``smollm2-135m`` (its verified cache folder, fetched on first
    use; ``progress`` shows the fetch) or a Hugging Face Hub id. ``dtype``: a torch dtype, a
    :data:`~orthoopt.models.dtypes.DTYPE_CHOICES` name, or ``"auto"`` (default): a folder's own
    dtype (a bfloat16 checkpoint loads in bfloat16), float32 for the other kinds
    (:func:`~orthoopt.models.dtypes.resolve_model_dtype`).

    Raises FileNotFoundError when ``path`` names nothing loadable (also for a Hub id while the Hub is
    unreachable, with what to pass instead), and ValueError naming the file and the fault for a
    damaged weight file (:mod:`orthoopt.utils.tensorfile`) and naming the tensor for a weight that
    holds NaN or inf.
    """
    from orthoopt.models.sources import load_hub, resolve_source

    source = resolve_source(path, progress=progress)
    if source.folder is not None:
        check_model_folder(source.folder)
    dtype = resolve_model_dtype(source, dtype)
    if source.folder is not None:
        try:
            with warnings.catch_warnings():  # "quantization_config from the model will be used" (it is; we set dequantize)
                warnings.filterwarnings("ignore", message="You passed `quantization_config`", category=UserWarning)
                model = AutoModelForCausalLM.from_pretrained(source.folder, dtype=dtype, use_safetensors=True,
                                                             trust_remote_code=False,
                                                             **_quantized_load_kwargs(source.folder))
        except (OSError, ValueError) as e:  # transformers' missing or unreadable files, a config it refuses
            raise InvalidInputError(f"cannot load the model in {source.folder}: {e}") from None
    elif source.kind == "gguf":
        from orthoopt.models.gguf import load_gguf_model

        model = load_gguf_model(source.path, dtype)
    elif source.kind == "llama2c":
        model = llama2c.read_llama2c(source.path, dtype)
    elif source.kind == "planted":
        from orthoopt.models.sources import PLANTED_CONFIG
        from orthoopt.testing.tiny import planted_outlier_model

        model = planted_outlier_model(**PLANTED_CONFIG, dtype=dtype)
    else:  # hub
        model = load_hub(source.spec, AutoModelForCausalLM.from_pretrained, dtype=dtype)
    check_model_weights(model, str(path))
    return model.to(device).eval()


def load_tokenizer(path: str | os.PathLike, progress: bool = True):
    """The tokenizer of a model source (see :func:`load_model`), or None when it has none: the
    tokenizer files of a folder (``AutoTokenizer``), the one inside a ``.gguf`` file, the byte
    tokenizer of ``planted``, the Hub's."""
    from orthoopt.models.sources import load_hub, resolve_source

    source = resolve_source(path, progress=progress)
    if source.kind == "gguf":
        from orthoopt.models.gguf import load_gguf_tokenizer

        return load_gguf_tokenizer(source.path)
    if source.kind == "planted":
        from orthoopt.testing.tiny import byte_tokenizer

        return byte_tokenizer()
    if source.kind == "hub":
        return load_hub(source.spec, AutoTokenizer.from_pretrained)
    folder = source.path if source.path.is_dir() else source.path.parent
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        return None
    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)  # never a folder's own code
    except (OSError, ValueError) as e:  # a damaged tokenizer.json or config.json
        raise InvalidInputError(f"cannot load the tokenizer in {folder}: {e}") from None


def _report_json(report: Mapping) -> str:
    try:
        return json.dumps(report, indent=2, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise InvalidInputError(f"report is not strict JSON: {e}") from e


def save_rotated(model: PreTrainedModel, tokenizer, out_dir: str | os.PathLike,
                 rotations: Mapping[str, torch.Tensor], report: Mapping,
                 extras: Callable[[Path], None] | None = None) -> Path:
    """Write ``model`` (safetensors), ``tokenizer`` (if not None), ``orthoopt/rotations.safetensors``
    and ``report.json`` into ``out_dir`` atomically (a previous ``out_dir`` is replaced only on success).
    ``extras(folder)`` may add files (plots) to the temporary folder before it is renamed.

    Raises ValueError before writing anything if ``report`` is not JSON-serializable (NaN included)
    or a rotation is not a tensor.
    """
    text, tensors = _checked_run_files(rotations, report)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)  # safetensors (the default)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _write_run_files(tmp, text, tensors)
        if extras is not None:
            extras(tmp)
    return Path(out_dir)


def write_run_files(folder: Path, rotations: Mapping[str, torch.Tensor], report: Mapping) -> None:
    """``orthoopt/rotations.safetensors`` and ``report.json`` of a rotate run into ``folder``. Raises
    ValueError, writing nothing, if ``report`` is not strict JSON or a rotation is not a tensor."""
    _write_run_files(Path(folder), *_checked_run_files(rotations, report))


def _checked_run_files(rotations: Mapping[str, torch.Tensor], report: Mapping) -> tuple[str, dict]:
    text = _report_json(report)
    tensors = {}
    for name, R in rotations.items():
        if not isinstance(R, torch.Tensor):
            raise InvalidInputError(f"rotation {name!r} is not a tensor ({type(R).__name__})")
        tensors[name] = R.detach().to("cpu")
    return text, tensors


def _write_run_files(folder: Path, text: str, tensors: dict) -> None:
    write_rotations(folder, tensors)
    (folder / REPORT_FILE).write_text(text + "\n")


def write_rotations(folder: Path, rotations: Mapping[str, torch.Tensor]) -> Path:
    """Save ``rotations`` (CPU tensors) as ``folder / ROTATIONS_FILE``; returns that path."""
    f = folder / ROTATIONS_FILE
    f.parent.mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in rotations.items()}, str(f))
    return f


def load_rotations(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The rotations of a folder written by :func:`save_rotated` (``orthoopt/rotations.safetensors``,
    or the top-level ``rotations.safetensors`` of older folders), or of a rotations file."""
    path = Path(path)
    f = path
    if path.is_dir():
        f = next((path / n for n in (ROTATIONS_FILE, LEGACY_ROTATIONS_FILE) if (path / n).is_file()),
                 path / ROTATIONS_FILE)
    if not f.is_file():
        raise FileNotFoundError(f"no {ROTATIONS_FILE} at {path}")
    return read_safetensors(f, "rotations file")
