"""PyHessian backend: PyHessian's own power iteration, Hutchinson trace and SLQ density.

PyHessian 0.1 is unmaintained; its quirks are handled here, never by patching the package:

- it switches the model to eval mode, leaves ``.grad`` fields holding graphs
  (``backward(create_graph=True)``) and draws probes from torch's global RNG, so it always runs on a
  deep copy of the model, inside a forked RNG seeded by curvkit;
- it draws probes in torch's default dtype, so the default dtype is the model's while it runs;
- ``density()`` calls ``torch.eig``, removed from torch: while it runs, ``torch.eig`` is answered
  by ``torch.linalg.eigh`` on its symmetric tridiagonal matrix (said in provenance);
- it weights each batch's mean loss by the batch size, which is correct for unequal batches.

G is the Hessian of the Gauss–Newton surrogate ``½ (f − f̄)ᵀ H_out (f − f̄)`` with f̄ and
``H_out = diag p − p pᵀ`` held constant: its residual vanishes at the current parameters, so
PyHessian's routines on that criterion give G exactly (``derived``).
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings

import torch
from torch import Tensor, nn

from curvkit.backend import (
    Backend,
    ClassDeltas,
    CountingBatches,
    Provenance,
    class_deltas_by_gradient_passes,
)
from curvkit.errors import MissingDependencyError, UnsupportedError
from curvkit.linalg import Density, EigenResult, TraceEstimate
from curvkit.linalg.lanczos import broadened_density

EIG_NOTE = "torch.eig (removed from torch) replaced by torch.linalg.eigh for PyHessian's tridiagonal matrix"


def gauss_newton_surrogate(logits: Tensor, labels: Tensor) -> Tensor:
    """Batch mean of ``½ (f − f̄)ᵀ (diag p̄ − p̄ p̄ᵀ) (f − f̄)``: zero, with Hessian exactly G."""
    fixed = logits.detach()
    p = torch.softmax(fixed, dim=1)
    d = logits - fixed
    quadratic = (p * d * d).sum(1) - (p * d).sum(1) ** 2
    return 0.5 * quadratic.mean()


def residual_criterion(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean CE minus the surrogate: its Hessian is H = Hess − G."""
    return nn.functional.cross_entropy(logits, labels) - gauss_newton_surrogate(logits, labels)


CRITERIA = {
    "hessian": nn.functional.cross_entropy,
    "ggn": gauss_newton_surrogate,
    "residual": residual_criterion,
}


def _eig_with_eigh(matrix: Tensor, eigenvectors: bool = True) -> tuple[Tensor, Tensor]:
    values, vectors = torch.linalg.eigh(matrix)
    return torch.stack([values, torch.zeros_like(values)], dim=1), vectors


