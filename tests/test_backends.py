"""Every backend (and the minimal per-batch adapter) against the dense float64 references of
each test case (tests/conftest.py): products, class sums, Kronecker factors, the layerwise
quantity, and spectra end to end.

Tolerances: products, class sums and Kronecker factors are exact computations, so 1e-8 relative
(rounding only); top eigenvalues 1e-4 relative through Lanczos with curvkit's defaults (error ≤
residual ≈ 1e-6 ‖A‖) and through ARPACK (curvlinops, tol 1e-6 relative), 1e-3 through PyHessian's
power iteration (its Rayleigh-quotient stopping rule); stochastic traces within 4 standard errors.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import curvkit
from curvkit.datasets import digits_loader
from curvkit.linalg.operator import trace
from curvkit.linalg.subspace import subspace_overlap
from curvkit.problem import model_guard
from curvkit.quantities.layerwise import kronecker_top, layerwise, psd_eigh
from tests import reference
from tests.conftest import BACKENDS, backend_params, make_backend, requires

RTOL = 1e-8
needs_backpack, needs_pyhessian = requires("backpack"), requires("pyhessian")
EIG_RTOL = {"pyhessian": 1e-3}  # else 1e-4


@pytest.mark.parametrize("name", backend_params("hvp", "ggnvp"))
def test_products_match_dense(name, case):
    """Full, residual and block products, one vector and a block of three at once."""
    model, loader, dense = case
    hessian, ggn = dense["hessian"], dense["ggn"]
    with model_guard(model):
        backend = make_backend(name, model, loader)
        g = torch.Generator().manual_seed(0)
        v = torch.randn(backend.problem.num_params, 3, generator=g, dtype=torch.float64)
        assert reference.rel_err(backend.hvp(v[:, 0]), hessian @ v[:, 0]) < RTOL
        assert reference.rel_err(backend.ggnvp(v), ggn @ v) < RTOL
        residual = backend.operator("residual").matmat(v)
        assert reference.rel_err(residual, (hessian - ggn) @ v) < RTOL
        name_, where = next(reversed(dense["weights"].items()))
        for matrix, full in (("hessian", hessian), ("ggn", ggn)):
            block = backend.operator(matrix, f"{name_}.weight").matmat(v[where])
            assert reference.rel_err(block, full[where, where] @ v[where]) < RTOL, matrix
            assert not block.requires_grad


@pytest.mark.parametrize("labels", ["digits", "predicted"])
@pytest.mark.parametrize("name", backend_params("hvp", "ggnvp"))
def test_products_of_confident_predictions_keep_their_digits(name, labels):
    """With 1 − p_top below float64's resolution (last layer × 10⁴), torch's cross-entropy
    double backward cancels every digit of G's part of a product: the products came out up to
    50 % off (λ₁ of G 7 %, tr G 47 % with an error bar of 1e-26) until every backend took them
    from curvkit's criteria (curvkit.loss). With the model's predictions as labels (the end of
    training) the Hessian is as small as G, which catches a Hessian product through the loss's
    own double backward. Against a reference free of that cancellation."""
    x, y = curvkit.datasets.digits_tensors(samples_per_class=4)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 8), torch.nn.Tanh(), torch.nn.Linear(8, 10)
    ).double()
    with torch.no_grad():
        model[2].weight.mul_(1e4)
    x = x.double()
    logits, jac = reference.per_example_jacobians(model, x)
    y = logits.argmax(1) if labels == "predicted" else y
    assert (torch.softmax(logits, 1).max(1).values == 1).float().mean() > 0.5
    ggn, hessian = reference._ggn(logits, jac), reference.confident_hessian(model, x, y)
    v = torch.randn(ggn.shape[0], 2, generator=torch.Generator().manual_seed(0), dtype=x.dtype)
    with model_guard(model):
        backend = make_backend(name, model, [(x[:20], y[:20]), (x[20:], y[20:])])
        assert reference.rel_err(backend.ggnvp(v), ggn @ v) < RTOL
        assert reference.rel_err(backend.hvp(v), hessian @ v) < RTOL
        residual = backend.operator("residual").matmat(v)
        assert reference.rel_err(residual, (hessian - ggn) @ v) < RTOL


@pytest.mark.parametrize("name", backend_params("class_deltas"))
def test_class_deltas_match_dense(name, case):
    model, loader, dense = case
    with model_guard(model):
        deltas = make_backend(name, model, loader).class_deltas()
    d, y = dense["deltas"], dense["labels"]
    expected = torch.stack([d[y == c].sum(0) for c in range(10)])
    assert reference.rel_err(deltas.sums, expected) < RTOL
    assert deltas.counts.tolist() == torch.bincount(y, minlength=10).tolist()
    if deltas.square_norm_sum is not None:
        assert deltas.square_norm_sum == pytest.approx(float((d**2).sum()), rel=RTOL)
    assert deltas.provenance.derived == (deltas.square_norm_sum is None)


@pytest.mark.parametrize("name", backend_params("kronecker_factors"))
def test_kronecker_factors_match_dense(name, case):
    """B (the bias's block of G) and A (mean of the unfolded inputs' outer products): exact, 1e-8.
    The CNN pins the convolution convention (B summed, A averaged over positions)."""
    model, loader, dense = case
    with model_guard(model):
        factors = make_backend(name, model, loader).kronecker_factors()
    assert factors.keys() == dense["kronecker"].keys()
    for layer, (b, a) in dense["kronecker"].items():
        assert reference.rel_err(factors[layer].B, b) < RTOL, layer
        assert reference.rel_err(factors[layer].A, a) < RTOL, layer


@pytest.mark.parametrize("name", backend_params("kronecker_factors", "hvp", "ggnvp"))
def test_layerwise_matches_dense(name, case):
    """Each layer's block: top eigenvalues (1e-4), trace (within 4 standard errors, or to
    rounding when exact), Kronecker eigenvalues from the dense factors (1e-8), and the overlap
    of B ⊗ A's top eigenvectors with the dense block's (the top-4 eigenvalues are separated by
    ≥ 1 % here, so Lanczos' eigenvectors are accurate to ~1e-6; 1e-4 absolute), and the top-4
    profile against the full Hessian's (ratios of eigenvalues each within 1e-4: 5e-4 absolute)
    and λ₁(A)/tr A from the dense A (1e-8)."""
    model, loader, dense = case
    options = curvkit.Options(
        trace_matvecs=30, density_probes=1, density_steps=10, layer_density=True
    )
    with model_guard(model):
        layers = layerwise(make_backend(name, model, loader, options), top_k=4)
    assert layers.keys() == dense["kronecker"].keys()
    full = dense["hessian_top"]
    for layer, where in dense["weights"].items():
        block = dense["hessian"][where, where]
        values, vectors = dense["block_top"][layer]
        got = layers[layer]
        np.testing.assert_allclose(got.top_eigenvalues, values, rtol=1e-4)
        profile = np.mean(np.abs(values[1:] / values[0] - full[1:] / full[0]))
        assert got.profile_distance == pytest.approx(profile, abs=5e-4), layer
        exact_trace = float(torch.trace(block))
        assert abs(got.trace - exact_trace) <= 4 * got.trace_stderr + RTOL * abs(exact_trace)
        b, a = dense["kronecker"][layer]
        kron_values, kron_vectors = kronecker_top(psd_eigh(b), psd_eigh(a), 4)
        np.testing.assert_allclose(got.kronecker["top_eigenvalues"], kron_values, rtol=RTOL)
        share = np.linalg.eigvalsh(a.numpy())[-1] / float(torch.trace(a))
        assert got.kronecker["A_top_share"] == pytest.approx(share, rel=RTOL), layer
        expected = subspace_overlap(torch.from_numpy(vectors), kron_vectors)
        assert got.overlap["hessian"] == pytest.approx(expected, abs=1e-4), layer
    assert sum(layer.closest_to_full for layer in layers.values()) == 1


@pytest.mark.parametrize("name", backend_params("hvp", "ggnvp", minimal=False))
def test_analyze_spectra_and_untouched_model(name, digits_problem, dense_mlp, dense_mlp_eigen):
    model, loader = digits_problem
    model = copy.deepcopy(model).train()  # the mode must come back, whatever the backend does
    params, buffers = list(model.parameters()), list(model.buffers())
    before = [p.detach().clone() for p in params]
    report = curvkit.analyze(
        model, loader, backend=name, quantities=["hessian", "ggn"], top_k=10, progress=False
    )
    for matrix in ("hessian", "ggn"):
        exact = dense_mlp_eigen[matrix][0][:10]
        s = getattr(report, matrix)
        rtol = EIG_RTOL.get(name, 1e-4)
        np.testing.assert_allclose(s.top_eigenvalues, exact, rtol=rtol, err_msg=matrix)
        exact_trace = float(torch.trace(dense_mlp[matrix]))
        # 4 standard errors of a stochastic estimate; an exact one (stderr 0) to rounding
        assert abs(s.trace - exact_trace) <= 4 * s.trace_stderr + RTOL * abs(exact_trace), matrix
        d = s.density
        assert np.trapezoid(d["values"], d["grid"]) == pytest.approx(1.0, abs=1e-3)
        assert s.provenance["top_eigenvalues"].backend == name
    # the same objects, values, grads and mode; torch.func still works (BackPACK's extend would
    # break it)
    assert all(a is b for a, b in zip(params, model.parameters()))
    assert all(a is b for a, b in zip(buffers, model.buffers()))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())
    assert model.training and all(m.training for m in model.modules())
    x = loader.dataset[:4][0]
    torch.func.grad(lambda p: torch.func.functional_call(model, p, (x,)).sum())(
        {n: p.detach() for n, p in model.named_parameters()}
    )


def test_every_registered_backend_is_tested():
    assert set(BACKENDS) == {"torchfunc", "backpack", "pyhessian", "curvlinops"}


@needs_backpack
def test_a_per_quantity_backend_setting_applies_to_that_quantity(digits_problem):
    """``options={"ggn": {"backend": {...}}}`` reaches the backend for G only (it was once
    read at construction and ignored)."""
    model, loader = digits_problem
    options = {"ggn": {"backend": {"backpack": {"ggn_trace": "mc", "mc_samples": 2}}}}
    report = curvkit.analyze(
        model,
        loader,
        backend="backpack",
        quantities=["hessian", "ggn"],
        top_k=2,
        progress=False,
        options={"density_probes": 1, "density_steps": 5, **options},
    )
    assert report.ggn.provenance["trace"].routine == "backpack.DiagGGNMC"
    assert report.ggn.trace_stderr > 0
    assert report.hessian.provenance["trace"].routine == "backpack.DiagHessian"


@needs_pyhessian
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


@needs_pyhessian
@pytest.mark.parametrize("seed", range(4))
def test_pyhessian_trace_uses_every_probe_of_an_indefinite_matrix(seed):
    """PyHessian's Hutchinson loop stops once ``|Δmean| / (mean + 1e-6) < tol``, which holds for
    any tol ≥ 0 while the running mean is negative: on an untrained MLP's residual H it stopped
    after 14, 2, 2 and 2 of 30 probes for these seeds, the error bar from those."""
    x, y = curvkit.datasets.digits_tensors(samples_per_class=4)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 8), torch.nn.Tanh(), torch.nn.Linear(8, 10)
    ).double()
    report = curvkit.analyze(
        model, [(x.double(), y)], backend="pyhessian", quantities=["residual"], top_k=1,
        seed=seed, progress=False, options={"trace_matvecs": 30, "density_probes": 0},
    )  # fmt: skip
    assert report.residual.provenance["trace"].matvecs == 30


@needs_pyhessian
def test_pyhessian_workarounds_stay_inside_pyhessian(digits_problem):
    """While PyHessian runs a float64 model, code outside its module (here a forward hook of the
    model, called from inside PyHessian) sees torch as it was: the default dtype, torch.eig
    absent or as it was; and the caller's random generator does not move."""
    model, loader = digits_problem
    model = copy.deepcopy(model)
    seen = []
    model[0].register_forward_hook(
        lambda *_: seen.append((torch.get_default_dtype(), getattr(torch, "eig", None)))
    )
    outside = (torch.get_default_dtype(), getattr(torch, "eig", None))
    state = torch.random.get_rng_state()
    report = curvkit.analyze(
        model,
        loader,
        backend="pyhessian",
        quantities=["hessian"],
        top_k=2,
        progress=False,
        options={"trace_matvecs": 3, "density_probes": 1, "density_steps": 5},
    )
    assert seen and set(seen) == {outside} and outside[0] == torch.float32
    assert torch.equal(torch.random.get_rng_state(), state)
    assert report.hessian.provenance["density"].routine == "pyhessian.density"


@needs_backpack
def test_backpack_rejects_unsupported_layer(digits_problem):
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 10)
    ).double()
    _, loader = digits_problem
    with model_guard(model):
        with pytest.raises(curvkit.UnsupportedError, match=r"1 \(LayerNorm\)\.$"):
            make_backend("backpack", model, loader).class_deltas()
    # through analyze: found before any pass, with the backends that can, computed
    with pytest.raises(
        curvkit.UnsupportedError, match=r"1 \(LayerNorm\); backend .*'torchfunc' can"
    ):
        curvkit.analyze(model, loader, "backpack", ["hessian", "classmeans"], progress=False)


