"""Lanczos with full reorthogonalisation: top-k eigenpairs and stochastic Lanczos quadrature.

Everything here takes a product ``V ↦ A V`` of a symmetric ``A`` with a (dim, k) block of
vectors and counts the vectors it was applied to. Nothing of size dim × dim is formed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from curvkit.errors import finite
from curvkit.linalg.subspace import long_matmul
from curvkit.progress import progress_bar

Matmat = Callable[[Tensor], Tensor]


@dataclass
class EigenResult:
    """Top eigenpairs in descending order, with how they were obtained."""

    values: Tensor  # (k,) descending
    vectors: Tensor  # (dim, k), orthonormal columns
    residuals: Tensor  # (k,) ‖A u − λ u‖
    matvecs: int
    converged: bool
    stopped_by: str = ""  # what ended the iteration before convergence, when not max_iter


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


def random_rademacher(
    shape: int | tuple[int, ...], generator: torch.Generator, dtype: torch.dtype, device
) -> Tensor:
    """±1 entries drawn on the CPU from ``generator`` (so CPU and GPU runs draw the same)."""
    shape = (shape,) if isinstance(shape, int) else shape
    signs = torch.randint(0, 2, shape, generator=generator, dtype=torch.int8)
    return (2 * signs - 1).to(device=device, dtype=dtype)


COPY_LIMIT = 2**26  # bytes: a smaller basis grows by copying, a larger one in new chunks


def _dot(u: Tensor, v: Tensor) -> float:
    """uᵀv of two P-vectors, accurate in float32 (``long_matmul``): torch's float32 ``norm`` of
    a normalised 4·10⁶-vector measured 3e-3 off on CPU, which left the basis 3e-3 from
    orthonormal and the Ritz values 4e-4 off."""
    return float(long_matmul(u[None], v[:, None]))


class _Krylov:
    """Block Lanczos recurrence with full (twice-applied Gram–Schmidt) reorthogonalisation.

    Keeps the orthonormal basis Q and the projected matrix T = QᵀAQ, which is block
    tridiagonal. Q is never pre-allocated in full: it grows by doubling, copied into one chunk
    while that stays under COPY_LIMIT bytes (fewer, larger products), and beyond it in new
    chunks, each as large as the basis before it, so that a large basis is never copied (the
    copy would hold 1.5× the basis at that moment). ``newest()`` is the block whose
    product is due; ``extend(A · newest())`` orthogonalises the product against Q and appends
    what is left as the next block, dropping a column whose remainder is at rounding level.
    When nothing is left (the Krylov space became invariant) it continues with a fresh random
    block orthogonal to Q, so that the whole space can be explored (repeated eigenvalues then
    appear as well); ``restart`` is the column where the newest such block begins (0 while
    there was none). Block size 1 is the classic Lanczos recurrence.
    """

    def __init__(self, start: Tensor, capacity: int, generator: torch.Generator):
        """``start``: the first block (dim, width); ``capacity``: the most products expected."""
        self.generator = generator
        self.dim, self.width = start.shape
        self.capacity = capacity
        self.chunks: list[Tensor] = []  # Q's rows, each chunk (rows, dim)
        self.used: list[int] = []  # rows in use in each chunk
        self.projected = torch.zeros(0, 0, dtype=torch.float64)
        self.blocks: list[slice] = []  # the basis columns of each block
        self.size = 0  # columns of the basis in use
        self.restart = 0
        self.complement_top: float | None = None  # see extend
        self.matvecs = 0
        self._largest = 0.0
        self._append(self._orthonormal_columns(start)[0])

    @property
    def done(self) -> int:
        """Columns whose product has been applied (the order of the projected matrix)."""
        return self.blocks[-1].start

    def newest(self) -> Tensor:
        rows = self.blocks[-1].stop - self.blocks[-1].start
        return self.chunks[-1][self.used[-1] - rows : self.used[-1]].T

    def rows(self) -> list[Tensor]:
        """Q's rows in use, chunk by chunk (views, in order)."""
        return [chunk[:used] for chunk, used in zip(self.chunks, self.used)]

    def combine(self, coefficients: Tensor) -> Tensor:
        """Q[:, :n] · coefficients for n × k coefficients (n ≤ size), as a (dim, k) view of a
        k × dim product: row-major products, accumulated in place over the chunks (on 1.1·10⁷
        float32 dimensions, Qᵀ's column-major product took 1.8× as long)."""
        out, start = None, 0
        for q in self.rows():
            q = q[: max(0, len(coefficients) - start)]
            if len(q):
                c = coefficients[start : start + len(q)].to(q).T
                out = c @ q if out is None else out.addmm_(c, q)
            start += len(q)
        return out.T

    def _append(self, columns: Tensor) -> None:
        width = columns.shape[1]
        if not self.chunks or self.used[-1] + width > len(self.chunks[-1]):  # room for more
            rows = max(min(self.size, self.capacity + 2 * self.width - self.size), width)
            if (
                len(self.chunks) == 1
                and (self.size + rows) * self.dim * columns.element_size() <= COPY_LIMIT
            ):
                grown = columns.new_empty(self.size + rows, self.dim)
                grown[: self.size] = self.chunks[0][: self.size]
                self.chunks[0] = grown
            else:
                self.chunks.append(columns.new_empty(rows, self.dim))
                self.used.append(0)
        if self.size + width > len(self.projected):
            grown = max(
                min(2 * len(self.projected), self.capacity + 2 * self.width), self.size + width
            )
            projected = torch.zeros(grown, grown, dtype=torch.float64)
            projected[: self.size, : self.size] = self.projected[: self.size, : self.size]
            self.projected = projected
        self.chunks[-1][self.used[-1] : self.used[-1] + width] = columns.T
        self.used[-1] += width
        self.blocks.append(slice(self.size, self.size + width))
        self.size += width

    def _project_out(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """w minus its projection on Q (twice, each time all of Qᵀw from the same w), and the
        coefficients Qᵀw."""
        coefficients = torch.zeros(self.size, w.shape[1], dtype=w.dtype, device=w.device)
        for _ in range(2):
            step = torch.cat([long_matmul(q, w) for q in self.rows()])
            w = w - self.combine(step)
            coefficients += step
        return w, coefficients

    def _orthonormal_columns(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """Gram–Schmidt (twice) on w's columns (Q already projected out), dropping those at
        rounding level: the orthonormal columns and R with w = columns · R (float64, CPU)."""
        kept: list[Tensor] = []
        coupling = torch.zeros(w.shape[1], w.shape[1], dtype=torch.float64)
        for j in range(w.shape[1]):
            v = w[:, j]
            for _ in range(2):
                for i, u in enumerate(kept):
                    step = _dot(u, v)
                    v = v - step * u
                    coupling[i, j] += step
            norm = math.sqrt(max(_dot(v, v), 0.0))
            if norm > 1e-10 * max(self._largest, 1e-300) and norm > 0:
                coupling[len(kept), j] = norm
                kept.append(v / norm)
        columns = torch.stack(kept, 1) if kept else w[:, :0]
        return columns, coupling[: len(kept)]

    def extend(self, product: Tensor) -> None:
        """Record A · newest() and append the next block of the basis."""
        block = self.blocks[-1]
        self.matvecs += product.shape[1]
        # products near overflow overflow in the norms and projections
        self._largest = max(self._largest, finite(float(product.norm(dim=0).max())))
        w, coefficients = self._project_out(product)
        coefficients = finite(coefficients.double().cpu())
        diagonal = coefficients[block]
        coefficients[block] = (diagonal + diagonal.T) / 2
        self.projected[: self.size, block] = coefficients
        self.projected[block, : self.size] = coefficients.T
        columns, coupling = self._orthonormal_columns(w)
        if columns.shape[1] == 0:  # invariant: continue in the complement, uncoupled
            # a block started in the complement whose space is invariant too holds the
            # complement's largest eigenvalue exactly (a random start reaches every direction)
            self.complement_top = (
                float(
                    torch.linalg.eigvalsh(
                        self.projected[self.restart : self.size, self.restart : self.size]
                    )[-1]
                )
                if self.restart
                else None
            )
            self.restart = self.size
            fresh = random_rademacher((self.dim, self.width), self.generator, w.dtype, w.device)
            columns = self._orthonormal_columns(self._project_out(fresh)[0])[0]
            coupling = torch.zeros(columns.shape[1], w.shape[1], dtype=torch.float64)
        self._append(columns)
        new = self.blocks[-1]
        self.projected[new, block] = coupling
        self.projected[block, new] = coupling.T

    def ritz(self, k: int) -> tuple[Tensor, Tensor, Tensor]:
        """The top-k Ritz values, their vectors' coefficients in Q, and the residual norms
        ``‖A u_i − θ_i u_i‖ = ‖T[new, done] s_i‖`` (new: the block not yet applied)."""
        done = self.done
        theta, s = torch.linalg.eigh(self.projected[:done, :done])
        theta, s = theta.flip(0)[:k], s.flip(1)[:, :k]
        residuals = (self.projected[done : self.size, :done] @ s).norm(dim=0)
        return theta, s, residuals

    def complement_explored(self, theta_k: float, tol: float) -> bool:
        """After a restart: has the newest block converged its top Ritz value at most θ_k (or,
        when it has not begun, did the block before it, whose space became invariant)? A tie
        is explored: another copy of θ_k changes no top-k value (the residual of a linear
        classifier, exactly zero, "did not converge" in 125 products before)."""
        start, done = self.restart, self.done
        if start == 0:
            return True
        if done <= start:
            return self.complement_top is not None and self.complement_top <= theta_k + tol
        values, vectors = torch.linalg.eigh(self.projected[start:done, start:done])
        top = float((self.projected[done : self.size, start:done] @ vectors[:, -1]).norm())
        return top <= tol and float(values[-1]) <= theta_k + tol


def lanczos(
    matmat: Matmat,
    dim: int,
    k: int,
    *,
    tol: float = 1e-6,
    max_iter: int | None = None,
    block: int = 1,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> EigenResult:
    """The k algebraically largest eigenpairs of a symmetric operator, by block Lanczos.

    Each step applies the operator to a block of ``block`` vectors at once (one pass over the
    data for a curvature operator). Converged when every wanted Ritz pair (θ_i, u_i) has
    residual ``‖A u_i − θ_i u_i‖ ≤ tol · max|θ|``; since the eigenvalue error is at most the
    residual (and typically its square over the gap), ``tol`` bounds the error relative to the
    spectral norm. Once the Krylov space has become invariant, the Ritz values found are exact
    but further copies of them can only lie in its complement: convergence then also needs the
    newest block (started from random vectors in the complement) to have converged its largest
    Ritz value below θ_k, which shows that the complement holds nothing of the top k. Without
    such a breakdown, an eigenvalue repeated more often than the block size is seen only
    through rounding and can be missed (``operator.top_eigen`` looks for the missing copies
    where the values found tie). ``max_iter`` bounds the products (default
    max(6k + 40, 100) · (1 + block/4), at most dim). Deterministic for a given ``seed``.
    """
    if not 1 <= k <= dim:
        raise ValueError(f"k must lie in [1, {dim}], got {k}")
    max_iter = min(dim, max_iter if max_iter is not None else default_max_iter(k, block))
    max_iter = max(max_iter, k)
    block = max(1, min(block, k, max_iter))
    generator = torch.Generator().manual_seed(seed)
    start = random_rademacher((dim, block), generator, dtype, device)
    krylov = _Krylov(start, max_iter, generator)
    converged = False
    with progress_bar(total=max_iter, desc="Lanczos products", enabled=progress) as bar:
        while True:
            applied = krylov.newest()
            krylov.extend(matmat(applied))
            bar.update(applied.shape[1])
            m = krylov.done
            if m < k:
                continue
            theta, s, bound = krylov.ritz(k)
            scale = max(float(theta.abs().max()), 1e-300)
            converged = bool((bound <= tol * scale).all()) and krylov.complement_explored(
                float(theta[-1]), tol * scale
            )
            converged = converged or m == dim
            if converged or m >= max_iter:
                break
    vectors = krylov.combine(s).contiguous()
    return EigenResult(theta.to(dtype=dtype), vectors, bound.to(dtype), krylov.matvecs, converged)


def default_max_iter(k: int, block: int) -> int:
    """Lanczos's default bound on the products for the top ``k`` (blocks need more)."""
    return max(6 * k + 40, 100) * (4 + block) // 4


def lanczos_extra_vectors(k: int, block: int) -> int:
    """Vectors of the operator's size a Lanczos run holds beside its basis: the k Ritz vectors
    and, per block column, the product, its orthogonalised remainder and the basis's growth
    by two blocks beyond its capacity."""
    return k + 5 * block


SLQ_EXTRA_VECTORS = 4  # per probe, beside its basis: its growth by 2, the product, its remainder


def slq_density(
    matmat: Matmat,
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
    group: int | None = None,
) -> Density:
    """Spectral density by stochastic Lanczos quadrature with Gaussian broadening.

    Each probe v (Rademacher, normalised) runs ``num_steps`` Lanczos steps; the Ritz values θ_j and
    weights τ_j = (e₁ᵀ s_j)² give the quadrature ``vᵀ f(A) v ≈ Σ_j τ_j f(θ_j)``, so the density is
    ``φ(t) ≈ (1/probes) Σ_probes Σ_j τ_j N(t; θ_j, σ²)``. ``σ`` defaults to ``relative_sigma`` times
    the width of the Ritz range. The grid extends 5σ beyond the extreme Ritz values, so φ
    integrates to 1. ``values_stderr`` is the standard error over probes. The recurrences of
    ``group`` probes (default: all) run in lockstep, each step one product with their block;
    each probe holds its basis of ``num_steps`` vectors (``SLQ_EXTRA_VECTORS`` more at its
    peak) until its group is done.
    """
    steps = min(num_steps, dim)
    group = group or num_probes
    generator = torch.Generator().manual_seed(seed)
    nodes, weights, matvecs = [], [], 0
    with progress_bar(total=num_probes * steps, desc="SLQ products", enabled=progress) as bar:
        for first in range(0, num_probes, group):
            probes = [
                _Krylov(random_rademacher((dim, 1), generator, dtype, device), steps, generator)
                for _ in range(min(group, num_probes - first))
            ]
            for _ in range(steps):
                products = matmat(torch.cat([krylov.newest() for krylov in probes], 1))
                for krylov, product in zip(probes, products.T):
                    krylov.extend(product[:, None])
                bar.update(len(probes))
            for krylov in probes:
                theta, s = torch.linalg.eigh(krylov.projected[:steps, :steps])
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
    chunk = max(1, 2**22 // nodes_t.numel())  # grid points per kernel of probes × steps × chunk
    per_probe = torch.cat(  # (probes, grid)
        [
            (weights_t[..., None] * _gaussian(grid[i : i + chunk], nodes_t, sigma)).sum(dim=1)
            for i in range(0, grid_size, chunk)
        ],
        dim=1,
    )
    values = per_probe.mean(0)
    stderr = (
        per_probe.std(0, unbiased=True) / math.sqrt(num_probes)
        if num_probes > 1
        else torch.full_like(values, float("nan"))
    )
    return Density(grid, values, stderr, nodes_t, weights_t, float(sigma), matvecs)


def _gaussian(grid: Tensor, nodes: Tensor, sigma: float) -> Tensor:
    """N(t; θ, σ²) for every node θ (any shape) and grid point t (last axis)."""
    kernel = torch.exp(-0.5 * ((grid - nodes[..., None]) / sigma) ** 2)
    return kernel / (sigma * math.sqrt(2 * math.pi))


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
