"""Layerwise Hessian structure (Wu et al. 2020; Sankar et al. 2021) and the trace regulariser.

For each Linear / Conv2d layer l, its block is the diagonal block of the Hessian for the layer's
weight W (n × m, bias excluded). Reported: the block's trace and top eigenvalues (λ_max), the
Kronecker approximation ``B ⊗ A`` (``B = E[M]``, ``A = E[a aᵀ]``) whose eigenvalues are the products
λ_i(B) λ_j(A) and eigenvectors u_i ⊗ v_j, the top-k eigenspace overlap of B ⊗ A with the exact
Hessian and G blocks, how close each top exact eigenvector reshaped to n × m is to rank one
(σ₁²/Σσ²), with λ₁(A)/tr A beside them (Wu et al.: a dominant direction of the layer inputs,
their mean, is what makes the eigenvectors nearly rank one), and, when ``options.layer_density``
asks for it, ``spectrum_distance``: the 1-Wasserstein distance between the block's and the full
Hessian's spectral densities, each on its eigenvalue axis divided by its own λ_max (None when
not asked). That distance is dominated by the zero spike: it tracks |tr_l/(P_l λ_l) − tr/(P λ)|,
block size against effective rank (benchmarks/results/reproduce_sankar.md). ``profile_distance`` compares the shape of the top of
the spectra instead: mean over i = 2..k of |λ_i/λ_1 (block) − λ_i/λ_1 (full Hessian)|, whenever
the full Hessian's top-k eigenvalues are at hand (in the report, or computed for the density).
"""

from __future__ import annotations

import math
import time
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from curvkit.backend import Backend
from curvkit.errors import InvalidInputError, UnsupportedError, listed, shown, warn
from curvkit.features import model_features
from curvkit.layers import kronecker_layers, kronecker_shape
from curvkit.linalg import subspace_overlap
from curvkit.linalg.krylov import normalised_w1
from curvkit.linalg.operator import density, integer, top_eigen, trace
from curvkit.linalg.trace import TraceEstimate
from curvkit.problem import differentiable_kernels, model_guard
from curvkit.report import Layer, Provenance, Spectrum

if TYPE_CHECKING:
    from curvkit.report import Report


