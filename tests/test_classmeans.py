"""Papyan's decomposition, for every backend, against a dense per-example reference on the
digits MLP (float64).

Identity and Gram-route eigenvalues are exact linear algebra: 1e-10 relative for the identity,
1e-8 for eigenvalues (each side carries ~1e-13 ‖A‖ rounding; the small ones sit near that floor,
so eigenvalues are compared relative to the largest of each term). Overlaps
depend on top-10 eigenvectors: 1e-6 through Lanczos and ARPACK (residuals ≈ 1e-6 ‖A‖), 1e-3
through PyHessian's power iteration, whose Rayleigh-quotient rule (power_tol 1e-7) leaves the
eigenvectors accurate to about sqrt(1e-7) ‖A‖ / gap.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.sparse.linalg
import torch

import curvkit
from curvkit.backend import ROUTINES
from curvkit.linalg import subspace_overlap
from curvkit.problem import Problem, model_guard
from curvkit.quantities.classmeans import classmeans, group_means
from curvkit.registry import get_backend
from tests import reference
from tests.conftest import backend_params, make_backend, top_eigh


def dense_terms(
    deltas: torch.Tensor, labels: torch.Tensor, traces: bool = False
) -> dict[str, torch.Tensor]:
    """The four terms built literally from the definitions, example by example: each a sum of
    weighted outer products Σ_j w_j u_j u_jᵀ, formed as one product Uᵀ diag(w) U of the stacked
    vectors (with ``traces``, their traces Σ_j w_j ‖u_j‖²)."""
    vectors, weights = stacked_terms(deltas, labels)
    if traces:
        return {k: (weights[k] * vectors[k].square().sum(1)).sum() for k in vectors}
    return {k: vectors[k].T @ (weights[k][:, None] * vectors[k]) for k in vectors}


def stacked_terms(
    deltas: torch.Tensor, labels: torch.Tensor
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Each term's vectors u_j (stacked as rows of U) and weights w_j, from the definitions."""
    n, c, p = deltas.shape
    present = sorted(set(labels.tolist()))
    group = {k: deltas[labels == k].mean(0) for k in present}  # (C, P): δ_{k,c'}
    mean = {k: (group[k].sum(0) - group[k][k]) / (c - 1) for k in present}
    w = {k: float((labels == k).sum()) / n for k in present}
    pairs = [(k, o) for k in present for o in range(c) if o != k]
    stacked = {
        "own": ([group[k][k] for k in present], [w[k] for k in present]),
        "class": ([mean[k] for k in present], [(c - 1) * w[k] for k in present]),
        "cross": ([group[k][o] - mean[k] for k, o in pairs], [w[k] for k, _ in pairs]),
    }
    centred = deltas - torch.stack([group[int(y)] for y in labels])
    vectors = {name: torch.stack(u) for name, (u, _) in stacked.items()}
    weights = {name: torch.tensor(ws, dtype=deltas.dtype) for name, (_, ws) in stacked.items()}
    vectors["within"] = centred.reshape(-1, p)
    weights["within"] = torch.full((n * c,), 1 / n, dtype=deltas.dtype)
    return vectors, weights


@pytest.fixture(scope="module")
def exact_terms(dense_mlp) -> dict[str, tuple[torch.Tensor, np.ndarray]]:
    """Papyan's four terms of the digits MLP's G, dense, with their descending eigenvalues: all
    nonzero ones of the low-rank terms Uᵀ diag(w) U (LAPACK on the small Gram diag(√w) U Uᵀ
    diag(√w), which has the same nonzero eigenvalues), the top 10 of the full-rank G_within
    (ARPACK on the dense matrix, converged to machine precision)."""
    deltas, labels = dense_mlp["deltas"], dense_mlp["labels"]
    terms = dense_terms(deltas, labels)
    vectors, weights = stacked_terms(deltas, labels)
    exact = {}
    for k in ("own", "class", "cross"):
        scaled = weights[k].sqrt()[:, None] * vectors[k]
        exact[k] = (terms[k], np.linalg.eigvalsh((scaled @ scaled.T).numpy())[::-1])
    within = terms["within"]
    top = scipy.sparse.linalg.eigsh(within.numpy(), k=10, which="LA", return_eigenvectors=False)
    return {**exact, "within": (within, np.sort(top)[::-1])}


