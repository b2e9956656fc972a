"""The Backend base class: primitives over the whole data set, plus overridable routines.

A backend adapter is thin. It implements the primitives its library computes (``hvp``,
``ggnvp``, ``class_deltas``, ``kronecker_factors``) on flat parameter vectors, normalised to the
data-set mean ``(1/N) Σ_i``. The routines (``top_eigen``, ``trace``, ``density``) default to
curvkit's own matrix-free numerics on those matvecs; a backend whose library has its own routine
overrides them and says so in the returned provenance.
"""

from __future__ import annotations

import copy
import importlib.metadata
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from curvkit.distributed import all_reduce_float
from curvkit.errors import InvalidInputError, UnsupportedError
from curvkit.linalg import Density, EigenResult, TraceEstimate, estimate_trace, lanczos, slq_density
from curvkit.problem import Problem

PRIMITIVES = ("hvp", "ggnvp", "class_deltas", "kronecker_factors")
MATRICES = ("hessian", "ggn", "residual")


@dataclass
class Provenance:
    """Where a number came from: backend, routine, matvecs used, wall time, derived or native."""

    backend: str
    routine: str
    matvecs: int = 0
    seconds: float = 0.0
    derived: bool = False
    note: str = ""


@dataclass
class ClassDeltas:
    """Per-class sums of Papyan's ``δ_{i,c'} = sqrt(p_{i,c'}) J_iᵀ(e_{c'} − p_i)``.

    ``sums[c, c']`` = Σ_{i: y_i = c} δ_{i,c'} (shape C × C × P); ``counts[c]`` = n_c;
    ``square_norm_sum`` = Σ_i Σ_{c'} ‖δ_{i,c'}‖² = N · tr G when the backend has per-example
    factors, else None.
    """

    sums: Tensor
    counts: Tensor
    square_norm_sum: float | None
    provenance: Provenance

    def all_reduced(self, problem: Problem) -> ClassDeltas:
        """The sums over every rank's shard (``self`` without a process group)."""
        if problem.group is None:
            return self
        norms = self.square_norm_sum
        return ClassDeltas(
            problem.all_reduce(self.sums),
            problem.all_reduce(self.counts),
            None if norms is None else all_reduce_float(norms, problem.group),
            self.provenance,
        )


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


@dataclass
class Options:
    """Settings of the matrix-free routines (curvkit's own and the backends' native ones)."""

    lanczos_tol: float = 1e-6
    lanczos_max_iter: int | None = None
    trace_method: str = "hutch++"
    trace_matvecs: int = 99
    density_probes: int = 5
    density_steps: int = 50
    density_grid: int = 400
    density_relative_sigma: float = 0.01
    progress: bool = False
    backend: dict[str, dict[str, Any]] = field(default_factory=dict)  # per backend name


