"""Data-parallel OptRot (orthoopt.solvers.distributed, orthoopt.distributed_rotate) with 2 gloo processes.

The two processes are forked with torch.multiprocessing (the parent's imports are reused) and join
the group through the environment variables torchrun sets (env:// rendezvous on 127.0.0.1, free port).
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from orthoopt.adapters import DecoderAdapter
from orthoopt.models import load_model
from orthoopt.testing import save_planted
from orthoopt.objectives import FourthPower
from orthoopt.solvers.distributed import (
    DistributedObjective,
    shard_blocks,
    shard_ranges,
)
from orthoopt.config import RotateConfig
from orthoopt.pipeline import rotate_streamed

WORLD = 2
TIMEOUT_S = 120
STEPS = 4


@settings(max_examples=50, deadline=None)
@given(sizes=st.lists(st.integers(0, 50), min_size=0, max_size=12), world=st.integers(1, 5))
def test_shard_ranges_cover_in_order_and_balance(sizes, world):
    ranges = shard_ranges(sizes, world)
    assert len(ranges) == world
    assert [j for r in ranges for j in r] == list(range(len(sizes)))  # contiguous, in order, each once
    total = sum(sizes)
    biggest = max(sizes, default=0)
    for r in ranges:  # each share is within one item of the ideal total / world
        assert sum(sizes[j] for j in r) <= total / world + biggest


def test_distributed_objective_needs_a_process_group():
    with pytest.raises(ValueError, match="process group"):
        DistributedObjective(None, {"R1": 4})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, src: str, out: str, scratch: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    # 1. one gradient of the in-memory R1 objective, blocks sharded across the ranks (float32)
    adapter = DecoderAdapter(load_model(src))
    adapter.fuse_norms()
    blocks = adapter.weight_blocks("R1")
    R = {"R1": torch.linalg.qr(torch.randn(64, 64, generator=torch.Generator().manual_seed(0)))[0]}
    objective = DistributedObjective(FourthPower(shard_blocks(blocks)), {"R1": 64})
    value, grads = objective.value_and_grad(R)
    torch.save({"value": value, "grad": grads["R1"], "n_blocks": len(shard_blocks(blocks))},
               Path(scratch) / f"grad{rank}.pt")
    # 2. the whole streamed rotation through the entry point (float64 rotations and weights)
    from orthoopt.distributed_rotate import main

    main([src, "--out", out, "--steps", str(STEPS), "--seed", "2", "--rotation-dtype", "float64",
          "--dtype", "float64", "--quiet"])


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    src = save_planted(root / "src", hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2,
                       intermediate_size=96)
    out, scratch = root / "out2", root / "scratch"
    scratch.mkdir()
    ctx = mp.start_processes(_worker, args=(_free_port(), str(src), str(out), str(scratch)), nprocs=WORLD,
                             join=False, start_method="fork")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                pytest.fail(f"2-process run did not finish within {TIMEOUT_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    return src, out, scratch


def test_sharded_gradient_equals_single_process_within_float32_summation_bound(two_process_run):
    # The two runs sum the same terms 4 a_ri y_rj^3 (y = A R, M rows in all, R of size n) in different
    # orders: ranks' partial sums, then their sum, against one running sum over all rows. In float32
    # (u = 2^-24) any order gives |fl(G) - G| <= gamma_K * 4 |A|^T (|A| |R|)^3 entrywise (Higham,
    # Accuracy and Stability, 3.1/3.5), with K = M + 3n + 3 covering the M-term sum, the n-term dot
    # products inside y and the products forming y^3 and a y^3; gamma_K = K u / (1 - K u). Two orders
    # therefore differ by at most 2 gamma_K times that majorant. A dropped or doubled shard would
    # miss it by orders of magnitude (checked below).
    src, _, scratch = two_process_run
    parts = [torch.load(scratch / f"grad{r}.pt") for r in range(WORLD)]
    assert parts[0]["n_blocks"] > 0 and parts[1]["n_blocks"] > 0
    assert torch.equal(parts[0]["grad"], parts[1]["grad"])  # every rank holds the same bits
    assert float(parts[0]["value"]) == float(parts[1]["value"])
    adapter = DecoderAdapter(load_model(src))
    adapter.fuse_norms()
    blocks = adapter.weight_blocks("R1")
    R = {"R1": torch.linalg.qr(torch.randn(64, 64, generator=torch.Generator().manual_seed(0)))[0]}
    value, grads = FourthPower(blocks).value_and_grad(R)
    rows = torch.cat([b.as_rows().double() for b in blocks])
    majorant = 4 * rows.abs().T @ (rows.abs() @ R["R1"].double().abs()) ** 3
    u = 2.0**-24
    K = rows.shape[0] + 3 * 64 + 3
    gamma = K * u / (1 - K * u)
    diff = (parts[0]["grad"].double() - grads["R1"].double()).abs()
    assert bool((diff <= 2 * gamma * majorant).all())
    assert float(parts[0]["value"]) == pytest.approx(float(value), rel=2 * gamma)
    # the bound is tight enough to see a missing shard: rank 1's share alone is far outside it
    half = FourthPower(shard_blocks(blocks, rank=1, world_size=WORLD)).value_and_grad(R)[1]["R1"].double()
    assert not bool((half.abs() <= 2 * gamma * majorant).all())


def test_two_process_rotation_equals_single_process(two_process_run, tmp_path):
    # End to end in float64 (rotations and weights): each step's gradient differs from the single
    # process's by at most 2 gamma_K (K ~ 1.1e3, u = 2^-53: ~2.6e-13) relative to its majorant. Cayley
    # SGD's step is clipped to a fixed length (alpha ||W||_1 <= 2q), so over STEPS = 4 steps the
    # rotations move apart by about STEPS times that, ~1e-12; we allow 1e-9. Any real disagreement
    # (a shard lost or counted twice, ranks out of step) changes the rotations at the 1e-2 level.
    src, out, _ = two_process_run
    single = rotate_streamed(
        src,
        tmp_path / "out1",
        RotateConfig(seed=2, solve={"steps": STEPS}, compute={"dtype": torch.float64}, checkpoint={"dtype": torch.float64}),
        progress=False,
    )
    multi = load_file(str(out / "orthoopt" / "rotations.safetensors"))
    assert set(multi) == set(single.rotations) == {"R1", "R2.0", "R2.1", "R2.2"}
    for k, R in single.rotations.items():
        assert float((multi[k] - R).abs().max()) <= 1e-9
    a, b = load_model(out, dtype=torch.float64).state_dict(), load_model(tmp_path / "out1", dtype=torch.float64).state_dict()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-9
    report = json.loads((out / "report.json").read_text())
    assert report["streamed"]["world_size"] == WORLD and report["streamed"]["rank_max_abs_difference"] == 0.0
    # and the run did learn something: R1 moved away from its start
    start = rotate_streamed(
        src,
        tmp_path / "out0",
        RotateConfig(rotations=("R1",), seed=2, solve={"steps": 0}, compute={"dtype": torch.float64}, checkpoint={"dtype": torch.float64}),
        progress=False,
    ).rotations["R1"]
    assert float((multi["R1"] - start).abs().max()) > 1e-3
