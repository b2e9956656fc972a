"""curvkit: the curvature of a trained classifier's loss, through one interface over several
curvature libraries (torch.func, BackPACK, PyHessian, curvlinops).

>>> import curvkit                                                  # doctest: +SKIP
>>> report = curvkit.analyze(model, loader, backend="torchfunc")    # doctest: +SKIP
>>> report.hessian.top_eigenvalues                                  # doctest: +SKIP
"""

__version__ = "0.1.0"

from curvkit.analysis import analyze  # noqa: E402
from curvkit.backend import Backend  # noqa: E402
from curvkit.benchmark import bench  # noqa: E402
from curvkit.comparison import assert_backends_agree, compare  # noqa: E402
from curvkit.errors import (  # noqa: E402
    BackendNotFoundError,
    CurvkitError,
    InvalidInputError,
    MissingDependencyError,
    PeerFailedError,
    UnsupportedError,
)
from curvkit.linalg import Operator, Options  # noqa: E402
from curvkit.problem import Problem, model_guard  # noqa: E402
from curvkit.quantities.layerwise import layer_trace_penalty  # noqa: E402
from curvkit.registry import backends, get_backend  # noqa: E402
from curvkit.report import Provenance, Report  # noqa: E402

__all__ = [
    "Backend",
    "BackendNotFoundError",
    "CurvkitError",
    "InvalidInputError",
    "MissingDependencyError",
    "Operator",
    "Options",
    "PeerFailedError",
    "Problem",
    "Provenance",
    "Report",
    "UnsupportedError",
    "analyze",
    "assert_backends_agree",
    "backends",
    "bench",
    "compare",
    "get_backend",
    "layer_trace_penalty",
    "model_guard",
]
