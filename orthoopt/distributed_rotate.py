"""``python -m orthoopt.distributed_rotate``: streamed OptRot over several processes (``torchrun``).

    torchrun --nproc_per_node 4 -m orthoopt.distributed_rotate MODEL_DIR --out OUT_DIR [--steps 100]

Each rank reads only its share of the layers (:func:`orthoopt.streaming.rotate_streamed`); the R1
gradient is all-reduced every step (gloo on CPU, NCCL with ``--device cuda``, each rank on GPU
``LOCAL_RANK``), so every rank takes the same steps and holds the same rotation; the layers' R2
problems are split across ranks; rank 0 writes the output folder and prints the summary. Without
``torchrun`` (no ``WORLD_SIZE`` in the environment) it runs as one process, like
``orthoopt rotate --streamed``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch
import torch.distributed as dist

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m orthoopt.distributed_rotate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", help="Hugging Face model folder with safetensors weights")
    p.add_argument("--out", required=True, help="output folder (written by rank 0)")
    p.add_argument("--rotations", default="R1,R2", help="comma-separated subset of R1,R2")
    p.add_argument("--solver", default=None, help="default: cayley-lbfgs")
    p.add_argument("--steps", type=int, default=100, help="solver steps per rotation phase")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="dtype of the learned rotations")
    p.add_argument("--model-dtype", choices=tuple(DTYPES), default="float32", help="dtype of the weights")
    p.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (NCCL, GPU LOCAL_RANK per rank)")
    p.add_argument("--chunk-rows", type=int, default=None)
    p.add_argument("--sample-fraction", type=float, default=None)
    p.add_argument("--layers-per-shard", type=int, default=1)
    p.add_argument("--include-embeddings", action="store_true")
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


def main(argv: list[str] | None = None) -> int:
    from orthoopt.solvers.distributed import world
    from orthoopt.streaming import rotate_streamed

    args = build_parser().parse_args(argv)
    phases = [s.strip() for s in args.rotations.split(",") if s.strip()]
    device = init_process_group(args.device)
    try:
        rank, size = world()
        result = rotate_streamed(
            args.model_dir, args.out, "optrot", phases, solver=args.solver, steps=args.steps, lr=args.lr,
            seed=args.seed, dtype=DTYPES[args.dtype], model_dtype=DTYPES[args.model_dtype],
            chunk_rows=args.chunk_rows, sample_fraction=args.sample_fraction,
            device=None if device.type == "cpu" else device, layers_per_shard=args.layers_per_shard,
            include_embeddings=args.include_embeddings, progress=not args.quiet,
            report_extra={"model": str(args.model_dir)},
        )
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
    except (ValueError, FileNotFoundError) as e:
        print(f"orthoopt.distributed_rotate: error: {e}", file=sys.stderr)
        sys.exit(2)
