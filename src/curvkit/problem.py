"""The problem a backend analyses: a model, a loss, the data and the parameters to differentiate.

Everything that is the same for every backend lives here once: input validation, the loop over
the data (moved to the model's device and dtype), flat-vector bookkeeping, and the guard that gives
the user's model back exactly as it came.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import numbers
import os
import sys
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import NoReturn

import torch
from torch import Tensor, nn
from torch.autograd import forward_ad
from torch.jit import ScriptModule
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils import parametrize

from curvkit.distributed import (
    Group,
    agree,
    all_gather_objects,
    all_reduce,
    check_loader,
    current_group,
    rank,
)
from curvkit.errors import (
    CurvkitError,
    InvalidInputError,
    UnsupportedError,
    first_line,
    listed,
    shown,
    warn,
)
from curvkit.features import (
    kept_graphs,
    low_precision,
    model_features,
    module_calls,
    stale_graphs,
    state_kept,
)
from curvkit.loss import make_loss
from curvkit.progress import progress_bar

DEFAULT_CACHE_MB = 2048.0


@dataclass(frozen=True)
class DataSummary:
    """What one pass over the data found: N, C and the examples per class."""

    num_samples: int
    num_classes: int
    counts: tuple[int, ...]
    num_batches: int
    max_batch: int


@dataclass(frozen=True)
class PassRecord:
    """What identifies one pass over this rank's data, in any order: the example and class
    counts, and in float64 the sums of p_i, p_i² and y_i p_i, where p_i = x_i · w projects each
    example's input on fixed positive weights (a flip, crop or noise changes it; the label
    term pairs inputs with labels)."""

    num_samples: int
    counts: tuple[int, ...]
    sums: tuple[float, float, float]

    @classmethod
    def of(cls, projections: Tensor, labels: Tensor) -> PassRecord:
        try:
            counts = torch.bincount(labels)
        except RuntimeError as error:  # negative labels (the first pass's scan explains them)
            raise InvalidInputError(
                f"the labels include {int(labels.min())}; labels must be class indices 0, 1, …, "
                "C − 1."
            ) from error
        terms = torch.stack([projections, projections.square(), labels * projections])
        return cls(len(labels), tuple(counts.tolist()), tuple(terms.sum(dim=1).tolist()))

    def matches(self, other: PassRecord) -> bool:
        close = all(
            abs(a - b) <= 1e-9 * max(abs(a), abs(b), 1e-300) for a, b in zip(self.sums, other.sums)
        )
        return close and (self.num_samples, self.counts) == (other.num_samples, other.counts)


class Problem:
    """Model + loss + data + parameter selection, validated once.

    The loss is ``L(θ) = (1/N) Σ_i ℓ(f(x_i; θ), y_i)``, averaged over examples (never over
    batches). ``params`` selects the parameters by name; by default all that require gradients.
    The first pass (the scan that checks every batch) keeps the prepared batches in memory on
    the model's device while they fit in ``cache_mb`` MiB (and a quarter of the free memory):
    every later pass then re-uses them, so the loader is read once and every quantity sees the
    same examples. ``cache_mb=0``, or data too large, reads the loader on every pass and refuses
    a pass whose examples differ from the first pass's. The first examples then go through
    the model twice: each example's logits must be one fixed function of the parameters
    (``_check_function``).
    With a torch.distributed ``group`` (by default an initialised one with several ranks) ``data``
    is this rank's shard: N and the class counts are the shards' totals, ``num_shard_samples``
    this rank's, and ``all_reduce`` sums a partial sum over the ranks (see curvkit.distributed).

    >>> problem = Problem(model, loader)            # doctest: +SKIP
    >>> problem.num_params, problem.num_classes     # doctest: +SKIP
    """

    def __init__(
        self,
        model: nn.Module,
        data: Iterable,
        loss: str = "cross_entropy",
        params: Sequence[str] | None = None,
        group: Group = None,
        cache_mb: float = DEFAULT_CACHE_MB,
    ) -> None:
        check_module(model)
        self.loss = make_loss(loss)
        if not isinstance(data, Iterable) or isinstance(data, (Tensor, str, bytes)):
            raise InvalidInputError(
                f"data must be an iterable of (inputs, labels) batches such as a DataLoader, got {type(data).__name__}."
            )
        if iter(data) is data:
            raise InvalidInputError(
                "data is a one-shot iterator (e.g. a generator); pass something that can be iterated "
                "many times, such as a DataLoader or a list of (inputs, labels) batches."
            )
        self.group = current_group(group)
        if self.group is not None:
            check_loader(data)
        self.model = model
        self.data = data
        self.first_pass: PassRecord | None = None
        # two examples kept by the scan for checks before computing (no data pass): the first,
        # and the one with the largest logits (the second where that is the first)
        self.sample: tuple[Tensor, Tensor] | None = None
        self.cache_mb = cache_mb
        self.cached: list[tuple[Tensor, Tensor]] | None = None
        self._weights: dict[int, Tensor] = {}
        self.names, self.params = _select_params(model, params)
        self.device = self.params[0].device
        self.dtype = self.params[0].dtype
        self.summary = self._scan()
        self._check_function(chosen=params is not None)
        self.shapes = [p.shape for p in self.params]
        self.num_params = sum(p.numel() for p in self.params)

    def _check_function(self, chosen: bool) -> None:
        """The first examples through the model (it comes back as it was). Curvature of a loss
        summed over examples needs one fixed function of the parameters per example: a forward
        that fails on one example, changes its input in place (every pass would see other data)
        or its parameters, draws random numbers in eval mode, or mixes the examples of a batch
        is refused. Parameters the logits do not depend on for autograd (a head not called in
        ``forward``, a backbone run under ``torch.no_grad()``) have no gradient at all, which
        the libraries cannot take: left out of the default selection with a warning, refused
        when named in ``params``."""
        pair = self.sample[0]  # one or two examples
        example, given = pair[:1], pair[:1].clone()
        with model_guard(self.model):
            before = {n: p.detach().clone() for n, p in self.model.named_parameters()}
            for p in self.params:
                p.requires_grad_(True)
            kept = kept_graphs(self.model)
            try:
                logits = self.model(example)
                with torch.no_grad():
                    again = self.model(given.clone())
                    together = self.model(pair.clone())[:1]
            except Exception as error:
                raise InvalidInputError(
                    f"the model raised {type(error).__name__} on a batch of one example "
                    f"({first_line(error)}); curvkit takes examples one at a time too, so the "
                    "model must accept any batch size."
                ) from error
            changed = [n for n, p in self.model.named_parameters() if not torch.equal(p, before[n])]
            stale = stale_graphs(kept, logits)
            if stale:
                raise InvalidInputError(
                    f"the model's forward pass uses {listed(stale)}, computed from parameters "
                    "outside forward (e.g. self.w2 = self.w * 2 in __init__): autograd frees its "
                    "graph after one backward pass, and it does not follow the parameters; "
                    "compute it inside forward."
                )
            grads = [None] * len(self.params)
            if logits.requires_grad:
                try:
                    grads = torch.autograd.grad(logits.sum(), self.params, allow_unused=True)
                except (RuntimeError, NotImplementedError) as error:
                    raise UnsupportedError(
                        "torch cannot differentiate the model's forward pass "
                        f"({first_line(error)[:300].rstrip('.')}), as every curvature "
                        "quantity needs; give that operation a derivative."
                    ) from error
        if not torch.equal(example, given):
            raise InvalidInputError(
                "the model's forward pass changes its input in place, so every pass would see "
                "other data; clone it first (x = x.clone()) or use out-of-place operations."
            )
        if changed:
            raise InvalidInputError(
                f"the model's forward pass changes its parameters ({', '.join(changed[:3])}); "
                "curvature needs a fixed function: move the update out of forward."
            )
        with model_guard(self.model):
            low = low_precision(self.model, given.clone())
        if low:
            raise InvalidInputError(
                f"the model's forward pass computes in half precision ({low}: autocast or "
                ".half() inside forward), whose rounding (≥ 1e-3) swamps the curvature's small "
                "eigenvalues and traces; analyse it with float32 or float64 throughout."
            )
        rounding = rounding_gap(again)
        if float((logits.detach() - again).abs().max()) > rounding:
            raise InvalidInputError(
                "the model's forward pass is random or keeps state in eval mode (two passes "
                "over one example differ); curvature needs one fixed function: switch the noise "
                "off in eval mode and keep no state from one call to the next."
            )
        if float((together - again).abs().max()) > rounding:
            raise InvalidInputError(
                "the model's output for an example depends on the other examples in its batch "
                "(statistics over the batch?); curvature of a loss summed over examples needs "
                "each output to depend on its own example only."
            )
        if all(g is None for g in grads):
            raise InvalidInputError(
                "the model's output depends on none of the selected parameters (does forward "
                "detach it, or run under torch.no_grad?); curvature needs logits that are "
                "differentiable in the parameters."
            )
        unused = [n for n, g in zip(self.names, grads) if g is None]
        if not unused:
            return
        them = "it" if len(unused) == 1 else "them"
        hidden = (  # a module forward never calls, or a dependence autograd is not told of
            f"(forward never uses {them}, or only under torch.no_grad() or after .detach(), "
            "which hide the dependence from autograd)"
        )
        if chosen:
            raise InvalidInputError(
                f"the model's output does not depend on {listed(unused)} {hidden}; leave {them} out of "
                "params."
            )
        warn(
            f"curvkit leaves out {listed(unused)}: the model's output does not depend on {them} {hidden}."
        )
        kept = [(n, p) for n, p, g in zip(self.names, self.params, grads) if g is not None]
        self.names, self.params = [n for n, _ in kept], [p for _, p in kept]

    # -- data -----------------------------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        return self.summary.num_samples

    @property
    def num_classes(self) -> int:
        return self.summary.num_classes

    def batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield the data's batches on the model's device, floating inputs in the model's dtype.

        An exception raised by the user's loader becomes an InvalidInputError naming the batch
        (KeyboardInterrupt and other BaseExceptions pass through). A complete pass whose
        examples differ from the first pass's (see PassRecord) is an InvalidInputError: every
        number assumes the same data on every pass. Once the first pass has cached the batches,
        they are yielded instead.
        """
        if self.cached is not None:
            yield from self.cached
            return
        iterator = iter(self.data)
        index, projections, labels = 0, [], []
        while True:
            try:
                batch = next(iterator)
            except StopIteration:
                break
            except CurvkitError:
                raise
            except Exception as error:
                raise InvalidInputError(
                    f"the data raised {type(error).__name__} when asked for batch {index} "
                    f"({first_line(error)}); fix the loader."
                ) from error
            x, y = self._prepare(batch, index)
            if not y.numel():  # an empty batch adds nothing (and would break per-example shapes)
                index += 1
                continue
            if self.first_pass is not None and not 0 <= y.min() <= y.max() < self.num_classes:
                # before the loss sees them (the pass's record is checked at its end)
                self._data_changed(f"batch {index} has labels outside [0, {self.num_classes - 1}]")
            projections.append(self._project(x))
            labels.append(y)
            yield x, y
            index += 1
        if labels:
            self._check_pass(PassRecord.of(torch.cat(projections), torch.cat(labels)))

    def _project(self, x: Tensor) -> Tensor:
        """``x_i · w`` per example in float64 (see PassRecord); w is drawn once per input size."""
        flat = (x.flatten(1) if x.dim() > 1 else x[:, None]).detach().double()
        width = flat.shape[1]
        if width not in self._weights:
            generator = torch.Generator().manual_seed(width)
            weights = 0.5 + torch.rand(width, generator=generator, dtype=torch.float64)
            self._weights[width] = weights.to(self.device)
        return flat @ self._weights[width]

    def _check_pass(self, record: PassRecord) -> None:
        if self.first_pass is None:
            self.first_pass = record
            return
        first = self.first_pass
        if not first.matches(record):
            change = (
                f"{first.num_samples} examples on the first pass, {record.num_samples} on this one"
                if first.num_samples != record.num_samples
                else "the same number of examples but different "
                + ("labels" if first.counts != record.counts else "inputs or labels")
            )
            self._data_changed(change)

    @staticmethod
    def _data_changed(change: str) -> NoReturn:
        raise InvalidInputError(
            f"the data changed between passes ({change}); give curvkit data that yields the "
            "same examples on every pass: no random augmentation, no shuffling with "
            "drop_last, no stream."
        )

    def batches_with_progress(self, desc: str, enabled: bool) -> Iterator[tuple[Tensor, Tensor]]:
        """``batches()`` with a progress bar on stderr (for the long one-off passes)."""
        with progress_bar(total=self.summary.num_batches, desc=desc, enabled=enabled) as bar:
            for batch in self.batches():
                yield batch
                bar.update(1)

    def _prepare(self, batch: object, index: int) -> tuple[Tensor, Tensor]:
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            single = (  # analyze(model, (x, y)) iterates the pair itself
                "; one batch goes in a list, [(inputs, labels)]"
                if isinstance(batch, Tensor)
                else ""
            )
            raise InvalidInputError(
                f"batch {index} is a {type(batch).__name__}, not an (inputs, labels) pair; "
                f"make the data yield two tensors per batch{single}."
            )
        x, y = batch
        if not isinstance(x, Tensor) or not isinstance(y, Tensor):
            raise InvalidInputError(
                f"batch {index} holds {type(x).__name__} and {type(y).__name__}; inputs and labels "
                "must both be torch tensors."
            )
        for role, t in (("inputs", x), ("labels", y)):
            form = (
                "on the meta device, without values"
                if t.is_meta
                else "nested"
                if t.is_nested
                else f"of layout {t.layout}"
                if t.layout != torch.strided
                else ""
            )
            if form:
                raise InvalidInputError(
                    f"the {role} in batch {index} are {form}; give dense tensors with values "
                    "(e.g. t.to_dense(), or the CPU tensors)."
                )
        if x.dtype.is_complex:
            raise InvalidInputError(
                f"inputs in batch {index} have dtype {x.dtype}; curvkit analyses real-valued "
                "models (pass x.real, or the real and imaginary parts as channels)."
            )
        if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
            raise InvalidInputError(
                f"labels in batch {index} have dtype {y.dtype}; class labels must be integers "
                "(e.g. labels.long())."
            )
        if y.dim() != 1 or x.dim() == 0 or x.shape[0] != y.shape[0]:
            raise InvalidInputError(
                f"batch {index} has inputs of shape {tuple(x.shape)} and labels of shape "
                f"{tuple(y.shape)}; labels must be one integer per example, matching the inputs' "
                "first dimension."
            )
        if x.dtype.is_floating_point:
            x = x.to(device=self.device, dtype=self.dtype)
        else:
            x = x.to(device=self.device)
        y = y.to(device=self.device, dtype=torch.long)
        # tensors made under torch.inference_mode() cannot enter autograd; copies can
        return (x.clone() if x.is_inference() else x), (y.clone() if y.is_inference() else y)

    def all_reduce(self, tensor: Tensor) -> Tensor:
        """The sum of a partial sum over this rank's shard across the ranks (itself alone)."""
        return all_reduce(tensor, self.group)

    def _scan(self) -> DataSummary:
        """One forward pass in eval mode that checks every batch and counts the classes; with a
        process group, the shards' summaries are combined (and the ranks' models and data
        compared: the same shard on every rank is refused)."""
        if self.group is None:
            summary = self._scan_shard()
            self.num_shard_samples = summary.num_samples
            return summary
        error, local, digest = None, None, self._weights_digest()
        try:
            local = self._scan_shard()
            self.num_shard_samples = local.num_samples
        except CurvkitError as caught:
            error = caught
        agree(error, self.group)
        shards = all_gather_objects((local, self.names, digest, self.first_pass), self.group)
        if any(names != self.names for _, names, _, _ in shards):
            raise InvalidInputError(
                "the ranks select different parameters (their requires_grad differs); set "
                "requires_grad alike on every rank, or pass the same params."
            )
        if len({digest for _, _, digest, _ in shards}) > 1:
            raise InvalidInputError(
                "the ranks hold different parameter or buffer values (a frozen layer, BatchNorm "
                "statistics); load the same weights on every rank (and seed any training "
                "identically)."
            )
        records = [record for _, _, _, record in shards]
        if len(records) > 1 and all(r is not None and r.matches(records[0]) for r in records):
            raise InvalidInputError(
                f"every rank holds the same {records[0].num_samples} examples, which would count "
                f"{len(records)} times each; give each rank its own shard, e.g. "
                "curvkit.distributed.shard_loader(loader)."
            )
        summaries = [summary for summary, _, _, _ in shards]
        empty = [r for r, s in enumerate(summaries) if s.num_samples == 0]
        if empty:
            raise InvalidInputError(
                f"rank {empty[0]} has no examples; give every rank a shard (fewer ranks than "
                "examples, e.g. with curvkit.distributed.shard_loader)."
            )
        num_samples = sum(s.num_samples for s in summaries)
        num_classes = summaries[0].num_classes
        counts = tuple(sum(s.counts[c] for s in summaries) for c in range(num_classes))
        return DataSummary(
            num_samples,
            num_classes,
            counts,
            local.num_batches,
            max(s.max_batch for s in summaries),
        )

    @staticmethod
    def _check_logits(out: Tensor) -> None:
        """Refuse probabilities (a final softmax): cross-entropy on them is another loss than
        the one the model learnt. Log-probabilities are logits already (log-softmax leaves them
        unchanged)."""
        sums = out.detach().sum(dim=1)
        rounding = 1e3 * torch.finfo(out.dtype).eps * out.shape[1]
        if out.numel() and bool((out >= 0).all()) and float((sums - 1).abs().max()) <= rounding:
            raise InvalidInputError(
                "the model's outputs are probabilities (non-negative, each row summing to 1), "
                "and cross-entropy on them is not the loss the model learnt; return logits (drop "
                "the final softmax) or log-probabilities (torch.log of the output)."
            )

    def _scan_shard(self) -> DataSummary:
        """The scan of this rank's data (all of it without a process group)."""
        num_samples, num_classes, counts, max_batch, index = 0, 0, None, 0, -1
        budget = cache_budget(self.cache_mb, self.device)
        cache: list[tuple[Tensor, Tensor]] | None = [] if budget > 0 else None
        largest: tuple[float, Tensor, Tensor] | None = None  # logits' norm, its example
        with model_guard(self.model), torch.no_grad():
            for index, (x, y) in enumerate(self.batches()):
                if self.sample is None:
                    self.sample = (x[:2].clone(), y[:2].clone())
                if cache is not None:
                    budget -= x.nbytes + y.nbytes
                    if budget >= 0:  # copies: a loader may refill one buffer every batch
                        cache.append((x.clone(), y.clone()))
                    else:
                        cache = None
                if x.dtype.is_floating_point and not torch.isfinite(x).all():
                    raise InvalidInputError(
                        f"inputs in batch {index} contain NaN or Inf; clean or filter the data first."
                    )
                try:
                    out = self.model(x)
                except Exception as error:
                    raise InvalidInputError(
                        f"the model raised {type(error).__name__} on batch {index} of inputs "
                        f"shaped {tuple(x.shape)} ({first_line(error)}); "
                        "check that the data matches the model."
                    ) from error
                if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != x.shape[0]:
                    shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                    raise InvalidInputError(
                        f"the model's output for batch {index} is {shape}; curvkit needs logits of "
                        "shape (batch, classes) from a classifier."
                    )
                if not torch.isfinite(out).all():
                    raise InvalidInputError(
                        f"the model's output for batch {index} contains NaN or Inf; check the "
                        "parameters and inputs."
                    )
                if counts is None:
                    self._check_logits(out)
                    if out.dtype != self.dtype:
                        raise InvalidInputError(
                            f"the model's logits are {out.dtype} but its parameters "
                            f"{self.dtype}; curvkit computes in one precision: return the logits "
                            "in the parameters' dtype (drop the cast in forward)."
                        )
                    num_classes = out.shape[1]
                    counts = torch.zeros(num_classes, dtype=torch.long)
                    if num_classes < 2:
                        raise InvalidInputError(
                            f"the model has {num_classes} output; a classifier needs at least 2 "
                            "classes."
                        )
                if out.shape[1] != num_classes:
                    raise InvalidInputError(
                        f"the model gives {out.shape[1]} outputs for batch {index} but {num_classes} "
                        "before; every batch must have the same number of classes."
                    )
                if y.numel() and (y.min() < 0 or y.max() >= num_classes):
                    raise InvalidInputError(
                        f"labels in batch {index} range over [{int(y.min())}, {int(y.max())}] but the "
                        f"model has {num_classes} outputs; labels must lie in [0, {num_classes - 1}]"
                        + (
                            " (curvkit has no ignore_index: leave such examples out)."
                            if y.min() < 0
                            else "."
                        )
                    )
                norms = out.norm(dim=1)
                if num_samples == 0 and norms.numel():
                    norms[0] = -1  # the first example is kept anyway
                if norms.numel() and (largest is None or float(norms.max()) > largest[0]):
                    i = int(norms.argmax())
                    largest = (float(norms[i]), x[i : i + 1].clone(), y[i : i + 1].clone())
                counts += torch.bincount(y.cpu(), minlength=num_classes)
                num_samples += y.numel()
                max_batch = max(max_batch, y.numel())
        if num_samples == 0 and self.group is None:
            raise InvalidInputError("the data yielded no examples; pass a non-empty loader.")
        counts_tuple = tuple(int(c) for c in counts) if counts is not None else ()
        if largest is not None and largest[0] >= 0:
            x, y = self.sample
            self.sample = (torch.cat([x[:1], largest[1]]), torch.cat([y[:1], largest[2]]))
        self.cached = cache
        return DataSummary(num_samples, num_classes, counts_tuple, index + 1, max_batch)

    # -- flat vectors ---------------------------------------------------------------------------
    def flatten(self, tensors: Sequence[Tensor]) -> Tensor:
        """Concatenate per-parameter tensors into one flat vector (the order of ``names``)."""
        return torch.cat([t.reshape(-1) for t in tensors])

    def unflatten(self, vector: Tensor) -> list[Tensor]:
        """Split a flat vector into tensors shaped like the selected parameters."""
        if vector.shape != (self.num_params,):
            raise InvalidInputError(
                f"expected a flat vector of {self.num_params} entries, got shape {tuple(vector.shape)}."
            )
        sizes = [s.numel() for s in self.shapes]
        return [v.view(s) for v, s in zip(torch.split(vector, sizes), self.shapes)]

    def named(self, vector: Tensor) -> dict[str, Tensor]:
        return dict(zip(self.names, self.unflatten(vector)))

    def selected(self, param: str | None = None) -> list[str]:
        """The names differentiated: all selected parameters, or the one named ``param``."""
        if param is None:
            return self.names
        self.slice_of(param)  # an unknown name is an error
        return [param]

    def size_of(self, param: str | None = None) -> int:
        """The length of a flat vector over all parameters or over ``param`` alone."""
        if param is None:
            return self.num_params
        where = self.slice_of(param)
        return where.stop - where.start

    def split_columns(self, matrix: Tensor, param: str | None = None) -> dict[str, Tensor]:
        """A (size, k) block of flat column vectors as {name: (k, *shape)} per parameter."""
        names = self.selected(param)
        shapes = [self.shapes[self.names.index(n)] for n in names]
        parts = torch.split(matrix.T, [s.numel() for s in shapes], dim=1)
        return {n: part.reshape(-1, *s) for n, part, s in zip(names, parts, shapes)}

    def join_columns(self, parts: Sequence[Tensor]) -> Tensor:
        """The inverse of ``split_columns``: per-parameter (k, *shape) tensors to (size, k)."""
        return torch.cat([t.reshape(t.shape[0], -1) for t in parts], dim=1).T

    def slice_of(self, name: str) -> slice:
        """Where parameter ``name`` sits in a flat vector."""
        start = 0
        for n, s in zip(self.names, self.shapes):
            if n == name:
                return slice(start, start + s.numel())
            start += s.numel()
        raise InvalidInputError(f"{name!r} is not among the selected parameters {self.names}.")

    def fingerprint(self) -> str:
        return fingerprint(self.model)

    def half_budget(self) -> float | None:
        """Half the memory budget on this rank (curvkit.problem.free_memory), in bytes, or None
        if unknown: what one routine may hold at its peak, the rest left for the model and
        the batches. ``Backend.memory_budget`` takes the smallest over the ranks."""
        free = free_memory(self.device)
        return None if free is None else free / 2

    @functools.cached_property
    def features(self) -> dict[str, str]:
        """The model's features that some libraries cannot handle (see curvkit.features),
        found in eval mode (BatchNorm refuses one example in training mode, and would update
        its running statistics) on the model, which comes back as it was; with a process
        group, those of any rank (each checks its own examples), so that all refuse alike."""
        half = self.half_budget()
        room = None if half is None else int(half // (self.num_params * self.dtype.itemsize))
        try:
            with model_guard(self.model):
                found = model_features(self.model, self.sample[0], self.names, room)
        except CurvkitError as error:  # a refusal (no second derivatives) stops every rank
            if self.group is not None:
                agree(error, self.group)
            raise
        if self.group is not None:
            agree(None, self.group)
            union: dict[str, str] = {}
            for features in all_gather_objects(found, self.group):
                for feature, where in features.items():
                    union.setdefault(feature, where)
            found = union
        if "surrogate_gradients" in found and rank(self.group) == 0:
            warn(
                f"the model has {found['surrogate_gradients']}; curvkit measures the curvature "
                "of autograd's derivatives, and can hold their second derivatives to symmetry "
                "only."
            )
        return found

    @functools.cached_property
    def module_calls(self) -> tuple[Counter[str], set[str]]:
        """How often each module holding parameters runs in one example's forward pass (in eval
        mode, on the model, which comes back as it was), and those given their input as a
        keyword argument."""
        with model_guard(self.model):
            calls, by_keyword, _ = module_calls(self.model, self.sample[0][:1])
        return calls, by_keyword

    def _weights_digest(self) -> str:
        """A hash of the values of every parameter and buffer, selected or not (a frozen
        backbone, BatchNorm's statistics), to check that all ranks hold the same model; taken
        before any forward pass, which may update buffers by a shard's batches."""
        digest = hashlib.sha256()
        for _, t in [*self.model.named_parameters(), *self.model.named_buffers()]:
            digest.update(str((t.dtype, tuple(t.shape))).encode())
            digest.update(t.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()


def cache_budget(cache_mb: float, device: torch.device) -> int:
    """Bytes the batches may occupy: ``cache_mb`` MiB, at most a quarter of the free memory."""
    if isinstance(cache_mb, bool) or not isinstance(cache_mb, numbers.Real) or not cache_mb >= 0:
        raise InvalidInputError(f"cache_mb must be a number of MiB ≥ 0, got {cache_mb!r:.40}.")
    free = free_memory(device)
    if math.isinf(cache_mb):  # no limit of its own
        return sys.maxsize if free is None else free // 4
    budget = int(cache_mb * 2**20)
    return budget if free is None else min(budget, free // 4)


def free_memory(device: torch.device) -> int | None:
    """The memory budget in bytes on ``device``: the environment variable CURVKIT_MEMORY_MB
    when set, else the free memory (CUDA: ``mem_get_info``; CPU: Linux's available memory,
    at most what the cgroup v2 limit leaves), or None if unknown."""
    override = os.environ.get("CURVKIT_MEMORY_MB")
    if override:
        try:
            megabytes = float(override)
        except ValueError:
            megabytes = math.nan
        if not 0 < megabytes < math.inf:
            raise InvalidInputError(
                f"CURVKIT_MEMORY_MB must be a positive number of MiB, got {override[:40]!r}."
            )
        return int(megabytes * 2**20)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    available = _read_int("/proc/meminfo", "MemAvailable:", 1024)  # free + reclaimable cache
    if available is None:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    limit = _read_int("/sys/fs/cgroup/memory.max")
    used = _read_int("/sys/fs/cgroup/memory.current")
    if limit is not None and used is not None:
        available = min(available, limit - used)
    return available


def _read_int(path: str, key: str = "", unit: int = 1) -> int | None:
    """The integer in the file at ``path`` (on the line starting with ``key``), or None."""
    try:
        with open(path) as file:
            line = next(line for line in file if line.startswith(key))
        return int(line.removeprefix(key).split()[0]) * unit
    except (OSError, ValueError, StopIteration, IndexError):
        return None


def check_module(model: object) -> None:
    if not isinstance(model, nn.Module):
        raise InvalidInputError(
            f"model must be a torch.nn.Module, got {type(model).__name__}; pass the classifier itself."
        )
    scripted = [n or "<root>" for n, m in model.named_modules() if isinstance(m, ScriptModule)]
    if scripted:
        raise InvalidInputError(
            f"module {scripted[0]} is TorchScript (torch.jit.script or trace), whose forward "
            "torch.func and the curvature libraries cannot transform or hook; analyse the "
            "Python nn.Module it was made from."
        )
    batch_statistics = [
        n for n, m in model.named_modules() if isinstance(m, _BatchNorm) and m.running_mean is None
    ]
    if batch_statistics:
        raise InvalidInputError(
            f"module {batch_statistics[0]} is a BatchNorm without running statistics "
            "(track_running_stats=False), which normalises over the batch in eval mode too, so "
            "each example's output depends on the others; analyse the model with running "
            "statistics (estimated on the training data)."
        )
    tensors = [*model.named_parameters(), *model.named_buffers()]
    lazy = [n for n, t in tensors if isinstance(t, nn.parameter.UninitializedTensorMixin)]
    if lazy:
        raise InvalidInputError(
            f"{lazy[0]!r} is not initialised yet (a lazy module); run one forward pass, "
            "model(inputs), before analysing the model."
        )
    inference = [n for n, t in tensors if t.is_inference()]
    if inference:
        raise InvalidInputError(
            f"{inference[0]!r} was made under torch.inference_mode(), and such tensors cannot "
            "be differentiated; build or load the model outside inference mode."
        )


def _select_params(model: nn.Module, names: Sequence[str] | None) -> tuple[list[str], list[Tensor]]:
    """The selected parameters under their first names (``model.named_parameters()``), in the
    model's order (a set's order differs between processes, which under torch.distributed
    would lay the ranks' vectors out differently); a Parameter held by several modules may be
    named by any of its names, but only once."""
    named = dict(model.named_parameters())
    if isinstance(names, str):
        raise InvalidInputError(
            f"params must be a list of parameter names, got the string {shown(names)}; "
            f"write params=[{shown(names)}]."
        )
    if names is None:  # a parameter without elements adds no coordinate: left out
        names = [n for n, p in named.items() if p.requires_grad and p.numel()]
        if not named:
            raise InvalidInputError(
                "the model has no parameters (nn.Parameter) to differentiate in; a quantized "
                "model keeps its weights otherwise: analyse the float model."
            )
        if not names:
            raise InvalidInputError(
                "no parameter of the model requires gradients; enable requires_grad on the "
                "parameters to analyse or pass params=[...]."
            )
    else:
        names = list(names)  # a generator would be used up by the checks
        other = next((n for n in names if not isinstance(n, str)), None)
        if other is not None:  # e.g. named_parameters()'s (name, Parameter) pairs
            raise InvalidInputError(
                f"params must be a list of parameter names, got {type(other).__name__} "
                f"{shown(other)}; write e.g. params=[name for name, _ in "
                "model.named_parameters()]."
            )
        first = {id(p): n for n, p in reversed(list(model.named_parameters()))}
        aliases = {n: first[id(p)] for n, p in model.named_parameters(remove_duplicate=False)}
        missing = [shown(n) for n in names if n not in aliases]
        if missing:
            raise InvalidInputError(
                f"unknown parameter names {', '.join(missing[:5])}; choose from "
                f"{shown(list(named))}."
            )
        if not names:
            raise InvalidInputError("params is empty; name at least one parameter.")
        given = list(names)
        names = [aliases[n] for n in given]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            spelled = [
                " = ".join(dict.fromkeys(g for g in given if aliases[g] == n)) for n in repeated
            ]
            raise InvalidInputError(
                f"params names the Parameter {', '.join(spelled)} more than once; name each "
                "parameter once (a repeated one would count twice in P and in every product)."
            )
        empty = [n for n in names if not named[n].numel()]
        if empty:
            raise InvalidInputError(
                f"parameter {shown(empty[0])} has no elements (shape "
                f"{tuple(named[empty[0]].shape)}) and hence no curvature; leave it out of params."
            )
        names = [n for n in named if n in names]  # in the model's order, whatever was given
    params = [named[n] for n in names]
    if len({(p.device, p.dtype) for p in params}) > 1:
        raise InvalidInputError(
            "the selected parameters live on several devices or dtypes; move the model with "
            "model.to(device, dtype) first."
        )
    if params[0].device.type == "meta":
        raise InvalidInputError(
            "the parameters are on the meta device and hold no values; materialise them first "
            "(model.to_empty(device=...) and load_state_dict)."
        )
    if not params[0].dtype.is_floating_point:
        raise InvalidInputError(f"parameters of dtype {params[0].dtype} cannot be differentiated.")
    if params[0].dtype.itemsize < 4:
        raise InvalidInputError(
            f"the parameters are {params[0].dtype}, whose rounding (≥ 1e-3) swamps the curvature's "
            "small eigenvalues and traces; analyse a float32 or float64 copy, e.g. "
            "copy.deepcopy(model).float()."
        )
    for n, p in zip(names, params):
        if not torch.isfinite(p).all():
            raise InvalidInputError(
                f"parameter {n!r} contains NaN or Inf; curvature is undefined there."
            )
    return list(names), params


def rounding_gap(logits: Tensor) -> float:
    """How far two computations of the same ``logits`` may differ by rounding alone: 1e3 ulps
    in float64; in float32 1e-2, as a GPU's TF32 convolutions (on by default) round to 1e-3 and
    may differ between batch sizes; relative to 1 + their largest magnitude."""
    relative = 1e3 * torch.finfo(logits.dtype).eps if logits.dtype == torch.float64 else 1e-2
    return relative * (1 + float(logits.abs().max()))


def fingerprint(model: nn.Module) -> str:
    """A short hash of the architecture, parameter names and shapes, dtype and device type."""
    parts = [type(m).__name__ + ":" + n for n, m in model.named_modules()]
    parts += [f"{n}{tuple(p.shape)}{p.dtype}{p.device.type}" for n, p in model.named_parameters()]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


@contextlib.contextmanager
def differentiable_kernels() -> Iterator[None]:
    """Gradients on under the caller's ``torch.no_grad()`` or ``torch.inference_mode()``,
    the caller's ``torch.autocast`` off (curvkit computes in the parameters' precision: the
    logits came out bfloat16, and the model was refused for a cast it does not make), anomaly
    detection off (its NaN checks call ``.item()``, which torch.func's vmap cannot batch: a raw
    RuntimeError on three backends), and attention through its plain math kernel (the fused
    scaled-dot-product kernels have no second derivative and MultiheadAttention's inference
    fast path no forward-mode one: raw errors on every backend). The caller's settings come
    back after."""
    fast_path = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with contextlib.ExitStack() as stack:
            for device in ("cpu", "cuda"):
                if torch.is_autocast_enabled(device):
                    stack.enter_context(torch.autocast(device, enabled=False))
            stack.enter_context(torch.inference_mode(False))
            stack.enter_context(torch.enable_grad())
            stack.enter_context(torch.autograd.set_detect_anomaly(False))
            stack.enter_context(sdpa_kernel(SDPBackend.MATH))
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fast_path)


@contextlib.contextmanager
def callers_contexts_lifted() -> Iterator[None]:
    """Two of the caller's contexts lifted for the block and put back afterwards:

    - saved-tensor hooks (``torch.autograd.graph.save_on_cpu()``, ...), popped and pushed back
      in their order: torch.func's transforms refuse to run under them (torchfunc and
      curvlinops refused every quantity, blaming the model);
    - ``torch.nn.utils.parametrize.cached()``, whose cached weights hide the parametrizations'
      parameters from every derivative (they were left out as unused, and G of the others
      reported): caching off, the caller's cache untouched;
    - BackPACK's ``with backpack(...)`` and ``with backpack.disable()`` (global state): the
      caller's extensions ran in curvkit's backward passes through a model the caller
      extended, and without stored inputs BackPACK's own passes failed (raw errors on every
      backend).

    The caller's ``torch.autograd.forward_ad.dual_level()`` cannot be lifted (leaving it
    drops the caller's tangents) and torch does not nest forward-mode AD, which the checks and
    libraries use: it is refused (a raw RuntimeError on every backend before).
    """
    if forward_ad._current_level >= 0:
        raise InvalidInputError(
            "curvkit was called inside torch.autograd.forward_ad.dual_level(), and torch does "
            "not nest forward-mode AD, which its checks and the libraries use; call it outside "
            "the dual level."
        )
    autograd = torch._C._autograd
    lifted = []
    if hasattr(autograd, "_top_saved_tensors_default_hooks"):  # torch ≥ 2.2
        while (hooks := autograd._top_saved_tensors_default_hooks(False)) is not None:
            lifted.append(hooks)
            autograd._pop_saved_tensors_default_hooks()
    caching, parametrize._cache_enabled = parametrize._cache_enabled, 0
    try:
        with contextlib.ExitStack() as stack:
            backpack = sys.modules.get("backpack")  # imported: the caller's state may be set
            if backpack is not None:
                stack.enter_context(backpack.backpack())  # no extensions, BackPACK's defaults
                stored, backpack.disable.store_io = backpack.disable.store_io, True
                stack.callback(setattr, backpack.disable, "store_io", stored)
            yield
    finally:
        parametrize._cache_enabled = caching
        for pack, unpack in reversed(lifted):
            autograd._push_saved_tensors_default_hooks(pack, unpack)


@contextlib.contextmanager
def random_state_kept(model: nn.Module) -> Iterator[None]:
    """Run a block and put torch's global random state back afterwards (the CPU's and that of
    each GPU holding a parameter): every pass over a DataLoader draws its seed from it, and a
    library may sample from it, so without this the user's later draws would depend on the
    backend and the number of passes."""
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        yield


SPARSE_GRADIENTS = (nn.Embedding, nn.EmbeddingBag)  # modules with a ``sparse`` flag


def _restore(tensor: Tensor, value: Tensor) -> None:
    """``tensor.copy_(value)`` where they differ (or cannot be compared)."""
    try:
        unchanged = torch.equal(tensor, value)
    except (RuntimeError, NotImplementedError):  # meta or sparse tensors: written back
        unchanged = False
    if not unchanged:
        tensor.copy_(value)


def evaluation_mode(model: nn.Module) -> nn.Module:
    """``model.eval()``, or the model as it is where it cannot switch modes (a module of
    ``torch.export`` runs as exported: its ``eval()`` raises NotImplementedError; dropout or
    batch statistics left in it are found by Problem's checks)."""
    try:
        model.eval()
    except NotImplementedError:
        pass
    return model


def _lift_backpack_extension(model: nn.Module) -> None:
    """Remove BackPACK's hooks and flag from a model the caller extended (``model_guard``
    puts them back): inert outside BackPACK's context, they were taken for the user's hooks
    (torchfunc and curvlinops refused every quantity), and a copy flagged as extended got no
    hooks of curvkit's own BackPACK run."""
    backpack = sys.modules.get("backpack")
    if backpack is None:  # never imported: no model is extended
        return
    installed = (backpack.hook_store_io, backpack.hook_run_extensions)
    for module in model.modules():
        for hooks in (module._forward_hooks, module._backward_hooks):
            for key in [k for k, hook in hooks.items() if hook in installed]:
                del hooks[key]
        vars(module).pop("_backpack_extend", None)


@contextlib.contextmanager
def model_guard(model: nn.Module, eval_mode: bool = True) -> Iterator[nn.Module]:
    """Run a block on ``model`` and restore it exactly afterwards, also on error or interrupt.

    Restored: the same Parameter and buffer objects in every module, with their values,
    ``.grad`` fields and ``requires_grad``, each module's train/eval mode, its hook
    dictionaries and its other attributes, as objects: a forward may set some (a computed
    tensor holding a graph, e.g. spectral_norm's ``weight``; a call counter, left at 422 by
    torchfunc's passes before), and a library others. Inside, the model is in eval mode by
    default, its embeddings give dense gradients (``sparse=False``: the same numbers, in the
    layout every library takes), and what ``backpack.extend`` installed is lifted
    (``_lift_backpack_extension``).
    """
    check_module(model)
    params = list(model.parameters())
    saved_params = [(p, p.detach().clone(), p.grad, p.requires_grad) for p in params]
    saved_grads = [None if p.grad is None else p.grad.detach().clone() for p in params]
    saved_buffers = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        with state_kept(model):
            if eval_mode:
                evaluation_mode(model)
            for m in model.modules():
                if isinstance(m, SPARSE_GRADIENTS):
                    m.sparse = False
            _lift_backpack_extension(model)
            yield model
    finally:
        with torch.no_grad():  # only what changed is written back: a write bumps a tensor's
            # version, and the caller's graph that saved it could not be backpropagated
            for (p, value, grad, requires_grad), grad_value in zip(saved_params, saved_grads):
                _restore(p, value)
                p.requires_grad_(requires_grad)
                if grad is not None:
                    _restore(grad, grad_value)
                p.grad = grad
            for b, value in saved_buffers:
                _restore(b, value)
