"""Lanczos, trace estimators and SLQ against exact eigendecompositions of random matrices."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from curvkit.linalg import estimate_trace, hutch_plus_plus, hutchinson, lanczos, slq_density
from curvkit.linalg.krylov import broadened_density
from curvkit.linalg.operator import Operator, Options, density, top_eigen, trace

N = 200


def symmetric(eigenvalues: torch.Tensor, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(N, N, generator=g, dtype=torch.float64))
    return q @ torch.diag(eigenvalues) @ q.T


def spectra() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    rest = torch.rand(N, generator=g, dtype=torch.float64)
    return {
        "indefinite": torch.randn(N, generator=g, dtype=torch.float64),
        "repeated": torch.cat(
            [torch.tensor([5.0, 5.0, 5.0, 3.0, 3.0], dtype=torch.float64), rest[5:]]
        ),
        "clustered": torch.cat([5 + 1e-7 * torch.arange(4, dtype=torch.float64), rest[4:]]),
        "outliers": torch.cat([torch.linspace(10, 50, 10, dtype=torch.float64), 0.1 * rest[10:]]),
    }


@pytest.mark.slow  # seconds: a float32 operator of dimension 2·10⁶
def test_float32_lanczos_on_two_million_dimensions():
    """A float32 diagonal operator the size of a large model (dimension 2·10⁶, three outliers
    among entries u⁸, u uniform): the top two eigenvalues to 2e-5 relative. BLAS's float32
    products and torch's float32 norm sum 2·10⁶ terms with errors up to 1e-3, which put λ₂ 2.8e-4
    off with a 1e-7 residual before the reductions over P were segmented and summed in float64
    (``long_matmul``); measured after: 2e-6 (float32 rounding is 6e-8)."""
    torch.manual_seed(0)
    dim = 2_000_000
    diagonal = torch.rand(dim) ** 8
    diagonal[torch.randperm(dim)[:3]] = torch.tensor([3.0, 2.0, 1.5])
    result = lanczos(lambda v: diagonal[:, None] * v, dim, 2, max_iter=80, dtype=torch.float32)
    assert result.converged
    np.testing.assert_allclose(result.values.tolist(), [3.0, 2.0], rtol=2e-5)


@pytest.mark.parametrize("block", [1, 4])
@pytest.mark.parametrize("name", list(spectra()))
def test_lanczos_top_k_matches_eigvalsh(name, block):
    eigs = spectra()[name]
    a = symmetric(eigs)
    exact = np.linalg.eigvalsh(a.numpy())[::-1][:10]
    result = lanczos(lambda v: a @ v, N, 10, tol=1e-10, max_iter=N, block=block)
    assert result.converged
    # residual tol 1e-10 of ‖A‖ bounds each eigenvalue error by 1e-10 ‖A‖; allow rounding on top
    np.testing.assert_allclose(result.values.numpy(), exact, rtol=0, atol=1e-9 * abs(exact).max())
    # eigenvectors: orthonormal, and A u = λ u
    u = result.vectors
    assert torch.allclose(u.T @ u, torch.eye(10, dtype=u.dtype), atol=1e-10)
    assert float((a @ u - u * result.values).norm(dim=0).max()) < 1e-8 * float(eigs.abs().max())


def test_lanczos_outliers_converge_in_few_steps():
    a = symmetric(spectra()["outliers"])
    result = lanczos(lambda v: a @ v, N, 10)
    assert result.converged and result.matvecs < 40


@pytest.mark.parametrize("block", [1, 4])
def test_lanczos_converges_on_a_low_rank_operator(block):
    """A rank-18 PSD operator (G of two examples): its Krylov space becomes invariant, and so
    does every fresh block in the complement, the null space (A v = 0 up to rounding). Each
    such block restarted the complement check, which then never saw a finished block: exact
    eigenvalues reported as not converged after max_iter products. An invariant complement
    block's top eigenvalue is exact, and below θ_k it shows the complement explored (block 1:
    140 products, not converged; block 4: converged at P = 200 products)."""
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(N, 18, generator=g, dtype=torch.float64))[0]
    values = torch.linspace(1, 0.5, 18, dtype=torch.float64)  # no gap: converged when invariant
    a = basis @ torch.diag(values) @ basis.T
    result = lanczos(lambda v: a @ v, N, 12, block=block)
    assert result.converged and result.matvecs <= 18 + 2 * block + 4  # the space, two blocks more
    np.testing.assert_allclose(result.values.numpy(), values[:12].numpy(), rtol=1e-12)


@pytest.mark.parametrize("block", [1, 4])
@pytest.mark.parametrize("rank", [0, 3])
def test_lanczos_converges_where_the_top_k_reach_the_null_space(block, rank):
    """The zero operator (the residual Hess − G of a linear classifier) and a rank-3 one asked
    for its top 6: θ_k is 0, and so is the top of every complement block. A tie is no larger
    eigenvalue, yet "below θ_k" never held: exact values reported as not converged after
    max_iter products (125 for the residual)."""
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(N, 3, generator=g, dtype=torch.float64))[0][:, :rank]
    values = torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)[:rank]
    a = basis @ torch.diag(values) @ basis.T
    result = lanczos(lambda v: a @ v, N, 6, block=block)
    assert result.converged and result.matvecs <= rank + 3 * block + 4
    expected = torch.cat([values, torch.zeros(6 - rank, dtype=torch.float64)])
    np.testing.assert_allclose(result.values.numpy(), expected.numpy(), atol=1e-12)


def test_block_lanczos_applies_blocks():
    """Each product is one block of ``block`` vectors (one data pass for a curvature operator)."""
    a = symmetric(spectra()["outliers"])
    widths = []
    result = lanczos(lambda v: widths.append(v.shape[1]) or a @ v, N, 10, block=5)
    assert result.converged and set(widths) == {5} and result.matvecs == 5 * len(widths)


def test_lanczos_is_deterministic_and_seeded():
    a = symmetric(spectra()["indefinite"])
    one = lanczos(lambda v: a @ v, N, 3, max_iter=30, seed=3)
    two = lanczos(lambda v: a @ v, N, 3, max_iter=30, seed=3)
    three = lanczos(lambda v: a @ v, N, 3, max_iter=30, seed=4)
    assert torch.equal(one.values, two.values)
    assert not torch.equal(one.values, three.values)


def test_lanczos_rejects_bad_k():
    with pytest.raises(ValueError):
        lanczos(lambda v: v, 5, 6)


@pytest.mark.parametrize("estimator", [hutchinson, hutch_plus_plus])
def test_trace_estimators_within_error_bars(estimator):
    eigs = spectra()["outliers"]
    a = symmetric(eigs)
    exact = float(eigs.sum())
    estimate = estimator(lambda v: a @ v, N, 90, seed=2)
    assert estimate.matvecs == 90
    # 4 standard errors: fails by chance with probability < 1e-4 (CLT)
    assert abs(estimate.value - exact) < 4 * estimate.stderr


@pytest.mark.slow  # 200 estimates on a 2410-dimensional operator
@pytest.mark.parametrize("estimator, matvecs", [(hutch_plus_plus, 12), (hutchinson, 6)])
def test_trace_error_bars_are_honest(dense_mlp, estimator, matvecs):
    """Over 200 seeds on the digits MLP's dense G (a few large directions, a long bulk), the
    errors in units of the reported standard error have a spread near 1 (0.8 to 1.25; the
    bound 2‖B‖_F²/n on the variance, B the deflated rest for Hutch++ and A itself for
    Hutchinson, is tight here) and none beyond 4.5. The spread of the n forms, reported
    before, gave 2.6 for Hutch++ at 12 products (and 1.15 at 99), with errors of up to 19
    standard errors, and put Hutchinson's at up to 8 with 6 products."""
    g = dense_mlp["ggn"]
    exact = float(torch.trace(g))
    estimates = [estimator(lambda v: g @ v, g.shape[0], matvecs, seed=s) for s in range(200)]
    z = np.array([(e.value - exact) / e.stderr for e in estimates])
    assert 0.8 < z.std() < 1.25 and np.abs(z).max() < 4.5, (z.std(), np.abs(z).max())


