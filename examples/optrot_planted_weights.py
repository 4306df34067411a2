"""OptRot on a weight matrix with planted outlier columns, started from a random Hadamard rotation.

    python examples/optrot_planted_weights.py [--steps 200] [--rows 4096] [--n 512]

W = randn(rows, n) with a few columns scaled x20 (outlier input channels). The block reads the rotated
space, so it becomes W @ R (docs/conventions.md). Prints the fourth-power loss and max |W R| of the
random-Hadamard start and of the learned rotation, and the RTN W4 error of both.
"""

import argparse

import torch

from orthoopt.manifold import orthogonality_error
from orthoopt.objectives import FourthPower, WeightBlock
from orthoopt.solvers import initial_rotations, solve


def rtn4_error(W: torch.Tensor) -> float:
    """Relative Frobenius error of symmetric per-row 4-bit round-to-nearest."""
    scale = W.abs().amax(dim=1, keepdim=True) / 7
    Q = (W / scale).round().clamp(-8, 7) * scale
    return float((W - Q).norm() / W.norm())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--outliers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    g = torch.Generator().manual_seed(args.seed)
    W = torch.randn(args.rows, args.n, generator=g)
    cols = torch.randperm(args.n, generator=g)[: args.outliers]
    W[:, cols] *= 20.0
    objective = FourthPower([WeightBlock(W, "R1", "in", name="planted")])
    start = initial_rotations(objective.dims, "hadamard", seed=args.seed)
    result = solve(objective, start, "cayley-sgd", args.steps)

    rows = [("no rotation", torch.eye(args.n)), ("random Hadamard (start)", start["R1"]),
            ("OptRot (learned)", result.rotations["R1"])]
    print(f"W = randn({args.rows}, {args.n}), columns {sorted(cols.tolist())} x20; {args.steps} Cayley SGD steps")
    print(f"{'rotation':<26}{'sum (W R)^4':>16}{'max |W R|':>12}{'RTN W4 rel. error':>20}")
    for label, R in rows:
        WR = W @ R
        print(f"{label:<26}{float(WR.double().pow(4).sum()):>16.4e}{float(WR.abs().max()):>12.3f}{rtn4_error(WR):>20.4f}")
    print(f"orthogonality error of the learned R: {orthogonality_error(result.rotations['R1']):.2e}")


if __name__ == "__main__":
    main()
