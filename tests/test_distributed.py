"""Data-parallel analysis: 2 CPU processes (gloo) give the single-process report.

Each rank holds every other example of 301 (151 + 150: uneven shards, weighted by the global
N). Every number of the report must equal the single-process one to 1e-10 relative (per list,
in norm) in float64: the ranks' partial sums are added in another order, which changes only the
last bits, and the solvers start from the same seeded vectors and probes on every rank. The
issue asks this of eigenvalues, traces, class-mean terms and layer factors. Spectral densities
(and the layers' spectrum_distance, computed from them) are held to 1e-5 instead: SLQ's short
Lanczos runs meet tiny β in the Hessian's near-null bulk, where the next direction is mostly
rounding, so last-bit differences grow (measured: 1.3e-6 for the density values, 3e-8 for a
spectrum_distance, 1e-8 for curvlinops' fast_lanczos).
"""

from __future__ import annotations

import datetime
import json
import math
import os
import re
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    DistributedSampler,
    IterableDataset,
    SequentialSampler,
    TensorDataset,
)

import curvkit
from curvkit.datasets import digits_tensors
from curvkit.distributed import shard_loader
from curvkit.models import digits_mlp
from tests import reference
from tests.conftest import backend_params, installed

pytestmark = pytest.mark.slow  # processes started per test

# hessian: products, Lanczos, Hutch++, SLQ; classmeans: class sums, G products, overlaps;
# layerwise: Kronecker factors and block products (ggn and residual add no other primitive)
QUANTITIES = ["hessian", "classmeans", "layerwise"]
BACKENDS = [p for p in backend_params(minimal=False) if p.values[0] != "pyhessian"]
NAMES = installed(BACKENDS)
SETTINGS = {
    "top_k": 3,
    "progress": False,
    "options": {
        "trace_matvecs": 12,
        "density_probes": 1,
        "density_steps": 20,
        "layer_density": True,
    },
}
IGNORED = {"timings", "provenance", "versions", "seconds"}
DENSITIES = {"density", "spectrum_distance"}