@needs_backpack
@pytest.mark.parametrize("fixture", ["digits_problem", "cnn_problem"])
def test_backpack_exact_traces(fixture, request):
    """DiagHessian / DiagGGNExact sums are exact: rounding only (1e-8)."""
    model, loader = request.getfixturevalue(fixture)
    x, y = reference.all_data(loader)
    hessian, ggn = reference.dense_hessian(model, x, y), reference.dense_ggn(model, x)
    expected = {"hessian": hessian, "ggn": ggn, "residual": hessian - ggn}
    with model_guard(model):
        backend = make_backend("backpack", model, loader)
        for matrix, dense in expected.items():
            estimate, provenance = trace(backend.operator(matrix), backend.options, 0)
            exact = float(torch.trace(dense))
            scale = float(torch.trace(hessian).abs())  # tr H = 0 for the ReLU CNN
            assert abs(estimate.value - exact) < RTOL * scale, matrix
            assert estimate.stderr == 0.0 and provenance.routine.startswith("backpack.Diag")


@requires("curvlinops")
def test_curvlinops_eigenpairs_arpack_left_unconverged():
    """With a product budget ARPACK cannot converge in, it returns only the converged pairs
    (none here): curvkit's Lanczos on curvlinops' products gives the top k, marked unconverged
    (an IndexError on an empty block of vectors before)."""
    model, loader = curvkit.models.trained_digits_mlp(3, progress=False, samples_per_class=4)
    with pytest.warns(UserWarning, match="did not converge"):
        report = curvkit.analyze(
            model, loader, "curvlinops", ["residual"], top_k=2, progress=False,
            options={"lanczos_max_iter": 1, "trace_matvecs": 0, "density_probes": 0},
        )  # fmt: skip
    assert len(report.residual.top_eigenvalues) == 2 and not report.residual.converged
    assert "ARPACK converged 0 of 2" in report.residual.provenance["top_eigenvalues"].note


