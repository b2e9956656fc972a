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
# on the ``means`` route (C·P memory) the cross and within terms are not separated
MEANS_ROUTE_REST = "cross_within"


def low_rank_factors(
    sums: Tensor, counts: Tensor, num_samples: int, route: str = "gradients"
) -> tuple[Tensor, dict[str, Tensor], Tensor | None, Tensor, list[int]]:
    """Scaled vectors of the low-rank terms, G_term = L Lᵀ, as the rows of one (r × P) matrix
    (the own, class and cross rows, r = 2C + C(C−1); on the ``means`` route own and class
    only) with each term's L as a (P × r_term) view of it, plus δ_{c,c'} (None on the means
    route), δ_c and the classes used. ``sums`` (see ClassDeltas) is divided in place into the
    group means: at the peak the group means and the rows, about 2 C²P numbers.

    Only classes present in the data (n_c > 0) enter; all C outputs stay potential classes c'.
    """
    num_classes = sums.shape[0]
    present = [c for c in range(num_classes) if counts[c] > 0]
    n = counts[present].to(sums.dtype).to(sums.device)
    weights = n / num_samples
    sums.div_(counts.clamp_min(1).to(sums)[:, None, None])  # the per-class means
    group = sums if len(present) == num_classes else sums[present]
    if route == "means":  # group[c] = (δ_{c,c}, δ_c)
        own, means, group = group[:, 0], group[:, 1], None
    else:  # group[c, c'] = δ_{c,c'}
        own = group[torch.arange(len(present)), present]
        others = torch.ones(len(present), num_classes, dtype=torch.bool, device=sums.device)
        others[torch.arange(len(present)), present] = False
        means = (group.sum(1) - own) / (num_classes - 1)
    k = len(present)
    cross_rows = 0 if group is None else k * (num_classes - 1)
    rows = sums.new_empty(2 * k + cross_rows, sums.shape[2])
    torch.mul(own, weights.sqrt()[:, None], out=rows[:k])
    torch.mul(means, ((num_classes - 1) * weights).sqrt()[:, None], out=rows[k : 2 * k])
    if group is not None:  # δ_{c,c'} − δ_c for c' ≠ c, row-major in (c, c'), class by class
        for i in range(k):
            block = rows[2 * k + i * (num_classes - 1) : 2 * k + (i + 1) * (num_classes - 1)]
            torch.sub(group[i, others[i]], means[i], out=block)
            block.mul_(weights[i].sqrt())
    factors = {"own": rows[:k].T, "class": rows[k : 2 * k].T}
    if group is not None:
        factors["cross"] = rows[2 * k :].T
    return rows, factors, group, means, present


def classmeans(
    backend: Backend, top_k: int, seed: int = 0, spectra: Report | None = None
) -> ClassMeans:
    """Papyan's decomposition of G, its spectra from Gram matrices, and the class-mean overlaps.

    ``top_k`` eigenvalues of G_within are computed; ``spectra``, when given, supplies
    already-computed top eigenvectors of G and the Hessian. On the ``means`` route (when the
    C² group sums do not fit the memory budget) G_cross and G_within are reported together,
    as ``cross_within`` = G − G_own − G_class, and listed in ``skipped``.
    """
    problem = backend.problem
    num_classes = problem.num_classes
    deltas = backend.class_deltas()
    rows, factors, group, means, present = low_rank_factors(
        deltas.sums, deltas.counts, problem.num_samples, deltas.route
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

    grams = {t: f.T @ f for t, f in factors.items()}
    traces = {t: float(torch.diagonal(g).double().sum()) for t, g in grams.items()}
    provenance = {"deltas": deltas.provenance}
    ggn, options = backend.operator("ggn"), backend.options
    stderr = 0.0
    if deltas.square_norm_sum is not None:
        total = deltas.square_norm_sum / problem.num_samples
    else:
        estimate, provenance["trace_ggn"] = trace(ggn, options, seed + 1)
        total, stderr = estimate.value, estimate.stderr
    rest = "within" if group is not None else MEANS_ROUTE_REST
    traces = {"total": total, **traces, rest: total - sum(traces.values())}

    remainder, provenance[rest] = top_eigen(ggn.minus_low_rank(rows.T), top_k, options, seed)
    eigenvalues = {t: gram_eigenvalues(g) for t, g in grams.items()}
    eigenvalues[rest] = [float(v) for v in remainder.values]

    class_basis = orthonormal_basis(means.T)
    overlap = {}
    for matrix in ("ggn", "hessian"):
        vectors = _top_vectors(backend, matrix, num_classes, seed, spectra, provenance)
        overlap[matrix] = subspace_overlap(vectors, class_basis)

    skipped = {}
    if group is None:
        reason = (
            "not separated on the class-means route (C·P memory): "
            f"{deltas.provenance.note or 'chosen with class_sums'}; "
            f"{MEANS_ROUTE_REST} holds their sum"
        )
        skipped = {"cross": reason, "within": reason}
    flat_group = group.reshape(-1, problem.num_params) if group is not None else None
    return ClassMeans(
        counts=[int(c) for c in deltas.counts],
        class_gram=(means @ means.T).tolist(),
        group_gram=(flat_group @ flat_group.T).tolist() if flat_group is not None else [],
        eigenvalues=eigenvalues,
        trace=traces,
        trace_stderr={"total": stderr, rest: stderr},
        overlap=overlap,
        coordinates=_coordinates(factors["class"], means, group, present),
        excluded_classes=excluded,
        provenance=provenance,
        skipped=skipped,
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
    class_factors: Tensor, means: Tensor, group: Tensor | None, present: list[int]
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
        "group_means": (group @ axes).tolist() if group is not None else [],
    }