class Backend:
    """Base class of the curvkit backends.

    Subclasses set ``name``, ``library`` (the distribution whose version is reported),
    ``extra`` (the pip extra that installs it) and ``capabilities``: for each primitive or routine
    the backend provides, ``"native"`` (its library computes it) or ``"derived"`` (built from the
    library's other primitives).
    """

    name: ClassVar[str] = ""
    library: ClassVar[str | None] = None
    extra: ClassVar[str | None] = None
    capabilities: ClassVar[Mapping[str, str]] = {}
    default_settings: ClassVar[Mapping[str, Any]] = {}  # options.backend[name] keys and defaults

    def __init__(self, problem: Problem, options: Options | None = None) -> None:
        self.problem = problem
        self.options = options or Options()
        self.config = self._read_settings()

    def _read_settings(self) -> dict[str, Any]:
        """This backend's own settings, ``options.backend[name]``, over ``defaults``.

        Each value is converted to the type of its default; an unknown key is an error.
        """
        defaults = self.default_settings
        given = dict(self.options.backend.get(self.name) or {})
        unknown = sorted(set(given) - set(defaults))
        if unknown:
            raise InvalidInputError(
                f"unknown setting(s) {', '.join(unknown)} for backend {self.name!r}; its settings "
                f"are {', '.join(sorted(defaults)) or 'none'}."
            )
        merged = dict(defaults)
        for key, value in given.items():
            try:
                merged[key] = type(defaults[key])(value)
            except (TypeError, ValueError) as error:
                raise InvalidInputError(
                    f"setting {key!r} of backend {self.name!r} must be a "
                    f"{type(defaults[key]).__name__}, got {value!r}."
                ) from error
        return merged

    # -- availability ---------------------------------------------------------------------------
    @classmethod
    def check_available(cls) -> None:
        """Raise MissingDependencyError when the backend's library cannot be imported."""

    @classmethod
    def version(cls) -> str | None:
        if cls.library is None:
            return None
        try:
            return importlib.metadata.version(cls.library)
        except importlib.metadata.PackageNotFoundError:
            return None

    # -- primitives -----------------------------------------------------------------------------
    def unsupported(self, what: str) -> UnsupportedError:
        """The error for a primitive this backend lacks, naming the installed ones that have it."""
        from curvkit.registry import backends

        providers = [
            name
            for name, row in backends().items()
            if row["installed"] and what in row["capabilities"]
        ]
        hint = f"; use one of {', '.join(providers)}" if providers else ""
        return UnsupportedError(f"backend {self.name!r} does not provide {what}{hint}.")

    def hvp(self, v: Tensor) -> Tensor:
        """Hessian–vector product ``∇²L v`` of the data-set loss (flat vectors)."""
        raise self.unsupported("hvp")

    def ggnvp(self, v: Tensor) -> Tensor:
        """Gauss–Newton–vector product ``G v = (1/N) Σ_i J_iᵀ (diag p_i − p_i p_iᵀ) J_i v``."""
        raise self.unsupported("ggnvp")

    def class_deltas(self) -> ClassDeltas:
        """Per-class sums of δ_{i,c'} over the data set (one pass)."""
        raise self.unsupported("class_deltas")

    def kronecker_factors(self) -> dict[str, KroneckerFactors]:
        """Kronecker factors of every supported layer's weight, keyed by module name."""
        raise self.unsupported("kronecker_factors")

    def matvec(self, matrix: str) -> Callable[[Tensor], Tensor]:
        """The matvec of ``hessian``, ``ggn`` or ``residual`` (= Hess − G)."""
        if matrix == "hessian":
            return self.hvp
        if matrix == "ggn":
            return self.ggnvp
        if matrix == "residual":
            return lambda v: self.hvp(v) - self.ggnvp(v)
        raise ValueError(f"unknown matrix {matrix!r}; use one of {MATRICES}")

    def block_matvec(self, matrix: str, name: str) -> Callable[[Tensor], Tensor]:
        """``v ↦ (A (0, …, v, …, 0))_W``: the diagonal block of ``matrix`` for parameter ``name``.

        By default a slice of the full product (as costly as a full product); backends whose
        library differentiates with respect to one parameter override this (``block_products``).
        """
        where = self.problem.slice_of(name)
        full = self.matvec(matrix)

        def apply(v: Tensor) -> Tensor:
            embedded = self.zeros()
            embedded[where] = v
            return full(embedded)[where]

        return apply

    def matvecs_per_product(self, matrix: str) -> int:
        return 2 if matrix == "residual" else 1

    # -- routines (curvkit's defaults; native libraries override) -------------------------------
    def _numerics_kwargs(self) -> dict[str, Any]:
        return {"dtype": self.problem.dtype, "device": self.problem.device}

    def top_eigen(self, matrix: str, k: int, seed: int) -> tuple[EigenResult, Provenance]:
        start = time.perf_counter()
        result = lanczos(
            self.matvec(matrix),
            self.problem.num_params,
            k,
            tol=self.options.lanczos_tol,
            max_iter=self.options.lanczos_max_iter,
            seed=seed,
            progress=self.options.progress,
            **self._numerics_kwargs(),
        )
        return result, self._provenance("curvkit.lanczos", matrix, result.matvecs, start)

    def trace(self, matrix: str, seed: int) -> tuple[TraceEstimate, Provenance]:
        start = time.perf_counter()
        result = estimate_trace(
            self.matvec(matrix),
            self.problem.num_params,
            self.options.trace_matvecs,
            method=self.options.trace_method,
            seed=seed,
            **self._numerics_kwargs(),
        )
        return result, self._provenance(f"curvkit.{result.method}", matrix, result.matvecs, start)

    def density(self, matrix: str, seed: int) -> tuple[Density, Provenance]:
        start = time.perf_counter()
        result = slq_density(
            self.matvec(matrix),
            self.problem.num_params,
            num_probes=self.options.density_probes,
            num_steps=self.options.density_steps,
            grid_size=self.options.density_grid,
            relative_sigma=self.options.density_relative_sigma,
            seed=seed,
            progress=self.options.progress,
            **self._numerics_kwargs(),
        )
        return result, self._provenance("curvkit.slq", matrix, result.matvecs, start)

    def _provenance(
        self, routine: str, matrix: str, products: int, start: float, note: str = ""
    ) -> Provenance:
        needs = {"hessian": ("hvp",), "ggn": ("ggnvp",), "residual": ("hvp", "ggnvp")}[matrix]
        derived = any(self.capabilities.get(p) == "derived" for p in needs)
        return Provenance(
            backend=self.name,
            routine=routine,
            matvecs=products * self.matvecs_per_product(matrix),
            seconds=time.perf_counter() - start,
            derived=derived,
            note=note,
        )

    def check_batch_memory(self, what: str, floats_per_example: int) -> None:
        """Refuse, before allocating, a per-batch tensor that would not fit in free memory.

        ``floats_per_example`` × the largest batch × the dtype's size is compared with half the
        free memory (CPU: available physical pages; CUDA: ``torch.cuda.mem_get_info``).
        """
        per_example = floats_per_example * self.problem.dtype.itemsize
        needed = per_example * self.problem.summary.max_batch
        free = free_memory(self.problem.device)
        if free is not None and needed > free / 2:
            largest = max(1, int(free / 2 // per_example))
            raise InvalidInputError(
                f"{what} for a batch of {self.problem.summary.max_batch} examples needs about "
                f"{needed / 2**30:.1f} GiB, but only {free / 2**30:.1f} GiB are free; use batches "
                f"of at most {largest} examples, or a backend with weighted gradient passes "
                "(pyhessian, curvlinops), which hold only C × C × P numbers."
            )

    def model_copy(self) -> tuple[torch.nn.Module, list[Tensor]]:
        """A deep copy of the model in eval mode, only the selected parameters requiring
        gradients, and those parameters in the order of ``problem.names`` (for libraries that
        change or hook the model they work on)."""
        model = copy.deepcopy(self.problem.model).eval()
        named = dict(model.named_parameters())
        selected = set(self.problem.names)
        for n, p in named.items():
            p.requires_grad_(n in selected)
        return model, [named[n] for n in self.problem.names]

    # -- helpers for adapters ---------------------------------------------------------------------
    def zeros(self) -> Tensor:
        return torch.zeros(
            self.problem.num_params, dtype=self.problem.dtype, device=self.problem.device
        )


def free_memory(device: torch.device) -> int | None:
    """Free memory in bytes on ``device`` (CPU: Linux's available pages), or None if unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


class CountingBatches:
    """The problem's batches as a re-iterable for libraries that take a loader, counting passes."""

    def __init__(self, problem: Problem) -> None:
        self.problem = problem
        self.passes = 0

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        self.passes += 1
        return self.problem.batches()


def kronecker_layers(problem: Problem) -> list[str]:
    """Names of the Linear and Conv2d modules whose weight is among the selected parameters."""
    selected = set(problem.names)
    return [
        name
        for name, m in problem.model.named_modules()
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and f"{name}.weight" in selected
    ]


def kronecker_shape(module: torch.nn.Module) -> tuple[int, int]:
    """(n, m) of a layer's weight as a matrix: out features × (in features · kernel size)."""
    weight = module.weight
    return weight.shape[0], weight[0].numel()


def output_positions(model: torch.nn.Module, names: list[str], x: Tensor) -> dict[str, int]:
    """Output positions T per layer (1 for Linear, H·W for Conv2d) from one example's forward
    pass through ``model`` (the adapter's copy: the hooks are removed afterwards); no pass
    without a Conv2d."""
    modules = dict(model.named_modules())
    if not any(isinstance(modules[n], torch.nn.Conv2d) for n in names):
        return dict.fromkeys(names, 1)
    positions: dict[str, int] = {}

    def record(name: str):
        def hook(_module: torch.nn.Module, _args: Any, output: Tensor) -> None:
            positions[name] = output[0, 0].numel()

        return hook

    handles = [modules[n].register_forward_hook(record(n)) for n in names]
    try:
        with torch.no_grad():
            model(x[:1])
    finally:
        for handle in handles:
            handle.remove()
    return {n: positions[n] if isinstance(modules[n], torch.nn.Conv2d) else 1 for n in names}


def unfolded_input(module: torch.nn.Module, inputs: Tensor) -> Tensor:
    """A layer's input as (batch, m, positions): Linear inputs as one position, Conv2d unfolded."""
    if isinstance(module, torch.nn.Conv2d):
        if module.groups != 1 or module.padding_mode != "zeros":
            raise UnsupportedError(
                f"Kronecker factors of Conv2d need groups=1 and zero padding, got groups="
                f"{module.groups}, padding_mode={module.padding_mode!r}."
            )
        return torch.nn.functional.unfold(
            inputs, module.kernel_size, module.dilation, module.padding, module.stride
        )
    return inputs.reshape(inputs.shape[0], -1, 1)


def class_deltas_by_gradient_passes(
    problem: Problem,
    model: torch.nn.Module,
    params: list[Tensor],
    backend: str,
    progress: bool = False,
) -> ClassDeltas:
    """Σ_{y_i=c} δ_{i,c'} from weighted gradient passes, for libraries without per-example factors.

    Since ``δ_{i,c'} = −sqrt(p_{i,c'}) ∇ℓ(f(x_i), c')``, the group sum for (c, c') is minus the
    gradient of ``Σ_{y_i=c} sqrt(p_{i,c'}) ℓ(f(x_i), c')`` with the weights held constant: C
    backward passes per class and batch (about C full backward passes over the data in all).
    ``params`` are the tensors of ``model`` in the order of ``problem.names``.
    """
    start = time.perf_counter()
    c, p = problem.num_classes, problem.num_params
    sums = torch.zeros(c, c, p, dtype=problem.dtype, device=problem.device)
    counts = torch.zeros(c, dtype=torch.long)
    for x, y in problem.batches_with_progress("class sums", progress):
        counts += torch.bincount(y.cpu(), minlength=c)
        for label in y.unique().tolist():
            logits = model(x[y == label])
            weights = torch.softmax(logits.detach(), dim=1).sqrt()
            log_probs = torch.log_softmax(logits, dim=1)  # ℓ(f, c') = −log p_{c'}
            for other in range(c):
                weighted = (weights[:, other] * log_probs[:, other]).sum()  # = −Σ w ℓ
                grads = torch.autograd.grad(weighted, params, retain_graph=other < c - 1)
                sums[label, other] += problem.flatten(grads)
    provenance = Provenance(
        backend,
        "autograd weighted gradient passes",
        seconds=time.perf_counter() - start,
        derived=True,
    )
    return ClassDeltas(sums, counts, None, provenance).all_reduced(problem)
