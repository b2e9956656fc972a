"""PyHessian backend: PyHessian's own power iteration, Hutchinson trace and SLQ density.

PyHessian 0.1 is unmaintained; its quirks are handled here, never by patching the package's files:

- it switches the model to eval mode and leaves ``.grad`` fields holding graphs
  (``backward(create_graph=True)``), so it runs on a copy of the model, cleaned after each use;
- it differentiates every parameter that requires gradients, so for a layer's block only that
  parameter of the copy requires them (native block products and routines);
- it creates tensors in torch's default dtype, draws probes from torch's global generator and
  calls ``torch.eig``, which torch removed. PyHessian's module therefore sees its own ``torch``
  (``PyHessianTorch``, installed once in ``pyhessian.hessian`` only): while curvkit runs it on a
  thread, tensors it creates get the model's dtype, its draws come from a generator seeded by
  curvkit, and ``torch.eig`` is ``torch.linalg.eigh`` on its symmetric tridiagonal matrix (said
  in provenance). No other module or thread sees any of this, and the caller's RNG does not move.
- it weights each batch's mean loss by the batch size, which is correct for unequal batches.

Every matrix is the Hessian of one of the loss object's criteria (``CrossEntropy.criterion``):
the Hessian that of the loss's second-order model, G that of the Gauss–Newton surrogate
``½ (f − f̄)ᵀ H (f − f̄)``, H = Hess − G that of ``ḡᵀ f``. PyHessian's routines on them give each
exactly (G and H ``derived``), one product per vector, without the cancellation of torch's
cross-entropy double backward when p_top ≈ 1.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from curvkit.backend import MATRICES, Backend, CountingBatches
from curvkit.errors import UnsupportedError, finite
from curvkit.linalg import Density, EigenResult, Operator, Options, TraceEstimate
from curvkit.linalg.krylov import broadened_density
from curvkit.linalg.operator import instead, top_eigen, trace
from curvkit.linalg.trace import SPREAD_SAMPLES, mean_and_stderr
from curvkit.report import Provenance

EIG_NOTE = "torch.eig (removed from torch) answered by torch.linalg.eigh for PyHessian's tridiagonal matrix"


class PyHessianTorch:
    """``torch`` as PyHessian's module sees it: torch itself, except inside ``session`` on the
    current thread, where ``zeros``/``randn`` default to a dtype and random draws come from
    seeded generators; ``eig`` is always ``torch.linalg.eigh`` on a symmetric matrix."""

    def __init__(self) -> None:
        self._local = threading.local()

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    @contextlib.contextmanager
    def session(self, dtype: torch.dtype, seed: int) -> Iterator[None]:
        previous = getattr(self._local, "state", None)  # sessions may nest
        self._local.state = (dtype, seed, {})
        try:
            yield
        finally:
            self._local.state = previous

    def _defaults(self, kwargs: dict[str, Any], dtype: bool, draw_on: Any = None) -> dict[str, Any]:
        """``kwargs`` with the session's dtype (if ``dtype``) and, for a random draw on device
        ``draw_on``, its generator there, where not given; unchanged outside a session."""
        state = getattr(self._local, "state", None)
        if state is None:
            return kwargs
        session_dtype, seed, generators = state
        if dtype:
            kwargs.setdefault("dtype", session_dtype)
        if draw_on is not None:
            device = torch.device(draw_on)
            if device not in generators:
                generators[device] = torch.Generator(device=device).manual_seed(seed)
            kwargs.setdefault("generator", generators[device])
        return kwargs

    def zeros(self, *size: Any, **kwargs: Any) -> Tensor:
        return torch.zeros(*size, **self._defaults(kwargs, dtype=True))

    def randn(self, *size: Any, **kwargs: Any) -> Tensor:
        draw_on = kwargs.get("device") or "cpu"
        return torch.randn(*size, **self._defaults(kwargs, dtype=True, draw_on=draw_on))

    def randint_like(self, input: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        draw_on = kwargs.get("device") or input.device
        return torch.randint_like(input, *args, **self._defaults(kwargs, False, draw_on))

    @staticmethod
    def eig(matrix: Tensor, eigenvectors: bool = True) -> tuple[Tensor, Tensor]:
        values, vectors = torch.linalg.eigh(finite(matrix))  # Lanczos' T from its products
        return torch.stack([values, torch.zeros_like(values)], dim=1), vectors


def pyhessian_torch() -> PyHessianTorch:
    """The PyHessianTorch in ``pyhessian.hessian``'s namespace (installed on first use)."""
    module = importlib.import_module("pyhessian.hessian")  # the package rebinds the name
    if not isinstance(module.torch, PyHessianTorch):
        module.torch = PyHessianTorch()
    return module.torch


