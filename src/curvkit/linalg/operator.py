"""Linear operators and the three routines that take them: top eigenpairs, trace, density.

An ``Operator`` is a symmetric matrix known only through its products: the Hessian or G of the
data-set loss, a layer's diagonal block, ``G_within``. The routines run the operator's native
routine when its backend supplied one (PyHessian's power iteration, curvlinops' Hutch++, ...)
and curvkit's own otherwise (Lanczos, Hutch++/Hutchinson, SLQ), all with the same ``Options``,
and say in the returned Provenance which ran, how many products it used and how long it took.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from curvkit.errors import InvalidInputError, UnsupportedError, memory_text, shown, warn
from curvkit.linalg.krylov import (
    SLQ_EXTRA_VECTORS,
    Density,
    EigenResult,
    default_max_iter,
    lanczos,
    lanczos_extra_vectors,
    slq_density,
)
from curvkit.linalg.subspace import long_matmul
from curvkit.linalg.trace import HELD_PER_MATVEC, METHODS, TraceEstimate, estimate_trace
from curvkit.report import Provenance


@dataclass
class Options:
    """Settings of the routines (curvkit's own and the backends' native ones)."""

    lanczos_tol: float = 1e-6
    lanczos_max_iter: int | None = None
    lanczos_block: int | None = None  # None: min(4, ⌈k/4⌉) (benchmarks/results/backends_cpu.md)
    block_size: int = 16  # the most vectors one batch's product takes at once (memory)
    trace_method: str = "hutch++"
    trace_matvecs: int = 99  # 0: no trace estimates (NaN in the report)
    # 3 × 30: W1 within 10 % of 5 × 50's (benchmarks/results/defaults_cpu.md); 0 probes: no
    # densities (empty in the report)
    density_probes: int = 3
    density_steps: int = 30
    density_grid: int = 400
    density_relative_sigma: float = 0.01
    # Papyan's class sums: "auto" (the most complete route that fits the memory budget),
    # "per-example", "gradients" or "means" (see curvkit.backend.CLASS_SUMS_ROUTES)
    class_sums: str = "auto"
    # layerwise: each layer's SLQ density and its distance to the full Hessian's (Sankar et
    # al.), only when asked: on a ResNet-18 its 21 densities cost more than the rest
    layer_density: bool = False
    progress: bool = False
    backend: dict[str, dict[str, Any]] = field(default_factory=dict)  # per backend name

    def __post_init__(self) -> None:
        """Every setting checked once, with one sentence for a bad value; a number written as
        a string (YAML reads ``1e-6`` as one) is read as the number."""
        for name, least in (("lanczos_tol", 0.0), ("density_relative_sigma", 0.0)):
            setattr(self, name, positive_number(f"option {name!r}", getattr(self, name), least))
        if self.lanczos_tol >= 1:  # Ritz values then "converge" at once, far from any λ
            raise InvalidInputError(
                "option 'lanczos_tol' must be below 1 (the residual allowed, relative to the "
                f"largest eigenvalue: 1e-6 by default), got {shown(self.lanczos_tol)}."
            )
        for name, least in INTEGER_OPTIONS.items():
            value = getattr(self, name)
            if value is not None or name not in ("lanczos_max_iter", "lanczos_block"):
                if name in SWITCHES and type(value) is int and value == 0:
                    continue  # switched off
                what = f"option {name!r}" + (" (0: off)" if name in SWITCHES else "")
                setattr(self, name, integer(what, value, least))
        self.layer_density = flag("option 'layer_density'", self.layer_density)
        if self.layer_density and not self.density_probes:
            raise InvalidInputError(
                "option 'layer_density' needs densities; set density_probes to 1 or more."
            )
        if self.trace_method not in METHODS:
            raise InvalidInputError(
                f"option 'trace_method' must be one of {', '.join(METHODS)}, "
                f"got {shown(self.trace_method)}."
            )
        if self.class_sums not in ("auto", *CLASS_SUMS_ROUTES):
            raise InvalidInputError(
                "option 'class_sums' must be one of auto, "
                f"{', '.join(CLASS_SUMS_ROUTES)}, got {shown(self.class_sums)}."
            )
        if not isinstance(self.backend, Mapping) or not all(
            isinstance(v, Mapping) or v is None for v in self.backend.values()
        ):
            raise InvalidInputError(
                "option 'backend' must map backend names to their settings, e.g. "
                f"{{'pyhessian': {{'power_tol': 1e-7}}}}, got {shown(self.backend)}."
            )


# Papyan's class sums, from the most to the least complete: per-example factors δ_{i,c'}
# (exact tr G), C weighted gradient passes per class (all C² group sums, tr G estimated), two
# per class (the own-label and class-mean sums only: C·P memory, cross and within not separated)
CLASS_SUMS_ROUTES = ("per-example", "gradients", "means")

# the least value of each integer option: Hutch++ needs a sketch and two probes (3 products);
# 0 switches off the estimates of the SWITCHES
SWITCHES = ("trace_matvecs", "density_probes")
INTEGER_OPTIONS = {
    "lanczos_max_iter": 1,
    "lanczos_block": 1,
    "block_size": 1,
    "trace_matvecs": 3,
    "density_probes": 1,
    "density_steps": 2,
    "density_grid": 2,
}


def integer(what: str, value: Any, least: int, most: int | None = None) -> int:
    """``value`` as an int in [``least``, ``most``], or an InvalidInputError naming ``what``."""
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Integral)
        or value < least
        or (most is not None and value > most)
    ):
        hint = " (a string: write it without quotes)" if isinstance(value, str) else ""
        bound = f"≥ {least}" if most is None else f"in [{least}, {most}]"
        raise InvalidInputError(f"{what} must be an integer {bound}, got {shown(value)}{hint}.")
    return int(value)


def flag(what: str, value: Any) -> bool:
    """``value`` as a bool (True or False only: a string such as "no" would read as true)."""
    if not isinstance(value, bool):
        raise InvalidInputError(f"{what} must be true or false, got {shown(value)}.")
    return value


def positive_number(what: str, value: Any, least: float) -> float:
    """``value`` (a number, or a string that reads as one) as a float > ``least``."""
    try:
        number = float(value) if isinstance(value, (str, numbers.Real)) else math.nan
    except ValueError:
        number = math.nan
    if isinstance(value, bool) or not number > least or math.isinf(number):
        raise InvalidInputError(f"{what} must be a number > {least:g}, got {shown(value)}.")
    return number


@dataclass
class Operator:
    """A symmetric ``size × size`` matrix known through ``matmat``: (size, k) ↦ (size, k).

    ``cost`` is the number of backend products one column takes (2 for a difference of two
    operators), ``derived`` says the products are built from other primitives of the library, and
    ``native`` maps a routine's name to the backend's own implementation, called
    as ``native["top_eigen"](k, options, seed)``, ``native["trace"](options, seed)``,
    ``native["density"](options, seed)`` and returning (result, Provenance). ``passes`` counts
    the backend's passes over the data so far and ``note`` says how its products ran.
    """

    size: int
    matmat: Callable[[Tensor], Tensor]
    dtype: torch.dtype
    device: torch.device
    backend: str = "curvkit"
    cost: int = 1
    derived: bool = False
    native: dict[str, Callable[..., Any]] = field(default_factory=dict)
    passes: Callable[[], int] = lambda: 0
    note: Callable[[], str] = lambda: ""
    # the bytes curvkit's routines may hold now (None: no limit known); a backend's operators
    # give half the memory budget, the same on every rank (Backend.memory_budget)
    budget: Callable[[], float | None] = lambda: None

    def matvec(self, v: Tensor) -> Tensor:
        return self.matmat(v[:, None])[:, 0]

    def room(self) -> tuple[int | None, float | None]:
        """How many vectors of this operator's size fit in ``budget()`` now, and the budget
        (None, None when no limit is known)."""
        budget = self.budget()
        if budget is None:
            return None, None
        return int(budget // (self.size * self.dtype.itemsize)), budget

    def vectors_text(self, count: int) -> str:
        return f"{count} vectors of {self.size} numbers ({self.memory(count)})"

    def memory(self, count: int) -> str:
        return memory_text(count * self.size * self.dtype.itemsize)

    def minus(self, other: Operator) -> Operator:
        """``self − other``, with curvkit's routines (a native routine is for one matrix)."""
        return dataclasses.replace(
            self,
            matmat=lambda V: self.matmat(V) - other.matmat(V),
            cost=self.cost + other.cost,
            derived=self.derived or other.derived,
            native={},
            note=lambda: "; ".join(filter(None, dict.fromkeys([self.note(), other.note()]))),
        )

    def minus_low_rank(self, factors: Tensor, inner: Tensor) -> Operator:
        """``self − F K Fᵀ`` for a (size, r) matrix F and an r × r matrix K, without extra
        backend products."""
        return dataclasses.replace(
            self,
            matmat=lambda V: self.matmat(V) - factors @ (inner @ long_matmul(factors.T, V)),
            native={},
        )

    def clock(self) -> tuple[float, int]:
        """Wall time and data passes now, for ``provenance``."""
        return time.perf_counter(), self.passes()

    def provenance(
        self, routine: str, columns: int, started: tuple[float, int], note: str = ""
    ) -> Provenance:
        """The record of a routine that applied this operator to ``columns`` vectors since
        ``started`` (a ``clock()`` reading)."""
        return Provenance(
            backend=self.backend,
            routine=routine,
            matvecs=columns * self.cost,
            seconds=time.perf_counter() - started[0],
            derived=self.derived,
            note="; ".join(filter(None, [note, self.note()])),
            passes=self.passes() - started[1],
        )


