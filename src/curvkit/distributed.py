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
import contextvars
import itertools
import os
import pickle
import time
from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, Subset

from curvkit.errors import CurvkitError, InvalidInputError, PeerFailedError, first_line, shown

Group = dist.ProcessGroup | None


def current_group(group: Group = None) -> Group:
    """``group`` if given, else the default group of an initialised run with several ranks."""
    if group is not None:
        if not (dist.is_available() and isinstance(group, dist.ProcessGroup)):
            raise InvalidInputError(
                f"process_group must be a torch.distributed ProcessGroup, got {shown(group)}."
            )
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
    """The sum of ``tensor`` over the ranks (``tensor`` itself without a group); CPU tensors
    travel to this rank's GPU and back under NCCL."""
    if group is None:
        return tensor
    total = tensor.detach().to(_device(group, tensor.device), copy=True)
    _wait(dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group, async_op=True))
    return total.to(tensor.device)


def all_reduce_float(value: float, group: Group) -> float:
    return float(all_reduce(torch.tensor([value], dtype=torch.float64), group))


def all_gather_objects(value: object, group: Group) -> list[object]:
    """Every rank's ``value`` (a picklable object), in rank order: pickled, the lengths summed
    and the padded bytes gathered, each an asynchronous collective watched as in ``_wait``."""
    if group is None:
        return [value]
    ranks, me = world_size(group), rank(group)
    device = _device(group, torch.device("cpu"))
    data = torch.frombuffer(bytearray(pickle.dumps(value)), dtype=torch.uint8).to(device)
    lengths = torch.zeros(ranks, dtype=torch.long, device=device)
    lengths[me] = len(data)
    _wait(dist.all_reduce(lengths, group=group, async_op=True))
    padded = torch.zeros(int(lengths.max()), dtype=torch.uint8, device=device)
    padded[: len(data)] = data
    parts = [torch.empty_like(padded) for _ in range(ranks)]
    _wait(dist.all_gather(parts, padded, group=group, async_op=True))
    return [pickle.loads(p[:n].cpu().numpy().tobytes()) for p, n in zip(parts, lengths.tolist())]


def _device(group: Group, default: torch.device) -> torch.device:
    """Where a collective's tensors must live: NCCL reduces on this rank's GPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return default


# one key per analysis in the group's store, set by a rank that fails (see stop_all_on_failure)
_analyses = itertools.count()
_failure_key: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "curvkit_failure", default=None
)


def _wait(work: dist.Work) -> None:
    """Wait for an asynchronous collective, and raise one CurvkitError naming the rank and its
    error as soon as another rank has failed (it will never join this collective)."""
    key, delay = _failure_key.get(), 1e-4
    while not work.is_completed():
        if key is not None and _store().check([key]):
            raise PeerFailedError(
                f"{_store().get(key).decode()} (this rank stopped waiting for it)."
            )
        time.sleep(delay)
        delay = min(2 * delay, 0.02)
    try:
        work.wait()
    except RuntimeError as error:  # a peer's process ended: its connection closed
        raise PeerFailedError(
            "another rank stopped while this one waited for it in a collective "
            f"({first_line(error)}); that rank's error says why."
        ) from error


def _store() -> dist.Store:
    return dist.distributed_c10d._get_default_store()


# the process groups on which an analysis failed on this rank inside ``stop_all_on_failure``
# (kept alive, so that a later group cannot take one's id)
_broken_groups: list[dist.ProcessGroup] = []


@contextlib.contextmanager
def stop_all_on_failure(group: Group) -> Iterator[None]:
    """Within this block, a rank that fails (an error or an interrupt) writes its error to the
    group's store, and every other rank's pending collective raises PeerFailedError with it at
    once, instead of waiting for the group's timeout (30 min by default). The group's pending
    work is then undefined on every rank, and ``check_usable`` refuses it from then on."""
    if group is None:
        yield
        return
    token = _failure_key.set(f"curvkit/failed/{next(_analyses)}")
    try:
        yield
    except PeerFailedError:
        _broken_groups.append(group)
        raise
    except BaseException as error:
        _broken_groups.append(group)
        _store().set(
            _failure_key.get(),
            f"rank {rank(group)} failed: {type(error).__name__}: {first_line(error)}",
        )
        raise
    finally:
        _failure_key.reset(token)


def check_usable(group: Group) -> None:
    """Refuse a group on which an analysis failed on this rank (``stop_all_on_failure``): its
    ranks' collectives no longer match (a rank that went on to a new analysis sent its data
    into another's abandoned all-reduce, and gloo aborted both processes)."""
    if any(broken is group for broken in _broken_groups):
        raise InvalidInputError(
            "an earlier analysis failed on this process group and left its ranks' collectives "
            "unmatched; end the group (torch.distributed.destroy_process_group()) and start a "
            "new one before analysing again."
        )


