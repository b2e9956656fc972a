"""curvlinops backend: its Hessian, GGN and KFAC linear operators and its own estimators, through
curvlinops' public API only.

- products: ``HessianLinearOperator`` and ``GGNLinearOperator`` on curvkit's criteria of the
  loss (``Criterion``: the residual H = Hess − G is one Hessian operator), normalised over the
  whole data set by curvlinops itself, on all selected parameters or on one (a block);
- top eigenpairs: SciPy's ARPACK ``eigsh`` on the operator's ``to_scipy()`` view, the route
  curvlinops documents (it has no eigensolver of its own);
- trace: curvlinops' ``hutchinson_trace`` (one probe per call); for Hutch++ curvkit's estimator
  on curvlinops' products (``hutchpp_trace`` gives no standard error: see ``_trace``);
- density: curvlinops' ``fast_lanczos`` (Papyan 2020's SLQ without reorthogonalisation), its
  nodes and weights broadened on curvkit's grid so that every backend's density is comparable;
- Kronecker factors: ``KFACLinearOperator`` with the exact (type-2) output Hessian, read through
  its ``state_dict()``;
- class means: weighted gradient passes (curvlinops has no per-example factors), ``derived``.

curvlinops works on a copy of the model (its KFAC installs hooks while it runs) and draws its
probes from torch's global generator, which curvkit forks and seeds around each routine. Under
torch.distributed each operator's products are summed over the ranks (``CopyKept``), so that
curvlinops' routines see the whole data set.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor

from curvkit.backend import Backend, CountingBatches, KroneckerFactors
from curvkit.errors import UnsupportedError, finite, first_line
from curvkit.features import state_kept
from curvkit.linalg import Density, EigenResult, Operator, Options, TraceEstimate
from curvkit.linalg.krylov import broadened_density
from curvkit.linalg.operator import density, instead, top_eigen, trace
from curvkit.linalg.trace import SPREAD_SAMPLES, mean_and_stderr
from curvkit.problem import Problem
from curvkit.report import Provenance


class Criterion(torch.nn.Module):
    """A batch-sum criterion of curvkit's loss (``CrossEntropy.criterion``) as the batch-mean
    loss module curvlinops' operators take: their Hessian or G is then the loss's, its products
    without the cancellation of torch's cross-entropy double backward when p_top ≈ 1 (on a
    float32 network trained to 1 − p_top ≈ 1e-7, λ₁ came out 1 % low from CrossEntropyLoss)."""

    reduction = "mean"

    def __init__(self, criterion: Callable[[Tensor, Tensor], Tensor]) -> None:
        super().__init__()
        self.criterion = criterion

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        return self.criterion(logits, labels) / len(labels)


class CopyKept:
    """A curvlinops operator as curvlinops' routines use it (``shape``, ``dtype``, ``device``,
    ``@``), whose products leave the model copy it works on as it was (torch's functional_call
    inside them swaps the Parameters of a module reachable by two names for its arguments,
    pytorch/pytorch#164759, and curvlinops looks them up in the copy when it builds its next
    operator's products: a raw ValueError) and, under torch.distributed, are summed over the
    ranks' shards."""

    def __init__(self, operator: Any, model: torch.nn.Module, problem: Problem) -> None:
        self.operator, self.model, self.problem = operator, model, problem
        self.shape, self.dtype, self.device = operator.shape, operator.dtype, operator.device

    def __matmul__(self, x: Tensor) -> Tensor:
        with state_kept(self.model):
            product = self.operator @ x
        return product if self.problem.group is None else self.problem.all_reduce(product)


class CurvlinopsBackend(Backend):
    """curvlinops (Dangel et al.): SciPy-compatible curvature linear operators."""

    name = "curvlinops"
    library = "curvlinops-for-pytorch"
    module = "curvlinops"
    extra = "curvlinops"
    capabilities = {
        "hvp": "native",  # HessianLinearOperator
        "ggnvp": "native",  # GGNLinearOperator
        "class_deltas": "derived",  # weighted gradient passes
        "kronecker_factors": "native",  # KFACLinearOperator, type-2 (exact) Fisher
        "top_eigen": "native",  # scipy eigsh on to_scipy()
        "trace": "native",  # hutchinson_trace (Hutch++: curvkit's, see _trace)
        "density": "native",  # fast_lanczos (Papyan 2020)
        "block_products": "native",  # the operators built on one parameter
    }

    # its products use torch.func (forward-over-reverse): no full backward hooks, no forward
    # derivative for weight_norm-like parametrizations (its routines go down with its products);
    # its functional model finds a shared parameter under one name only
    limits = {
        "backward_hooks": ("hvp", "ggnvp", "class_deltas"),
        "functional_transforms": ("hvp", "ggnvp", "class_deltas"),
        "parametrizations": ("hvp", "ggnvp", "class_deltas"),
        "shared_parameters": ("class_deltas",),
        "jvp_of_jacrev": ("hvp",),  # its Hessian products
        "forward_mode": ("hvp", "ggnvp"),  # its G products: jvp, then vjp
        "asymmetric_padding": ("kronecker_factors",),  # its unfold: "Unequal padding"
        "uncopied_forward": ("hvp", "ggnvp", "block_products"),  # its operators' model copy
    }

    def __init__(self, problem: Problem, options: Options | None = None) -> None:
        super().__init__(problem, options)
        self._operators: dict[tuple[str, str | None], Any] = {}

    def _common(self, params: list[Tensor], num_data: int, loss_func: Any) -> dict[str, Any]:
        model, _ = self.working_copy()
        return {
            "model_func": model,
            "loss_func": loss_func,
            "params": params,
            "data": CountingBatches(self),
            "check_deterministic": False,  # curvkit's Problem checks every pass
            "num_data": num_data,
        }

    def library_operator(self, matrix: str, param: str | None = None) -> Any:
        """curvlinops' operator of ``hessian``, ``ggn`` or ``residual`` (the Hessian of
        ``ḡᵀ f``) for the selected parameters or for ``param`` alone, summed over the ranks."""
        key = (matrix, param)
        if key not in self._operators:
            from curvlinops import GGNLinearOperator, HessianLinearOperator

            model, copies = self.working_copy()
            params = [copies[self.problem.names.index(n)] for n in self.problem.selected(param)]
            criterion = Criterion(self.problem.loss.criterion(matrix))
            common = self._common(params, self.problem.num_samples, criterion)
            kind = GGNLinearOperator if matrix == "ggn" else HessianLinearOperator
            self._operators[key] = CopyKept(kind(**common), model, self.problem)
        return self._operators[key]

    def _apply(self, matrix: str, V: Tensor, param: str | None) -> Tensor:
        try:
            return finite(self.library_operator(matrix, param) @ V)
        finally:
            self.clean(self.working_copy()[1])

    def hvp(self, v: Tensor, param: str | None = None) -> Tensor:
        return self._apply("hessian", v, param)

    def operator(self, matrix: str, param: str | None = None) -> Operator:
        """The base class's operators; the residual's products in one pass of one operator
        (the Hessian of ``ḡᵀ f``) instead of the Hessian's minus G's."""
        op = super().operator(matrix, param)
        if matrix == "residual":
            op.matmat, op.cost = (lambda V: self._apply("residual", V, param)), 1
        return op

    def ggnvp(self, v: Tensor, param: str | None = None) -> Tensor:
        return self._apply("ggn", v, param)

    def native_routines(self, matrix: str, param: str | None, op: Operator) -> dict[str, Any]:
        return {
            "top_eigen": lambda k, options, seed: self._top_eigen(op, k, options, seed),
            "trace": lambda options, seed: self._trace(matrix, param, op, options, seed),
            "density": lambda options, seed: self._density(matrix, param, op, options, seed),
        }

    # -- routines -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _seeded(self, seed: int) -> Iterator[None]:
        """curvlinops draws its probes from torch's global generator: fork it and seed it."""
        devices = [self.problem.device] if self.problem.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            yield

    def _top_eigen(
        self, op: Operator, k: int, options: Options, seed: int
    ) -> tuple[EigenResult, Provenance]:
        """ARPACK's implicitly restarted Lanczos (``eigsh``, largest algebraic) to ``lanczos_tol``."""
        from scipy.sparse.linalg import ArpackError, ArpackNoConvergence, LinearOperator, eigsh

        if k >= op.size:  # ARPACK needs k < dim; small problems are solved densely by curvkit
            return top_eigen(op, k, options, seed, native=False)
        start = op.clock()
        dtype = torch.zeros((), dtype=op.dtype).numpy().dtype
        count = 0

        def product(x: np.ndarray) -> np.ndarray:
            nonlocal count
            count += 1
            v = torch.as_tensor(x.ravel(), dtype=op.dtype, device=op.device)
            return op.matvec(v).cpu().numpy()

        scipy_operator = LinearOperator((op.size, op.size), matvec=product, dtype=dtype)
        v0 = np.random.default_rng(seed).standard_normal(op.size)
        max_iter = options.lanczos_max_iter or max(10 * op.size, 1000)
        converged = True
        try:
            values, vectors = eigsh(
                scipy_operator, k=k, which="LA", tol=options.lanczos_tol, v0=v0, maxiter=max_iter
            )
        except ArpackNoConvergence as error:
            values, vectors, converged = error.eigenvalues, error.eigenvectors, False
        except ArpackError as error:  # e.g. "starting vector is zero": A v0 = 0
            why = f"ARPACK failed ({first_line(error)}): curvkit's Lanczos on curvlinops' products"
            return instead(top_eigen, op, k, options, seed, why=why)
        if len(values) < k:  # unconverged, ARPACK returns only the converged pairs
            why = f"ARPACK converged {len(values)} of {k} eigenpairs: curvkit's Lanczos instead"
            return instead(top_eigen, op, k, options, seed, why=why)
        order = np.argsort(values)[::-1]
        vectors_t = torch.as_tensor(
            np.ascontiguousarray(vectors[:, order]), dtype=op.dtype, device=op.device
        )
        values_t = torch.as_tensor(values[order].copy(), dtype=op.dtype)
        residuals = torch.linalg.vector_norm(
            op.matmat(vectors_t) - vectors_t * values_t.to(vectors_t), dim=0
        )  # k products in one pass
        result = EigenResult(
            values_t.to(op.device), vectors_t, residuals.cpu(), count + k, converged
        )
        return result, op.provenance(
            "scipy.eigsh(curvlinops.to_scipy)", count + k, start, note="+k for residuals"
        )

    def _trace(
        self, matrix: str, param: str | None, op: Operator, options: Options, seed: int
    ) -> tuple[TraceEstimate, Provenance]:
        """curvlinops' ``hutchinson_trace``, one probe per call (their spread gives the standard
        error, with at least SPREAD_SAMPLES probes; with fewer, curvkit's Hutchinson on
        curvlinops' products). Hutch++ is curvkit's on curvlinops' products: ``hutchpp_trace``
        returns one number, and the spread of 3–9 runs of it (2–8 degrees of freedom) put 2 of
        60 traces of a digits MLP 7 error bars off at 60 products, where curvkit's had none
        beyond 3 and a 20 % smaller error. No larger than the budget, the trace is exact."""
        from curvlinops import hutchinson_trace

        budget = options.trace_matvecs
        if options.trace_method == "hutch++" or budget >= op.size or budget < SPREAD_SAMPLES:
            return trace(op, options, seed, native=False)
        start = op.clock()
        operator = self.library_operator(matrix, param)
        with self._seeded(seed):
            samples = [float(hutchinson_trace(operator, 1)) for _ in range(budget)]
            used, routine = budget, "curvlinops.hutchinson_trace"
        mean, stderr = mean_and_stderr(finite(samples))
        estimate = TraceEstimate(mean, stderr, used, options.trace_method)
        return estimate, op.provenance(routine, used, start)

    def _density(
        self, matrix: str, param: str | None, op: Operator, options: Options, seed: int
    ) -> tuple[Density, Provenance]:
        """``fast_lanczos`` per probe (Gaussian start, no reorthogonalisation): Ritz values are
        the quadrature nodes, the squared first components of the Ritz vectors the weights."""
        from curvlinops.papyan2020traces.spectrum import fast_lanczos

        start = op.clock()
        operator = self.library_operator(matrix, param)
        steps = min(options.density_steps, op.size)
        nodes, weights = [], []
        try:
            with self._seeded(seed):
                for _ in range(options.density_probes):
                    values, vectors = fast_lanczos(operator, steps)
                    nodes.append(values.cpu())
                    weights.append(vectors[0].cpu() ** 2)
        except torch.linalg.LinAlgError as error:  # a breakdown (e.g. G = 0) leaves NaN in T
            why = f"fast_lanczos failed ({first_line(error)[:80]}): curvkit's SLQ"
            return instead(density, op, options, seed, why=why)
        used = steps * options.density_probes
        result = broadened_density(
            torch.stack(nodes),
            torch.stack(weights),
            used,
            grid_size=options.density_grid,
            relative_sigma=options.density_relative_sigma,
        )
        return result, op.provenance(
            "curvlinops.fast_lanczos", used, start, note="broadened on curvkit's grid"
        )

    def kronecker_factors(self) -> dict[str, KroneckerFactors]:
        """KFAC with the exact output Hessian (type-2 Fisher) in curvkit's convention.

        curvlinops' "reduce" B sums the output gradients over a convolution's positions before the
        outer product, which is curvkit's B; its "expand" A averages the patches' outer products
        over the positions, which is curvkit's A (from a forward-only pass: no backward passes).
        curvlinops normalises by this rank's N; scaled by its share of the global N, the factors
        are summed over the ranks.
        """
        from curvlinops import FisherType, KFACLinearOperator, KFACType

        self.require("kronecker_factors")
        _, copies = self.working_copy()
        layers, _ = self.kronecker_plan()
        # the layers' weights alone: curvlinops refuses parameters of other layers (LayerNorm, …)
        params = [copies[self.problem.names.index(f"{n}.weight")] for n in layers]
        shard = self.problem.num_shard_samples
        common = self._common(params, shard, self.problem.loss.module("mean"))

        def factors(fisher_type: str, approx: str, key: str) -> dict[str, Tensor]:
            operator = KFACLinearOperator(**common, fisher_type=fisher_type, kfac_approx=approx)
            operator.compute_kronecker_factors()
            stored = operator.state_dict().get(key)
            if not stored:
                raise UnsupportedError(
                    f"this curvlinops version gives no {key}; use backpack or torchfunc for "
                    "Kronecker factors."
                )
            return stored

        b = factors(FisherType.TYPE2, KFACType.REDUCE, "gradient_covariances")
        a = factors(FisherType.FORWARD_ONLY, KFACType.EXPAND, "input_covariances")
        share = shard / self.problem.num_samples

        def reduce(factor: Tensor) -> Tensor:
            return self.problem.all_reduce(factor.detach() * share)

        return {n: KroneckerFactors(reduce(b[n]), reduce(a[n])) for n in layers}
