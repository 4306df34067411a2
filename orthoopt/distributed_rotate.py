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

from orthoopt.models.dtypes import DTYPE_CHOICES, dtype_name, resolve_model_dtype
from orthoopt.models.sources import local_source
from orthoopt.config import DTYPES, RotateConfig
from orthoopt.errors import OrthooptError
from orthoopt.methods import METHODS, names
from orthoopt.utils.argtypes import integer, real


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m orthoopt.distributed_rotate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", help="Hugging Face model folder with safetensors weights")
    p.add_argument("--out", required=True, help="output folder (written by rank 0)")
    p.add_argument("--method", choices=names(lambda m: m.supports_streamed), default="optrot",
                   help="a method the streamed store runs (docs/solvers.md); default optrot")
    p.add_argument("--rotations", default="R1,R2", help="comma-separated subset of R1,R2")
    p.add_argument("--solver", default=None, help=f"default: the method's (optrot {METHODS['optrot'].solver})")
    p.add_argument("--steps", type=integer(0), default=None,
                   help=f"solver steps per rotation phase; default the method's budget (optrot {METHODS['optrot'].steps})")
    p.add_argument("--lr", type=real(0, low_open=True), default=None)
    p.add_argument("--seed", type=integer(0), default=0)
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="dtype of the learned rotations")
    p.add_argument("--model-dtype", choices=DTYPE_CHOICES, default="auto",
                   help="dtype the weights are read, fused and written in (auto: the checkpoint's own)")
    p.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (NCCL, GPU LOCAL_RANK per rank)")
    p.add_argument("--chunk-rows", type=integer(1), default=None)
    p.add_argument("--sample-fraction", type=real(0, 1, low_open=True), default=None)
    p.add_argument("--layers-per-shard", type=integer(1), default=1)
    p.add_argument("--include-embeddings", action="store_true")
    p.add_argument("--checkpoint-every", type=integer(0), default=25, help="steps between partial checkpoints (0: off)")
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
    phases = tuple(s.strip() for s in args.rotations.split(",") if s.strip())
    return RotateConfig(method=args.method, rotations=phases, solver=args.solver, steps=args.steps, lr=args.lr,
                        seed=args.seed, dtype=args.dtype,
                        model_dtype=dtype_name(resolve_model_dtype(local_source(Path(args.model_dir)), args.model_dtype)),
                        device=None if device.type == "cpu" else device.type, chunk_rows=args.chunk_rows,
                        sample_fraction=args.sample_fraction, layers_per_shard=args.layers_per_shard,
                        include_embeddings=args.include_embeddings, checkpoint_every=args.checkpoint_every)


def main(argv: list[str] | None = None) -> int:
    from orthoopt.pipeline import rotate_streamed
    from orthoopt.solvers.distributed import all_gather_objects, world
    from orthoopt.streaming.rotate import rank_partial

    args = build_parser().parse_args(argv)
    device = init_process_group(args.device)
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
