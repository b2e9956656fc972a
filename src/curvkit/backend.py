"""The Backend base class: it owns the loop over the data; adapters supply their library's part.

An adapter whose library works on one batch supplies batch sums over the batch's examples:

- ``batch_hvp(x, y, V, param)`` and ``batch_ggnvp(x, y, V, param)``: ``Σ_i ∇²ℓ_i V`` and
  ``Σ_i J_iᵀ H_i J_i V`` for a block V of k flat columns, with respect to every selected
  parameter (``param=None``) or to the one named ``param`` (its diagonal block);
- ``batch_class_deltas(x, y)``: Papyan's per-example factors ``δ_{i,c'}`` as (B, C, P);
- ``batch_kronecker(x, y)``: per layer, ``Σ_i M_i`` and ``Σ_i A_i`` (see KroneckerFactors);
- optionally ``batch_residual(x, y, V, param)``: ``Σ_i (∇²ℓ_i − J_iᵀ H_i J_i) V`` in one product
  (by default the difference of the two above).

The base class iterates the batches, divides by N, sums over the ranks under torch.distributed
and counts data passes. An adapter whose library loops over the data itself (PyHessian, curvlinops'
operators) overrides the whole-data methods (``hvp``, ``ggnvp``, ``kronecker_factors``)
instead. ``operator(matrix, param)`` wraps the products as a linear operator for the routines
(``curvkit.linalg.operator``), with the library's own routines attached by
``native_routines``. Capabilities are declared: a ``class_deltas`` capability of ``"native"``
means per-example factors, ``"derived"`` only the gradient routes (batched vector–Jacobian
products on the adapter's model copy), which every backend has for models too large for
per-example factors (``class_sums_route``).
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import math
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from curvkit.distributed import all_gather_objects, all_reduce_float
from curvkit.errors import (
    InvalidInputError,
    MissingDependencyError,
    UnsupportedError,
    finite,
    listed,
    memory_text,
    shown,
)
from curvkit.features import deep_copy
from curvkit.layers import kronecker_layers, kronecker_plan
from curvkit.linalg.operator import (
    CLASS_SUMS_ROUTES,
    Operator,
    Options,
    integer,
    positive_number,
)
from curvkit.problem import Problem, evaluation_mode
from curvkit.report import Provenance

MATRICES = ("hessian", "ggn", "residual")
# the primitives each quantity needs from a backend (capabilities)
NEEDS = {
    "hessian": ("hvp",),
    "ggn": ("ggnvp",),
    "residual": ("hvp", "ggnvp"),
    "classmeans": ("class_deltas", "ggnvp"),  # and the Hessian's overlap, where it can
    "layerwise": ("kronecker_factors", "hvp", "ggnvp"),
}
ROUTINES = {
    "per-example": "per-example factors",
    "gradients": "weighted gradient passes",
    "means": "class-mean gradient passes",
}
# E[M] ⊗ E[aaᵀ] assumes each layer runs once per example; every backend's Hessian products
# come from autograd's or torch.func's second derivatives (every backend)
SHARED_LIMITS = {
    "shared_parameters": ("kronecker_factors",),
    # every backend's Kronecker factors and class sums by gradient passes run on a copy
    "uncopied_forward": ("class_deltas", "kronecker_factors"),
    "wrong_hessian": ("hvp",),
    "wrong_jacobian_products": ("hvp", "ggnvp"),
}


@functools.cache
def _import_quietly(module: str | None) -> None:
    """Import ``module`` (None: none) and load torch's forward-mode AD, once per process. Both
    run ``torch.jit.script``, which torch 2.14 deprecates with a FutureWarning nothing a user
    can act on: silenced here (a failed import is not cached, so it is tried again)."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", r"`torch\.jit\.script` is deprecated", category=FutureWarning
        )
        torch.func.jvp(torch.sin, (torch.zeros(()),), (torch.ones(()),))
        if module is not None:
            importlib.import_module(module)


