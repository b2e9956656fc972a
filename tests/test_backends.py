"""Every backend against the dense float64 torch.func references on the digits MLP (and the CNN
for the backends with per-example factors).

Tolerances: products and class sums are exact computations, so 1e-8 relative (rounding only);
top eigenvalues 1e-4 relative through Lanczos with curvkit's defaults (error ≤ residual ≈ 1e-6 ‖A‖)
and 1e-3 through PyHessian's power iteration (its Rayleigh-quotient stopping rule).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import curvkit
from curvkit.problem import Problem, model_guard
from curvkit.registry import get_backend
from tests import reference

BACKENDS = ["torchfunc", "backpack", "pyhessian"]
RTOL = 1e-8
EIG_RTOL = {"torchfunc": 1e-4, "backpack": 1e-4, "pyhessian": 1e-3}


def make(name, model, loader):
    return get_backend(name)(Problem(model, loader))


@pytest.mark.parametrize("name", BACKENDS)
def test_products_match_dense(name, digits_problem, dense_mlp):
    model, loader = digits_problem
    with model_guard(model):
        backend = make(name, model, loader)
        v = torch.randn(backend.problem.num_params, dtype=torch.float64)
        assert reference.rel_err(backend.hvp(v), dense_mlp["hessian"] @ v) < RTOL
        assert reference.rel_err(backend.ggnvp(v), dense_mlp["ggn"] @ v) < RTOL
        residual = backend.matvec("residual")(v)
        assert reference.rel_err(residual, (dense_mlp["hessian"] - dense_mlp["ggn"]) @ v) < RTOL


@pytest.mark.parametrize("name", BACKENDS)
def test_class_deltas_match_dense(name, digits_problem, dense_mlp):
    model, loader = digits_problem
    with model_guard(model):
        deltas = make(name, model, loader).class_deltas()
    d, y = dense_mlp["deltas"], dense_mlp["labels"]
    expected = torch.stack([d[y == c].sum(0) for c in range(10)])
    assert reference.rel_err(deltas.sums, expected) < RTOL
    assert deltas.counts.tolist() == [30] * 10
    if deltas.square_norm_sum is not None:
        assert deltas.square_norm_sum == pytest.approx(float((d**2).sum()), rel=RTOL)


@pytest.mark.parametrize("name", ["backpack"])
def test_class_deltas_on_cnn(name, cnn_problem):
    model, loader = cnn_problem
    x, y = reference.all_data(loader)
    d = reference.papyan_deltas(model, x)
    with model_guard(model):
        deltas = make(name, model, loader).class_deltas()
    expected = torch.stack([d[y == c].sum(0) for c in range(10)])
    assert reference.rel_err(deltas.sums, expected) < RTOL


@pytest.mark.parametrize("name", BACKENDS)
def test_analyze_spectra_and_untouched_model(name, digits_problem, dense_mlp):
    model, loader = digits_problem
    before = [p.detach().clone() for p in model.parameters()]
    report = curvkit.analyze(
        model, loader, backend=name, quantities=["hessian", "ggn"], top_k=10, progress=False
    )
    for matrix in ("hessian", "ggn"):
        exact = np.linalg.eigvalsh(dense_mlp[matrix].numpy())[::-1][:10]
        s = getattr(report, matrix)
        np.testing.assert_allclose(s.top_eigenvalues, exact, rtol=EIG_RTOL[name], err_msg=matrix)
        trace = float(torch.trace(dense_mlp[matrix]))
        assert abs(s.trace - trace) < 4 * s.trace_stderr, matrix
        d = s.density
        assert np.trapezoid(d["values"], d["grid"]) == pytest.approx(1.0, abs=1e-3)
        assert s.provenance["top_eigenvalues"].backend == name
    # the model is untouched and torch.func still works on it (BackPACK's extend would break it)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert not model.training
    x = loader.dataset[:4][0]
    torch.func.grad(lambda p: torch.func.functional_call(model, p, (x,)).sum())(
        {n: p.detach() for n, p in model.named_parameters()}
    )


def test_pyhessian_routines_are_reported(digits_problem):
    model, loader = digits_problem
    report = curvkit.analyze(
        model, loader, backend="pyhessian", quantities=["ggn"], top_k=3, progress=False
    )
    prov = report.ggn.provenance
    assert prov["top_eigenvalues"].routine == "pyhessian.eigenvalues"
    assert prov["trace"].routine == "pyhessian.trace"
    assert prov["density"].routine == "pyhessian.density" and "torch.eig" in prov["density"].note
    assert prov["top_eigenvalues"].derived  # G through the Gauss–Newton surrogate


def test_backpack_rejects_unsupported_layer(digits_problem):
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 10)
    ).double()
    _, loader = digits_problem
    with model_guard(model):
        backend = make("backpack", model, loader)
        with pytest.raises(curvkit.UnsupportedError, match=r"1 \(LayerNorm\).*torchfunc"):
            backend.class_deltas()
