"""Papyan's class-mean structure of the Gauss–Newton matrix G (Papyan 2019, Eq. 28).

With ``δ_{i,c'} = sqrt(p_{i,c'}) J_iᵀ(e_{c'} − p_i)``, group means ``δ_{c,c'} = (1/n_c) Σ_{y_i=c} δ_{i,c'}``,
class means ``δ_c = (1/(C−1)) Σ_{c'≠c} δ_{c,c'}`` and weights ``w_c = n_c/N``::

    G = G_own + G_class + G_cross + G_within, exactly, where
    G_own    = Σ_c w_c δ_{c,c} δ_{c,c}ᵀ
    G_class  = (C−1) Σ_c w_c δ_c δ_cᵀ
    G_cross  = Σ_c w_c Σ_{c'≠c} (δ_{c,c'} − δ_c)(δ_{c,c'} − δ_c)ᵀ
    G_within = (1/N) Σ_i Σ_{c'} (δ_{i,c'} − δ_{y_i,c'})(δ_{i,c'} − δ_{y_i,c'})ᵀ

Each of the first three is ``L Lᵀ`` for a P × r matrix L of scaled vectors (r = C, C, C(C−1)), so
its nonzero eigenvalues are those of the small Gram matrix ``Lᵀ L``. Every such vector is a
combination of the C² group means, ``L = Rᵀ M`` (R the group means as rows, M small), so
``Lᵀ L = Mᵀ (R Rᵀ) M`` and nothing P-sized is stored beyond R. G_within is reached through
``v ↦ G v − Σ L Lᵀ v`` (Lanczos) and its trace as tr G minus the other three.

Papyan's two claims are checked against G itself, each by a relative gap ``‖λ − μ‖ / ‖λ‖``
between G's top-C eigenvalues λ and a prediction μ: ``gap["class"]``, μ = G_class's eigenvalues
(the eigenvalue claim), and ``gap["ritz"]``, μ = the Rayleigh–Ritz values of G on span{δ_c},
the eigenvalues of Qᵀ G Q for an orthonormal basis Q of the class means (the subspace claim;
C products). ``confidence_spread`` says why the first may fail: the mean over groups (c, c') of
the standard deviation of log10 √p_{i,c'} over the examples of class c. When it is large the
weights √p_{i,c'} of the δ_{i,c'} span orders of magnitude, a few examples dominate each group
mean, and the class means no longer carry G's outliers (benchmarks/reproduce/papyan.py: 0.06
where the claim held, 0.26–0.74 where it failed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from curvkit.backend import Backend
from curvkit.distributed import all_gather_objects
from curvkit.errors import InvalidInputError, listed, warn
from curvkit.linalg import Operator, gram_eigenvalues, orthonormal_basis, subspace_overlap
from curvkit.linalg.operator import top_eigen, trace
from curvkit.linalg.subspace import long_matmul
from curvkit.report import ClassMeans, Provenance

if TYPE_CHECKING:
    from curvkit.report import Report

# on the ``means`` route (C·P memory) the cross and within terms are not separated
MEANS_ROUTE_REST = "cross_within"


@dataclass
class GroupMeans:
    """The group means as rows, and every term's vectors as combinations of them.

    ``rows`` (k·C' × P, the k classes present): δ_{c,c'} for every c' (C' = C), or (δ_{c,c},
    δ_c) on the ``means`` route (C' = 2). Each term's scaled vectors are ``L = rowsᵀ M`` for a
    small float64 coefficient matrix M = ``coefficients[term]``, so G_term = L Lᵀ is never formed
    and its Gram matrix is ``Mᵀ (rows rowsᵀ) M``: the group means are the only P-sized storage
    (about C²P numbers). ``means`` holds the coefficients of the class means δ_c.
    """

    rows: Tensor
    coefficients: dict[str, Tensor]
    means: Tensor
    present: list[int]

    def factor(self, term: str) -> Tensor:
        """The term's P × r matrix L (only for tests and small models: it is P-sized)."""
        return self.rows.T @ self.coefficients[term].to(self.rows)


def group_means(sums: Tensor, counts: Tensor, num_samples: int, route: str) -> GroupMeans:
    """The group means of the classes present (n_c > 0) from the class sums (see ClassDeltas),
    which are divided in place, and the coefficients of Papyan's terms in them (weights
    w_c = n_c/N). All C outputs stay potential classes c'."""
    num_classes, columns = sums.shape[0], sums.shape[1]
    present = [c for c in range(num_classes) if counts[c] > 0]
    sums.div_(counts.clamp_min(1).to(sums)[:, None, None])
    group = sums if len(present) == num_classes else sums[present]
    k = len(present)
    weights = counts[present].double() / num_samples
    row = torch.arange(k) * columns  # the first row of each class
    means = torch.zeros(k * columns, k, dtype=torch.float64)
    own = torch.zeros(k * columns, k, dtype=torch.float64)
    if route == "means":  # rows (δ_{c,c}, δ_c)
        own[row, torch.arange(k)] = 1.0
        means[row + 1, torch.arange(k)] = 1.0
    else:  # rows δ_{c,c'}: δ_c averages the C − 1 others
        labels = torch.tensor(present)
        own[row + labels, torch.arange(k)] = 1.0
        for i in range(k):
            means[row[i] : row[i] + columns, i] = 1.0 / (num_classes - 1)
        means[row + labels, torch.arange(k)] = 0.0
    coefficients = {
        "own": own * weights.sqrt(),
        "class": means * ((num_classes - 1) * weights).sqrt(),
    }
    if route != "means":  # δ_{c,c'} − δ_c for c' ≠ c, columns in (c, c') order
        eye = torch.eye(k * columns, dtype=torch.float64)
        cross = [
            (eye[:, row[i] + o] - means[:, i]) * weights[i].sqrt()
            for i, c in enumerate(present)
            for o in range(num_classes)
            if o != c
        ]
        coefficients["cross"] = torch.stack(cross, 1)
    return GroupMeans(group.reshape(k * columns, -1), coefficients, means, present)


def within_operator(ggn: Operator, group: GroupMeans) -> Operator:
    """G_within (or, on the ``means`` route, G_cross + G_within) as ``v ↦ G v − Σ_term L Lᵀ v``."""
    every = torch.cat(list(group.coefficients.values()), dim=1)
    return ggn.minus_low_rank(group.rows.T, (every @ every.T).to(group.rows))


def row_gram(rows: Tensor, chunk: int = 2**16) -> Tensor:
    """``rows rowsᵀ`` in float64, accumulated over chunks of columns (no float64 copy of a
    float32 ``rows``: its C² × P numbers may fill the memory budget)."""
    gram = torch.zeros(rows.shape[0], rows.shape[0], dtype=torch.float64, device=rows.device)
    for part in torch.split(rows, chunk, dim=1):
        part = part.double()
        gram += part @ part.T
    return gram.cpu()


def classmeans(
    backend: Backend, top_k: int, seed: int = 0, spectra: Report | None = None
) -> ClassMeans:
    """Papyan's decomposition of G, its spectra from Gram matrices, and the class-mean overlaps.

    ``top_k`` eigenvalues of G_within are computed; ``spectra``, when given, supplies
    already-computed top eigenvectors of G and the Hessian, and G's trace estimate. On the
    ``means`` route (when the C² group sums do not fit the memory budget) G_cross and G_within
    are reported together, as ``cross_within`` = G − G_own − G_class, and listed in
    ``skipped``.
    """
    problem = backend.problem
    num_classes = problem.num_classes
    deltas = backend.class_deltas()
    counts = [int(c) for c in deltas.counts]
    group = group_means(deltas.sums, deltas.counts, problem.num_samples, deltas.route)
    excluded = [c for c in range(num_classes) if c not in group.present]
    if len(group.present) < 2:
        raise InvalidInputError(
            f"the data holds examples of {len(group.present)} class only; the class-mean "
            "decomposition needs examples of at least two classes."
        )
    if excluded:
        warn(
            f"classes {listed(excluded, 10)} have no examples in the data and are left out of "
            "the class means (they still count as potential labels c')."
        )

    gram = row_gram(group.rows)
    grams = {t: m.T @ gram @ m for t, m in group.coefficients.items()}
    traces = {t: float(torch.trace(g)) for t, g in grams.items()}
    provenance = {"deltas": deltas.provenance}
    skipped = {}
    if "cross" not in grams:
        reason = (
            "not separated on the class-means route (C·P memory): "
            f"{deltas.provenance.note or 'chosen with class_sums'}; {MEANS_ROUTE_REST} holds "
            "their sum"
        )
        skipped = {"cross": reason, "within": reason}

    ggn, options = backend.operator("ggn"), backend.options
    # one example per class: δ_{i,c'} = δ_{y_i,c'}, so G_within = 0 and G is the sum of the
    # other three terms, exactly (a Krylov run on G − Σ L Lᵀ would chase rounding, unconverged)
    alone = not skipped and all(counts[c] == 1 for c in group.present)
    stderr = 0.0
    if alone:
        total = sum(traces.values())
    elif deltas.square_norm_sum is not None:
        total = deltas.square_norm_sum / problem.num_samples
    elif getattr(spectra, "ggn", None) is not None and math.isfinite(spectra.ggn.trace):
        # estimated already: no second Hutch++
        total, stderr = spectra.ggn.trace, spectra.ggn.trace_stderr
        provenance["trace_ggn"] = spectra.ggn.provenance["trace"]
    elif options.trace_matvecs:
        estimate, provenance["trace_ggn"] = trace(ggn, options, seed + 1)
        total, stderr = estimate.value, estimate.stderr
    else:  # trace estimates switched off: no within (or cross + within) trace
        total, stderr = math.nan, math.nan
    rest = MEANS_ROUTE_REST if skipped else "within"
    traces = {"total": total, **traces, rest: total - sum(traces.values())}

    eigenvalues = {t: gram_eigenvalues(g) for t, g in grams.items()}
    if alone:
        eigenvalues[rest] = [0.0] * min(top_k, problem.num_params)
        provenance[rest] = Provenance(backend.name, "exact", note="one example per class: 0")
    else:
        low_rank = within_operator(ggn, group)
        remainder, provenance[rest] = top_eigen(low_rank, top_k, options, seed, what=f"G_{rest}")
        eigenvalues[rest] = [float(v) for v in remainder.values]
        del low_rank, remainder

    coordinates = _coordinates(group, grams["class"])
    class_gram = group.means.T @ gram @ group.means  # ⟨δ_c, δ_d⟩
    means = group.rows.T @ group.means.to(group.rows)  # δ_c as P × k columns
    spread = confidence_spread(deltas.log_sqrt_p, deltas.counts)
    # the C² group means and G_within's eigenvectors: not needed by the overlaps' solvers
    del group, deltas
    class_basis = orthonormal_basis(means)
    overlap, top = {}, {}
    count = min(num_classes, problem.num_params)  # the top-C eigenspace, all of R^P when P ≤ C
    # the Hessian's overlap where this backend can take its products on every rank; else NaN
    # and the reason (a model whose second derivatives autograd gets wrong: G's part stands)
    refusals = all_gather_objects(backend.refusal("hessian"), backend.problem.group)
    refused = {"ggn": None, "hessian": next(filter(None, refusals), None)}
    for matrix in ("ggn", "hessian"):
        if refused[matrix]:
            overlap[matrix] = math.nan
            provenance[f"lanczos_{matrix}"] = Provenance(
                backend.name, "refused", note=refused[matrix]
            )
            continue
        top[matrix], vectors = _top_eigen(backend, matrix, count, seed, spectra, provenance)
        overlap[matrix] = subspace_overlap(vectors, class_basis)
    ritz = []  # none when every class mean is 0 (a network whose G is 0)
    if class_basis.shape[1]:
        started = ggn.clock()
        restricted = long_matmul(class_basis.T, ggn.matmat(class_basis)).double()
        ritz = torch.linalg.eigvalsh((restricted + restricted.T) / 2).flip(0).tolist()
        provenance["ritz"] = ggn.provenance("curvkit.rayleigh_ritz", class_basis.shape[1], started)
    gap = {
        "class": relative_gap(top["ggn"], eigenvalues["class"]),
        "ritz": relative_gap(top["ggn"], ritz),
    }

    return ClassMeans(
        counts=counts,
        class_gram=class_gram.tolist(),
        group_gram=[] if skipped else gram.tolist(),
        eigenvalues=eigenvalues,
        trace=traces,
        trace_stderr={"total": stderr, rest: stderr},
        overlap=overlap,
        coordinates=coordinates,
        excluded_classes=excluded,
        provenance=provenance,
        skipped=skipped,
        ritz_eigenvalues=ritz,
        gap=gap,
        confidence_spread=spread,
    )


def relative_gap(measured: list[float], predicted: list[float]) -> float:
    """``‖λ − μ‖ / ‖λ‖`` over the common length of two descending lists (0: the same; NaN
    where λ is 0 there or a list is empty)."""
    k = min(len(measured), len(predicted))
    scale = math.hypot(*measured[:k])
    return math.dist(measured[:k], predicted[:k]) / scale if scale else math.nan


def confidence_spread(log_sqrt_p: Tensor, counts: Tensor) -> float | None:
    """The mean over groups (c, c') with n_c ≥ 2 of the standard deviation (over the examples of
    class c) of log10 √p_{i,c'}, from the sums in ``ClassDeltas.log_sqrt_p``; None when no
    class has two examples."""
    if not bool((counts >= 2).any()):
        return None
    n = counts.to(log_sqrt_p)[:, None]
    mean = log_sqrt_p[0] / n.clamp_min(1)
    variance = (log_sqrt_p[1] / n.clamp_min(1) - mean**2).clamp_min(0)
    return float(variance[counts >= 2].sqrt().mean())


def _top_eigen(
    backend: Backend,
    matrix: str,
    count: int,
    seed: int,
    spectra: Report | None,
    provenance: dict[str, Provenance],
) -> tuple[list[float], Tensor]:
    """Top-``count`` eigenvalues and eigenvectors of ``matrix``: reused from the report when it
    has them."""
    known = getattr(spectra, matrix, None) if spectra is not None else None
    if (
        known is not None
        and known.eigenvectors is not None
        and known.eigenvectors.shape[1] >= count
    ):
        return known.top_eigenvalues[:count], known.eigenvectors[:, :count]
    result, provenance[f"lanczos_{matrix}"] = top_eigen(
        backend.operator(matrix),
        count,
        backend.options,
        seed,
        what=f"the {matrix}'s top {count} in the class-mean overlap",
    )
    return [float(v) for v in result.values], result.vectors


def _coordinates(group: GroupMeans, class_term_gram: Tensor) -> dict[str, object]:
    """δ_c and δ_{c,c'} projected on the top two eigenvectors of G_class (Papyan's hierarchy
    plot)."""
    _, vectors = torch.linalg.eigh(class_term_gram)
    # the top two eigenvectors of G_class = L Lᵀ are L u for the Gram's top u, unnormalised
    axes = group.rows.T @ (group.coefficients["class"] @ vectors[:, -2:].flip(1)).to(group.rows)
    axes = axes / axes.norm(dim=0).clamp_min(torch.finfo(axes.dtype).tiny)
    on_axes = long_matmul(group.rows, axes).double().cpu()  # every row's coordinates
    k = len(group.present)
    return {
        "axes": "top two eigenvectors of G_class",
        "classes": group.present,
        "class_means": (group.means.T @ on_axes).tolist(),
        "group_means": []
        if "cross" not in group.coefficients
        else on_axes.reshape(k, -1, 2).tolist(),
    }