@dataclass
class ClassDeltas:
    """Per-class sums of Papyan's ``δ_{i,c'} = sqrt(p_{i,c'}) J_iᵀ(e_{c'} − p_i)``.

    ``sums[c, c']`` = Σ_{i: y_i = c} δ_{i,c'} (C × C × P), except on the ``means`` route, where
    ``sums[c]`` = (Σ_{y_i=c} δ_{i,c}, Σ_{y_i=c} (1/(C−1)) Σ_{c'≠c} δ_{i,c'}) (C × 2 × P);
    ``counts[c]`` = n_c; ``square_norm_sum`` = Σ_i Σ_{c'} ‖δ_{i,c'}‖² = N · tr G on the
    per-example route, else None; ``route``: one of CLASS_SUMS_ROUTES; ``log_sqrt_p[0, c, c']``
    and ``log_sqrt_p[1, c, c']``: Σ_{i: y_i = c} of log10 √p_{i,c'} and of its square (the
    weights' spread within each group, which decides how well the group means summarise the δ).
    """

    sums: Tensor
    counts: Tensor
    square_norm_sum: float | None
    route: str
    provenance: Provenance
    log_sqrt_p: Tensor


@dataclass
class KroneckerFactors:
    """A layer's Kronecker factors ``B = E[M]`` (n × n) and ``A = E[a aᵀ]`` (m × m).

    Conv2d (weight n × m, m = in channels · kernel size, T output positions): ``B`` is the bias's
    Gauss–Newton block (the output Jacobian summed over positions, KFAC-reduce's factor) and ``A``
    the mean over positions of the unfolded patches' outer products (KFAC-expand's factor),
    ``A = (1/N) Σ_i (1/T) Σ_s ã_{i,s} ã_{i,s}ᵀ``. Then ``B ⊗ A`` is exact when every position sees
    the same patch, and of the block's scale in general (summing over positions in both
    factors, as BackPACK's KFLR does, makes it about T times too large).
    """

    B: Tensor
    A: Tensor