def top_eigen(
    op: Operator, k: int, options: Options, seed: int, native: bool = True, what: str = ""
) -> tuple[EigenResult, Provenance]:
    """The k algebraically largest eigenpairs of ``what`` (words for a warning): the native
    routine, else curvkit's Lanczos. Unconverged pairs are approximate: the provenance says
    "not converged" and a warning says what would help."""
    routine = (native and op.native.get("top_eigen")) or functools.partial(_lanczos, op)
    result, provenance = _every_copy(op, *routine(k, options, seed), options, seed)
    if not native:  # curvkit's, in place of a native routine (``instead``), which says the rest
        return result, provenance
    if not result.converged:
        provenance.note = "; ".join(filter(None, ["not converged", provenance.note]))
        advice = result.stopped_by or (
            "raise lanczos_max_iter, or the backend's own iteration limit"
        )
        warn(
            f"{provenance.routine} for {what or 'an operator'} did not converge in "
            f"{result.matvecs} products; the top eigenvalues are approximate ({advice})."
        )
    return result, provenance


def _every_copy(
    op: Operator, result: EigenResult, provenance: Provenance, options: Options, seed: int
) -> tuple[EigenResult, Provenance]:
    """``result`` with every copy of a repeated eigenvalue among the top k. A Krylov method
    started from one vector sees one direction of each eigenspace, and further copies only
    through rounding: a zero-initialised linear classifier's G, whose top eigenvalue is
    9-fold, got 6 copies from curvkit's Lanczos and 5 from scipy's eigsh, the rest of its top
    12 from the next eigenvalue, with ``converged: True``. Where converged values tie (within
    ``lanczos_tol`` of the largest), curvkit's Lanczos runs on the operator deflated by the
    pairs found, (I − UUᵀ) A (I − UUᵀ), until it finds nothing above θ_k; what it finds above
    takes the place of the smallest."""
    found = 0
    while result.converged and _ties(result.values, options.lanczos_tol):
        u = result.vectors
        deflated = dataclasses.replace(
            op,
            matmat=lambda V, u=u: _deflated(op.matmat(_deflated(V, u)), u),
            native={},
            budget=lambda u=u: None if op.budget() is None else op.budget() - u.numel() * u.element_size(),
        )  # fmt: skip
        try:
            extra, _ = _lanczos(deflated, result.values.numel(), options, seed + 1 + found)
        except UnsupportedError as error:  # no room beside the pairs found: unverified
            result.converged, result.stopped_by = False, f"ties left unchecked: {error}"
            break
        provenance.matvecs += extra.matvecs
        scale = max(float(result.values.abs().max()), 1e-300)
        if float(extra.values[0]) <= float(result.values[-1]) + options.lanczos_tol * scale:
            if not extra.converged:  # nothing above θ_k, as far as it got
                result.converged, result.stopped_by = False, extra.stopped_by
            break
        values = torch.cat([result.values, extra.values.to(result.values)])
        order = torch.argsort(values, descending=True)[: result.values.numel()]
        found += int((order >= result.values.numel()).sum())
        result = EigenResult(
            values[order],
            torch.cat([result.vectors, extra.vectors], dim=1)[:, order.to(result.vectors.device)],
            torch.cat([result.residuals, extra.residuals.to(result.residuals)])[order],
            result.matvecs + extra.matvecs,
            extra.converged,
            extra.stopped_by,
        )
    if found:
        provenance.note = "; ".join(filter(None, [
            provenance.note, f"{found} more copies of repeated eigenvalues by deflated Lanczos"
        ]))  # fmt: skip
    return result, provenance