def test_hutch_plus_plus_beats_hutchinson_on_outliers():
    a = symmetric(spectra()["outliers"])
    plain = hutchinson(lambda v: a @ v, N, 90, seed=2)
    plus = hutch_plus_plus(lambda v: a @ v, N, 90, seed=2)
    assert plus.stderr < plain.stderr / 5


def test_trace_is_exact_when_budget_covers_dimension():
    a = symmetric(spectra()["indefinite"])
    estimate = estimate_trace(lambda v: a @ v, N, N)
    assert estimate.method == "exact" and estimate.stderr == 0
    assert estimate.value == pytest.approx(float(torch.trace(a)), rel=1e-12)


def test_the_operators_routines_stream_through_a_small_budget():
    """An operator whose budget holds 40 vectors of N = 200: the exact trace (N ≤ 250
    products; 2N vectors at once) takes its unit vectors 13 at a time and stays exact; SLQ's 4
    probes of 20 steps (96 vectors) run one at a time and give the density of the unlimited
    run (the same probes; rounding apart); Lanczos's basis is capped at 40 − (3 + 5) = 32."""
    a = symmetric(spectra()["outliers"])
    free = Operator(N, lambda v: a @ v, torch.float64, torch.device("cpu"))
    tight = dataclasses.replace(free, budget=lambda: 40 * N * 8)
    options = Options(trace_matvecs=250, density_probes=4, density_steps=20)
    exact = trace(tight, options, 0)
    assert exact[0].method == "exact" and "exact in chunks of 13 vectors" in exact[1].note
    assert exact[0].value == pytest.approx(float(torch.trace(a)), rel=1e-12)
    streamed, provenance = density(tight, options, 0)
    assert "SLQ's probes 1 at a time" in provenance.note
    assert streamed.values.tolist() == pytest.approx(density(free, options, 0)[0].values.tolist(),
                                                     abs=1e-12 * float(streamed.values.max()))  # fmt: skip
    eigen, provenance = top_eigen(tight, 3, options, 0)
    assert "capped at 32 vectors" in provenance.note and eigen.matvecs <= 32 + 1


