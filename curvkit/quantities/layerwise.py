"""Layerwise Hessian structure (Wu et al. 2020; Sankar et al. 2021) and the trace regulariser.

For each Linear / Conv2d layer l, its block is the diagonal block of the Hessian for the layer's
weight W (n × m, bias excluded). Reported: the block's trace and top eigenvalues (λ_max), the
Kronecker approximation ``B ⊗ A`` (``B = E[M]``, ``A = E[a aᵀ]``) whose eigenvalues are the products
λ_i(B) λ_j(A) and eigenvectors u_i ⊗ v_j, the top-k eigenspace overlap of B ⊗ A with the exact
Hessian and G blocks, how close each top exact eigenvector reshaped to n × m is to rank one
(σ₁²/Σσ²), and ``spectrum_distance``: the 1-Wasserstein distance between the block's and the full
Hessian's spectral densities, each on its eigenvalue axis divided by its own λ_max.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn

from curvkit.backend import Backend, Provenance, kronecker_layers
from curvkit.errors import InvalidInputError
from curvkit.linalg import estimate_trace, lanczos, slq_density
from curvkit.quantities.classmeans import subspace_overlap
from curvkit.report import Layer

if TYPE_CHECKING:
    from curvkit.report import Report


def kronecker_top(b: Tensor, a: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k eigenpairs of ``B ⊗ A`` from the factors' eigenpairs, without forming the product."""
    lb, ub = torch.linalg.eigh(b)
    la, ua = torch.linalg.eigh(a)
    products = torch.outer(lb, la).flatten()
    order = torch.argsort(products, descending=True)[:k]
    i, j = order // la.numel(), order % la.numel()
    vectors = (ub[:, i][:, None, :] * ua[:, j][None, :, :]).reshape(-1, k)  # u_i ⊗ v_j
    return products[order], vectors


def rank_one_ratio(vector: Tensor, shape: tuple[int, int]) -> float:
    """σ₁² / Σ σ² of a vector reshaped to an n × m matrix (1 = exactly rank one)."""
    s = torch.linalg.svdvals(vector.reshape(shape))
    return float(s[0] ** 2 / (s**2).sum())


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


def layerwise(
    backend: Backend, top_k: int, seed: int = 0, spectra: Report | None = None
) -> dict[str, Layer]:
    """Every Linear / Conv2d layer's Hessian block against its Kronecker approximation."""
    problem, opts = backend.problem, backend.options
    names = kronecker_layers(problem)
    if not names:
        raise InvalidInputError(
            "the model has no Linear or Conv2d layer whose weight is selected; layerwise analysis "
            "needs at least one."
        )
    start = time.perf_counter()
    factors = backend.kronecker_factors()
    factor_prov = Provenance(
        backend.name,
        f"{backend.name}.kronecker_factors",
        seconds=time.perf_counter() - start,
        derived=backend.capabilities.get("kronecker_factors") == "derived",
    )
    full = _full_density(backend, seed, spectra)
    modules = dict(problem.model.named_modules())
    numerics = {"dtype": problem.dtype, "device": problem.device}
    layers: dict[str, Layer] = {}
    for name in names:
        weight = modules[name].weight
        shape = (weight.shape[0], weight[0].numel())
        dim = shape[0] * shape[1]
        k = min(top_k, dim)
        hessian_block = backend.block_matvec("hessian", f"{name}.weight")
        native_blocks = backend.capabilities.get("block_products") == "native"
        t0 = time.perf_counter()
        exact, exact_g = (
            lanczos(
                backend.block_matvec(matrix, f"{name}.weight"),
                dim,
                k,
                tol=opts.lanczos_tol,
                max_iter=opts.lanczos_max_iter,
                seed=seed,
                **numerics,
            )
            for matrix in ("hessian", "ggn")
        )
        trace = estimate_trace(
            hessian_block,
            dim,
            opts.trace_matvecs,
            method=opts.trace_method,
            seed=seed + 1,
            **numerics,
        )
        density = slq_density(
            hessian_block,
            dim,
            num_probes=opts.density_probes,
            num_steps=opts.density_steps,
            grid_size=opts.density_grid,
            relative_sigma=opts.density_relative_sigma,
            seed=seed + 2,
            **numerics,
        )
        kron_values, kron_vectors = kronecker_top(factors[name].B, factors[name].A, k)
        lmax = float(exact.values[0])
        layers[name] = Layer(
            shape=list(shape),
            trace=trace.value,
            trace_stderr=trace.stderr,
            max_eigenvalue=lmax,
            top_eigenvalues=[float(v) for v in exact.values],
            kronecker={
                "B_shape": list(factors[name].B.shape),
                "A_shape": list(factors[name].A.shape),
                "top_eigenvalues": [float(v) for v in kron_values],
            },
            overlap={
                "hessian": subspace_overlap(exact.vectors, kron_vectors.to(exact.vectors)),
                "ggn": subspace_overlap(exact_g.vectors, kron_vectors.to(exact_g.vectors)),
            },
            rank1=[rank_one_ratio(u, shape) for u in exact.vectors.T],
            spectrum_distance=normalised_w1(density.grid, density.values, lmax, *full),
            closest_to_full=False,
            provenance={
                "kronecker": factor_prov,
                "blocks": Provenance(
                    backend.name,
                    "curvkit.lanczos/hutch++/slq on block products",
                    exact.matvecs + exact_g.matvecs + trace.matvecs + density.matvecs,
                    time.perf_counter() - t0,
                    derived=not native_blocks,
                    note="products with respect to the layer's weight alone"
                    if native_blocks
                    else "block product = slice of a full product",
                ),
            },
        )
    distances = {
        n: layer.spectrum_distance
        for n, layer in layers.items()
        if not math.isnan(layer.spectrum_distance)
    }
    if distances:
        layers[min(distances, key=distances.get)].closest_to_full = True
    return layers