def _ties(values: Tensor, tol: float) -> bool:
    """Whether two of the descending ``values`` above the last lie within ``tol`` of the
    largest magnitude of each other (a missed copy of the last changes no value: the zeros of
    a null space tie there)."""
    scale = max(float(values.abs().max()), 1e-300)
    above = values[values > values[-1] + tol * scale]
    return bool((above[:-1] - above[1:] <= tol * scale).any())


def _deflated(V: Tensor, u: Tensor) -> Tensor:
    """``(I − uuᵀ) V`` for orthonormal columns u."""
    return V - u @ long_matmul(u.T, V)


def _lanczos(op: Operator, k: int, options: Options, seed: int) -> tuple[EigenResult, Provenance]:
    """curvkit's Lanczos for the k algebraically largest eigenpairs, its basis capped by the
    memory budget."""
    block = lanczos_block(k, options)
    max_iter = min(op.size, options.lanczos_max_iter or default_max_iter(k, block))
    room, budget = op.room()
    capped = ""
    if room is not None:
        fits = room - lanczos_extra_vectors(k, block)  # the basis that fits beside the rest
        if fits < k + block:  # analyze refuses this before computing (least_vectors)
            raise UnsupportedError(
                f"Lanczos for the top {k} eigenpairs needs at least "
                f"{op.vectors_text(k + block + lanczos_extra_vectors(k, block))}, beyond "
                f"half the memory budget, {memory_text(budget)}; lower top_k or select fewer "
                "parameters with params=[...]."
            )
        if fits < max_iter:
            max_iter = fits
            capped = (
                f"Lanczos's basis capped at {fits} vectors by half the memory budget, "
                f"{memory_text(budget)}"
            )
    started = op.clock()
    result = lanczos(
        op.matmat,
        op.size,
        k,
        tol=options.lanczos_tol,
        max_iter=max_iter,
        block=block,
        seed=seed,
        dtype=op.dtype,
        device=op.device,
        progress=options.progress,
    )
    if capped and not result.converged:
        result.stopped_by = f"{capped}; select fewer parameters with params=[...] or free memory"
    return result, op.provenance("curvkit.lanczos", result.matvecs, started, capped)