@pytest.fixture(scope="module", params=backend_params("class_deltas"))
def result(request, digits_problem):
    """Every backend's class means of the digits MLP (top-10 of G_within)."""
    model, loader = digits_problem
    with model_guard(model):
        return classmeans(make_backend(request.param, model, loader), top_k=10)


def test_decomposition_is_exact(digits_problem, dense_mlp, exact_terms):
    """curvkit's own, class and cross terms (from its class sums) plus the within term built from
    the dense per-example factors give G exactly (1e-10): nothing is lost or counted twice."""
    model, loader = digits_problem
    with model_guard(model):
        backend = get_backend("torchfunc")(Problem(model, loader))
        deltas = backend.class_deltas()
    group = group_means(deltas.sums, deltas.counts, 300, deltas.route)
    factors = [group.factor(t) for t in ("own", "class", "cross")]
    total = sum(f @ f.T for f in factors) + exact_terms["within"][0]
    assert reference.rel_err(total, dense_mlp["ggn"]) < 1e-10


def test_gram_route_matches_dense_terms(result, exact_terms):
    for name in ("own", "class", "cross"):
        term, exact = exact_terms[name]
        got = np.array(result.eigenvalues[name])
        np.testing.assert_allclose(
            got, exact[: len(got)], rtol=0, atol=1e-8 * exact[0], err_msg=name
        )
        assert exact[len(got) :].max(initial=0) < 1e-10 * exact[0]  # nothing nonzero was dropped
        assert result.trace[name] == pytest.approx(float(torch.trace(term)), rel=1e-10)
    exact_within = exact_terms["within"][1][:10]
    np.testing.assert_allclose(result.eigenvalues["within"], exact_within, rtol=1e-4)
    assert len(result.eigenvalues["own"]) <= 10 and len(result.eigenvalues["cross"]) <= 90


def test_traces_add_up(result, dense_mlp):
    """tr G is exact from per-example factors (1e-10), else Hutch++ within 4 standard errors."""
    t, exact = result.trace, float(torch.trace(dense_mlp["ggn"]))
    assert abs(t["total"] - exact) <= 4 * result.trace_stderr["total"] + 1e-10 * exact
    assert (result.trace_stderr["total"] == 0) == (not result.provenance["deltas"].derived)
    assert t["own"] + t["class"] + t["cross"] + t["within"] == pytest.approx(t["total"], rel=1e-12)
    assert min(t.values()) > 0


@pytest.fixture(scope="module")
def dense_top_vectors(dense_mlp_eigen) -> dict[str, torch.Tensor]:
    return {
        name: torch.from_numpy(dense_mlp_eigen[name][1][:, :10].copy())
        for name in ("ggn", "hessian")
    }


def class_mean_basis(dense_mlp) -> torch.Tensor:
    """An orthonormal basis (QR) of the ten class means δ_c, from the dense per-example factors."""
    d, y = dense_mlp["deltas"], dense_mlp["labels"]
    means = torch.stack([(d[y == k].mean(0).sum(0) - d[y == k].mean(0)[k]) / 9 for k in range(10)])
    return torch.linalg.qr(means.T)[0]


def test_overlap_matches_dense(result, dense_mlp, dense_top_vectors):
    q = class_mean_basis(dense_mlp)
    for name in ("ggn", "hessian"):
        u = dense_top_vectors[name]
        routine = result.provenance[f"lanczos_{name}"].routine
        tol = 1e-3 if routine == "pyhessian.eigenvalues" else 1e-6
        assert result.overlap[name] == pytest.approx(subspace_overlap(u, q), abs=tol), routine
        assert 0 <= result.overlap[name] <= 1


