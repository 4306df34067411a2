"""Load a compressed-tensors export in plain transformers, with its online transforms, without orthoopt.

    python examples/ct_transformers_load.py runs/rot-w4a8-r4 [--ids ids.pt --out logits.pt] [--no-transforms]

transformers 5.24 reads ``quantization_config`` (integer weights; ``input_activations``, which its
default route quantizes at run time) but not the ``transform_config`` inside it: the online Hadamard
before ``down_proj`` (R4) of an ``orthoopt quantize --online-hadamard --format compressed-tensors``
export would silently not run. :func:`load` therefore applies it with compressed-tensors' own
``apply_transform_config`` after ``from_pretrained``; that is all a user needs besides transformers and
compressed-tensors (docs/export.md, "Activations and R4").

With ``--ids`` (a saved ``[batch, seq]`` LongTensor) the logits are computed and saved to ``--out``
(tests/test_export_ct_act.py runs it that way, in a subprocess, and compares them with orthoopt's
fake-quantized model); without, it prints what was loaded. It checks at the end that orthoopt was
never imported.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def transform_config_of(model_dir: str | Path) -> dict | None:
    """The ``transform_config`` recorded in the folder's config.json (None if there is none)."""
    config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    return (config.get("quantization_config") or {}).get("transform_config")


def load(model_dir: str | Path, dtype=None, transforms: bool = True):
    """``AutoModelForCausalLM.from_pretrained(model_dir)`` (default compressed-tensors route: weights
    decompressed on the first forward, input activations quantized per token at run time), then the
    checkpoint's ``transform_config`` applied by compressed-tensors (unless ``transforms`` is False)."""
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": dtype} if dtype is not None else {}
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs).eval()
    config = transform_config_of(model_dir)
    if config and transforms:
        from compressed_tensors.transform import TransformConfig, apply_transform_config

        apply_transform_config(model, TransformConfig.model_validate(config))
    return model


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir")
    p.add_argument("--ids", help="a torch-saved [batch, seq] LongTensor of token ids")
    p.add_argument("--out", help="where to torch.save the logits (with --ids)")
    p.add_argument("--no-transforms", action="store_true", help="do not apply the transform_config (what "
                   "transformers alone does)")
    args = p.parse_args(argv)
    import torch

    model = load(args.model_dir, transforms=not args.no_transforms)
    if args.ids:
        ids = torch.load(args.ids)
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        if args.out:
            torch.save(logits, args.out)
        print(f"logits {tuple(logits.shape)}, max |logit| {logits.abs().max().item():.4g}")
    else:
        n = sum(1 for m in model.modules() if hasattr(m, "quantization_scheme"))
        print(f"loaded {args.model_dir}: {n} quantized modules, transform_config "
              f"{'applied' if transform_config_of(args.model_dir) and not args.no_transforms else 'none'}")
    if "orthoopt" in sys.modules:
        raise SystemExit("orthoopt was imported; this example must run without it")


if __name__ == "__main__":
    main()
