"""``python -m orthoopt.distributed_rotate``: streamed rotation over several processes (``torchrun``).

    torchrun --nproc_per_node 4 -m orthoopt.distributed_rotate MODEL_DIR --out OUT_DIR [--steps 150]

``--method``: one the safetensors store streams (default optrot; the fixed methods need no solve).

The same :class:`~orthoopt.config.RotateConfig` and phase loop as ``orthoopt rotate --streamed``
(:func:`orthoopt.pipeline.rotate_streamed`). Each rank reads only its share of the layers; the R1
gradient is all-reduced every step (gloo on CPU, NCCL with ``--device cuda``, each rank on GPU
``LOCAL_RANK``), so every rank takes the same steps and holds the same rotation; the layers' R2
problems are split across ranks; rank 0 writes the output folder and prints the summary. Without
``torchrun`` (no ``WORLD_SIZE`` in the environment) it runs as one process, like
``orthoopt rotate --streamed``.

Exact resume: every ``--checkpoint-every`` steps the run writes its whole state: during R1 rank 0 writes
every rank's state to ``OUT.partial.safetensors`` (the ranks step together), during R2 (and after each
layer) each rank writes its own ``OUT.partial.rankR-of-W.safetensors``. ``--resume`` continues from
them, bit-identical to an uninterrupted run with the same number of processes
(``docs/guarantees.md``). The files are removed once the output is written.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from orthoopt.models.dtypes import dtype_name, resolve_model_dtype
from orthoopt.models.sources import local_source
from orthoopt.config import RotateConfig
from orthoopt.config_options import add_config_options, build_config, config_values, dest, resolve_dtypes
from orthoopt.errors import OrthooptError
from orthoopt.methods import names


STREAMED_FIELDS = ("rotations", "solve.solver", "solve.steps", "solve.lr", "seed", "checkpoint.dtype", "compute.dtype",
                   "compute.device", "compute.chunk_rows", "compute.sample_fraction", "checkpoint.layers_per_shard",
                   "include_embeddings", "solve.checkpoint_every")
"""The :class:`~orthoopt.config.RotateConfig` fields this entry point sets: the options of
``orthoopt rotate --streamed`` (the same flags, types, defaults and help, from
:func:`orthoopt.config_options.add_config_options`)."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m orthoopt.distributed_rotate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", help="Hugging Face model folder with safetensors weights")
    p.add_argument("--out", required=True, help="output folder (written by rank 0)")
    p.add_argument("--method", choices=names(lambda m: m.supports_streamed and not m.needs_calibration),
                   default="optrot", help="a data-free method the streamed store runs (docs/solvers.md); default "
                   "optrot. The streamed data methods run in one process: orthoopt rotate --streamed --calib")
    add_config_options(p, STREAMED_FIELDS, help_prefix={
        "compute.device": "cpu (gloo, the default) or cuda (NCCL, GPU LOCAL_RANK per rank)"})
    p.add_argument("--resume", action="store_true", help="continue exactly from the partial checkpoints")
    p.add_argument("--json", action="store_true", help="rank 0 prints the report as JSON on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


COLLECTIVE_TIMEOUT = datetime.timedelta(hours=12)
"""How long a rank waits in a collective: the other ranks wait while rank 0 writes the whole model."""


def init_process_group(device: str) -> torch.device:
    """Join the ``torchrun`` process group (env://) if ``WORLD_SIZE`` > 1; returns this rank's device."""
    dev = torch.device(device)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(dev)
            dist.init_process_group("nccl", device_id=dev, timeout=COLLECTIVE_TIMEOUT)
        else:
            dist.init_process_group("gloo", timeout=COLLECTIVE_TIMEOUT)
    return dev


def config_from_args(args: argparse.Namespace, device: torch.device) -> RotateConfig:
    """The run's :class:`~orthoopt.config.RotateConfig` (the same fields as ``orthoopt rotate --streamed``).
    ``device`` is the type only (``"cuda"``): each rank computes on its current device (``LOCAL_RANK``),
    and every rank's config, hence its resume settings, is the same."""
    source = local_source(Path(args.model_dir))
    values = resolve_dtypes(config_values(args, [dest(n) for n in STREAMED_FIELDS]),
                            lambda: dtype_name(resolve_model_dtype(source, "auto")))
    values["compute.device"] = None if device.type == "cpu" else device.type
    return build_config(args.method, values)


def main(argv: list[str] | None = None) -> int:
    from orthoopt.pipeline import rotate_streamed
    from orthoopt.solvers.distributed import all_gather_objects, world
    from orthoopt.streaming.rotate import rank_partial

    args = build_parser().parse_args(argv)
    device = init_process_group(args.device or "cpu")
    try:
        rank, size = world()
        config = config_from_args(args, device)
        out = Path(args.out)
        partial = out.with_name(out.name + ".partial.safetensors")
        result = rotate_streamed(args.model_dir, out, config, progress=not args.quiet, checkpoint=partial,
                                 resume=args.resume, report_extra={"model": str(args.model_dir)})
        if size > 1:
            rank_partial(partial, rank, size).unlink(missing_ok=True)
            all_gather_objects(None)  # every rank removed its own file before the shared one goes
        if rank == 0:
            partial.unlink(missing_ok=True)
        if rank == 0:
            if args.json:
                print(json.dumps(result.report))
            else:
                print(f"orthoopt.distributed_rotate: {size} process(es) -> {args.out} in "
                      f"{result.report['seconds']:.1f} s", file=sys.stderr)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":  # pragma: no cover
    try:
        sys.exit(main())
    except (OrthooptError, FileNotFoundError) as e:  # as orthoopt.cli.main: other exceptions are bugs
        print(f"orthoopt.distributed_rotate: error: {e}", file=sys.stderr)
        sys.exit(2)