def test_curvlinops_trace_error_bars_are_honest():
    """Over 60 seeds, the Hutch++ trace of the Hessian from curvlinops' 60 products is never more
    than 4 of its standard errors off the exact trace (curvkit's estimator, 19 degrees of
    freedom). The spread of 3 runs of curvlinops' hutchpp_trace (2 degrees of freedom) put 2 of
    them 6.8 standard errors off, which `compare` reports as disagreement."""
    model, loader = curvkit.models.trained_digits_mlp(3, progress=False, samples_per_class=10)
    exact = float(torch.trace(reference.dense_hessian(model, *reference.all_data(loader))))
    options = curvkit.Options(trace_matvecs=60)
    with model_guard(model):
        operator = make_backend("curvlinops", model, loader).operator("hessian")
        estimates = [trace(operator, options, s)[0] for s in range(60)]
    outliers = [e for e in estimates if abs(e.value - exact) > 4 * e.stderr]
    assert not outliers, [(e.value, e.stderr) for e in outliers]


def backpack_with(model, loader, **settings):
    options = curvkit.Options(backend={"backpack": settings})
    return make_backend("backpack", model, loader, options)


@needs_backpack
def test_backpack_monte_carlo_options(digits_problem, dense_mlp):
    """KFAC's B and DiagGGNMC's trace are unbiased Monte-Carlo estimates of KFLR's B and tr G.

    With C = 10 sampled classes per example (the most curvkit allows: beyond, the exact
    extensions cost less), B's max-entry error measured 0.16 and 0.24 for the two layers (it
    falls as 1/sqrt(samples): 0.016 at 1000); 0.75 is three times the larger, and a B scaled
    by 2 or by the samples' number is off by 1 or more. KFAC's A is exact. Eleven samples are
    refused."""
    model, loader = digits_problem
    with model_guard(model):
        kflr = make_backend("backpack", model, loader).kronecker_factors()
        kfac = backpack_with(model, loader, kronecker="kfac", mc_samples=10).kronecker_factors()
        for name, factors in kflr.items():
            assert reference.rel_err(kfac[name].A, factors.A) < RTOL
            assert 1e-4 < reference.rel_err(kfac[name].B, factors.B) < 0.75
        with pytest.raises(curvkit.InvalidInputError, match="more than the 10 classes"):
            backpack_with(model, loader, kronecker="kfac", mc_samples=11)
        backend = backpack_with(model, loader, ggn_trace="mc", mc_samples=10)
        estimate, _ = trace(backend.operator("ggn"), backend.options, 0)
    exact = float(torch.trace(dense_mlp["ggn"]))
    assert 0 < estimate.stderr < 0.2 * exact
    assert abs(estimate.value - exact) < 4 * estimate.stderr


