"""Property-based tests (hypothesis) of the numerics on random inputs of varied structure.

Runs are derandomised (the same examples every time) so that CI is reproducible.
"""

from __future__ import annotations

import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from curvkit.linalg import hutch_plus_plus, hutchinson, lanczos
from curvkit.quantities.classmeans import group_means

SETTINGS = settings(
    max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)


@st.composite
def symmetric_matrices(draw, min_dim: int = 4, max_dim: int = 50):
    """Q diag(λ) Qᵀ with λ drawn from spread, clustered, repeated or outlier-dominated spectra."""
    dim = draw(st.integers(min_dim, max_dim))
    kind = draw(st.sampled_from(["spread", "repeated", "outliers", "indefinite"]))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(dim, generator=g, dtype=torch.float64)
    if kind == "repeated":  # a few distinct values, each several times
        levels = torch.tensor([0.0, 0.5, 2.0, 7.0], dtype=torch.float64)
        values = levels[torch.randint(0, 4, (dim,), generator=g)]
    elif kind == "outliers":
        values = 0.01 * base
        values[: min(5, dim)] += torch.linspace(10, 50, min(5, dim), dtype=torch.float64)
    elif kind == "indefinite":
        values = torch.randn(dim, generator=g, dtype=torch.float64)
    else:
        values = 10 ** (4 * base - 2)  # six decades
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    return q @ torch.diag(values) @ q.T, kind


@SETTINGS
@given(symmetric_matrices(), st.integers(1, 4), st.integers(1, 4))
def test_lanczos_top_k(matrix_and_kind, k, block):
    """Converged Ritz values are the top-k eigenvalues (multiplicities included) to 1e-8 ‖A‖;
    every Ritz pair is an eigenpair to within its residual (Kahan's bound for symmetric A);
    for single vectors and blocks."""
    a, kind = matrix_and_kind
    dim = a.shape[0]
    k = min(k, dim)
    exact = torch.linalg.eigvalsh(a).flip(0)
    norm = float(exact.abs().max())
    result = lanczos(lambda v: a @ v, dim, k, tol=1e-10, block=block)
    values = result.values
    assert torch.all(values[:-1] >= values[1:])
    for theta, residual in zip(values, result.residuals):
        assert float((exact - theta).abs().min()) <= float(residual) + 1e-12 * norm
    if result.converged:
        torch.testing.assert_close(values, exact[:k], rtol=0, atol=1e-8 * norm)


@SETTINGS
@given(symmetric_matrices(min_dim=10, max_dim=80), st.sampled_from([hutchinson, hutch_plus_plus]))
def test_trace_estimators_within_their_error_bars(matrix_and_kind, estimator):
    """Unbiased with an honest error bar: within 6 standard errors (the chance of a larger
    deviation of a mean of ≥ 10 samples is far below 1 in the 120 derandomised examples)."""
    a, _ = matrix_and_kind
    dim = a.shape[0]
    budget = 30 if estimator is hutchinson else 33
    result = estimator(lambda v: a @ v, dim, budget, seed=1)
    exact = float(torch.trace(a))
    rounding = 1e-10 * float(torch.linalg.matrix_norm(a)) * math.sqrt(dim)
    assert abs(result.value - exact) <= 6 * result.stderr + rounding


@SETTINGS
@given(
    st.integers(2, 30),  # N
    st.integers(2, 6),  # C
    st.integers(1, 12),  # P
    st.integers(0, 2**16),
    st.booleans(),  # leave a class out of the labels
)
def test_classmean_decomposition_is_exact(n, c, p, seed, drop_class):
    """G = G_own + G_class + G_cross + G_within (Papyan Eq. 28, weights n_c/N) for any δ."""
    g = torch.Generator().manual_seed(seed)
    deltas = torch.randn(n, c, p, generator=g, dtype=torch.float64)
    labels = torch.randint(0, c - 1 if drop_class else c, (n,), generator=g)
    sums = torch.zeros(c, c, p, dtype=torch.float64).index_add_(0, labels, deltas)
    counts = torch.bincount(labels, minlength=c)
    group = group_means(sums, counts, n, "gradients")
    present = group.present
    ggn = torch.einsum("icp,icq->pq", deltas, deltas) / n
    rows = {cls: i for i, cls in enumerate(present)}
    means = group.rows.reshape(len(present), c, p)
    centred = deltas - means[[rows[int(y)] for y in labels]]
    within = torch.einsum("icp,icq->pq", centred, centred) / n
    factors = [group.factor(t) for t in ("own", "class", "cross")]
    terms = sum(f @ f.T for f in factors) + within
    torch.testing.assert_close(terms, ggn, rtol=0, atol=1e-10 * float(ggn.abs().max()))
    assert present == [cls for cls in range(c) if counts[cls] > 0]
