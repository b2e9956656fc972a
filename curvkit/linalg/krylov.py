"""Lanczos with full reorthogonalisation: top-k eigenpairs and stochastic Lanczos quadrature.

Everything here takes a matvec ``v ↦ A v`` on flat vectors of a symmetric ``A`` and counts how
often it was called. Nothing of size dim × dim is formed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from curvkit.progress import progress_bar

Matvec = Callable[[Tensor], Tensor]


@dataclass
class EigenResult:
    """Top eigenpairs in descending order, with how they were obtained."""

    values: Tensor  # (k,) descending
    vectors: Tensor  # (dim, k), orthonormal columns
    residuals: Tensor  # (k,) ‖A u − λ u‖
    matvecs: int
    converged: bool


@dataclass
class Density:
    """Spectral density ``φ(t) = (1/dim) Σ_i N(t; λ_i, σ²)`` estimated by SLQ on a grid."""

    grid: Tensor
    values: Tensor
    values_stderr: Tensor
    nodes: Tensor  # (probes, steps) Ritz values
    weights: Tensor  # (probes, steps) squared first components, each row sums to 1
    sigma: float
    matvecs: int


def random_rademacher(dim: int, generator: torch.Generator, dtype: torch.dtype, device) -> Tensor:
    """A ±1 vector drawn on the CPU from ``generator`` (so CPU and GPU runs draw the same)."""
    signs = torch.randint(0, 2, (dim,), generator=generator, dtype=torch.int8)
    return (2 * signs - 1).to(device=device, dtype=dtype)


class _Krylov:
    """Lanczos recurrence with full (twice-applied Gram–Schmidt) reorthogonalisation.

    Keeps the orthonormal basis Q and the tridiagonal coefficients α, β. When the Krylov space
    becomes invariant (β ≈ 0) it continues with a fresh random vector orthogonal to Q, so that the
    whole space can be explored (repeated eigenvalues then appear as well); ``block_start`` is
    the index where the newest such block begins (0 while there was none).
    """

    def __init__(self, matvec: Matvec, start: Tensor, capacity: int, generator: torch.Generator):
        self.matvec = matvec
        self.generator = generator
        self.dim = start.numel()
        self.basis = torch.empty(capacity, self.dim, dtype=start.dtype, device=start.device)
        self.basis[0] = start / start.norm()
        self.alpha: list[float] = []
        self.beta: list[float] = []
        self.size = 1
        self.block_start = 0
        self.matvecs = 0
        self._last_norm = 0.0

    def _orthogonalise(self, w: Tensor) -> Tensor:
        q = self.basis[: self.size]
        for _ in range(2):
            w = w - q.T @ (q @ w)
        return w

    def step(self) -> None:
        """Apply A to the newest basis vector and extend the basis by one vector."""
        j = self.size - 1
        v = self.basis[j]
        w = self.matvec(v)
        self.matvecs += 1
        self._last_norm = max(self._last_norm, float(w.norm()))
        alpha = float(v @ w)
        self.alpha.append(alpha)
        w = self._orthogonalise(w)
        beta = float(w.norm())
        if self.size == self.basis.shape[0]:
            self.beta.append(beta)
            return
        if beta <= 1e-10 * max(self._last_norm, 1e-300):
            beta = 0.0
            w = random_rademacher(self.dim, self.generator, v.dtype, v.device)
            w = self._orthogonalise(w)
            self.block_start = self.size
        self.beta.append(beta)
        self.basis[self.size] = w / w.norm()
        self.size += 1

    def tridiagonal(self) -> Tensor:
        m = len(self.alpha)
        t = torch.diag(torch.tensor(self.alpha, dtype=torch.float64))
        off = torch.tensor(self.beta[: m - 1], dtype=torch.float64)
        return t + torch.diag(off, 1) + torch.diag(off, -1)


def lanczos(
    matvec: Matvec,
    dim: int,
    k: int,
    *,
    tol: float = 1e-6,
    max_iter: int | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> EigenResult:
    """The k algebraically largest eigenpairs of a symmetric operator.

    Converged when every wanted Ritz pair (θ_i, u_i) has residual ``‖A u_i − θ_i u_i‖ =
    |β_m s_{m,i}| ≤ tol · max|θ|``; since the eigenvalue error is at most the residual (and
    typically its square over the gap), ``tol`` bounds the error relative to the spectral norm.
    Once the Krylov space has become invariant, the Ritz values found are exact but further
    copies of them can only lie in its complement: convergence then also needs the newest block
    (started from a random vector in the complement) to have converged its largest Ritz value
    below θ_k, which shows that the complement holds nothing of the top k. Without such a
    breakdown, a single start vector sees repeated eigenvalues only through rounding, so an
    exactly repeated top eigenvalue can be missed (a limitation of single-vector Lanczos).
    Deterministic for a given ``seed``.
    """
    if not 1 <= k <= dim:
        raise ValueError(f"k must lie in [1, {dim}], got {k}")
    max_iter = min(dim, max_iter if max_iter is not None else max(6 * k + 40, 100))
    max_iter = max(max_iter, k)
    generator = torch.Generator().manual_seed(seed)
    start = random_rademacher(dim, generator, dtype, device)
    krylov = _Krylov(matvec, start, max_iter, generator)
    check_every = max(1, k // 4)
    converged = False
    with progress_bar(total=max_iter, desc="Lanczos", enabled=progress) as bar:
        while True:
            krylov.step()
            bar.update(1)
            m = len(krylov.alpha)
            if m < k or (m % check_every and m < max_iter):
                continue
            theta, s = torch.linalg.eigh(krylov.tridiagonal())
            theta, s = theta.flip(0)[:k], s.flip(1)[:, :k]
            bound = abs(krylov.beta[-1]) * s[-1].abs()
            scale = max(float(theta.abs().max()), 1e-300)
            converged = bool((bound <= tol * scale).all()) and _complement_explored(
                krylov, float(theta[-1]), tol * scale
            )
            converged = converged or m == dim
            if converged or m >= max_iter:
                break
    q = krylov.basis[:m]
    vectors = q.T @ s.to(dtype=q.dtype, device=q.device)
    values = theta.to(dtype=dtype)
    return EigenResult(values, vectors, bound.to(dtype), krylov.matvecs, converged)


def _complement_explored(krylov: _Krylov, theta_k: float, tol: float) -> bool:
    """After a breakdown: has the newest block converged its top Ritz value below θ_k?"""
    start, m = krylov.block_start, len(krylov.alpha)
    if start == 0:
        return True
    if m <= start:
        return False
    values, vectors = torch.linalg.eigh(krylov.tridiagonal()[start:m, start:m])
    top_bound = abs(krylov.beta[-1]) * float(vectors[-1, -1].abs())
    return top_bound <= tol and float(values[-1]) < theta_k - tol


def slq_density(
    matvec: Matvec,
    dim: int,
    *,
    num_probes: int = 8,
    num_steps: int = 60,
    grid_size: int = 400,
    sigma: float | None = None,
    relative_sigma: float = 0.01,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> Density:
    """Spectral density by stochastic Lanczos quadrature with Gaussian broadening.

    Each probe v (Rademacher, normalised) runs ``num_steps`` Lanczos steps; the Ritz values θ_j and
    weights τ_j = (e₁ᵀ s_j)² give the quadrature ``vᵀ f(A) v ≈ Σ_j τ_j f(θ_j)``, so the density is
    ``φ(t) ≈ (1/probes) Σ_probes Σ_j τ_j N(t; θ_j, σ²)``. ``σ`` defaults to ``relative_sigma`` times
    the width of the Ritz range. The grid extends 5σ beyond the extreme Ritz values, so φ
    integrates to 1. ``values_stderr`` is the standard error over probes.
    """
    steps = min(num_steps, dim)
    generator = torch.Generator().manual_seed(seed)
    nodes, weights, matvecs = [], [], 0
    with progress_bar(total=num_probes * steps, desc="SLQ", enabled=progress) as bar:
        for _ in range(num_probes):
            start = random_rademacher(dim, generator, dtype, device)
            krylov = _Krylov(matvec, start, steps, generator)
            for _ in range(steps):
                krylov.step()
                bar.update(1)
            theta, s = torch.linalg.eigh(krylov.tridiagonal())
            nodes.append(theta)
            weights.append(s[0] ** 2)
            matvecs += krylov.matvecs
    return broadened_density(
        torch.stack(nodes), torch.stack(weights), matvecs, grid_size, sigma, relative_sigma
    )


def broadened_density(
    nodes: Tensor,
    weights: Tensor,
    matvecs: int,
    grid_size: int = 400,
    sigma: float | None = None,
    relative_sigma: float = 0.01,
) -> Density:
    """Gaussian-broadened density from SLQ nodes and weights of shape (probes, steps).

    ``φ(t) = (1/probes) Σ_probes Σ_j τ_j N(t; θ_j, σ²)`` on a grid reaching 5σ beyond the
    extreme nodes; σ defaults to ``relative_sigma`` times the width of the node range.
    """
    nodes_t, weights_t = nodes.double().cpu(), weights.double().cpu()
    num_probes = nodes_t.shape[0]
    low, high = float(nodes_t.min()), float(nodes_t.max())
    if sigma is None:
        sigma = relative_sigma * max(high - low, abs(high), 1e-12)
    grid = torch.linspace(low - 5 * sigma, high + 5 * sigma, grid_size, dtype=torch.float64)
    kernel = torch.exp(-0.5 * ((grid[None, None, :] - nodes_t[..., None]) / sigma) ** 2)
    kernel = kernel / (sigma * math.sqrt(2 * math.pi))
    per_probe = (weights_t[..., None] * kernel).sum(dim=1)  # (probes, grid)
    values = per_probe.mean(0)
    stderr = (
        per_probe.std(0, unbiased=True) / math.sqrt(num_probes)
        if num_probes > 1
        else torch.full_like(values, float("nan"))
    )
    return Density(grid, values, stderr, nodes_t, weights_t, float(sigma), matvecs)


def normalised_w1(
    grid_a: Tensor,
    values_a: Tensor,
    scale_a: float,
    grid_b: Tensor,
    values_b: Tensor,
    scale_b: float,
) -> float:
    """1-Wasserstein distance between two densities, each on its axis divided by its λ_max."""
    if scale_a <= 0 or scale_b <= 0:
        return math.nan
    xa, xb = grid_a / scale_a, grid_b / scale_b
    x = torch.linspace(min(xa[0], xb[0]), max(xa[-1], xb[-1]), 4096, dtype=torch.float64)

    def cdf(grid: Tensor, values: Tensor) -> Tensor:
        mass = torch.cat([values.new_zeros(1), torch.cumulative_trapezoid(values, grid)])
        mass = mass / mass[-1]
        return torch.from_numpy(
            np.interp(x.numpy(), grid.numpy(), mass.numpy(), left=0.0, right=1.0)
        )

    return float(torch.trapezoid((cdf(xa, values_a) - cdf(xb, values_b)).abs(), x))
