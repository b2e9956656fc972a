"""One process against two (torch.distributed, gloo) on this machine, for the same analysis.

    python benchmarks/bench_distributed.py [--repeat 4] [--backends torchfunc backpack]

The digits repeated ``--repeat`` times (N = 1797 · repeat) and the digits MLP (P = 2410, tanh):
the passes over the data dominate. Compared on the same 2 cores: one process with 2 threads,
and 2 processes (gloo) with 1 thread each, each holding every other example. Reported: the wall
time of ``curvkit.analyze`` (quantities hessian and classmeans) on rank 0, the speed-up, and the
share of rank 0's time spent in the all-reduces (communication plus waiting for the other rank).
Writes benchmarks/results/distributed_cpu.md.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import curvkit
import curvkit.problem
from curvkit.datasets import digits_tensors
from curvkit.distributed import shard_loader
from curvkit.models import digits_mlp

RESULTS = Path(__file__).parent / "results"
QUANTITIES = ["hessian", "classmeans"]


def analyse(backend: str, repeat: int) -> dict[str, float]:
    """Time curvkit.analyze on this process's shard (the whole data without a group)."""
    x, y = digits_tensors()
    x, y = x.repeat(repeat, 1), y.repeat(repeat)
    model = digits_mlp(activation=nn.Tanh)
    loader = shard_loader(DataLoader(TensorDataset(x, y), batch_size=512))
    spent = {"reduce": 0.0, "calls": 0, "floats": 0}
    original = curvkit.problem.all_reduce

    def timed(tensor, group):
        start = time.perf_counter()
        result = original(tensor, group)
        spent["reduce"] += time.perf_counter() - start
        spent["calls"] += group is not None
        spent["floats"] += tensor.numel() if group is not None else 0
        return result

    curvkit.problem.all_reduce = timed
    start = time.perf_counter()
    report = curvkit.analyze(model, loader, backend, QUANTITIES, top_k=10, progress=False)
    total = time.perf_counter() - start
    return {
        "seconds": total,
        "reduce": spent["reduce"],
        "calls": spent["calls"],
        "floats": spent["floats"],
        "lambda1": report.hessian.top_eigenvalues[0],
    }


def _rank(rank: int, world: int, init: str, backend: str, repeat: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        result = analyse(backend, repeat)
        if rank == 0:
            Path(out).write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def two_processes(backend: str, repeat: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder, "result.json")
        init = f"file://{Path(folder, 'rendezvous')}"
        mp.spawn(_rank, (2, init, backend, repeat, str(out)), nprocs=2, join=True)
        return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=4)
    parser.add_argument("--backends", nargs="+", default=["torchfunc", "backpack"])
    args = parser.parse_args()
    n = 1797 * args.repeat
    lines = [
        "# One process against two (gloo), CPU, 2 cores",
        "",
        f"Digits repeated {args.repeat}× (N = {n}), digits MLP (tanh, P = 2410), quantities "
        f"{', '.join(QUANTITIES)}, top 10 eigenvalues, default options. 1 process × 2 threads "
        "against 2 processes × 1 thread (shards of every other example). 'all-reduce' is rank "
        "0's time inside the all-reduces: communication plus waiting for the other rank.",
        "",
        "| backend | 1 process | 2 processes | speed-up | all-reduce share | all-reduces | "
        "floats reduced | λ₁ agrees |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for backend in args.backends:
        torch.set_num_threads(2)
        one = analyse(backend, args.repeat)
        two = two_processes(backend, args.repeat)
        agree = abs(one["lambda1"] - two["lambda1"]) <= 1e-10 * abs(one["lambda1"])
        lines.append(
            f"| {backend} | {one['seconds']:.1f} s | {two['seconds']:.1f} s | "
            f"{one['seconds'] / two['seconds']:.2f}× | {100 * two['reduce'] / two['seconds']:.1f} % "
            f"| {two['calls']} | {two['floats'] / 1e6:.1f} M | {'yes' if agree else 'NO'} |"
        )
        print(lines[-1], flush=True)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "distributed_cpu.md"
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
