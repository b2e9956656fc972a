"""Every backend against the dense float64 torch.func references on the digits MLP (and the CNN
for the backends with per-example factors).

Tolerances: products and class sums are exact computations, so 1e-8 relative (rounding only);
top eigenvalues 1e-4 relative through Lanczos with curvkit's defaults (error ≤ residual ≈ 1e-6 ‖A‖)
and through ARPACK (curvlinops, tol 1e-6 relative), 1e-3 through PyHessian's power iteration (its
Rayleigh-quotient stopping rule).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import curvkit
from curvkit.datasets import digits_loader
from curvkit.problem import Problem, model_guard
from curvkit.registry import get_backend
from tests import reference

BACKENDS = ["torchfunc", "backpack", "pyhessian", "curvlinops"]
RTOL = 1e-8
EIG_RTOL = {"torchfunc": 1e-4, "backpack": 1e-4, "pyhessian": 1e-3, "curvlinops": 1e-4}


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
        # 4 standard errors of a stochastic estimate; an exact one (stderr 0) to rounding
        assert abs(s.trace - trace) <= 4 * s.trace_stderr + RTOL * abs(trace), matrix
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


@pytest.mark.parametrize("fixture", ["digits_problem", "cnn_problem"])
def test_backpack_exact_traces(fixture, request):
    """DiagHessian / DiagGGNExact sums are exact: rounding only (1e-8)."""
    model, loader = request.getfixturevalue(fixture)
    x, y = reference.all_data(loader)
    hessian, ggn = reference.dense_hessian(model, x, y), reference.dense_ggn(model, x)
    expected = {"hessian": hessian, "ggn": ggn, "residual": hessian - ggn}
    with model_guard(model):
        backend = make("backpack", model, loader)
        for matrix, dense in expected.items():
            estimate, provenance = backend.trace(matrix, seed=0)
            exact = float(torch.trace(dense))
            scale = float(torch.trace(hessian).abs())  # tr H = 0 for the ReLU CNN
            assert abs(estimate.value - exact) < RTOL * scale, matrix
            assert estimate.stderr == 0.0 and provenance.routine.startswith("backpack.Diag")


def backpack_with(model, loader, **settings):
    options = curvkit.Options(backend={"backpack": settings})
    return get_backend("backpack")(Problem(model, loader), options)


def test_backpack_monte_carlo_options(digits_problem, dense_mlp):
    """KFAC's B and DiagGGNMC's trace are unbiased Monte-Carlo estimates of KFLR's B and tr G.

    With 1000 sampled classes per example, B's max-entry error measured 0.015–0.018 (it falls
    as 1/sqrt(samples): 0.15 at 10, 0.033 at 200); 0.05 is three times that. KFAC's A is exact.
    """
    model, loader = digits_problem
    with model_guard(model):
        exact = make("backpack", model, loader).kronecker_factors()
        kfac = backpack_with(model, loader, kronecker="kfac", mc_samples=1000).kronecker_factors()
        for name, factors in exact.items():
            assert reference.rel_err(kfac[name].A, factors.A) < RTOL
            assert 1e-4 < reference.rel_err(kfac[name].B, factors.B) < 0.05
        estimate, _ = backpack_with(model, loader, ggn_trace="mc", mc_samples=20).trace("ggn", 0)
    trace = float(torch.trace(dense_mlp["ggn"]))
    assert 0 < estimate.stderr < 0.2 * trace
    assert abs(estimate.value - trace) < 4 * estimate.stderr


@pytest.mark.parametrize(
    "settings, match",
    [
        ({"kronecker": "exact"}, "kronecker.*kflr, kfac"),
        ({"mc_samples": "many"}, "mc_samples.*int"),
        ({"samples": 3}, "unknown setting.*samples.*settings are ggn_trace, kronecker, mc_samples"),
    ],
)
def test_backpack_rejects_bad_settings(settings, match, digits_problem):
    model, loader = digits_problem
    with pytest.raises(curvkit.InvalidInputError, match=match):
        backpack_with(model, loader, **settings)


@pytest.mark.parametrize("name", BACKENDS)
def test_float32_models(name, digits_problem, dense_mlp):
    """A float32 copy of the model (and float32 data) against the float64 dense reference.

    float32 rounding (ε ≈ 6e-8) accumulated over 300 examples measured ≤ 5e-7 relative on the
    top eigenvalues through Lanczos and 4e-6 through PyHessian; 1e-4 leaves ample room while
    still catching a dtype mix-up (which errs by 1e-2 or more, or raises).
    """
    model, _ = digits_problem
    model32 = copy.deepcopy(model).float()
    loader = digits_loader(batch_size=128, samples_per_class=30, dtype=torch.float32)
    report = curvkit.analyze(
        model32, loader, backend=name, quantities=["hessian"], top_k=5, progress=False
    )
    exact = np.linalg.eigvalsh(dense_mlp["hessian"].numpy())[::-1][:5]
    np.testing.assert_allclose(report.hessian.top_eigenvalues, exact, rtol=1e-4)
    trace = float(torch.trace(dense_mlp["hessian"]))
    assert abs(report.hessian.trace - trace) <= 4 * report.hessian.trace_stderr + 1e-5 * trace
    assert next(model32.parameters()).dtype == torch.float32


class ResidualMLP(torch.nn.Module):
    """Not a Sequential: a tanh MLP with a skip connection, activations as modules or functions."""

    def __init__(self, functional: bool = False) -> None:
        super().__init__()
        self.functional = functional
        self.fc1, self.fc2, self.head = (
            torch.nn.Linear(64, 16),
            torch.nn.Linear(16, 16),
            torch.nn.Linear(16, 10),
        )
        self.act1, self.act2 = torch.nn.Tanh(), torch.nn.Tanh()

    def forward(self, x):
        h = torch.tanh(self.fc1(x)) if self.functional else self.act1(self.fc1(x))
        return self.head(h + self.act2(self.fc2(h)))


def test_backpack_converter_on_a_residual_network(digits_problem):
    """BackPACK's converter handles the skip connection for SqrtGGNExact and DiagGGNExact (both
    exact: 1e-8); its DiagHessian lacks the inserted SumModule, so the Hessian trace falls back to
    Hutch++ on BackPACK's products (said in provenance); KFLR cannot branch and says so."""
    _, loader = digits_problem
    torch.manual_seed(0)
    model = ResidualMLP().double()
    x, y = reference.all_data(loader)
    with model_guard(model):
        backend = make("backpack", model, loader)
        expected = make("torchfunc", model, loader).class_deltas().sums
        assert reference.rel_err(backend.class_deltas().sums, expected) < RTOL
        ggn_trace, _ = backend.trace("ggn", seed=0)
        exact = float(torch.trace(reference.dense_ggn(model, x)))
        assert ggn_trace.value == pytest.approx(exact, rel=RTOL)
        _, provenance = backend.trace("hessian", seed=0)
        assert provenance.derived and "SumModule" in provenance.note
        with pytest.raises(curvkit.UnsupportedError, match="KFLR cannot handle the ResidualMLP"):
            backend.kronecker_factors()
    assert isinstance(model.act1, torch.nn.Tanh)  # the converter worked on a copy


def test_backpack_names_what_it_cannot_follow(digits_problem):
    """A functional call (torch.tanh) is invisible to BackPACK's hooks: a clear error, no number."""
    _, loader = digits_problem
    model = ResidualMLP(functional=True).double()
    with model_guard(model):
        with pytest.raises(curvkit.UnsupportedError, match="SqrtGGNExact cannot handle.*torchfunc"):
            make("backpack", model, loader).class_deltas()
