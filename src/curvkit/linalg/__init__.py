"""Backend-agnostic matrix-free numerics: Krylov methods (Lanczos, SLQ), trace estimators,
subspace helpers, and the routines on linear operators (``curvkit.linalg.operator``)."""

from curvkit.linalg.krylov import Density, EigenResult, lanczos, slq_density
from curvkit.linalg.operator import Operator, Options
from curvkit.linalg.subspace import gram_eigenvalues, orthonormal_basis, subspace_overlap
from curvkit.linalg.trace import TraceEstimate, estimate_trace, hutch_plus_plus, hutchinson

__all__ = [
    "Density",
    "EigenResult",
    "Operator",
    "Options",
    "TraceEstimate",
    "estimate_trace",
    "gram_eigenvalues",
    "hutch_plus_plus",
    "hutchinson",
    "lanczos",
    "orthonormal_basis",
    "slq_density",
    "subspace_overlap",
]