def _full_density(
    backend: Backend, seed: int, spectra: Report | None
) -> tuple[Tensor, Tensor, float]:
    """Grid, values and λ_max of the full Hessian's density, reused from the report if there."""
    known = getattr(spectra, "hessian", None) if spectra is not None else None
    if known is not None:
        grid = torch.tensor(known.density["grid"], dtype=torch.float64)
        values = torch.tensor(known.density["values"], dtype=torch.float64)
        return grid, values, known.top_eigenvalues[0]
    density, _ = backend.density("hessian", seed + 2)
    eigen, _ = backend.top_eigen("hessian", 1, seed)
    return density.grid, density.values, float(eigen.values[0])


def middle_layers(model: nn.Module) -> list[str]:
    """The middle half of the model's Linear / Conv2d layers (Sankar et al.'s default set)."""
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    count = len(names)
    return names[count // 4 : count - count // 4] or names


def layer_trace_penalty(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    inputs: Tensor,
    targets: Tensor,
    layers: Sequence[str] | None = None,
    num_probes: int = 1,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Differentiable Hutchinson estimate of ``Σ_{l ∈ layers} tr(H_l)`` on one batch.

    ``(1/K) Σ_k v_kᵀ H_S v_k`` with Rademacher probes v_k on the weights of the chosen layers
    (default: the middle half, as Sankar et al.), H_S the Hessian of ``loss_fn(model(inputs),
    targets)`` restricted to them. Add ``γ · penalty`` to the training loss. Cost: one gradient with
    ``create_graph=True`` plus one double-backward per probe, and the backward of the result.
    """
    modules = dict(model.named_modules())
    layers = list(layers) if layers is not None else middle_layers(model)
    unknown = [n for n in layers if not isinstance(modules.get(n), (nn.Linear, nn.Conv2d))]
    if unknown or not layers:
        raise InvalidInputError(
            f"layers {unknown or layers} are not Linear or Conv2d modules of the model; choose from "
            f"{[n for n, m in modules.items() if isinstance(m, (nn.Linear, nn.Conv2d))]}."
        )
    weights = [modules[n].weight for n in layers]
    grads = torch.autograd.grad(loss_fn(model(inputs), targets), weights, create_graph=True)
    total = inputs.new_zeros(())
    for _ in range(num_probes):
        probes = [
            (2 * torch.randint(0, 2, w.shape, generator=generator) - 1).to(w) for w in weights
        ]
        directional = sum((g * v).sum() for g, v in zip(grads, probes))
        hv = torch.autograd.grad(directional, weights, create_graph=True)
        total = total + sum((h * v).sum() for h, v in zip(hv, probes))
    return total / num_probes
