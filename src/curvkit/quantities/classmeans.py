"""Papyan's class-mean structure of the Gauss–Newton matrix G (Papyan 2019, Eq. 28).

With ``δ_{i,c'} = sqrt(p_{i,c'}) J_iᵀ(e_{c'} − p_i)``, group means ``δ_{c,c'} = (1/n_c) Σ_{y_i=c} δ_{i,c'}``,
class means ``δ_c = (1/(C−1)) Σ_{c'≠c} δ_{c,c'}`` and weights ``w_c = n_c/N``::

    G = G_own + G_class + G_cross + G_within, exactly, where
    G_own    = Σ_c w_c δ_{c,c} δ_{c,c}ᵀ
    G_class  = (C−1) Σ_c w_c δ_c δ_cᵀ
    G_cross  = Σ_c w_c Σ_{c'≠c} (δ_{c,c'} − δ_c)(δ_{c,c'} − δ_c)ᵀ
    G_within = (1/N) Σ_i Σ_{c'} (δ_{i,c'} − δ_{y_i,c'})(δ_{i,c'} − δ_{y_i,c'})ᵀ

Each of the first three is ``L Lᵀ`` for a P × r matrix L of scaled vectors (r = C, C, C(C−1)), so
its nonzero eigenvalues are those of the small Gram matrix ``Lᵀ L``. G_within is reached through
``v ↦ G v − Σ L Lᵀ v`` (Lanczos) and its trace as tr G minus the other three.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from curvkit.backend import Backend
from curvkit.errors import InvalidInputError
from curvkit.linalg import gram_eigenvalues, orthonormal_basis, subspace_overlap
from curvkit.linalg.operator import top_eigen, trace
from curvkit.report import ClassMeans, Provenance

if TYPE_CHECKING:
    from curvkit.report import Report

TERMS = ("own", "class", "cross")


def low_rank_factors(
    sums: Tensor, counts: Tensor, num_samples: int
) -> tuple[dict[str, Tensor], Tensor, Tensor, list[int]]:
    """Scaled vectors L_term (P × r) with G_term = L Lᵀ, plus δ_{c,c'}, δ_c and the classes used.

    Only classes present in the data (n_c > 0) enter; all C outputs stay potential classes c'.
    """
    num_classes = sums.shape[0]
    present = [c for c in range(num_classes) if counts[c] > 0]
    n = counts[present].to(sums.dtype).to(sums.device)
    weights = n / num_samples
    group = sums[present] / n[:, None, None]  # δ_{c,c'}: (C_present, C, P)
    others = torch.ones(len(present), num_classes, dtype=torch.bool, device=sums.device)
    others[torch.arange(len(present)), present] = False
    means = (group * others[..., None]).sum(1) / (num_classes - 1)  # δ_c
    own = group[torch.arange(len(present)), present]  # δ_{c,c}
    cross = (group - means[:, None, :])[others]  # δ_{c,c'} − δ_c for c' ≠ c, row-major in (c, c')
    cross_weights = weights[:, None].expand(-1, num_classes)[others]
    factors = {
        "own": (own * weights.sqrt()[:, None]).T,
        "class": (means * ((num_classes - 1) * weights).sqrt()[:, None]).T,
        "cross": (cross * cross_weights.sqrt()[:, None]).T,
    }
    return factors, group, means, present


def classmeans(
    backend: Backend, top_k: int, seed: int = 0, spectra: Report | None = None
) -> ClassMeans:
    """Papyan's decomposition of G, its spectra from Gram matrices, and the class-mean overlaps.

    ``top_k`` eigenvalues of G_within are computed; ``spectra``, when given, supplies
    already-computed top eigenvectors of G and the Hessian.
    """
    problem = backend.problem
    num_classes = problem.num_classes
    deltas = backend.class_deltas()
    factors, group, means, present = low_rank_factors(
        deltas.sums, deltas.counts, problem.num_samples
    )
    excluded = [c for c in range(num_classes) if c not in present]
    if len(present) < 2:
        raise InvalidInputError(
            f"the data holds examples of {len(present)} class only; the class-mean decomposition "
            "needs examples of at least two classes."
        )
    if excluded:
        warnings.warn(
            f"classes {excluded} have no examples in the data and are left out of the class means "
            "(they still count as potential labels c').",
            stacklevel=2,
        )

    traces = {t: float(factors[t].double().pow(2).sum()) for t in TERMS}
    provenance = {"deltas": deltas.provenance}
    ggn, options = backend.operator("ggn"), backend.options
    stderr = 0.0
    if deltas.square_norm_sum is not None:
        total = deltas.square_norm_sum / problem.num_samples
    else:
        estimate, provenance["trace_ggn"] = trace(ggn, options, seed + 1)
        total, stderr = estimate.value, estimate.stderr
    traces = {"total": total, **traces, "within": total - sum(traces.values())}

    low_rank = torch.cat([factors[t] for t in TERMS], dim=1)
    within, provenance["within"] = top_eigen(ggn.minus_low_rank(low_rank), top_k, options, seed)

    eigenvalues = {t: gram_eigenvalues(factors[t].T @ factors[t]) for t in TERMS}
    eigenvalues["within"] = [float(v) for v in within.values]

    class_basis = orthonormal_basis(means.T)
    overlap = {}
    for matrix in ("ggn", "hessian"):
        vectors = _top_vectors(backend, matrix, num_classes, seed, spectra, provenance)
        overlap[matrix] = subspace_overlap(vectors, class_basis)

    flat_group = group.reshape(-1, problem.num_params)
    return ClassMeans(
        counts=[int(c) for c in deltas.counts],
        class_gram=(means @ means.T).tolist(),
        group_gram=(flat_group @ flat_group.T).tolist(),
        eigenvalues=eigenvalues,
        trace=traces,
        trace_stderr={"total": stderr, "within": stderr},
        overlap=overlap,
        coordinates=_coordinates(factors["class"], means, group, present),
        excluded_classes=excluded,
        provenance=provenance,
    )


def _top_vectors(
    backend: Backend,
    matrix: str,
    count: int,
    seed: int,
    spectra: Report | None,
    provenance: dict[str, Provenance],
) -> Tensor:
    """Top-``count`` eigenvectors of ``matrix``: reused from the report when it has them."""
    known = getattr(spectra, matrix, None) if spectra is not None else None
    if (
        known is not None
        and known.eigenvectors is not None
        and known.eigenvectors.shape[1] >= count
    ):
        return known.eigenvectors[:, :count]
    result, provenance[f"lanczos_{matrix}"] = top_eigen(
        backend.operator(matrix), count, backend.options, seed
    )
    return result.vectors


def _coordinates(
    class_factors: Tensor, means: Tensor, group: Tensor, present: list[int]
) -> dict[str, object]:
    """δ_c and δ_{c,c'} projected on the top two eigenvectors of G_class (Papyan's hierarchy plot)."""
    gram = class_factors.T @ class_factors
    _, vectors = torch.linalg.eigh(gram)
    axes = class_factors @ vectors[:, -2:].flip(1)  # top two eigenvectors of G_class, unnormalised
    axes = axes / axes.norm(dim=0).clamp_min(torch.finfo(axes.dtype).tiny)
    return {
        "axes": "top two eigenvectors of G_class",
        "classes": present,
        "class_means": (means @ axes).tolist(),
        "group_means": (group @ axes).tolist(),
    }