def lanczos_block(k: int, options: Options) -> int:
    """The block size of curvkit's Lanczos for the top ``k``: never more than k, as
    ``lanczos`` takes it (a memory need reckoned with a larger one refused runs that fit)."""
    return min(options.lanczos_block, k) if options.lanczos_block else min(4, -(-k // 4))


def least_vectors(k: int, size: int, options: Options, density: bool = True) -> int:
    """The fewest vectors of an operator's ``size`` that curvkit's routines need at once for
    its top ``k`` eigenpairs, trace and (when asked) density: Lanczos's basis of k + block
    vectors beside the Ritz vectors and products, and one SLQ probe's basis. The trace's
    probes and the density's further probes stream through what is left."""
    k = min(k, size)
    block = lanczos_block(k, options)
    least = k + block + lanczos_extra_vectors(k, block)
    if density and options.density_probes:
        least = max(least, min(options.density_steps, size) + SLQ_EXTRA_VECTORS)
    return least


def trace(
    op: Operator, options: Options, seed: int, native: bool = True
) -> tuple[TraceEstimate, Provenance]:
    """The trace ± standard error: the native routine, else curvkit's Hutch++ or Hutchinson
    with ``trace_matvecs`` products (exact when the operator is no larger than that)."""
    if native and "trace" in op.native:
        return op.native["trace"](options, seed)
    method, products = options.trace_method, options.trace_matvecs
    exact = op.size <= products  # unit vectors and their products
    need = 2 * op.size if exact else HELD_PER_MATVEC[method] * products
    room, budget = op.room()
    chunk, note = None, ""
    if room is not None and need > room:
        # Hutchinson and the exact trace stream: their vectors a chunk at a time
        chunk = room // HELD_PER_MATVEC["hutchinson"]
        if chunk < 1:
            raise UnsupportedError(
                f"a trace estimate needs at least {op.vectors_text(3)}, beyond half the "
                f"memory budget, {memory_text(budget)}; select fewer parameters with "
                "params=[...]."
            )
        done = "unit vectors" if exact else f"{method} with {products} products"
        note = (
            f"{'exact' if exact else 'Hutchinson'} in chunks of {chunk} vectors: {done} at "
            f"once would hold {op.memory(need)}, beyond half the memory budget, "
            f"{memory_text(budget)}"
        )
        method = "hutchinson"
    started = op.clock()
    result = estimate_trace(
        op.matmat,
        op.size,
        products,
        method=method,
        seed=seed,
        dtype=op.dtype,
        device=op.device,
        chunk=chunk,
    )
    return result, op.provenance(f"curvkit.{result.method}", result.matvecs, started, note)


def density(
    op: Operator, options: Options, seed: int, native: bool = True
) -> tuple[Density, Provenance]:
    """The spectral density by SLQ: the native routine, else curvkit's."""
    if native and "density" in op.native:
        return op.native["density"](options, seed)
    probes, steps = options.density_probes, min(options.density_steps, op.size)
    room, budget = op.room()
    group, note = probes, ""
    if room is not None and probes * (steps + SLQ_EXTRA_VECTORS) > room:
        group = room // (steps + SLQ_EXTRA_VECTORS)
        if group < 1:
            raise UnsupportedError(
                f"one SLQ probe of {steps} steps needs "
                f"{op.vectors_text(steps + SLQ_EXTRA_VECTORS)}, beyond half the memory "
                f"budget, {memory_text(budget)}; lower density_steps or select fewer "
                "parameters with params=[...]."
            )
        note = (
            f"SLQ's probes {group} at a time: all {probes} at once would hold "
            f"{op.memory(probes * (steps + SLQ_EXTRA_VECTORS))}, beyond half the memory "
            f"budget, {memory_text(budget)}"
        )
    started = op.clock()
    result = slq_density(
        op.matmat,
        op.size,
        num_probes=options.density_probes,
        num_steps=options.density_steps,
        grid_size=options.density_grid,
        relative_sigma=options.density_relative_sigma,
        seed=seed,
        dtype=op.dtype,
        device=op.device,
        progress=options.progress,
        group=group,
    )
    return result, op.provenance("curvkit.slq", result.matvecs, started, note)


def instead(
    routine: Callable[..., tuple[Any, Provenance]],
    op: Operator,
    *args: Any,
    why: str,
    derived: bool | None = None,
) -> tuple[Any, Provenance]:
    """curvkit's own ``routine`` (top_eigen, trace or density) on ``op``'s products where the
    backend's native one cannot serve; provenance says ``why`` (and ``derived`` if given)."""
    result, provenance = routine(op, *args, native=False)
    provenance.note = "; ".join(filter(None, [why, provenance.note]))
    if derived is not None:
        provenance.derived = derived
    return result, provenance
