"""Compare the weight blocks of rotated checkpoints, block by block.

    python examples/compare_rotations.py runs/hadamard runs/optrot [--json]

For each R1/R2 weight block that gets quantized (every q/k/v/o/gate/up/down projection and every
per-head v/o slice; embeddings and lm_head stay in full precision) prints the fourth-power sum and
max |w| of each checkpoint, and counts the blocks where the last checkpoint is lower than the first.
Checkpoints written by ``orthoopt rotate`` have fused norms, so their blocks are directly comparable.
"""

import argparse
import json


from orthoopt.adapters import DecoderAdapter
from orthoopt.models import load_model

FULL_PRECISION = ("embed_tokens", "lm_head")


def block_table(model_dir: str) -> dict[str, tuple[float, float]]:
    """``{block name: (sum w^4, max |w|)}`` in float64."""
    adapter = DecoderAdapter(load_model(model_dir))
    return {b.name: (float(b.weight.double().pow(4).sum()), float(b.weight.abs().max()))
            for b in adapter.weight_blocks() if b.name not in FULL_PRECISION}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="+", help="rotated checkpoints; the first is the reference")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    tables = [block_table(d) for d in args.dirs]
    ref, last = tables[0], tables[-1]
    names = list(ref)
    summary = {
        "reference": args.dirs[0], "candidate": args.dirs[-1], "blocks": len(names),
        "fourth_power_total": [sum(t[k][0] for k in names) for t in tables],
        "max_abs_mean": [sum(t[k][1] for k in names) / len(names) for t in tables],
        "blocks_lower_fourth_power": sum(last[k][0] < ref[k][0] for k in names),
        "blocks_lower_max_abs": sum(last[k][1] < ref[k][1] for k in names),
    }
    for group in ("R1", "R2"):
        keys = [k for k in names if (".head" in k) == (group == "R2")]
        summary[group] = {"blocks": len(keys),
                          "lower_fourth_power": sum(last[k][0] < ref[k][0] for k in keys),
                          "lower_max_abs": sum(last[k][1] < ref[k][1] for k in keys),
                          "fourth_power_total": [sum(t[k][0] for k in keys) for t in tables]}
    if args.json:
        print(json.dumps(summary))
        return
    print(f"{'block':<40}" + "".join(f"{d[-18:]:>22}{'':>12}" for d in args.dirs))
    print(f"{'':<40}" + "".join(f"{'sum w^4':>22}{'max|w|':>12}" for _ in args.dirs))
    for k in names:
        print(f"{k:<40}" + "".join(f"{t[k][0]:>22.5e}{t[k][1]:>12.4f}" for t in tables))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
