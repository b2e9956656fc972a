"""Data-parallel analysis on torch.distributed: each rank holds a shard of the data.

Every primitive that sums over the data (N and the class counts, Hessian/G–vector products,
class-mean sums, Kronecker factors, diagonal traces) computes its rank's partial sum, divided by
the global N, and all-reduces it (SUM), so every rank holds the data set's value. The iterative
solvers then run identically on every rank (same seed, same probes, the same reduced products),
and all ranks hold the same report; the command line prints and writes files on rank 0 only.

Communication: one all-reduce of P floats per Hessian/G–vector product (P·s bytes in dtype of
size s; a ring all-reduce sends about 2·(K−1)/K of that per rank, so the cost per rank is flat in
the number of ranks K and linear in P); C²·P + C floats once for the class-mean sums; Σ_l (n_l² +
m_l²) once for the Kronecker factors; P floats for a diagonal trace.

>>> torch.distributed.init_process_group("gloo")                  # doctest: +SKIP
>>> report = curvkit.analyze(model, shard_loader(loader), ...)   # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler, Subset

from curvkit.errors import CurvkitError, InvalidInputError

Group = dist.ProcessGroup | None


def current_group(group: Group = None) -> Group:
    """``group`` if given, else the default group of an initialised run with several ranks."""
    if group is not None:
        return group
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None


def rank(group: Group = None) -> int:
    """This process's rank in ``group`` (0 without one)."""
    return dist.get_rank(group) if group is not None else 0


def world_size(group: Group = None) -> int:
    return dist.get_world_size(group) if group is not None else 1


def all_reduce(tensor: Tensor, group: Group) -> Tensor:
    """The sum of ``tensor`` over the ranks (``tensor`` itself without a group). NCCL reduces on
    this rank's GPU, so CPU tensors travel there and back."""
    if group is None:
        return tensor
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if dist.get_backend(group) == "nccl"
        else tensor.device
    )
    total = tensor.detach().to(device, copy=True)
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return total.to(tensor.device)


def all_reduce_float(value: float, group: Group) -> float:
    return float(all_reduce(torch.tensor([value], dtype=torch.float64), group))


def all_gather_objects(value: object, group: Group) -> list[object]:
    """Every rank's ``value`` (a picklable object), in rank order."""
    if group is None:
        return [value]
    gathered: list[object] = [None] * world_size(group)
    dist.all_gather_object(gathered, value, group=group)
    return gathered


def agree(error: CurvkitError | None, group: Group) -> None:
    """Raise on every rank if any rank failed (so none waits forever in a later all-reduce):
    the rank's own error, or one naming the rank that failed first."""
    messages = all_gather_objects(None if error is None else str(error), group)
    if error is not None:
        raise error
    failed = [(r, m) for r, m in enumerate(messages) if m is not None]
    if failed:
        raise InvalidInputError(f"rank {failed[0][0]} failed: {failed[0][1]}")


def check_loader(data: Iterable) -> None:
    """A DistributedSampler that pads its shards repeats examples, which would change the loss."""
    sampler = getattr(data, "sampler", None)
    if isinstance(sampler, DistributedSampler) and sampler.total_size != len(sampler.dataset):
        raise InvalidInputError(
            f"the DistributedSampler pads {len(sampler.dataset)} examples to "
            f"{sampler.total_size} by repeating some, which changes the data set's loss; shard "
            "with curvkit.distributed.shard_loader(loader) instead."
        )


def shard_loader(loader: DataLoader, group: Group = None) -> DataLoader:
    """This rank's shard of ``loader``'s data set: examples rank, rank + K, rank + 2K, … (every
    example exactly once over the K ranks; shards differ in size by at most one), in batches of
    the same size. A loader with a (non-padding) DistributedSampler is already a shard."""
    group = current_group(group)
    if group is None:
        return loader
    if isinstance(getattr(loader, "sampler", None), DistributedSampler):
        check_loader(loader)
        return loader
    if not isinstance(loader, DataLoader):
        raise InvalidInputError(
            f"curvkit shards a DataLoader's data set across the ranks, not a "
            f"{type(loader).__name__}; return a DataLoader, or one with a DistributedSampler "
            "(drop_last=True or N divisible by the number of ranks)."
        )
    dataset = loader.dataset
    indices = range(rank(group), len(dataset), world_size(group))
    return DataLoader(
        Subset(dataset, indices),
        batch_size=loader.batch_size,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
    )


@contextlib.contextmanager
def start_from_environment(device: str = "cpu") -> Iterator[Group]:
    """The process group torchrun describes in the environment (WORLD_SIZE > 1): gloo on CPU,
    NCCL on CUDA (each rank on cuda:LOCAL_RANK), started here and ended on exit; an already
    initialised group is used as it is; None for a single process."""
    if current_group() is not None:
        yield current_group()
        return
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield None
        return
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()
