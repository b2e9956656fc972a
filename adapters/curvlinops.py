"""curvlinops backend: its Hessian, GGN and KFAC linear operators and its own estimators.

- products: ``HessianLinearOperator`` and ``GGNLinearOperator`` (mean cross-entropy, normalised
  over the whole data set by curvlinops itself);
- top eigenpairs: SciPy's ARPACK ``eigsh`` on the operator's ``to_scipy()`` view, the route
  curvlinops documents (it has no eigensolver of its own);
- trace: curvlinops' ``hutchpp_trace`` (3 independent runs, so that the spread gives a standard
  error) or ``hutchinson_trace`` (one probe per call), after ``options.trace_method``;
- density: curvlinops' ``fast_lanczos`` (Papyan 2020's SLQ without reorthogonalisation), its
  nodes and weights broadened on curvkit's grid so that every backend's density is comparable;
- Kronecker factors: ``KFACLinearOperator`` with the exact (type-2) output Hessian;
- class means: weighted gradient passes (curvlinops has no per-example factors), ``derived``.

curvlinops works on a deep copy of the model (its KFAC installs hooks while it runs).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from curvkit.backend import (
    Backend,
    ClassDeltas,
    CountingBatches,
    KroneckerFactors,
    Provenance,
    class_deltas_by_gradient_passes,
    kronecker_layers,
)
from curvkit.errors import MissingDependencyError, UnsupportedError
from curvkit.linalg import Density, EigenResult, TraceEstimate
from curvkit.linalg.lanczos import broadened_density


class CurvlinopsBackend(Backend):
    """curvlinops (Dangel et al.): SciPy-compatible curvature linear operators."""

    name = "curvlinops"
    library = "curvlinops-for-pytorch"
    extra = "curvlinops"
    capabilities = {
        "hvp": "native",  # HessianLinearOperator
        "ggnvp": "native",  # GGNLinearOperator
        "class_deltas": "derived",  # weighted gradient passes
        "kronecker_factors": "native",  # KFACLinearOperator, type-2 (exact) Fisher
        "top_eigen": "native",  # scipy eigsh on to_scipy()
        "trace": "native",  # hutchpp_trace / hutchinson_trace
        "density": "native",  # fast_lanczos (Papyan 2020)
        "block_products": "native",  # the operators built on one parameter
    }

    @classmethod
    def check_available(cls) -> None:
        try:
            import curvlinops  # noqa: F401
        except ImportError as error:
            raise MissingDependencyError(
                "backend 'curvlinops' needs curvlinops; install it with "
                "pip install 'curvkit[curvlinops]'."
            ) from error

    def __init__(self, problem, options=None) -> None:
        super().__init__(problem, options)
        self._model, self._params = self.model_copy()
        self._batches = CountingBatches(problem)
        self._operators: dict[str, Any] = {}

    # -- operators ------------------------------------------------------------------------------
    def _common(self, params: list[Tensor] | None = None) -> dict[str, Any]:
        return {
            "model_func": self._model,
            "loss_func": nn.CrossEntropyLoss(reduction="mean"),
            "params": self._params if params is None else params,
            "data": self._batches,
            "check_deterministic": False,  # curvkit's Problem already validated the data
            "num_data": self.problem.num_samples,
        }

    def operator(self, matrix: str, name: str | None = None) -> Any:
        """curvlinops' linear operator of ``hessian``, ``ggn`` or ``residual`` (their difference),
        for all selected parameters or for the one parameter ``name`` (its diagonal block)."""
        key = (matrix, name)
        if key not in self._operators:
            from curvlinops import GGNLinearOperator, HessianLinearOperator

            params = None if name is None else [self._params[self.problem.names.index(name)]]
            if matrix == "hessian":
                self._operators[key] = self._summed(HessianLinearOperator(**self._common(params)))
            elif matrix == "ggn":
                self._operators[key] = self._summed(GGNLinearOperator(**self._common(params)))
            else:
                self._operators[key] = self.operator("hessian", name) - self.operator("ggn", name)
        return self._operators[key]

    def _summed(self, operator: Any) -> Any:
        """``operator`` (applied to this rank's shard) with its products summed over the ranks,
        so that curvlinops' own routines see the whole data set; itself without a group."""
        if self.problem.group is None:
            return operator
        from curvlinops._torch_base import PyTorchLinearOperator  # not exported; the base class

        problem = self.problem

        class SummedOverRanks(PyTorchLinearOperator):
            SELF_ADJOINT = True

            def _matmat(self, X: list[Tensor]) -> list[Tensor]:
                parts = operator._matmat(X)
                total = problem.all_reduce(torch.cat([p.flatten() for p in parts]))
                return [
                    t.view_as(p) for t, p in zip(total.split([p.numel() for p in parts]), parts)
                ]

            def _adjoint(self) -> SummedOverRanks:
                return self

            @property
            def device(self) -> torch.device:
                return operator.device

            @property
            def dtype(self) -> torch.dtype:
                return operator.dtype

        return SummedOverRanks(operator._in_shape, operator._out_shape)

    def block_matvec(self, matrix: str, name: str):
        """Products with the operator built on one parameter."""
        return lambda v: self._apply(matrix, v, name)

    def _apply(self, matrix: str, v: Tensor, name: str | None = None) -> Tensor:
        try:
            return self.operator(matrix, name) @ v
        finally:
            for p in self._params:
                p.grad = None

    def hvp(self, v: Tensor) -> Tensor:
        return self._apply("hessian", v)

    def ggnvp(self, v: Tensor) -> Tensor:
        return self._apply("ggn", v)

    def matvec(self, matrix: str):
        return lambda v: self._apply(matrix, v)

    def class_deltas(self) -> ClassDeltas:
        return class_deltas_by_gradient_passes(
            self.problem, self._model, self._params, self.name, self.options.progress
        )

    # -- routines -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _seeded(self, seed: int) -> Iterator[None]:
        """curvlinops draws its probes from torch's global generator: fork it and seed it."""
        devices = [self.problem.device] if self.problem.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            yield

    def top_eigen(self, matrix: str, k: int, seed: int) -> tuple[EigenResult, Provenance]:
        """ARPACK's implicitly restarted Lanczos (``eigsh``, largest algebraic) to ``lanczos_tol``."""
        from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh

        start = time.perf_counter()
        dim = self.problem.num_params
        if k >= dim:  # ARPACK needs k < dim; small problems are solved densely by curvkit
            return super().top_eigen(matrix, k, seed)
        dtype = torch.zeros((), dtype=self.problem.dtype).numpy().dtype

        count = 0

        def product(x: np.ndarray) -> np.ndarray:
            nonlocal count
            count += 1
            v = torch.as_tensor(x.ravel(), dtype=self.problem.dtype, device=self.problem.device)
            return self._apply(matrix, v).cpu().numpy()

        scipy_operator = LinearOperator((dim, dim), matvec=product, dtype=dtype)
        v0 = np.random.default_rng(seed).standard_normal(dim)
        max_iter = self.options.lanczos_max_iter or max(10 * dim, 1000)
        converged = True
        try:
            values, vectors = eigsh(
                scipy_operator, k=k, which="LA", tol=self.options.lanczos_tol, v0=v0,
                maxiter=max_iter,
            )  # fmt: skip
        except ArpackNoConvergence as error:
            values, vectors, converged = error.eigenvalues, error.eigenvectors, False
        order = np.argsort(values)[::-1]
        vectors_t = torch.as_tensor(
            np.ascontiguousarray(vectors[:, order]),
            dtype=self.problem.dtype,
            device=self.problem.device,
        )
        values_t = torch.as_tensor(values[order].copy(), dtype=self.problem.dtype)
        used = count + k
        products = self._apply(matrix, vectors_t)  # k products in one pass, for the residuals
        residuals = torch.linalg.vector_norm(products - vectors_t * values_t.to(vectors_t), dim=0)
        result = EigenResult(
            values_t.to(self.problem.device), vectors_t, residuals.cpu(), used, converged
        )
        return result, self._provenance(
            "scipy.eigsh(curvlinops.to_scipy)", matrix, used, start, note="+k for residuals"
        )

    def trace(self, matrix: str, seed: int) -> tuple[TraceEstimate, Provenance]:
        """curvlinops' estimators; the spread of independent runs gives the standard error."""
        from curvlinops import hutchinson_trace, hutchpp_trace

        budget, dim = self.options.trace_matvecs, self.problem.num_params
        if budget >= dim:  # the exact trace costs no more than the estimate
            return super().trace(matrix, seed)
        start = time.perf_counter()
        operator = self.operator(matrix)
        with self._seeded(seed):
            if self.options.trace_method == "hutch++":
                per_run = max(3, budget // 9 * 3)  # 3 runs, each a multiple of 3 products
                samples = [float(hutchpp_trace(operator, per_run)) for _ in range(3)]
                used = 3 * per_run
                routine = "curvlinops.hutchpp_trace ×3"
            else:
                samples = [float(hutchinson_trace(operator, 1)) for _ in range(budget)]
                used = budget
                routine = "curvlinops.hutchinson_trace"
        mean = math.fsum(samples) / len(samples)
        spread = math.fsum((s - mean) ** 2 for s in samples) / (len(samples) - 1)
        estimate = TraceEstimate(
            mean, math.sqrt(spread / len(samples)), used, self.options.trace_method
        )
        return estimate, self._provenance(routine, matrix, used, start)

    def density(self, matrix: str, seed: int) -> tuple[Density, Provenance]:
        """``fast_lanczos`` per probe (Gaussian start, no reorthogonalisation): Ritz values are
        the quadrature nodes, the squared first components of the Ritz vectors the weights."""
        from curvlinops.papyan2020traces.spectrum import fast_lanczos

        start = time.perf_counter()
        operator = self.operator(matrix)
        steps = min(self.options.density_steps, self.problem.num_params)
        nodes, weights = [], []
        with self._seeded(seed):
            for _ in range(self.options.density_probes):
                values, vectors = fast_lanczos(operator, steps)
                nodes.append(values.cpu())
                weights.append(vectors[0].cpu() ** 2)
        used = steps * self.options.density_probes
        density = broadened_density(
            torch.stack(nodes),
            torch.stack(weights),
            used,
            grid_size=self.options.density_grid,
            relative_sigma=self.options.density_relative_sigma,
        )
        return density, self._provenance(
            "curvlinops.fast_lanczos", matrix, used, start, note="broadened on curvkit's grid"
        )

    def kronecker_factors(self) -> dict[str, KroneckerFactors]:
        """KFAC with the exact output Hessian (type-2 Fisher) in curvkit's convention.

        curvlinops' "reduce" B sums the output gradients over a convolution's positions before the
        outer product, which is curvkit's B; its "expand" A averages the patches' outer products
        over the positions, which is curvkit's A (from a forward-only pass: no backward passes).
        """
        from curvlinops import FisherType, KFACLinearOperator, KFACType

        names = kronecker_layers(self.problem)

        # curvlinops needs this rank's N; the factors, scaled by its share of the global N,
        # are summed over the ranks
        shard = self.problem.num_shard_samples
        common = {**self._common(), "num_data": shard}

        def factors(fisher_type: str, approx: str, attribute: str) -> dict[str, Tensor]:
            operator = KFACLinearOperator(**common, fisher_type=fisher_type, kfac_approx=approx)
            operator.compute_kronecker_factors()
            stored = getattr(operator, attribute, None)
            if stored is None:
                raise UnsupportedError(
                    f"this curvlinops version stores no {attribute}; use backpack or torchfunc "
                    "for Kronecker factors."
                )
            return stored

        b = factors(FisherType.TYPE2, KFACType.REDUCE, "_gradient_covariances")
        a = factors(FisherType.FORWARD_ONLY, KFACType.EXPAND, "_input_covariances")
        share = shard / self.problem.num_samples

        def reduce(factor: Tensor) -> Tensor:
            return self.problem.all_reduce(factor.detach() * share)

        return {n: KroneckerFactors(reduce(b[n]), reduce(a[n])) for n in names}