@needs_backpack
def test_backpack_monte_carlo_trace_error_bars_are_honest():
    """DiagGGNMC's trace on data in two batches: its standard error came from the spread of
    the two batch sums (one degree of freedom), and over 60 seeds the errors spread over 9.5
    of them, up to 54. Batches are now split into at least 30 groups: over 40 seeds the
    errors spread over about one standard error (below 1.5; the groups' spread also counts
    the data's, so it errs large) and none reaches 4."""
    x, y = curvkit.datasets.digits_tensors(samples_per_class=4)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 8), torch.nn.Tanh(),
                                torch.nn.Linear(8, 10)).double()  # fmt: skip
    data = [(x[:20].double(), y[:20]), (x[20:].double(), y[20:])]
    exact = float(torch.trace(reference.dense_ggn(model, x.double())))
    with model_guard(model):
        backend = backpack_with(model, data, ggn_trace="mc", mc_samples=1)
        estimates = [trace(backend.operator("ggn"), backend.options, s)[0] for s in range(40)]
    z = np.array([(e.value - exact) / e.stderr for e in estimates])
    assert z.std() < 1.5 and np.abs(z).max() < 4, (z.std(), np.abs(z).max())


@needs_backpack
def test_backpack_monte_carlo_is_seeded_and_leaves_the_callers_generator(digits_problem):
    """DiagGGNMC and KFAC sample from torch's global generator: curvkit forks and seeds it, so
    the same seed gives the same numbers and the caller's generator does not move."""
    model, loader = digits_problem
    state = torch.random.get_rng_state()
    with model_guard(model):
        backend = backpack_with(model, loader, ggn_trace="mc", kronecker="kfac")
        ggn = backend.operator("ggn")
        first, second = (trace(ggn, backend.options, 3)[0].value for _ in range(2))
        other = trace(ggn, backend.options, 4)[0].value
        factors = [backend.kronecker_factors()["2"].B for _ in range(2)]
    assert first == second != other
    assert torch.equal(factors[0], factors[1])
    assert torch.equal(torch.random.get_rng_state(), state)