class Backend:
    """Base class of the curvkit backends.

    Subclasses set ``name``, ``library`` (the distribution whose version is reported),
    ``module`` (what to import to check that it is installed), ``extra`` (the pip extra that
    installs it), ``capabilities`` (for each primitive or routine it provides, ``"native"`` or
    ``"derived"``), ``default_settings`` / ``choices`` for its own settings, given as
    ``options.backend[name]`` (per quantity too: ``configure`` reads them again), and
    ``limits``: for each model feature its library cannot handle (see curvkit.features), the
    primitives or native routines that feature breaks.
    """

    name: ClassVar[str] = ""
    library: ClassVar[str | None] = None
    module: ClassVar[str | None] = None
    extra: ClassVar[str | None] = None
    capabilities: ClassVar[Mapping[str, str]] = {}
    default_settings: ClassVar[Mapping[str, Any]] = {}
    choices: ClassVar[Mapping[str, tuple[Any, ...]]] = {}
    limits: ClassVar[Mapping[str, tuple[str, ...]]] = {}

    def __init__(self, problem: Problem, options: Options | None = None) -> None:
        self.check_available()  # also for an adapter made directly, not through get_backend
        self.problem = problem
        self.passes = 0
        self._working_copy: tuple[torch.nn.Module, list[Tensor]] | None = None
        self._kronecker_plan: tuple[list[str], dict[str, str]] | None = None
        self.configure(options or Options())

    def configure(self, options: Options) -> None:
        """Use ``options`` from now on; this backend's settings are validated and read anew."""
        self.options, self.config = options, self.settings(options)

    @classmethod
    def settings(cls, options: Options) -> dict[str, Any]:
        """This backend's settings in ``options.backend``, over its defaults, each checked."""
        defaults = cls.default_settings
        given = dict(options.backend.get(cls.name) or {})
        unknown = sorted(set(given) - set(defaults), key=str)
        if unknown:
            raise InvalidInputError(
                f"unknown setting(s) {listed(str(u)[:40] for u in unknown)} for backend {cls.name!r}; its settings "
                f"are {', '.join(sorted(defaults)) or 'none'}."
            )
        config = dict(defaults)
        for key, value in given.items():
            what = f"setting {key!r} of backend {cls.name!r}"
            if isinstance(defaults[key], int):  # counts: iterations, samples
                config[key] = integer(what, value, 1)
            elif isinstance(defaults[key], float):  # tolerances
                config[key] = positive_number(what, value, 0.0)
            elif not isinstance(value, str):
                raise InvalidInputError(f"{what} must be a string, got {shown(value)}.")
            else:
                config[key] = value
            allowed = cls.choices.get(key)
            if allowed is not None and config[key] not in allowed:
                raise InvalidInputError(
                    f"{what} must be one of {', '.join(map(str, allowed))}, got {shown(value)}."
                )
        return config

    # -- availability ---------------------------------------------------------------------------
    @classmethod
    def check_available(cls) -> None:
        """Raise MissingDependencyError when the backend's library cannot be imported."""
        try:
            _import_quietly(cls.module)
        except ImportError as error:
            raise MissingDependencyError(
                f"backend {cls.name!r} needs {cls.library}; install it with "
                f"pip install 'curvkit[{cls.extra}]'."
            ) from error

    @classmethod
    def version(cls) -> str | None:
        if cls.library is None:
            return None
        try:
            return importlib.metadata.version(cls.library)
        except importlib.metadata.PackageNotFoundError:
            return None

    # -- what this backend can do for this model -------------------------------------------------
    def broken_by(self, primitive: str) -> str | None:
        """The model feature that keeps this backend's ``primitive`` from being right, if any."""
        for feature, where in self.problem.features.items():
            if primitive in self.limits.get(feature, ()) + SHARED_LIMITS.get(feature, ()):
                return where
        return None

    def _broken(self, primitive: str) -> str | None:
        """``broken_by`` as the sentence of a refusal."""
        where = self.broken_by(primitive)
        return (
            f"backend {self.name!r} cannot give {primitive} for a model with {where}"
            if where
            else None
        )

    def refusal(self, quantity: str) -> str | None:
        """Why this backend cannot compute ``quantity`` for this model (None when it can), found
        before anything is computed: a missing capability, a model feature its library cannot
        handle, or Papyan's class sums beyond the memory budget. Adapters add their library's
        own checks."""
        missing = [n for n in NEEDS[quantity] if n not in self.capabilities]
        if missing:
            return (
                f"backend {self.name!r} does not provide {', '.join(missing)}, which {quantity} "
                "needs"
            )
        broken = next(filter(None, map(self._broken, NEEDS[quantity])), None)
        if broken:
            return broken
        if quantity == "classmeans":
            route, why = self.class_sums_route()
            return None if route else why
        if quantity == "layerwise" and not kronecker_layers(self.problem):
            return "the model has no Linear or Conv2d layer whose weight is selected"
        return None

    def kronecker_plan(self) -> tuple[list[str], dict[str, str]]:
        """The layers whose Kronecker factors are computed, and each left-out layer with the
        reason (curvkit.layers.kronecker_plan, against half the memory budget: the smallest
        budget of all ranks, so that every rank keeps the same layers). Decided once."""
        if self._kronecker_plan is None:
            self._kronecker_plan = kronecker_plan(self.problem, self.memory_budget())
        return self._kronecker_plan

    def memory_budget(self) -> float | None:
        """Half the memory budget now (curvkit.problem.free_memory), in bytes, the smallest of
        all ranks' so that every rank takes the same route (a collective: every rank calls it
        at the same point); None when unknown."""
        budgets = all_gather_objects(self.problem.half_budget(), self.problem.group)
        known = [b for b in budgets if b is not None]
        return min(known) if known else None

    def class_sums_route(self) -> tuple[str | None, str]:
        """The route of Papyan's class sums (see CLASS_SUMS_ROUTES) and a sentence saying why,
        or (None, the reason for a refusal): the most complete route this backend has that fits
        half the memory budget (curvkit.problem.free_memory), or ``options.class_sums`` when
        named. Memory at the peak, in numbers: the C × C × P group sums, the C class means
        (C × P) and the (C²)² Gram of the group means, and beside them a batch's 2 × B × C × P
        per-example factors or the vector–Jacobian products of one chunk of at most
        ``block_size`` columns (2 × chunk × P with their concatenation); the means route about
        5 C P."""
        c, p, size = self.problem.num_classes, self.problem.num_params, self.problem.dtype.itemsize
        batch = self.problem.summary.max_batch
        structure = (c * c + c) * p + (c * c) ** 2
        need = {
            "per-example": structure + 2 * batch * c * p,
            "gradients": structure + 2 * min(c, self.options.block_size) * p,
            "means": 5 * c * p,
        }
        what = {
            "per-example": f"per-example factors (a batch of {batch}) beside the C² group sums",
            "gradients": "the C² group sums",
            "means": "the own-label and class-mean sums",
        }
        routes = list(CLASS_SUMS_ROUTES)
        if self.capabilities.get("class_deltas") != "native":
            routes.remove("per-example")
        wanted = self.options.class_sums
        if wanted != "auto":
            if wanted not in routes:
                return None, (
                    f"backend {self.name!r} has no per-example factors, which option "
                    "class_sums='per-example' asks for"
                )
            routes = [wanted]
        budget = self.problem.half_budget()  # this rank's: class_deltas gathers the routes
        for route in routes:
            if budget is None or need[route] * size <= budget:
                best = routes[0]
                return route, "" if route == best else (
                    f"the {best} route would need {memory_text(need[best] * size)} "
                    f"({what[best]}), beyond half the memory budget, {memory_text(budget)}"
                )
        last = routes[-1]
        return None, (
            f"Papyan's class means for C = {c} and P = {p} need at least "
            f"{memory_text(need[last] * size)} ({what[last]}), but half the memory budget is "
            f"{memory_text(budget)}; select fewer parameters with params=[...] (e.g. the "
            "last layers)"
        )

    def require(self, primitive: str) -> None:
        """Raise UnsupportedError when a model feature breaks ``primitive`` for this backend."""
        broken = self._broken(primitive)
        if broken:
            raise UnsupportedError(broken + ".")

    def unsupported(self, what: str) -> UnsupportedError:
        return UnsupportedError(
            f"backend {self.name!r} does not provide {what}; `curvkit backends` lists the "
            "backends that do."
        )

    # -- the data loop ----------------------------------------------------------------------------
    def data_pass(self, desc: str | None = None) -> Iterator[tuple[Tensor, Tensor]]:
        """One pass over this rank's batches (counted; a progress bar when ``desc`` is given)."""
        self.passes += 1
        if desc is None:
            yield from self.problem.batches()
        else:
            yield from self.problem.batches_with_progress(desc, self.options.progress)

    def data_mean(self, batch_sum: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
        """``(1/N) Σ_batches batch_sum(x, y)`` over the whole data set (all ranks)."""
        total: Tensor | None = None
        for x, y in self.data_pass():
            part = batch_sum(x, y)
            total = part if total is None else total + part
        assert total is not None  # Problem refuses empty data
        return self.problem.all_reduce(total / self.problem.num_samples)

    # -- per-batch primitives (sums over the batch's examples) ----------------------------------
    def batch_hvp(self, x: Tensor, y: Tensor, V: Tensor, param: str | None) -> Tensor:
        raise self.unsupported("hvp")

    def batch_ggnvp(self, x: Tensor, y: Tensor, V: Tensor, param: str | None) -> Tensor:
        raise self.unsupported("ggnvp")

    def batch_class_deltas(self, x: Tensor, y: Tensor) -> Tensor:
        raise self.unsupported("class_deltas")

    def batch_kronecker(self, x: Tensor, y: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
        raise self.unsupported("kronecker_factors")

    # -- whole-data primitives ------------------------------------------------------------------
    def hvp(self, v: Tensor, param: str | None = None) -> Tensor:
        """``∇²L v`` of the data-set loss for a flat vector or a (size, k) block of columns, in
        one pass over the data; with ``param``, the product with that parameter's diagonal
        block."""
        return self._columns(lambda V: self._block_mean(self.batch_hvp, V, param), v)

    def ggnvp(self, v: Tensor, param: str | None = None) -> Tensor:
        """``G v = (1/N) Σ_i J_iᵀ H_i J_i v`` (H_i the loss's output Hessian), as ``hvp``."""
        return self._columns(lambda V: self._block_mean(self.batch_ggnvp, V, param), v)

    def _block_mean(
        self, batch_product: Callable[..., Tensor], V: Tensor, param: str | None
    ) -> Tensor:
        """One pass: each batch's product with V, in chunks of at most ``options.block_size``
        columns (near-equal widths) to bound the memory a batch's product takes."""
        chunks = torch.tensor_split(V, math.ceil(V.shape[1] / self.options.block_size), dim=1)
        return self.data_mean(
            lambda x, y: torch.cat([batch_product(x, y, c, param) for c in chunks], dim=1)
        )

    def batch_residual(self, x: Tensor, y: Tensor, V: Tensor, param: str | None) -> Tensor:
        """``Σ_i (∇²ℓ_i − J_iᵀ H_i J_i) V``: by default the two products' difference; an adapter
        that can apply the residual in one product (the loss's ``residual_surrogate``)
        overrides it."""
        return self.batch_hvp(x, y, V, param) - self.batch_ggnvp(x, y, V, param)

    def _loops_over_data(self) -> bool:
        """Whether the adapter replaced the base class's loop over the batches for products."""
        cls = type(self)
        return cls.hvp is not Backend.hvp or cls.ggnvp is not Backend.ggnvp

    def product_note(self, matrix: str) -> str:
        """How this backend's products with ``matrix`` ran (for provenance); none by default."""
        return ""

    @staticmethod
    def _columns(product: Callable[[Tensor], Tensor], v: Tensor) -> Tensor:
        """Apply a product on (size, k) blocks to a flat vector or to a block."""
        return finite(product(v) if v.dim() == 2 else product(v[:, None])[:, 0])

    def class_deltas(self) -> ClassDeltas:
        """Papyan's class sums over the data set in one pass, by the route that
        ``class_sums_route`` chooses: per-example factors (``batch_class_deltas``, with tr G
        exactly) or vector–Jacobian products of each class's logits (``add_class_gradients``)."""
        start, passes = time.perf_counter(), self.passes
        if "class_deltas" not in self.capabilities:
            raise self.unsupported("class_deltas")
        self.require("class_deltas")
        # every rank takes the least complete route that any rank can take (memory differs)
        order = [*CLASS_SUMS_ROUTES, None]
        chosen = all_gather_objects(self.class_sums_route(), self.problem.group)
        route, why = max(chosen, key=lambda choice: order.index(choice[0]))
        if route is None:
            raise UnsupportedError(why + ".")
        c, p, dtype, device = (
            self.problem.num_classes,
            self.problem.num_params,
            self.problem.dtype,
            self.problem.device,
        )
        # column j of sums[c] sums S_i mixing[c][:, j] over class c (S_i[:, c'] gives δ_{i,c'})
        eye = torch.eye(c, dtype=dtype, device=device)
        mixing = (
            eye.expand(c, c, c) if route != "means" else torch.stack([eye, (1 - eye) / (c - 1)], 2)
        )
        sums = torch.zeros(c, mixing.shape[2], p, dtype=dtype, device=device)
        counts = torch.zeros(c, dtype=torch.long, device=device)
        log_sqrt_p = torch.zeros(2, c, c, dtype=torch.float64, device=device)
        square_norms: list[float] = []
        for x, y in self.data_pass("class sums"):
            counts += torch.bincount(y, minlength=c)
            with torch.no_grad():
                log10_sqrt_p = self.problem.model(x).double().log_softmax(dim=1) / (
                    2 * math.log(10)
                )
            log_sqrt_p.index_add_(1, y, torch.stack([log10_sqrt_p, log10_sqrt_p**2]))
            if route == "per-example":
                deltas = self.batch_class_deltas(x, y)
                sums.index_add_(0, y, deltas)
                square_norms.append(float((deltas**2).sum()))
            else:
                self.add_class_gradients(x, y, sums, mixing)
        provenance = Provenance(
            self.name,
            ROUTINES[route],
            seconds=time.perf_counter() - start,
            derived=route != "per-example",
            note=why,
            passes=self.passes - passes,
        )
        group = self.problem.group
        return ClassDeltas(
            finite(self.problem.all_reduce(sums)),
            self.problem.all_reduce(counts).cpu(),
            all_reduce_float(math.fsum(square_norms), group) if route == "per-example" else None,
            route,
            provenance,
            self.problem.all_reduce(log_sqrt_p),
        )

    def add_class_gradients(self, x: Tensor, y: Tensor, sums: Tensor, mixing: Tensor) -> None:
        """Add ``Σ_{i in batch, y_i=c} J_iᵀ S_i mixing[c]`` to ``sums[c]`` (one row per column of
        ``mixing[c]``), S the loss's square-root output Hessian: a batched vector–Jacobian
        product of each class's logits with the cotangents held constant, in chunks of at most
        ``options.block_size`` columns, on the adapter's model copy (plain autograd)."""
        model, params = self.working_copy()
        for label in y.unique().tolist():
            logits = model(x[y == label])
            sqrt_h = self.problem.loss.sqrt_output_hessian(logits.detach())
            chunks = torch.split((sqrt_h @ mixing[label]).movedim(2, 0), self.options.block_size)
            row = 0
            for i, chunk in enumerate(chunks):
                grads = torch.autograd.grad(
                    logits, params, chunk, is_grads_batched=True, retain_graph=i < len(chunks) - 1
                )
                sums[label, row : row + len(chunk)] += torch.cat(
                    [g.reshape(len(g), -1) for g in grads], 1
                )
                row += len(chunk)

    def kronecker_factors(self) -> dict[str, KroneckerFactors]:
        """Kronecker factors of every selected Linear / Conv2d weight, keyed by module name."""
        self.require("kronecker_factors")
        sums: dict[str, list[Tensor]] = {}
        for x, y in self.data_pass("Kronecker"):
            for name, (b, a) in self.batch_kronecker(x, y).items():
                if name in sums:
                    sums[name][0] += b
                    sums[name][1] += a
                else:
                    sums[name] = [b.detach().clone(), a.detach().clone()]
        n, reduce = self.problem.num_samples, self.problem.all_reduce
        return {
            name: KroneckerFactors(finite(reduce(b / n)), finite(reduce(a / n)))
            for name, (b, a) in sums.items()
        }

    # -- operators ------------------------------------------------------------------------------
    def operator(self, matrix: str, param: str | None = None) -> Operator:
        """``hessian``, ``ggn`` or ``residual`` (= Hess − G) as a linear operator, over every
        selected parameter or over ``param``'s diagonal block, with the native routines."""
        if matrix == "residual":
            op = self.operator("hessian", param).minus(self.operator("ggn", param))
            if not self._loops_over_data():  # both products in one pass
                op.matmat = lambda V: self._columns(
                    lambda W: self._block_mean(self.batch_residual, W, param), V
                )
                if type(self).batch_residual is not Backend.batch_residual:  # in one product
                    op.cost, op.note = 1, lambda: self.product_note("residual")
        elif matrix in ("hessian", "ggn"):
            product = self.hvp if matrix == "hessian" else self.ggnvp
            primitive = "hvp" if matrix == "hessian" else "ggnvp"
            op = Operator(
                self.problem.size_of(param),
                lambda V: product(V, param),
                self.problem.dtype,
                self.problem.device,
                backend=self.name,
                derived=self.capabilities.get(primitive) == "derived",
                passes=lambda: self.passes,
                note=lambda: self.product_note(matrix),
                budget=self.memory_budget,
            )
        else:
            raise ValueError(f"unknown matrix {matrix!r}; use one of {MATRICES}")
        native = self.native_routines(matrix, param, op)
        broken = {r: self.broken_by(r) for r in native}
        op.native = {r: routine for r, routine in native.items() if not broken[r]}
        # curvkit's routine on this backend's products instead, and provenance says why
        why = [f"not {self.name}'s own {r}: {where}" for r, where in broken.items() if where]
        if why:
            product_note = op.note
            op.note = lambda: "; ".join(filter(None, [product_note(), *why]))
        return op

    def native_routines(
        self, matrix: str, param: str | None, op: Operator
    ) -> dict[str, Callable[..., Any]]:
        """The library's own routines for ``op`` (see Operator.native); none by default."""
        return {}

    # -- helpers for adapters ---------------------------------------------------------------------
    def model_copy(self) -> tuple[torch.nn.Module, list[Tensor]]:
        """A deep copy of the model in eval mode, only the selected parameters requiring
        gradients, and those parameters in the order of ``problem.names`` (for libraries that
        change or hook the model they work on)."""
        model = evaluation_mode(deep_copy(self.problem.model))
        named = dict(model.named_parameters())
        selected = set(self.problem.names)
        for n, p in named.items():
            p.requires_grad_(n in selected)
        return model, [named[n] for n in self.problem.names]

    def working_copy(self) -> tuple[torch.nn.Module, list[Tensor]]:
        """One ``model_copy`` kept for this backend's lifetime."""
        if self._working_copy is None:
            self._working_copy = self.model_copy()
        return self._working_copy

    @staticmethod
    def clean(params: list[Tensor], attributes: tuple[str, ...] = ()) -> None:
        """Remove what a library left on parameters: ``.grad`` and the named attributes."""
        for p in params:
            p.grad = None
            for attribute in attributes:
                if hasattr(p, attribute):
                    delattr(p, attribute)


class CountingBatches:
    """The backend's data passes as a re-iterable, for libraries that take a loader."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return self.backend.data_pass()