class PyHessianBackend(Backend):
    """PyHessian (Yao et al. 2020): Hessian routines over a data loader."""

    name = "pyhessian"
    library = "pyhessian"
    module = "pyhessian"
    extra = "pyhessian"
    limits = {"uncopied_forward": ("hvp", "ggnvp", "block_products")}  # all on its copy
    capabilities = {
        "hvp": "native",  # hessian.dataloader_hv_product
        "ggnvp": "derived",  # the same on the Gauss–Newton surrogate criterion
        "class_deltas": "derived",  # weighted gradient passes
        "block_products": "native",  # only the block's parameter requires gradients
        "top_eigen": "native",  # hessian.eigenvalues (power iteration with deflation)
        "trace": "native",  # hessian.trace (Hutchinson)
        "density": "native",  # hessian.density (SLQ)
    }
    default_settings = {"power_iter": 1000, "power_tol": 1e-7}

    def __init__(self, problem, options=None) -> None:
        if problem.group is not None:
            raise UnsupportedError(
                "backend 'pyhessian' cannot run under torch.distributed: its routines loop over "
                "the data inside PyHessian, where curvkit cannot sum the ranks' shards; use "
                "torchfunc, backpack or curvlinops."
            )
        super().__init__(problem, options)

    def _criterion(self, matrix: str) -> Callable[[Tensor, Tensor], Tensor]:
        """The batch-mean criterion whose Hessian is ``matrix`` (PyHessian weights batches).
        PyHessian differentiates every gradient again, which fails for one that is constant (the
        last layer's of ``ḡᵀ f``, linear in it): 0 × G's surrogate keeps each in the graph."""
        loss = self.problem.loss
        criterion, keep = loss.criterion(matrix), 0.0 if matrix == "residual" else None

        def batch_mean(logits: Tensor, labels: Tensor) -> Tensor:
            value = criterion(logits, labels)
            if keep is not None:
                value = value + keep * loss.gauss_newton_surrogate(logits)
            return value / len(labels)

        return batch_mean

    @contextlib.contextmanager
    def _engine(self, matrix: str, param: str | None, seed: int = 0) -> Iterator[Any]:
        """A PyHessian ``hessian`` object for ``matrix`` on the model copy, differentiating the
        selected parameters or only ``param``."""
        from pyhessian import hessian

        model, params = self.working_copy()
        wanted = self.problem.selected(param)
        for name, p in zip(self.problem.names, params):
            p.requires_grad_(name in wanted)
        with pyhessian_torch().session(self.problem.dtype, seed), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*create_graph=True.*reference cycle")
            try:
                yield hessian(
                    model,
                    self._criterion(matrix),
                    dataloader=CountingBatches(self),
                    cuda=self.problem.device.type == "cuda",
                )
            finally:
                for p in params:
                    p.requires_grad_(True)
                self.clean(params)

    def _product(self, matrix: str, V: Tensor, param: str | None) -> Tensor:
        with self._engine(matrix, param) as engine:
            columns = [
                self.problem.flatten(engine.dataloader_hv_product(list(v))[1])
                for v in zip(*self.problem.split_columns(V, param).values())
            ]
        return finite(torch.stack(columns, dim=1))

    # -- primitives -----------------------------------------------------------------------------
    def hvp(self, v: Tensor, param: str | None = None) -> Tensor:
        return self._columns(lambda V: self._product("hessian", V, param), v)

    def ggnvp(self, v: Tensor, param: str | None = None) -> Tensor:
        return self._columns(lambda V: self._product("ggn", V, param), v)

    def operator(self, matrix: str, param: str | None = None) -> Operator:
        """Every matrix, the residual included, is one PyHessian criterion: one product."""
        if matrix not in MATRICES:
            raise ValueError(f"unknown matrix {matrix!r}; use one of {MATRICES}")
        op = Operator(
            self.problem.size_of(param),
            lambda V: self._product(matrix, V, param),
            self.problem.dtype,
            self.problem.device,
            backend=self.name,
            derived=matrix != "hessian",
            passes=lambda: self.passes,
        )
        op.native = {
            "top_eigen": lambda k, options, seed: self._top_eigen(
                matrix, param, op, k, options, seed
            ),
            "trace": lambda options, seed: self._trace(matrix, param, op, options, seed),
            "density": lambda options, seed: self._density(matrix, param, op, options, seed),
        }
        return op

    # -- PyHessian's own routines ---------------------------------------------------------------
    @staticmethod
    def _lanczos_instead(
        op: Operator, k: int, options: Options, seed: int, why: str
    ) -> tuple[EigenResult, Provenance]:
        note = (
            f"PyHessian's power iteration finds the largest |λ| and {why}: curvkit's Lanczos on "
            "PyHessian's products"
        )
        return instead(top_eigen, op, k, options, seed, why=note, derived=True)

    def _top_eigen(
        self, matrix: str, param: str | None, op: Operator, k: int, options: Options, seed: int
    ) -> tuple[EigenResult, Provenance]:
        """Power iteration with deflation (``hessian.eigenvalues``), sorted descending.

        PyHessian finds eigenvalues of largest magnitude. Its stopping rule compares successive
        Rayleigh quotients (``power_tol``, default 1e-7 here against its own 1e-3, which left the
        top-10 up to 5e-3 off); the residuals ``‖A u − λ u‖`` are checked afterwards (k products).

        Largest magnitude is the contract's largest algebraic only when no negative eigenvalue
        outweighs the k-th positive one. So for the residual H (indefinite: tr H = 0 in a ReLU
        network), and whenever the power iteration returns a negative eigenvalue, the top
        eigenvalues come from curvkit's Lanczos on PyHessian's products instead (``derived``).
        """
        if matrix == "residual":
            return self._lanczos_instead(op, k, options, seed, "H = Hess − G is indefinite")
        start, passes = op.clock(), self.passes
        power_tol = self.config["power_tol"]
        with self._engine(matrix, param, seed) as engine:
            values, vectors = engine.eigenvalues(
                maxIter=self.config["power_iter"], tol=power_tol, top_n=k
            )
        passes = self.passes - passes
        vectors_t = torch.stack([self.problem.flatten(v) for v in vectors], dim=1)
        if not bool(vectors_t.norm(dim=0).all()):  # it divides A v by ‖A v‖ + 1e-6
            return self._lanczos_instead(op, k, options, seed, "it returned a zero vector")
        values_t = finite(torch.tensor(values, dtype=self.problem.dtype))
        order = torch.argsort(values_t, descending=True)
        values_t, vectors_t = values_t[order], vectors_t[:, order.to(vectors_t.device)]
        vectors_t = vectors_t / vectors_t.norm(dim=0)
        residuals = torch.linalg.vector_norm(
            op.matmat(vectors_t) - vectors_t * values_t.to(vectors_t), dim=0
        ).cpu()
        scale = max(float(values_t.abs().max()), 1e-300)
        converged = bool((residuals <= math.sqrt(power_tol) * scale).all())
        if float(values_t.min()) < 0:
            return self._lanczos_instead(op, k, options, seed, "it returned a negative eigenvalue")
        result = EigenResult(values_t, vectors_t, residuals, passes + k, converged)
        return result, op.provenance(
            "pyhessian.eigenvalues", passes + k, start, note="+k products for residuals"
        )

    def _trace(
        self, matrix: str, param: str | None, op: Operator, options: Options, seed: int
    ) -> tuple[TraceEstimate, Provenance]:
        """Hutchinson (``hessian.trace``) with ``trace_matvecs`` probes and no early stop: its rule
        ``|Δmean| / (mean + 1e-6) < tol`` holds for any tol ≥ 0 once the running mean is
        negative (an indefinite Hessian), which stopped it after 2 probes; nothing is below −∞.
        The probes' spread gives the standard error; with fewer than SPREAD_SAMPLES, whose
        spread is no honest one, curvkit's estimator runs on PyHessian's products instead."""
        if options.trace_matvecs < SPREAD_SAMPLES:
            return trace(op, options, seed, native=False)
        start, passes = op.clock(), self.passes
        with self._engine(matrix, param, seed) as engine:
            samples = engine.trace(maxIter=options.trace_matvecs, tol=-math.inf)
        passes = self.passes - passes
        mean, stderr = mean_and_stderr(finite(samples))
        return TraceEstimate(mean, stderr, passes, "hutchinson"), op.provenance(
            "pyhessian.trace", passes, start
        )

    def _density(
        self, matrix: str, param: str | None, op: Operator, options: Options, seed: int
    ) -> tuple[Density, Provenance]:
        """SLQ (``hessian.density``) nodes and weights, broadened on curvkit's grid."""
        start, passes = op.clock(), self.passes
        steps = min(options.density_steps, op.size)
        with self._engine(matrix, param, seed) as engine:
            nodes, weights = engine.density(iter=steps, n_v=options.density_probes)
        passes = self.passes - passes
        result = broadened_density(
            torch.tensor(nodes, dtype=torch.float64),
            torch.tensor(weights, dtype=torch.float64),
            passes,
            options.density_grid,
            relative_sigma=options.density_relative_sigma,
        )
        return result, op.provenance("pyhessian.density", passes, start, note=EIG_NOTE)