@pytest.mark.parametrize(
    "settings, match",
    [
        ({"kronecker": "exact"}, "kronecker.*kflr, kfac"),
        ({"mc_samples": "many"}, "mc_samples.*int"),
        ({"samples": 3}, "unknown setting.*samples.*settings are ggn_trace, kronecker, mc_samples"),
    ],
)
@needs_backpack
def test_backpack_rejects_bad_settings(settings, match, digits_problem):
    model, loader = digits_problem
    with pytest.raises(curvkit.InvalidInputError, match=match):
        backpack_with(model, loader, **settings)


@pytest.mark.parametrize("name", backend_params("hvp", minimal=False))
def test_float32_models(name, digits_problem, dense_mlp, dense_mlp_eigen):
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
    exact = dense_mlp_eigen["hessian"][0][:5]
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


@needs_backpack
def test_backpack_converter_on_a_residual_network(digits_problem):
    """BackPACK's converter handles the skip connection for SqrtGGNExact and DiagGGNExact (both
    exact: 1e-8); its DiagHessian lacks the inserted SumModule, so the Hessian trace falls back to
    Hutch++ on BackPACK's products (said in provenance); KFLR, completed with the accumulation
    rule for the branch, gives torch.func's exact Kronecker factors (1e-8)."""
    _, loader = digits_problem
    torch.manual_seed(0)
    model = ResidualMLP().double()
    x, y = reference.all_data(loader)
    with model_guard(model):
        backend = make_backend("backpack", model, loader)
        expected = make_backend("torchfunc", model, loader).class_deltas().sums
        assert reference.rel_err(backend.class_deltas().sums, expected) < RTOL
        ggn_trace, _ = trace(backend.operator("ggn"), backend.options, 0)
        exact = float(torch.trace(reference.dense_ggn(model, x)))
        assert ggn_trace.value == pytest.approx(exact, rel=RTOL)
        _, provenance = trace(backend.operator("hessian"), backend.options, 0)
        assert provenance.derived and "SumModule" in provenance.note
        factors = backend.kronecker_factors()
        for layer, exact_factors in (
            make_backend("torchfunc", model, loader).kronecker_factors().items()
        ):
            assert reference.rel_err(factors[layer].B, exact_factors.B) < RTOL, layer
            assert reference.rel_err(factors[layer].A, exact_factors.A) < RTOL, layer
    assert isinstance(model.act1, torch.nn.Tanh)  # the converter worked on a copy


