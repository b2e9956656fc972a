"""Shared test problems and the one list of backends.

Test cases: a trained digits MLP (float64, P = 2410) on a 300-example subset with an unequal last
batch (128 + 128 + 44), and a trained digits CNN (P = 1030, 100 examples in batches of 64 + 36),
each with dense float64 references built by ``tests/reference.py``. The MLP uses tanh, not ReLU:
in a ReLU network each layer's own block of H = Hess − G vanishes, so tr H = 0 and every trace
test of H would compare zeros.

Backends: every registered one plus the minimal per-batch adapter of ``tests/minimal_backend.py``;
``backend_params(*needs)`` lists those that declare the capabilities a test needs, each skipped
with the reason when its library is not installed. Tests marked ``slow`` (the wrapped libraries'
runs, reproductions, distributed runs, full comparisons) are left out by ``pytest -m "not
slow"``; CI runs everything.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import sys
import textwrap
from collections.abc import Callable

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from curvkit.backend import Backend
from curvkit.datasets import digits_loader
from curvkit.errors import MissingDependencyError
from curvkit.linalg import Options
from curvkit.models import digits_cnn, digits_mlp, train
from curvkit.problem import Problem
from curvkit.registry import GROUP
from tests import reference
from tests.minimal_backend import MinimalBackend


def backend_class(name: str) -> type[Backend]:
    """The class of a registered backend (or the minimal test adapter), installed or not."""
    if name == MinimalBackend.name:
        return MinimalBackend
    (point,) = importlib.metadata.entry_points(group=GROUP, name=name)
    return point.load()


BACKENDS = sorted(ep.name for ep in importlib.metadata.entry_points(group=GROUP))


QUICK_BACKENDS = ("torchfunc", MinimalBackend.name)  # the rest are marked slow


def backend_params(*needs: str, minimal: bool = True) -> list:
    """The backends declaring every capability in ``needs``, as pytest params (skipped with the
    reason when the library is missing; the wrapped libraries marked ``slow``, so that
    ``pytest -m "not slow"`` checks the contract on torch.func and the minimal adapter)."""
    params = []
    for name in BACKENDS + ([MinimalBackend.name] if minimal else []):
        cls = backend_class(name)
        if not all(need in cls.capabilities for need in needs):
            continue
        marks = [] if name in QUICK_BACKENDS else [pytest.mark.slow]
        if reason := missing(cls):
            marks.append(pytest.mark.skip(reason=reason))
        params.append(pytest.param(name, marks=marks))
    return params


def missing(cls: type[Backend]) -> str | None:
    """Why a backend's tests are skipped: its library is not installed. Found without importing
    it (the three libraries' imports took 2 s of every collection); an installed library that
    fails to import fails its tests instead of skipping them."""
    if cls.module is None or importlib.util.find_spec(cls.module) is not None:
        return None
    try:
        cls.check_available()
    except MissingDependencyError as error:
        return str(error)
    return None


def installed(params: list) -> list[str]:
    """The names of ``backend_params`` whose library is installed (not skipped)."""
    return [p.values[0] for p in params if not any(m.name == "skip" for m in p.marks)]


def requires(name: str) -> Callable[[Callable], Callable]:
    """A decorator for a test of one wrapped library: marked ``slow``, and skipped with the
    reason when that library is missing."""
    reason = missing(backend_class(name))

    def decorate(test: Callable) -> Callable:
        test = pytest.mark.slow(test)
        return pytest.mark.skip(reason=reason)(test) if reason else test

    return decorate


def make_backend(name: str, model: nn.Module, data, options: Options | None = None) -> Backend:
    return backend_class(name)(Problem(model, data), options)


@pytest.fixture(scope="session")
def digits_problem():
    loader = digits_loader(batch_size=128, samples_per_class=30)
    model = train(
        digits_mlp(activation=nn.Tanh),
        digits_loader(batch_size=32, samples_per_class=30, shuffle=True),
        epochs=20,
        progress=False,
    )
    return model, loader


@pytest.fixture(scope="session")
def cnn_problem():
    loader = digits_loader(batch_size=64, samples_per_class=10)
    model = train(
        digits_cnn(),
        digits_loader(batch_size=20, samples_per_class=10, shuffle=True),
        epochs=10,
        progress=False,
    )
    return model, loader


@pytest.fixture(scope="session")
def dense_mlp(digits_problem):
    return reference.dense_references(*digits_problem)


@pytest.fixture(scope="session")
def dense_mlp_eigen(dense_mlp) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The top 20 eigenpairs of the digits MLP's dense Hessian, G and H = Hess − G, computed
    once per session."""
    return {
        name: top_eigh(matrix, 20)
        for name, matrix in (
            ("hessian", dense_mlp["hessian"]),
            ("ggn", dense_mlp["ggn"]),
            ("residual", dense_mlp["hessian"] - dense_mlp["ggn"]),
        )
    }


def top_eigh(matrix: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k largest eigenvalues (descending) of a dense symmetric matrix and their
    eigenvectors (columns, same order): LAPACK's subset eigensolver, exact to rounding and
    several times faster than the full spectrum (torch.linalg.eigh of a 2048² block took 1.5 s
    of the quick run)."""
    size = matrix.shape[0]
    values, vectors = scipy.linalg.eigh(matrix.numpy(), subset_by_index=[size - k, size - 1])
    return values[::-1].copy(), vectors[:, ::-1].copy()


@pytest.fixture(scope="session")
def dense_cnn(cnn_problem):
    return reference.dense_references(*cnn_problem)


@pytest.fixture(scope="session", params=["mlp", "cnn"])
def case(request):
    """(model, loader, dense references) of each test case, with the Kronecker factors, the
    weights' places in the flat parameters, the top-4 eigenvalues of the Hessian and the top-4
    eigenpairs of each weight's block (computed once, not per backend)."""
    problem, dense = {"mlp": ("digits_problem", "dense_mlp"), "cnn": ("cnn_problem", "dense_cnn")}[
        request.param
    ]
    model, loader = request.getfixturevalue(problem)
    dense = dict(request.getfixturevalue(dense))
    x, _ = reference.all_data(loader)
    dense["kronecker"] = reference.kronecker_factors(model, x, dense["ggn"])
    dense["weights"] = reference.weight_slices(model)
    dense["hessian_top"] = top_eigh(dense["hessian"], 4)[0]
    dense["block_top"] = {
        layer: top_eigh(dense["hessian"][where, where], 4)
        for layer, where in dense["weights"].items()
    }
    return model, loader, dense


@pytest.fixture
def plugin_backend(tmp_path, monkeypatch):
    """Register a third-party backend: ``plugin_backend(name, class_source)`` writes a module and
    a dist-info with an entry point in the group ``curvkit.backends`` onto sys.path."""

    def register(name: str, source: str) -> None:
        module = f"plugin_{name}"
        (tmp_path / f"{module}.py").write_text(textwrap.dedent(source))
        dist = tmp_path / f"{module}-1.0.dist-info"
        dist.mkdir()
        (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 1.0\n")
        (dist / "entry_points.txt").write_text(f"[curvkit.backends]\n{name} = {module}:Plugin\n")
        monkeypatch.syspath_prepend(str(tmp_path))
        monkeypatch.delitem(sys.modules, module, raising=False)

    return register
