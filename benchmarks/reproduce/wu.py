"""Wu et al. (2020): each layer's Hessian block is close to the Kronecker product E[M] ⊗ E[aaᵀ],
in its top eigenvalues and top eigenspace, and its top eigenvectors reshape to nearly rank-one
matrices.

    python benchmarks/reproduce/wu.py [--quick] [--data mnist --root DIR]

MLPs (64-64-64-10) with ReLU, as in the paper (trained with Adam lr 1e-2, and with SGD, momentum
0.9, lr 0.05, weight decay 5e-4), a tanh MLP as the contrast, and a LeNet-style CNN (ReLU) are
trained on the digits; curvkit (torch.func backend, curvkit.layerwise) measures, per Linear /
Conv2d weight: the exact block's top C − 1 eigenvalues (Lanczos on block products) against those
of B ⊗ A, the overlap of their top C − 1 eigenspaces (E[M] has rank C − 1 under the softmax, so
the C-th eigenvector of B ⊗ A is arbitrary), and σ₁²/Σσ² of each exact top eigenvector
reshaped to the weight's shape.
"""

from __future__ import annotations

import statistics

import torch
from common import arguments, load, run, table, trained, write
from matplotlib import colormaps
from matplotlib.figure import Figure

import curvkit
from curvkit.models import zoo_model
from curvkit.quantities.classmeans import relative_gap

NUM_CLASSES = 10
TOP = NUM_CLASSES - 1  # the rank of E[M]
MODELS = {  # label: (architecture, activation, optimizer, lr, weight decay)
    "ReLU MLP, Adam": ("mlp", torch.nn.ReLU, "adam", 1e-2, 0.0),
    "ReLU MLP, SGD wd 5e-4": ("mlp", torch.nn.ReLU, "sgd", 0.05, 5e-4),
    "tanh MLP, Adam": ("mlp", torch.nn.Tanh, "adam", 1e-2, 0.0),
    "LeNet (ReLU), Adam": ("lenet", torch.nn.ReLU, "adam", 1e-2, 0.0),
}


def measure(args, label: str, samples: int | None, epochs: int) -> dict:
    x, y = load(args, samples)
    name, activation, optimizer, lr, decay = MODELS[label]
    model = zoo_model(name, tuple(x.shape[1:]), NUM_CLASSES, seed=args.seed, activation=activation)
    model, data = trained(model, x, y, epochs, args.seed, lr, optimizer, decay)
    report = curvkit.analyze(model, data, quantities=["layerwise"], top_k=TOP, progress=False)
    return {"model": label, "P": report.model.num_params, "layers": report.layerwise}


def main() -> None:
    args = arguments(__doc__, "digits")
    samples, epochs = (5, 2) if args.quick else (None, 30)
    labels = list(MODELS)[::3] if args.quick else list(MODELS)
    results = [measure(args, label, samples, epochs) for label in labels]
    rows, rank_ones = [], []
    for r in results:
        for layer_name, layer in r["layers"].items():
            exact, kron = layer.top_eigenvalues, layer.kronecker["top_eigenvalues"]
            gap = relative_gap(exact, kron)
            rank_ones.append(layer.rank1[0])
            rows.append(
                [r["model"], layer_name, "×".join(map(str, layer.shape)), exact[0], kron[0], gap,
                 layer.overlap["hessian"], layer.overlap["ggn"], layer.rank1[0],
                 statistics.fmean(layer.rank1)]
            )  # fmt: skip
    body = table(
        ("model", "layer", "weight n×m", "λ₁ exact", "λ₁ B⊗A", "top gap", "overlap Hess",
         "overlap G", "rank-1 of u₁", "mean rank-1 of top"),
        rows,
    )  # fmt: skip
    body = [
        f"Top gap = ‖λ_exact − λ_B⊗A‖ / ‖λ_exact‖ over the top C − 1 = {TOP} eigenvalues; overlap "
        f"= ‖UᵀV‖²_F / {TOP} between the top C − 1 eigenvectors of B ⊗ A and of the exact Hessian (or G) "
        "block; rank-1 = σ₁²/Σσ² of an exact eigenvector reshaped to n × m (1 = rank one; a random "
        "vector gives about 1/min(n, m)).",
        "",
        *body,
    ]

    def summary(label: str) -> str:
        rows_of = [row for row in rows if row[0] == label]
        gap, overlap, rank1 = ([row[i] for row in rows_of] for i in (5, 6, 8))
        return (
            f"{label}: top gap median {statistics.median(gap):.2f} "
            f"({min(gap):.2f}–{max(gap):.2f}), overlap median {statistics.median(overlap):.2f} "
            f"({min(overlap):.2f}–{max(overlap):.2f}), rank-1 median {statistics.median(rank1):.2f}"
        )

    relu = [r for r in rows if "ReLU" in r[0]]
    relu_gap = statistics.median(r[5] for r in relu) if relu else float("nan")
    relu_overlap = statistics.median(r[6] for r in relu) if relu else float("nan")
    verdict = [
        *(summary(label) for label in labels),
        f"The paper's setting (ReLU, all layers of the ReLU models): top gap median "
        f"{relu_gap:.2f} "
        + ("(close" if relu_gap < 0.25 else "(not close")
        + f"), overlap median {relu_overlap:.2f} "
        + ("(high, as claimed)." if relu_overlap > 0.7 else "(lower than claimed)."),
        f"Rank one over all layers: the top eigenvector's σ₁²/Σσ² has median "
        f"{statistics.median(rank_ones):.2f} ({min(rank_ones):.2f}–{max(rank_ones):.2f}) "
        + ("— nearly rank one, as claimed." if statistics.median(rank_ones) > 0.8 else "— not nearly rank one here."),
        "Not measured: λ₁(A)/tr A per layer (the report does not carry A's spectrum) and the "
        "overlap of top eigenspaces between models trained from different seeds (the layer "
        "report keeps no eigenvectors).",
    ]  # fmt: skip
    figure = Figure(figsize=(11, 4.2), layout="constrained")
    left, right = figure.subplots(1, 2)
    for axes in (left, right):  # up to 20 layers, each its own colour
        axes.set_prop_cycle(color=[colormaps["tab20"](i) for i in range(20)])
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
        title="Top C − 1 eigenvalues per layer",
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
        f"MLPs 64-64-64-10 (ReLU with Adam lr 1e-2 and with SGD lr 0.05, momentum 0.9, weight "
        f"decay 5e-4; tanh with Adam) and LeNet (conv 5×5 ×6, ×16, Linear 120-84-10, ReLU, Adam) "
        f"trained {epochs} epochs on all digits; blocks of each weight (bias excluded) of "
        "the mean cross-entropy's Hessian; B ⊗ A from torch.func's per-example factors.",
        body,
        verdict,
        figure,
    )


if __name__ == "__main__":
    run(main)
