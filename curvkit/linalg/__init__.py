"""Backend-agnostic matrix-free numerics on a matvec."""

from curvkit.linalg.lanczos import Density, EigenResult, lanczos, slq_density
from curvkit.linalg.trace import TraceEstimate, estimate_trace, hutch_plus_plus, hutchinson

__all__ = [
    "Density",
    "EigenResult",
    "TraceEstimate",
    "estimate_trace",
    "hutch_plus_plus",
    "hutchinson",
    "lanczos",
    "slq_density",
]