def test_papyans_claims_against_dense(
    result, digits_problem, dense_mlp, dense_mlp_eigen, exact_terms
):
    """The Rayleigh–Ritz values of G on span{δ_c} equal those of the dense G (1e-8 of the
    largest: exact products, a 10 × 10 eigensolver); both gaps ‖λ − μ‖/‖λ‖ against the dense top
    ten λ (1e-5 absolute: λ through Lanczos carries ~1e-6 relative error; 1e-3 through PyHessian's
    power iteration, as the overlaps); the spread of log10 √p_{i,c'} within classes from the
    reference logits directly (1e-10)."""
    q = class_mean_basis(dense_mlp)
    ritz = np.linalg.eigvalsh((q.T @ dense_mlp["ggn"] @ q).numpy())[::-1]
    np.testing.assert_allclose(result.ritz_eigenvalues, ritz, rtol=0, atol=1e-8 * ritz[0])
    top = dense_mlp_eigen["ggn"][0][:10]
    tol = 1e-3 if result.provenance["lanczos_ggn"].routine == "pyhessian.eigenvalues" else 1e-5
    for name, predicted in (("ritz", ritz), ("class", exact_terms["class"][1][:10])):
        expected = np.linalg.norm(top - predicted) / np.linalg.norm(top)
        assert result.gap[name] == pytest.approx(expected, abs=tol), name
    assert result.gap["ritz"] < 0.1 < 0.5 < result.gap["class"]  # issue #20: the digits regime
    model, loader = digits_problem
    x, y = reference.all_data(loader)
    with torch.no_grad():
        log10_sqrt_p = torch.log_softmax(model(x), dim=1) / (2 * np.log(10))
    spreads = [log10_sqrt_p[y == c, o].std(unbiased=False) for c in range(10) for o in range(10)]
    assert result.confidence_spread == pytest.approx(float(torch.stack(spreads).mean()), rel=1e-10)


def test_one_example_per_class_has_no_confidence_spread(digits_problem):
    """A spread within classes needs two examples of a class: with one of each of two classes
    it was the mean of nothing, NaN in the report and "nan" in the summary."""
    model, loader = digits_problem
    x, y = reference.all_data(loader)
    second = int((y != y[0]).nonzero()[0])
    data = [(x[[0, second]], y[[0, second]])]
    report = curvkit.analyze(model, data, "torchfunc", ["classmeans"], top_k=2, progress=False,
                             options={"trace_matvecs": 0})  # fmt: skip
    assert report.classmeans.confidence_spread is None
    assert "spread of log10 √p within classes n/a (no class has two examples)" in str(report)


def test_group_gram_and_coordinates(result, dense_mlp):
    assert np.array(result.group_gram).shape == (100, 100)
    assert np.array(result.class_gram).shape == (10, 10)
    assert np.array(result.coordinates["class_means"]).shape == (10, 2)
    assert np.array(result.coordinates["group_means"]).shape == (10, 10, 2)


def test_unbalanced_and_absent_classes(digits_problem):
    """Drop class 3 entirely and thin class 5: weights n_c/N, class 3 excluded with a warning."""
    model, loader = digits_problem
    data = unbalanced(loader)
    x, y = (torch.cat(t) for t in zip(*data))
    with model_guard(model), pytest.warns(UserWarning, match=r"classes 3 have no examples"):
        out = classmeans(get_backend("torchfunc")(Problem(model, data)), top_k=5)
    assert out.excluded_classes == [3] and out.counts[3] == 0
    traces = dense_terms(reference.papyan_deltas(model, x), y, traces=True)
    for name in ("own", "class", "cross", "within"):
        assert out.trace[name] == pytest.approx(float(traces[name]), rel=1e-9)


@pytest.mark.parametrize("name", backend_params("class_deltas"))
def test_one_example_per_class_has_no_within_term(name, digits_problem):
    """With one example per class δ_{i,c'} = δ_{y_i,c'}: G_within is 0 and tr G the exact sum
    of the other three traces (1e-10 against the dense G), on every route, with no warning
    (before: Lanczos chased rounding of 1e-17 in G − Σ L Lᵀ and warned that it had not
    converged, and tr G was a Hutch++ estimate on the gradient routes)."""
    model, loader = digits_problem
    x, y = reference.all_data(loader)
    first = torch.tensor([int((y == c).nonzero()[0]) for c in range(10)])
    data = [(x[first], y[first])]
    with model_guard(model), warnings.catch_warnings():
        warnings.simplefilter("error")
        out = classmeans(make_backend(name, model, data), top_k=3)
    assert out.eigenvalues["within"] == [0.0, 0.0, 0.0] and out.trace["within"] == 0.0
    exact = float(torch.trace(reference.dense_ggn(model, x[first])))
    assert out.trace["total"] == pytest.approx(exact, rel=1e-10)
    assert out.trace_stderr["total"] == 0.0


