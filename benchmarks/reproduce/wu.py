"""Wu et al. (2020): each layer's Hessian block is close to the Kronecker product E[M] ⊗ E[aaᵀ],
in its top eigenvalues and top eigenspace, and its top eigenvectors reshape to nearly rank-one
matrices.

    python benchmarks/reproduce/wu.py [--quick] [--data mnist --root DIR]

A tanh MLP (64-64-64-10) and a LeNet-style CNN are trained on the digits (Adam, lr 1e-2); curvkit
(torch.func backend, curvkit.layerwise) measures, per Linear / Conv2d weight: the exact block's
top C eigenvalues (Lanczos on block products) against those of B ⊗ A, the overlap of their top-C
eigenspaces, and σ₁²/Σσ² of each exact top eigenvector reshaped to the weight's shape.
"""

from __future__ import annotations

import statistics

from common import arguments, load, relative_gap, run, table, trained, write
from matplotlib.figure import Figure

import curvkit
from curvkit.models import zoo_model

NUM_CLASSES = 10


def measure(args, name: str, samples: int | None, epochs: int) -> dict:
    x, y = load(args, samples)
    model = zoo_model(name, tuple(x.shape[1:]), NUM_CLASSES, width=64, depth=2, seed=args.seed)
    model, data = trained(model, x, y, epochs, args.seed)
    report = curvkit.analyze(
        model, data, quantities=["layerwise"], top_k=NUM_CLASSES, progress=False
    )
    return {"model": name, "P": report.model.num_params, "layers": report.layerwise}


def main() -> None:
    args = arguments(__doc__, "digits")
    samples, epochs = (5, 2) if args.quick else (None, 30)
    results = [measure(args, name, samples, epochs) for name in ("mlp", "lenet")]
    rows, gaps, overlaps, rank_ones = [], [], [], []
    for r in results:
        for layer_name, layer in r["layers"].items():
            exact, kron = layer.top_eigenvalues, layer.kronecker["top_eigenvalues"]
            gap = relative_gap(exact, kron)
            gaps.append(gap)
            overlaps.append(layer.overlap["hessian"])
            rank_ones.append(layer.rank1[0])
            rows.append(
                [r["model"], layer_name, "×".join(map(str, layer.shape)), exact[0], kron[0], gap,
                 layer.overlap["hessian"], layer.overlap["ggn"], layer.rank1[0],
                 statistics.fmean(layer.rank1)]
            )  # fmt: skip
    body = table(
        ("model", "layer", "weight n×m", "λ₁ exact", "λ₁ B⊗A", "top-C gap", "overlap Hess",
         "overlap G", "rank-1 of u₁", "mean rank-1 of top C"),
        rows,
    )  # fmt: skip
    body = [
        "Top-C gap = ‖λ_exact − λ_B⊗A‖ / ‖λ_exact‖ over the top C = 10 eigenvalues; overlap = "
        "‖UᵀV‖²_F / C between the top-C eigenvectors of B ⊗ A and of the exact Hessian (or G) "
        "block; rank-1 = σ₁²/Σσ² of an exact eigenvector reshaped to n × m (1 = rank one; a random "
        "vector gives about 1/min(n, m)).",
        "",
        *body,
    ]
    verdict = [
        f"Kronecker eigenvalues: top-C gap median {statistics.median(gaps):.2f} (range "
        f"{min(gaps):.2f}–{max(gaps):.2f}) "
        + ("— close, as claimed." if statistics.median(gaps) < 0.25 else "— not close here."),
        f"Top-C eigenspace overlap with the Hessian block: median {statistics.median(overlaps):.2f} "
        f"(range {min(overlaps):.2f}–{max(overlaps):.2f}) "
        + ("— high, as claimed." if statistics.median(overlaps) > 0.7 else "— lower than claimed."),
        f"Rank one: the top eigenvector's σ₁²/Σσ² has median {statistics.median(rank_ones):.2f} "
        f"(range {min(rank_ones):.2f}–{max(rank_ones):.2f}) "
        + ("— nearly rank one, as claimed." if statistics.median(rank_ones) > 0.8 else "— not nearly rank one here."),
    ]  # fmt: skip
    figure = Figure(figsize=(11, 4.2), layout="constrained")
    left, right = figure.subplots(1, 2)
    for r in results:
        for layer_name, layer in r["layers"].items():
            left.loglog(layer.top_eigenvalues, layer.kronecker["top_eigenvalues"], "o", ms=4,
                        mfc="none", label=f"{r['model']} {layer_name}")  # fmt: skip
            right.plot(
                range(1, len(layer.rank1) + 1),
                layer.rank1,
                ".-",
                label=f"{r['model']} {layer_name}",
            )
    low, high = left.get_xlim()
    left.plot([low, high], [low, high], "k:", lw=1)
    left.set(
        xlabel="exact block eigenvalue",
        ylabel="B ⊗ A eigenvalue",
        title="Top C eigenvalues per layer",
    )
    left.legend(fontsize="x-small", ncol=2)
    right.set(xlabel="index i of the exact eigenvector", ylabel="σ₁²/Σσ² of u_i reshaped", ylim=(0, 1.02),
              title="How close to rank one")  # fmt: skip
    write(
        args,
        "reproduce_wu",
        "Wu et al. 2020: Kronecker structure of layerwise Hessians",
        "A layer's Hessian block ≈ E[M] ⊗ E[aaᵀ] (the decoupling conjecture): its top eigenvalues "
        "and top eigenspace match those of the Kronecker product, and its top eigenvectors reshape "
        "to nearly rank-one matrices.",
        f"Tanh MLP 64-64-64-10 and LeNet (conv 5×5 ×6, ×16, Linear 120-84-10, ReLU) trained "
        f"{epochs} epochs (Adam lr 1e-2) on all digits; blocks of each weight (bias excluded) of "
        "the mean cross-entropy's Hessian; B ⊗ A from torch.func's per-example factors.",
        body,
        verdict,
        figure,
    )


if __name__ == "__main__":
    run(main)