def test_the_broadened_density_is_computed_in_chunks_of_the_grid():
    """A grid of 10⁵ points over 90 nodes takes three kernel chunks (2²² numbers each); every
    point equals the density's formula."""
    g = torch.Generator().manual_seed(0)
    nodes = torch.randn(3, 30, generator=g, dtype=torch.float64)
    weights = torch.rand(3, 30, generator=g, dtype=torch.float64)
    weights /= weights.sum(1, keepdim=True)
    density = broadened_density(nodes, weights, 90, grid_size=100_000, sigma=0.1)
    for i in (0, 46_602, 46_603, 99_999):  # both sides of a chunk's edge
        kernel = torch.exp(-0.5 * ((density.grid[i] - nodes) / 0.1) ** 2) / (
            0.1 * (2 * np.pi) ** 0.5
        )
        assert float(density.values[i]) == pytest.approx(float((weights * kernel).sum(1).mean()),
                                                         rel=1e-12, abs=1e-300)  # fmt: skip


def test_slq_density_integrates_to_one_and_matches_histogram():
    g = torch.Generator().manual_seed(0)
    eigs = torch.cat(
        [torch.rand(N // 2, generator=g), 3 + torch.rand(N // 2, generator=g)]
    ).double()
    a = symmetric(eigs)
    density = slq_density(lambda v: a @ v, N, num_probes=20, num_steps=60, relative_sigma=0.02)
    grid, values = density.grid.numpy(), density.values.numpy()
    assert np.trapezoid(values, grid) == pytest.approx(1.0, abs=1e-3)
    # half the mass in each of the two bands [0, 1] and [3, 4]: compare the integrated mass
    low = np.trapezoid(np.where(grid < 2, values, 0), grid)
    assert low == pytest.approx(0.5, abs=0.05)
    assert (density.weights.sum(1) - 1).abs().max() < 1e-10
    assert density.matvecs == 20 * 60


@pytest.mark.parametrize("block", [3, 5, 7])
def test_block_lanczos_stops_at_max_iter_for_any_block(block):
    """A product limit that is not a multiple of the block: at least max_iter products, fewer
    than max_iter + block, and the Ritz values still bracketed by the spectrum."""
    eigs = spectra()["indefinite"]
    a = symmetric(eigs)
    result = lanczos(lambda v: a @ v, N, 12, tol=1e-14, max_iter=37, block=block)
    assert not result.converged and 37 <= result.matvecs < 37 + block
    assert float(result.values[0]) <= float(eigs.max()) + 1e-12