def test_single_class_is_refused(digits_problem):
    model, loader = digits_problem
    x, y = reference.all_data(loader)
    data = [(x[y == 2], y[y == 2])]
    with model_guard(model), pytest.raises(curvkit.InvalidInputError, match="two classes"):
        classmeans(get_backend("torchfunc")(Problem(model, data)), top_k=3)


def test_term_factors_reproduce_terms_on_random_deltas():
    g = torch.Generator().manual_seed(0)
    c, p = 4, 30
    deltas = torch.randn(50, c, p, generator=g, dtype=torch.float64)
    labels = torch.randint(0, c, (50,), generator=g)
    sums = torch.stack([deltas[labels == k].sum(0) for k in range(c)])
    group = group_means(sums, torch.bincount(labels, minlength=c), 50, "gradients")
    terms = dense_terms(deltas, labels)
    for name in ("own", "class", "cross"):
        factor = group.factor(name)
        assert reference.rel_err(factor @ factor.T, terms[name]) < 1e-12


def unbalanced(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The digits without class 3 and with two thirds of class 5 left out, in batches of 100."""
    x, y = reference.all_data(loader)
    keep = (y != 3) & ~((y == 5) & (torch.arange(len(y)) % 3 != 0))
    x, y = x[keep], y[keep]
    return [(x[i : i + 100], y[i : i + 100]) for i in range(0, len(y), 100)]


@pytest.mark.parametrize("balance", ["balanced", "unbalanced"])
def test_streaming_routes_equal_per_example(digits_problem, balance):
    """The gradient routes (C or 2 vector–Jacobian products per class and batch, C²·P or C·P
    memory) give the same class sums as the per-example factors, to 1e-10 relative in float64
    (the same sums in another order), on balanced data and on data with an absent and a thinned
    class; the means route's own-label and class-mean sums are those of the full sums."""
    model, loader = digits_problem
    data = loader if balance == "balanced" else unbalanced(loader)
    sums = {}
    with model_guard(model), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the absent class
        for route in ("per-example", "gradients", "means"):
            options = curvkit.Options(class_sums=route)
            backend = get_backend("torchfunc")(Problem(model, data), options)
            deltas = backend.class_deltas()
            assert deltas.route == route and deltas.provenance.routine in ROUTINES.values()
            sums[route] = deltas.sums
    full = sums["per-example"]
    assert reference.rel_err(sums["gradients"], full) < 1e-10
    c = full.shape[0]
    own = full[torch.arange(c), torch.arange(c)]
    means = (full.sum(1) - own) / (c - 1)
    assert reference.rel_err(sums["means"], torch.stack([own, means], 1)) < 1e-10


def test_means_route_reports_own_and_class_terms_exactly(digits_problem, exact_terms, dense_mlp):
    """On the means route the own-label and class-mean terms are exact (their Gram eigenvalues
    to 1e-8 of the largest, as above) and G_cross + G_within is one term, whose top eigenvalues
    are those of the dense G − G_own − G_class (Lanczos, 1e-4); cross and within are listed as
    skipped with the reason."""
    model, loader = digits_problem
    with model_guard(model):
        backend = make_backend("torchfunc", model, loader, curvkit.Options(class_sums="means"))
        out = classmeans(backend, top_k=5)
    assert set(out.skipped) == {"cross", "within"} and "class_sums" in out.skipped["cross"]
    for name in ("own", "class"):
        term, exact = exact_terms[name]
        got = np.array(out.eigenvalues[name])
        np.testing.assert_allclose(got, exact[: len(got)], rtol=0, atol=1e-8 * exact[0])
    rest = exact_terms["cross"][0] + exact_terms["within"][0]
    top = top_eigh(rest, 5)[0]
    np.testing.assert_allclose(out.eigenvalues["cross_within"], top, rtol=1e-4)
    t = out.trace
    assert t["own"] + t["class"] + t["cross_within"] == pytest.approx(t["total"], rel=1e-12)
    assert out.group_gram == [] and out.coordinates["group_means"] == []