def _worker(rank: int, world: int, init: str, model, x, y, backends, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        loader = shard_loader(DataLoader(TensorDataset(x, y), batch_size=64))
        for backend in backends:
            try:
                report = curvkit.analyze(model, loader, backend, QUANTITIES, **SETTINGS)
                result = report.to_dict()
            except curvkit.CurvkitError as error:
                result = {"error": f"{type(error).__name__}: {error}"}
            Path(folder, f"{backend}-{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def _spawn(tmp_path: Path, model, x, y, backends) -> None:
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_worker, (2, init, model, x, y, backends, str(tmp_path)), nprocs=2, join=True)


def _differences(a, b, where: str = "", rtol: float = 1e-10, density_rtol: float = 1e-10):
    """Where two report dicts differ: numbers (lists in norm, NaN only where the other has NaN)
    beyond ``rtol`` relative (under a density key beyond ``density_rtol``), or in keys,
    lengths or other values."""
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{where}: keys {sorted(a)} != {sorted(b)}"]
        return [
            d
            for k in a
            if k not in IGNORED
            for d in _differences(
                a[k], b[k], f"{where}.{k}", density_rtol if k in DENSITIES else rtol, density_rtol
            )
        ]
    numbers = (int, float)
    if isinstance(a, list) and all(isinstance(v, numbers) for v in a + b) and len(a) == len(b):
        if [math.isnan(u) for u in a] != [math.isnan(v) for v in b]:
            return [f"{where}: NaN in one report only"]
        a, b = [u for u in a if not math.isnan(u)], [v for v in b if not math.isnan(v)]
        if not a:
            return []
        scale = math.hypot(*b) or 1.0
        error = math.hypot(*(u - v for u, v in zip(a, b)))
        return [] if error <= rtol * scale else [f"{where}: {error / scale:.1e} relative"]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [
            d
            for i, (u, v) in enumerate(zip(a, b))
            for d in _differences(u, v, f"{where}[{i}]", rtol, density_rtol)
        ]
    if isinstance(a, numbers) and isinstance(b, numbers):
        return _differences([a], [b], where, rtol, density_rtol)
    return [] if a == b else [f"{where}: {a!r} != {b!r}"]


@pytest.fixture(scope="module")
def shards(digits_problem, tmp_path_factory):
    model, loader = digits_problem
    x, y = reference.all_data(loader)
    x, y = torch.cat([x, x[:1]]), torch.cat([y, y[:1]])  # 301 examples: shards of 151 and 150
    folder = tmp_path_factory.mktemp("distributed")
    _spawn(folder, model, x, y, NAMES + ["pyhessian"])
    return model, x, y, folder


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_ranks_give_the_single_process_report(shards, backend):
    model, x, y, folder = shards
    single = curvkit.analyze(
        model, DataLoader(TensorDataset(x, y), batch_size=64), backend, QUANTITIES, **SETTINGS
    ).to_dict()
    ranks = [json.loads(Path(folder, f"{backend}-{r}.json").read_text()) for r in (0, 1)]
    assert "error" not in ranks[0], ranks[0]
    assert ranks[0]["model"]["num_samples"] == 301
    differences = _differences(ranks[0], single, density_rtol=1e-5)
    assert not differences, differences
    assert _differences(ranks[1], ranks[0]) == []  # the ranks hold identical reports


def test_pyhessian_says_it_cannot_run_distributed(shards):
    _, _, _, folder = shards
    error = json.loads(Path(folder, "pyhessian-0.json").read_text())["error"]
    assert error.startswith("UnsupportedError: backend 'pyhessian' cannot run under torch.dist")


def test_the_comparison_can_fail():
    """The checker itself: a relative change of 1e-9 in one eigenvalue is reported."""
    report = {"hessian": {"top_eigenvalues": [2.0, 1.0], "trace": 3.0}}
    changed = {"hessian": {"top_eigenvalues": [2.0, 1.0 + 3e-9], "trace": 3.0}}
    assert _differences(changed, report) == [".hessian.top_eigenvalues: 1.3e-09 relative"]


def _bad_sharding_worker(rank: int, world: int, init: str, folder: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        inputs = torch.randn(5, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        data = TensorDataset(inputs, torch.arange(5) % 2)  # the same on both ranks
        loaders = {
            "padded": DataLoader(
                data, batch_size=2, sampler=DistributedSampler(data, shuffle=False)
            ),
            "unsharded": DataLoader(data, batch_size=2),
        }
        for case, loader in loaders.items():
            try:
                curvkit.analyze(digits_mlp(), loader, quantities=["ggn"], top_k=2, progress=False)
                message = "no error"
            except curvkit.InvalidInputError as error:
                message = str(error)
            Path(folder, f"{case}-{rank}.txt").write_text(message)
        # shard_loader on loaders without indices or without a batch_size
        by_sampler = DataLoader(data, batch_sampler=BatchSampler(SequentialSampler(data), 2, False))
        report = curvkit.analyze(digits_mlp(), shard_loader(by_sampler), quantities=["ggn"],
                                 top_k=2, progress=False)  # fmt: skip
        Path(folder, f"batch_sampler-{rank}.txt").write_text(str(report.model.num_samples))
        for case, loader in {
            "iterable": DataLoader(Streamed(data), batch_size=2),
            "unbatched": DataLoader(data, batch_size=None),
        }.items():
            try:
                shard_loader(loader)
                message = "no error"
            except curvkit.InvalidInputError as error:
                message = str(error)
            Path(folder, f"{case}-{rank}.txt").write_text(message)
    finally:
        dist.destroy_process_group()


class Streamed(IterableDataset):
    """A data set's examples as a stream, without indices."""

    def __init__(self, dataset: TensorDataset) -> None:
        self.dataset = dataset

    def __iter__(self):
        return (self.dataset[i] for i in range(len(self.dataset)))


def test_bad_sharding_is_refused(tmp_path):
    """5 examples on 2 ranks: DistributedSampler repeats one to make 6, and a loader given to
    every rank unsharded counts each example twice; both would change the loss (the second
    only its N, silently, before). shard_loader shards a batch_sampler's loader in its batch
    size, and refuses a loader without indices or batches."""
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_bad_sharding_worker, (2, init, str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        padded = (tmp_path / f"padded-{rank}.txt").read_text()
        assert "pads 5 examples to 6" in padded and "shard_loader" in padded
        unsharded = (tmp_path / f"unsharded-{rank}.txt").read_text()
        assert "every rank holds the same 5 examples" in unsharded, unsharded
        # shard_loader kept batch_size=None from a batch_sampler's loader: single examples
        # (collate's "stack expects each tensor to be equal size", blamed on the loader)
        assert (tmp_path / f"batch_sampler-{rank}.txt").read_text() == "5"
        # an IterableDataset: a raw TypeError ("has no len()")
        iterable = (tmp_path / f"iterable-{rank}.txt").read_text()
        assert "is an IterableDataset, which has none" in iterable, iterable
        unbatched = (tmp_path / f"unbatched-{rank}.txt").read_text()
        assert "yields single examples (batch_size=None)" in unbatched, unbatched


def test_a_group_of_one_rank_is_the_single_process_run(tmp_path, digits_problem):
    """A process group of one holds the whole data set (not "the same data on every rank")."""
    model, loader = digits_problem
    kwargs = dict(quantities=["hessian"], top_k=2, progress=False, options={"trace_matvecs": 6})
    single = curvkit.analyze(model, loader, **kwargs)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0,
                            world_size=1)  # fmt: skip
    try:
        grouped = curvkit.analyze(model, loader, process_group=dist.group.WORLD, **kwargs)
    finally:
        dist.destroy_process_group()
    assert grouped.hessian.top_eigenvalues == single.hessian.top_eigenvalues


class FailsOnRankOne:
    """A rank's shard of the digits that raises on rank 1 from its third pass on (after the scan
    and the first products), as a disk or a remote store might."""

    def __init__(self, rank: int) -> None:
        x, y = digits_tensors(samples_per_class=10)
        self.batches = [(x[i : i + 20], y[i : i + 20]) for i in range(rank, len(y), 40)]
        self.rank, self.passes = rank, 0

    def __iter__(self):
        self.passes += 1
        if self.rank == 1 and self.passes >= 3:
            raise OSError("disk gone")
        yield from self.batches


def _failing_rank_worker(rank: int, world: int, init: str, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    start = time.perf_counter()
    try:
        curvkit.analyze(digits_mlp(), FailsOnRankOne(rank), quantities=["hessian"], top_k=2,
                        progress=False, cache_mb=0)  # fmt: skip
        message = "no error"
    except curvkit.CurvkitError as error:
        message = f"{type(error).__name__}: {error}"
    Path(folder, f"{rank}.txt").write_text(f"{time.perf_counter() - start:.1f}\n{message}")
    if rank == 1:  # stays alive, as in a notebook, until rank 0 is through
        deadline = time.monotonic() + 120
        while not Path(folder, "0.txt").exists() and time.monotonic() < deadline:
            time.sleep(0.2)


def test_a_failing_rank_stops_the_others_at_once(tmp_path):
    """Rank 1's loader fails mid-analysis while its process lives on: it writes its error to the
    group's store, so rank 0 stops waiting within seconds with that error, not after the group's
    30-minute timeout (before the fix: rank 0 waited until rank 1's process ended, 127 s here)."""
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_failing_rank_worker, (2, init, str(tmp_path)), nprocs=2, join=True)
    seconds, message = (tmp_path / "0.txt").read_text().split("\n", 1)
    assert message.startswith("PeerFailedError: rank 1 failed: InvalidInputError: the data"), (
        message
    )
    assert float(seconds) < 60
    assert "data raised OSError" in (tmp_path / "1.txt").read_text()


def _going_on_worker(rank: int, world: int, init: str, folder: str) -> None:
    """Each rank analyses twice in a row, whatever the first analysis gave, then once more on
    a new group."""
    torch.set_num_threads(1)
    messages = []
    for group in range(2):
        dist.init_process_group("gloo", init_method=f"{init}-{group}", rank=rank,
                                world_size=world)  # fmt: skip
        try:
            for loader in [FailsOnRankOne(rank), [FailsOnRankOne(rank).batches[0]]][group:]:
                try:
                    curvkit.analyze(digits_mlp(), loader, quantities=["hessian"], top_k=2,
                                    progress=False, cache_mb=0)  # fmt: skip
                    messages.append("no error")
                except curvkit.CurvkitError as error:
                    messages.append(f"{type(error).__name__}: {error}")
        finally:
            dist.destroy_process_group()
    Path(folder, f"{rank}.txt").write_text("\n".join(messages))


def test_a_group_an_analysis_failed_on_is_refused_until_it_is_renewed(tmp_path):
    """After rank 1's loader failed, rank 1 went straight on to a new analysis and sent its
    first collective's data into rank 0's abandoned all-reduce: gloo aborted both processes
    (SIGABRT, "Is there a distributed collective mismatch?"). Both ranks now refuse the group,
    saying to renew it, and analyse again on a new one."""
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_going_on_worker, (2, init, str(tmp_path)), nprocs=2, join=True)
    first = {"0": "PeerFailedError: rank 1 failed", "1": "InvalidInputError: the data raised"}
    for rank in "01":
        messages = (tmp_path / f"{rank}.txt").read_text().split("\n")
        assert messages[0].startswith(first[rank]), messages[0]
        assert "an earlier analysis failed on this process group" in messages[1], messages[1]
        assert messages[2] == "no error", messages[2]


MISMATCHES = {  # the keyword arguments of rank 0 and of rank 1, and the error both must raise
    "seed": ({"seed": 0}, {"seed": 1}, "different seed \\(0 on rank 0, 1 on rank 1\\)"),
    "quantities": (
        {"quantities": ["hessian"]},
        {"quantities": ["ggn"]},
        "different quantities \\(\\['hessian'\\] on rank 0, \\['ggn'\\] on rank 1\\)",
    ),
    "top_k": ({"top_k": 2}, {"top_k": 3}, "different top_k"),
    "an argument bad on one rank": ({}, {"top_k": 0}, "top_k must be an integer ≥ 1, got 0"),
    "requires_grad": ({}, {"frozen": True}, "the ranks select different parameters"),
    # before: each rank analysed its own function, silently (only the selected were hashed)
    "an unselected parameter": (
        {"params": ["2.weight"]},
        {"params": ["2.weight"], "nudged": "0.weight"},
        "the ranks hold different parameter or buffer values",
    ),
    "a buffer": (
        {"params": ["2.weight"]},
        {"params": ["2.weight"], "nudged": "0.scale"},
        "the ranks hold different parameter or buffer values",
    ),
}


class Scaled(torch.nn.Linear):
    """A Linear layer whose output a buffer scales (as BatchNorm's statistics would)."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__(linear.in_features, linear.out_features, dtype=linear.weight.dtype)
        self.load_state_dict(linear.state_dict())
        self.register_buffer("scale", torch.ones((), dtype=linear.weight.dtype))

    def forward(self, x):
        return self.scale * super().forward(x)


def _mismatch_worker(rank: int, world: int, init: str, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))  # fmt: skip
    x, y = digits_tensors(samples_per_class=4)
    loader = [(x[rank::2], y[rank::2])]
    try:
        for case, arguments in MISMATCHES.items():
            kwargs = {"quantities": ["hessian"], "top_k": 2, **arguments[rank]}
            model = digits_mlp()
            model[0] = Scaled(model[0])
            if kwargs.pop("frozen", False):
                model[0].bias.requires_grad_(False)
            nudged = kwargs.pop("nudged", None)
            if nudged:
                with torch.no_grad():
                    dict([*model.named_parameters(), *model.named_buffers()])[nudged].mul_(1.01)
            try:
                curvkit.analyze(model, loader, progress=False, options={"trace_matvecs": 6},
                                **kwargs)  # fmt: skip
                message = "no error"
            except curvkit.CurvkitError as error:
                message = f"{type(error).__name__}: {error}"
            Path(folder, f"{case}-{rank}.txt").write_text(message)
        # the same selection in another order (a set's order differs between processes)
        params = [["0.weight", "2.bias"], ["2.bias", "0.weight"]][rank]
        report = curvkit.analyze(digits_mlp(), loader, quantities=["hessian"], top_k=2,
                                 params=params, progress=False, options={"trace_matvecs": 6})  # fmt: skip
        Path(folder, f"reordered-{rank}.json").write_text(json.dumps(report.to_dict()))
    finally:
        dist.destroy_process_group()


def test_ranks_called_with_different_arguments_all_stop_with_the_reason(tmp_path):
    """The ranks' partial sums are added, so each rank must compute the same thing. Before:
    different seeds gave each rank its own wrong λ₁ (1.3700 and 1.3672 for 1.3691), different
    quantities a λ₁ of neither matrix (1.517), a different top_k made gloo abort the process,
    a bad argument on one rank left the other waiting for the group's timeout, a Parameter
    frozen on one rank was reported as different weights, and ranks whose unselected weights or
    buffers differed each analysed their own function. One selection named in two orders
    (a set's differs between processes) is the same selection: it was refused as different
    weights."""
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_mismatch_worker, (2, init, str(tmp_path)), nprocs=2, join=True)
    for case, (_, _, match) in MISMATCHES.items():
        for rank in (0, 1):
            message = (tmp_path / f"{case}-{rank}.txt").read_text()
            assert message.startswith("InvalidInputError") and re.search(match, message), (
                case,
                rank,
                message,
            )
    reordered = [json.loads((tmp_path / f"reordered-{r}.json").read_text()) for r in (0, 1)]
    assert _differences(reordered[1], reordered[0]) == []
    assert reordered[0]["config"]["params"] == ["0.weight", "2.bias"]  # the model's order


def _budget_worker(rank: int, world: int, init: str, folder: str) -> None:
    torch.set_num_threads(1)
    if rank == 1:  # a machine with less memory
        os.environ["CURVKIT_MEMORY_MB"] = "6"
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))  # fmt: skip
    x, y = digits_tensors(samples_per_class=4)
    report = curvkit.analyze(digits_mlp(), [(x[rank::2], y[rank::2])], quantities=["ggn",
                             "classmeans"], top_k=2, progress=False)  # fmt: skip
    Path(folder, f"{rank}.json").write_text(json.dumps(report.to_dict()))
    dist.destroy_process_group()


def test_ranks_with_different_memory_take_the_same_routes(tmp_path):
    """Rank 1's half budget (3 MiB) holds the class sums' gradient route (2.5 MiB), not the
    per-example one (9.5 MiB at 20 examples), nor Hutch++'s 198 vectors of P = 2410 float64
    (3.6 MiB); rank 0's is ample. Every rank takes the route the smallest budget allows, so both
    hold the same report. Before, each rank chose its own class-sums route and gloo aborted
    both processes (SIGABRT) on the mismatched collectives."""
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_budget_worker, (2, init, str(tmp_path)), nprocs=2, join=True)
    reports = [json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1)]
    assert _differences(reports[1], reports[0]) == []
    for report in reports:
        provenance = report["classmeans"]["provenance"]
        assert provenance["deltas"]["routine"] == "weighted gradient passes"
        assert report["ggn"]["provenance"]["trace"]["routine"] == "curvkit.hutchinson"


def _two_sizes_worker(rank: int, world: int, init: str, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))  # fmt: skip
    x, y = digits_tensors(samples_per_class=6)
    images = x.float().view(-1, 1, 8, 8)
    shard = [(images[rank * 20 : rank * 20 + 20], y[rank * 20 : rank * 20 + 20])]
    if rank == 0:  # a batch of larger images on rank 0 alone
        large = torch.nn.functional.interpolate(images[40:], size=(12, 12), mode="bilinear")
        shard.append((large, y[40:]))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3, padding=1), torch.nn.Tanh(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(3, 10))  # fmt: skip
    report = curvkit.analyze(model, shard, "backpack", ["ggn"], top_k=1, progress=False,
                             options={"trace_matvecs": 12})  # fmt: skip
    Path(folder, f"{rank}.json").write_text(json.dumps(report.to_dict()))
    dist.destroy_process_group()


def test_a_batch_that_stops_backpack_on_one_rank_moves_every_rank_to_its_products(tmp_path):
    """BackPACK's exact trace stops at a batch its converted copy gets wrong (larger images
    through an adaptive pool), here on rank 0 alone. That rank fell back to Hutchinson while
    the other gathered its exact sums: their collectives mismatched (raw TypeErrors on both).
    Now the ranks agree after the pass, and both take the products' route: one report."""
    pytest.importorskip("backpack")
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_two_sizes_worker, (2, init, str(tmp_path)), nprocs=2, join=True)
    reports = [json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1)]
    assert _differences(reports[1], reports[0]) == []
    trace = reports[0]["ggn"]["provenance"]["trace"]
    assert "off the model's" in trace["note"], trace


def test_without_a_process_group_nothing_is_sharded(digits_problem):
    _, loader = digits_problem
    assert not dist.is_initialized() and os.environ.get("WORLD_SIZE") is None
    assert shard_loader(loader) is loader