def agree(error: CurvkitError | None, group: Group) -> None:
    """Raise on every rank if any rank failed (so none waits forever in a later all-reduce):
    the rank's own error, or one naming the rank that failed first."""
    messages = all_gather_objects(None if error is None else str(error), group)
    if error is not None:
        raise error
    failed = [(r, m) for r, m in enumerate(messages) if m is not None]
    if failed:
        raise InvalidInputError(f"rank {failed[0][0]} failed: {failed[0][1]}")


@contextlib.contextmanager
def checked_on_every_rank(group: Group) -> Iterator[None]:
    """Run a block of checks on every rank, and raise on every rank if any rank's failed with a
    CurvkitError (see ``agree``): a rank that stopped alone would leave the others waiting."""
    error = None
    try:
        yield
    except CurvkitError as caught:
        error = caught
    agree(error, group)


def same_on_every_rank(call: str, arguments: dict[str, object], group: Group) -> None:
    """Raise on every rank when ``arguments`` of ``call`` differ between the ranks, naming the
    first that does: the ranks' partial sums of different products would add up to numbers of
    no matrix (a different seed gave each rank its own wrong λ₁, different quantities a λ₁ of
    neither), or a collective would receive what it did not expect (gloo aborted the process)."""
    if group is None:
        return
    gathered = all_gather_objects(arguments, group)
    for name in arguments:
        values = [g[name] for g in gathered]
        if any(v != values[0] for v in values):
            first = next(r for r, v in enumerate(values) if v != values[0])
            raise InvalidInputError(
                f"the ranks called {call} with different {name} ({shown(values[0])} on rank 0, "
                f"{shown(values[first])} on rank {first}); pass the same arguments on every rank."
            )


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
    if isinstance(dataset, IterableDataset):
        raise InvalidInputError(
            f"curvkit shards a data set by its indices, and the {type(dataset).__name__} of "
            "this DataLoader is an IterableDataset, which has none; give each rank a loader "
            "of its own examples instead."
        )
    # a loader built from a batch_sampler has batch_size None: its sampler's size, else refused
    batch_size = loader.batch_size or getattr(loader.batch_sampler, "batch_size", None)
    if not isinstance(batch_size, int):
        how = (
            "yields single examples (batch_size=None)"
            if loader.batch_sampler is None
            else f"takes its batches from a {type(loader.batch_sampler).__name__} without one"
        )
        raise InvalidInputError(
            f"curvkit shards a DataLoader into batches of its batch_size, and this one {how}; "
            "give it a batch_size, or give each rank a loader of its own examples."
        )
    indices = range(rank(group), len(dataset), world_size(group))
    return DataLoader(
        Subset(dataset, indices),
        batch_size=batch_size,
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
    size = os.environ.get("WORLD_SIZE", "1")
    if not size.strip().isdigit():
        raise InvalidInputError(
            f"the environment variable WORLD_SIZE is {shown(size)}, not a number of processes; "
            "run under torchrun, which sets it, or unset it."
        )
    if int(size) <= 1:
        yield None
        return
    cuda = device.startswith("cuda")
    try:
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
    except (ValueError, RuntimeError) as error:  # e.g. RANK or MASTER_ADDR not set
        raise InvalidInputError(
            f"WORLD_SIZE is {size}, but torch.distributed cannot start from the environment "
            f"({first_line(error)}); run under torchrun, which sets RANK, WORLD_SIZE, "
            "MASTER_ADDR and MASTER_PORT, or unset WORLD_SIZE."
        ) from error
    try:
        yield dist.group.WORLD
    finally:
        if dist.is_initialized():  # a failed rank has ended it already
            dist.destroy_process_group()