def psd_eigh(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenpairs (eigenvalues ascending up to rounding) of a symmetric PSD Kronecker factor,
    in float64. Rows and columns that are exactly zero (a convolution's padding on a small
    input, dead units: 4239 of 4608 in a ResNet-18's last layer on 8×8 images) give eigenvalue
    0 with eigenvector e_j and are left out of LAPACK, whose eigh (torch's divide and conquer)
    failed to converge on such a matrix in float32 and float64; SciPy's ``evr`` driver takes
    over if it fails on the rest."""
    matrix = matrix.double()
    live = (matrix != 0).any(dim=1)
    kept, dead = live.nonzero()[:, 0], (~live).nonzero()[:, 0]
    block = matrix[kept][:, kept]
    try:
        values, small = torch.linalg.eigh(block)
    except torch.linalg.LinAlgError:
        import scipy.linalg

        found = scipy.linalg.eigh(block.cpu().numpy(), driver="evr")
        values, small = (torch.from_numpy(a).to(matrix.device) for a in found)
    vectors = matrix.new_zeros(matrix.shape)
    vectors[dead, torch.arange(len(dead), device=matrix.device)] = 1.0
    vectors[kept[:, None], len(dead) + torch.arange(len(kept), device=matrix.device)] = small
    return torch.cat([values.new_zeros(len(dead)), values]), vectors


def kronecker_top(
    b: tuple[Tensor, Tensor], a: tuple[Tensor, Tensor], k: int
) -> tuple[Tensor, Tensor]:
    """Top-k eigenpairs of ``B ⊗ A`` from the factors' eigenpairs (``psd_eigh`` of each),
    without forming the product: λ_i(B) λ_j(A) and u_i ⊗ v_j, in float64."""
    (lb, ub), (la, ua) = b, a
    products = torch.outer(lb, la).flatten()
    order = torch.argsort(products, descending=True)[:k]
    i, j = order // la.numel(), order % la.numel()
    vectors = (ub[:, i][:, None, :] * ua[:, j][None, :, :]).reshape(-1, k)  # u_i ⊗ v_j
    return products[order], vectors


def rank_one_ratio(vector: Tensor, shape: tuple[int, int]) -> float:
    """σ₁² / Σ σ² of a vector reshaped to an n × m matrix (1 = exactly rank one)."""
    s = torch.linalg.svdvals(vector.reshape(shape))
    return float(s[0] ** 2 / (s**2).sum())


def profile_distance(block: Sequence[float], full: Sequence[float]) -> float | None:
    """Mean over i = 2..k of |λ_i/λ_1 − μ_i/μ_1| for the block's top eigenvalues λ and the full
    Hessian's μ (k the shorter list); None when k < 2 or a λ_1 is not positive."""
    k = min(len(block), len(full))
    if k < 2 or block[0] <= 0 or full[0] <= 0:
        return None
    return sum(abs(block[i] / block[0] - full[i] / full[0]) for i in range(1, k)) / (k - 1)


def layerwise(
    backend: Backend, top_k: int, seed: int = 0, spectra: Report | None = None
) -> dict[str, Layer]:
    """Every Linear / Conv2d layer's Hessian block against its Kronecker approximation.

    The blocks are operators of the backend (its native block products and routines where it
    has them), so the quantity's options apply to them as to the full matrices. A layer whose
    Kronecker factors do not fit the memory budget (``Backend.kronecker_plan``) keeps its exact
    block numbers; its ``kronecker`` says why it was ``skipped`` (no Kronecker eigenvalues,
    NaN overlaps and λ₁(A)/tr A).
    """
    problem, options = backend.problem, backend.options
    names = kronecker_layers(problem)  # at least one (Backend.refusal)
    other = [  # a parametrized weight (ParametrizedLinear) is computed from other Parameters
        f"{n} ({type(m).__name__})"
        for n, m in problem.model.named_modules()
        if n not in names
        and isinstance(getattr(m, "weight", None), torch.Tensor)
        and m.weight.dim() >= 2
        and any(
            p == f"{n}.weight" or p.startswith(f"{n}.parametrizations.weight.")
            for p in problem.names
        )  # fmt: skip
    ]
    if other:
        warn(
            "layerwise analyses the Parameter weights of Linear and Conv2d layers only; it "
            f"leaves out {listed(other)}."
        )
    kept, skipped = backend.kronecker_plan()
    start, passes = time.perf_counter(), backend.passes
    factors = backend.kronecker_factors() if kept else {}
    factor_prov = Provenance(
        backend.name,
        f"{backend.name}.kronecker_factors",
        seconds=time.perf_counter() - start,
        derived=backend.capabilities.get("kronecker_factors") == "derived",
        passes=backend.passes - passes,
    )
    known = getattr(spectra, "hessian", None) if spectra is not None else None
    full_top = known.top_eigenvalues if known is not None else None
    full = None
    if options.layer_density:
        full, full_top = _full_density(backend, top_k, seed, known)
    modules = dict(problem.model.named_modules())
    layers: dict[str, Layer] = {}
    for name in names:
        shape = kronecker_shape(modules[name])
        hessian_block = backend.operator("hessian", f"{name}.weight")
        k = min(top_k, hessian_block.size)
        exact, exact_prov = top_eigen(
            hessian_block, k, options, seed, what=f"layer {name}'s Hessian block"
        )
        exact_g, exact_g_prov = top_eigen(
            backend.operator("ggn", f"{name}.weight"), k, options, seed,
            what=f"layer {name}'s G block",
        )  # fmt: skip
        provenance = {
            "kronecker": factor_prov,
            "top_eigenvalues": exact_prov,
            "ggn_top_eigenvalues": exact_g_prov,
        }
        estimate = TraceEstimate(math.nan, math.nan, 0, "off")
        if options.trace_matvecs:
            estimate, provenance["trace"] = trace(hessian_block, options, seed + 1)
        lmax, distance = float(exact.values[0]), None
        if full is not None:
            spectral, provenance["density"] = density(hessian_block, options, seed + 2)
            distance = normalised_w1(spectral.grid, spectral.values, lmax, *full)
        top = [float(v) for v in exact.values]
        kronecker: dict[str, Any] = {"B_shape": [shape[0]] * 2, "A_shape": [shape[1]] * 2}
        if name in skipped:
            kronecker.update(top_eigenvalues=[], A_top_share=math.nan, skipped=skipped[name])
            overlap = {"hessian": math.nan, "ggn": math.nan}
        else:
            a_values, a_vectors = psd_eigh(factors[name].A)
            kron_values, kron_vectors = kronecker_top(
                psd_eigh(factors[name].B), (a_values, a_vectors), k
            )
            kronecker.update(
                top_eigenvalues=[float(v) for v in kron_values],
                A_top_share=float(a_values.max() / a_values.sum()),
            )
            overlap = {
                "hessian": subspace_overlap(exact.vectors, kron_vectors.to(exact.vectors)),
                "ggn": subspace_overlap(exact_g.vectors, kron_vectors.to(exact_g.vectors)),
            }
        layers[name] = Layer(
            shape=list(shape),
            trace=estimate.value,
            trace_stderr=estimate.stderr,
            max_eigenvalue=lmax,
            top_eigenvalues=top,
            kronecker=kronecker,
            overlap=overlap,
            rank1=[rank_one_ratio(u, shape) for u in exact.vectors.T],
            spectrum_distance=distance,
            profile_distance=None if full_top is None else profile_distance(top, full_top),
            closest_to_full=False,
            provenance=provenance,
        )
    distances = {
        n: layer.spectrum_distance
        for n, layer in layers.items()
        if layer.spectrum_distance is not None and not math.isnan(layer.spectrum_distance)
    }
    if distances:
        layers[min(distances, key=distances.get)].closest_to_full = True
    return layers


def _full_density(
    backend: Backend, top_k: int, seed: int, known: Spectrum | None
) -> tuple[tuple[Tensor, Tensor, float], list[float]]:
    """(grid, values, λ_max) of the full Hessian's density, and its top-k eigenvalues: those of
    the report's Hessian spectrum ``known`` where it has them, else computed."""
    if known is not None and known.density["grid"]:  # not switched off for the hessian
        grid = torch.tensor(known.density["grid"], dtype=torch.float64)
        values = torch.tensor(known.density["values"], dtype=torch.float64)
        return (grid, values, known.top_eigenvalues[0]), known.top_eigenvalues
    op = backend.operator("hessian")
    spectral, _ = density(op, backend.options, seed + 2)
    if known is not None:
        top = known.top_eigenvalues
    else:
        eigen, _ = top_eigen(op, top_k, backend.options, seed, what="the hessian")
        top = [float(v) for v in eigen.values]
    return (spectral.grid, spectral.values, top[0]), top


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
    num_probes = integer("num_probes", num_probes, 1)
    if not callable(loss_fn):
        raise InvalidInputError(
            f"loss_fn must be a function (logits, targets) ↦ loss, got {shown(loss_fn)}."
        )
    if not isinstance(inputs, Tensor) or not isinstance(targets, Tensor):
        raise InvalidInputError(
            f"inputs and targets must be torch tensors, got {type(inputs).__name__} and "
            f"{type(targets).__name__}."
        )
    if generator is not None and not (
        isinstance(generator, torch.Generator) and generator.device.type == "cpu"
    ):
        raise InvalidInputError(
            "generator must be a CPU torch.Generator (the probes are drawn on the CPU), got "
            f"{shown(generator)}."
        )
    if isinstance(layers, str):
        raise InvalidInputError(
            f"layers must be a list of layer names, got the string {shown(layers)}; write "
            f"layers=[{shown(layers)}]."
        )
    layers = list(layers) if layers is not None else middle_layers(model)
    unknown = [
        n
        for n in layers
        if not isinstance(n, str) or not isinstance(modules.get(n), (nn.Linear, nn.Conv2d))
    ]
    if unknown or not layers:
        raise InvalidInputError(
            f"layers {listed(map(shown, unknown)) or '[]'} are not Linear or Conv2d modules of "
            "the model; choose from "
            f"{listed(n for n, m in modules.items() if isinstance(m, (nn.Linear, nn.Conv2d)))}."
        )
    weights = [modules[n].weight for n in layers]
    holders: dict[int, list[str]] = {}
    for name, weight in zip(layers, weights):
        holders.setdefault(id(weight), []).append(name)
    repeated = [" and ".join(names) for names in holders.values() if len(names) > 1]
    if repeated:
        raise InvalidInputError(
            f"layers {repeated[0]} name one weight more than once; name each weight once (a "
            "repeat would count its block twice, with independent probes)."
        )
    parametrized = [n for n in layers if parametrize.is_parametrized(modules[n], "weight")]
    if parametrized:  # its .weight is computed anew on each access, outside the loss's graph
        raise InvalidInputError(
            f"the weight of layer {parametrized[0]} is parametrized (weight_norm, "
            "spectral_norm, ...), so it is no Parameter whose Hessian block could be probed; "
            "leave the layer out."
        )
    frozen = [n for n, w in zip(layers, weights) if not w.requires_grad]
    if frozen:
        raise InvalidInputError(
            f"the weight of layer {frozen[0]} does not require gradients; leave the layer out "
            "or enable requires_grad."
        )
    fault = _second_derivative_fault(model, inputs[:2], [f"{n}.weight" for n in layers])
    if fault:
        raise UnsupportedError(
            f"layer_trace_penalty probes the Hessian, and the model has {fault}; no estimate of "
            "its trace would be right: replace that operation."
        )
    with differentiable_kernels():  # attention through a kernel with second derivatives
        return _probed_trace(loss_fn(model(inputs), targets), weights, num_probes, generator)


# what curvkit.features found wrong with each model's second derivatives ("" for nothing),
# found on its first penalty: the faults are the model's operations', not its values'
_SECOND_DERIVATIVE_FAULTS: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()


def _second_derivative_fault(model: nn.Module, examples: Tensor, names: list[str]) -> str:
    """Why autograd's Hessian of ``model`` in the parameters ``names`` is wrong (torch's
    weight_norm, an autograd.Function whose backward does not differentiate), "" when it is
    right: curvkit.features' checks on ``examples`` (the first batch's first two), once per
    model (the model comes back as it was)."""
    if model not in _SECOND_DERIVATIVE_FAULTS:
        with model_guard(model):
            try:
                features = model_features(model, examples, names)
            except UnsupportedError:
                raise
            except Exception:  # noqa: BLE001 (a check that cannot run finds nothing)
                features = {}
        _SECOND_DERIVATIVE_FAULTS[model] = next(
            (features[f] for f in ("wrong_hessian", "wrong_jacobian_products") if f in features),
            "",
        )
    return _SECOND_DERIVATIVE_FAULTS[model]


def _probed_trace(
    loss: Tensor, weights: list[Tensor], num_probes: int, generator: torch.Generator | None
) -> Tensor:
    """``(1/K) Σ_k v_kᵀ H v_k`` for the Hessian H of ``loss`` in ``weights``, differentiable."""
    if not isinstance(loss, Tensor) or loss.dim() != 0:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise InvalidInputError(
            f"loss_fn must return a scalar (reduction 'mean' or 'sum'), got {shape}."
        )
    grads = torch.autograd.grad(loss, weights, create_graph=True)
    total = loss.new_zeros(())
    for _ in range(num_probes):
        probes = [
            (2 * torch.randint(0, 2, w.shape, generator=generator) - 1).to(w) for w in weights
        ]
        directional = sum((g * v).sum() for g, v in zip(grads, probes))
        hv = torch.autograd.grad(directional, weights, create_graph=True)
        total = total + sum((h * v).sum() for h, v in zip(hv, probes))
    return total / num_probes