class PyHessianBackend(Backend):
    """PyHessian (Yao et al. 2020): Hessian routines over a data loader."""

    name = "pyhessian"
    library = "pyhessian"
    extra = "pyhessian"
    capabilities = {
        "hvp": "native",  # hessian.dataloader_hv_product
        "ggnvp": "derived",  # the same on the Gauss–Newton surrogate criterion
        "class_deltas": "derived",  # autograd weighted gradient passes
        "top_eigen": "native",  # hessian.eigenvalues (power iteration with deflation)
        "trace": "native",  # hessian.trace (Hutchinson)
        "density": "native",  # hessian.density (SLQ)
    }
    default_settings = {"power_iter": 1000, "power_tol": 1e-7}

    @classmethod
    def check_available(cls) -> None:
        try:
            import pyhessian  # noqa: F401
        except ImportError as error:
            raise MissingDependencyError(
                "backend 'pyhessian' needs PyHessian; install it with pip install 'curvkit[pyhessian]'."
            ) from error

    def __init__(self, problem, options=None) -> None:
        if problem.group is not None:
            raise UnsupportedError(
                "backend 'pyhessian' cannot run under torch.distributed: its routines loop over "
                "the data inside PyHessian, where curvkit cannot sum the ranks' shards; use "
                "torchfunc, backpack or curvlinops."
            )
        super().__init__(problem, options)
        self.power_iter, self.power_tol = self.config["power_iter"], self.config["power_tol"]
        self._model, self._params = self.model_copy()

    @contextlib.contextmanager
    def _session(self, matrix: str, seed: int = 0):
        """A PyHessian ``hessian`` object for ``matrix``, with RNG, dtype and torch.eig handled."""
        from pyhessian import hessian

        devices = [self.problem.device] if self.problem.device.type == "cuda" else []
        default_dtype = torch.get_default_dtype()
        missing = object()
        original_eig = getattr(torch, "eig", missing)  # a stub that raises, or absent
        with torch.random.fork_rng(devices=devices), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*create_graph=True.*reference cycle")
            torch.manual_seed(seed)
            torch.set_default_dtype(self.problem.dtype)
            torch.eig = _eig_with_eigh
            try:
                loader = CountingBatches(self.problem)
                engine = hessian(
                    self._model,
                    CRITERIA[matrix],
                    dataloader=loader,
                    cuda=self.problem.device.type == "cuda",
                )
                yield engine, loader
            finally:
                torch.set_default_dtype(default_dtype)
                if original_eig is missing:
                    del torch.eig
                else:
                    torch.eig = original_eig
                for p in self._params:
                    p.grad = None

    def _product(self, matrix: str, v: Tensor) -> Tensor:
        with self._session(matrix) as (engine, _):
            _, product = engine.dataloader_hv_product(self.problem.unflatten(v))
        return self.problem.flatten(product)

    # -- primitives -----------------------------------------------------------------------------
    def hvp(self, v: Tensor) -> Tensor:
        return self._product("hessian", v)

    def ggnvp(self, v: Tensor) -> Tensor:
        return self._product("ggn", v)

    def matvec(self, matrix: str):
        return lambda v: self._product(matrix, v)

    def matvecs_per_product(self, matrix: str) -> int:
        return 1  # the residual is one criterion, one product

    def class_deltas(self) -> ClassDeltas:
        return class_deltas_by_gradient_passes(
            self.problem, self._model, self._params, self.name, self.options.progress
        )

    # -- PyHessian's own routines ---------------------------------------------------------------
    def top_eigen(self, matrix: str, k: int, seed: int) -> tuple[EigenResult, Provenance]:
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
            return self._lanczos_instead(matrix, k, seed, "H = Hess − G is indefinite")
        start = time.perf_counter()
        with self._session(matrix, seed) as (engine, loader):
            values, vectors = engine.eigenvalues(
                maxIter=self.power_iter, tol=self.power_tol, top_n=k
            )
            passes = loader.passes
        vectors_t = torch.stack([self.problem.flatten(v) for v in vectors], dim=1)
        values_t = torch.tensor(values, dtype=self.problem.dtype)
        order = torch.argsort(values_t, descending=True)
        values_t, vectors_t = values_t[order], vectors_t[:, order.to(vectors_t.device)]
        vectors_t = vectors_t / vectors_t.norm(dim=0)
        apply = self.matvec(matrix)
        residuals = torch.stack(
            [(apply(u) - lam * u).norm() for lam, u in zip(values_t.tolist(), vectors_t.T)]
        )
        scale = max(float(values_t.abs().max()), 1e-300)
        converged = bool((residuals <= math.sqrt(self.power_tol) * scale).all())
        if float(values_t.min()) < 0:
            return self._lanczos_instead(matrix, k, seed, "it returned a negative eigenvalue")
        result = EigenResult(values_t, vectors_t, residuals, passes + k, converged)
        return result, self._provenance(
            "pyhessian.eigenvalues", matrix, passes + k, start, note="+k products for residuals"
        )

    def _lanczos_instead(
        self, matrix: str, k: int, seed: int, why: str
    ) -> tuple[EigenResult, Provenance]:
        result, provenance = super().top_eigen(matrix, k, seed)
        provenance.derived = True
        provenance.note = (
            f"PyHessian's power iteration finds the largest |λ| and {why}: curvkit's Lanczos on "
            "PyHessian's products"
        )
        return result, provenance

    def trace(self, matrix: str, seed: int) -> tuple[TraceEstimate, Provenance]:
        """Hutchinson (``hessian.trace``) with ``trace_matvecs`` probes, no early stop."""
        start = time.perf_counter()
        with self._session(matrix, seed) as (engine, loader):
            samples = engine.trace(maxIter=self.options.trace_matvecs, tol=0.0)
            passes = loader.passes
        n = len(samples)
        mean = math.fsum(samples) / n
        stderr = (
            math.sqrt(math.fsum((s - mean) ** 2 for s in samples) / (n - 1) / n)
            if n > 1
            else math.nan
        )
        return TraceEstimate(mean, stderr, passes, "hutchinson"), self._provenance(
            "pyhessian.trace", matrix, passes, start
        )

    def density(self, matrix: str, seed: int) -> tuple[Density, Provenance]:
        """SLQ (``hessian.density``) nodes and weights, broadened on curvkit's grid."""
        start = time.perf_counter()
        steps = min(self.options.density_steps, self.problem.num_params)
        with self._session(matrix, seed) as (engine, loader):
            nodes, weights = engine.density(iter=steps, n_v=self.options.density_probes)
            passes = loader.passes
        result = broadened_density(
            torch.tensor(nodes, dtype=torch.float64),
            torch.tensor(weights, dtype=torch.float64),
            passes,
            self.options.density_grid,
            relative_sigma=self.options.density_relative_sigma,
        )
        return result, self._provenance("pyhessian.density", matrix, passes, start, note=EIG_NOTE)