@needs_backpack
def test_backpack_names_what_it_cannot_follow(digits_problem):
    """A functional call (torch.tanh) is invisible to BackPACK's hooks: a clear error, no number."""
    _, loader = digits_problem
    model = ResidualMLP(functional=True).double()
    with model_guard(model):
        with pytest.raises(curvkit.UnsupportedError, match="SqrtGGNExact cannot handle"):
            make_backend("backpack", model, loader).class_deltas()
    with pytest.raises(
        curvkit.UnsupportedError, match="SqrtGGNExact cannot handle.*'torchfunc' can"
    ):
        curvkit.analyze(model, loader, "backpack", ["classmeans"], progress=False)


class TinyResNet(torch.nn.Module):
    """torchvision's ResNet pattern in small: in-place ReLU, an in-place residual add
    (``out += x``), BatchNorm and an adaptive average pool, on 8×8 digits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.BatchNorm2d(4)
        self.conv2, self.bn2 = torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.BatchNorm2d(4)
        self.relu = torch.nn.ReLU(inplace=True)
        self.pool, self.fc = torch.nn.AdaptiveAvgPool2d(2), torch.nn.Linear(16, 10)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x.reshape(-1, 1, 8, 8))))
        out = self.bn2(self.conv2(x))
        out += x
        return self.fc(torch.flatten(self.pool(self.relu(out)), 1))


@needs_backpack
def test_backpack_on_a_resnet_pattern(digits_problem):
    """BackPACK's extensions break on in-place ReLU and have no AdaptiveAvgPool2d rule; on its
    own copy the adapter computes the ReLU out of place and pools with the equivalent fixed
    AvgPool2d (4×4 inputs to 2×2 here), so SqrtGGNExact's class sums equal torch.func's. float32
    (BackPACK's AvgPool2d rule computes in float32): sums of 300 examples' products in float32
    measured 3e-7 relative; 1e-5 catches a wrong pooling (its error is O(1)). KFLR, which has
    no BatchNorm rule of its own, passes through the eval-mode BatchNorm by BackPACK's BatchNorm
    Jacobian: its factors equal torch.func's exact ones (same float32 bound; the BatchNorm
    statistics are set far from the identity, so that a missing or wrong scale is an O(1)
    error). The user's model keeps its modules."""
    torch.manual_seed(0)
    model = TinyResNet().eval()
    for bn in (model.bn1, model.bn2):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.2, 3)
        bn.weight.data.uniform_(0.5, 2)
        bn.bias.data.uniform_(-1, 1)
    data = digits_loader(batch_size=128, samples_per_class=30, dtype=torch.float32)
    options = curvkit.Options(class_sums="per-example")
    with model_guard(model):
        backend = make_backend("backpack", model, data, options)
        exact = make_backend("torchfunc", model, data, options)
        assert backend.refusal("classmeans") is None and backend.refusal("layerwise") is None
        expected = exact.class_deltas().sums
        assert reference.rel_err(backend.class_deltas().sums, expected) < 1e-5
        factors, expected = backend.kronecker_factors(), exact.kronecker_factors()
        assert factors.keys() == expected.keys() == {"conv1", "conv2", "fc"}
        for layer, exact_factors in expected.items():
            assert reference.rel_err(factors[layer].B, exact_factors.B) < 1e-5, layer
            assert reference.rel_err(factors[layer].A, exact_factors.A) < 1e-5, layer
    assert model.relu.inplace and isinstance(model.pool, torch.nn.AdaptiveAvgPool2d)


def test_features_are_found_in_eval_mode():
    """Finding the model's features runs one example through it: in training mode BatchNorm
    refused that with a raw ValueError (and would have updated its running statistics)."""
    torch.manual_seed(0)
    model = TinyResNet().train()
    data = digits_loader(batch_size=128, samples_per_class=3, dtype=torch.float32)
    before = model.bn1.running_mean.clone()
    assert curvkit.Problem(model, data).features == {}
    assert model.training and torch.equal(model.bn1.running_mean, before)
