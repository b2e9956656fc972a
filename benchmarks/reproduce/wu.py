"""Wu et al. (2020): each layer's Hessian block is close to the Kronecker product E[M] ⊗ E[aaᵀ],
in its top eigenvalues and top eigenspace, and its top eigenvectors reshape to nearly rank-one
matrices.

    python benchmarks/reproduce/wu.py [--quick | --full] [--data mnist --root DIR] [--device cuda]

MLPs (64-64-64-10) with ReLU, as in the paper (trained with Adam lr 1e-2 for 30 epochs, and
with SGD, momentum 0.9, lr 0.05, weight decay 5e-4), the Adam one also after 5 epochs, 256 wide
and 4 hidden layers deep, a tanh MLP as the contrast, and a LeNet-style CNN (ReLU) are trained
on the digits; curvkit (torch.func backend, curvkit.layerwise) measures, per Linear /
Conv2d weight: the exact block's top C − 1 eigenvalues (Lanczos on block products) against those
of B ⊗ A, the overlap of their top C − 1 eigenspaces (E[M] has rank C − 1 under the softmax, so
the C-th eigenvector of B ⊗ A is arbitrary), and σ₁²/Σσ² of each exact top eigenvector
reshaped to the weight's shape; λ₁(A)/tr A, the share of the layer inputs' second moment in its
top direction (the paper's explanation of the rank-one eigenvectors); and, for three MLPs,
the overlap of each layer's top C − 1 Hessian eigenspace between two models trained from
different seeds (the paper: top eigenspaces of different models overlap highly), beside the
overlap k/P_l of random subspaces. ``--full`` adds the longer, wider and deeper versions
(100 epochs, width 512, 6 hidden layers), LeNet with SGD and weight decay, and LeNet's Linear
layers across seeds; it is meant for ``--data mnist|fashion-mnist|cifar10`` on a GPU.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import scipy.stats
import torch
from common import arguments, load, run, table, trained, write
from matplotlib import colormaps
from matplotlib.figure import Figure

import curvkit
from curvkit.linalg import subspace_overlap
from curvkit.linalg.operator import top_eigen
from curvkit.models import zoo_model
from curvkit.quantities.classmeans import relative_gap

NUM_CLASSES = 10
TOP = NUM_CLASSES - 1  # the rank of E[M]
SIDE = 3  # directions compared on the side of a weight that two models share


@dataclass
class Model:
    """One trained model: architecture, activation, optimizer and its settings."""

    arch: str
    activation: type[torch.nn.Module] = torch.nn.ReLU
    optimizer: str = "adam"
    lr: float = 1e-2
    weight_decay: float = 0.0
    width: int = 64
    depth: int = 2
    epochs: int = 30
    full: bool = False  # only in --full


MODELS = {
    "ReLU MLP, Adam": Model("mlp"),
    "ReLU MLP, Adam, 5 epochs": Model("mlp", epochs=5),
    "ReLU MLP, Adam, 100 epochs": Model("mlp", epochs=100, full=True),
    "ReLU MLP, Adam, width 256": Model("mlp", width=256),
    "ReLU MLP, Adam, width 512": Model("mlp", width=512, full=True),
    "ReLU MLP, Adam, depth 4": Model("mlp", depth=4),
    "ReLU MLP, Adam, depth 6": Model("mlp", depth=6, full=True),
    "ReLU MLP, SGD wd 5e-4": Model("mlp", optimizer="sgd", lr=0.05, weight_decay=5e-4),
    "tanh MLP, Adam": Model("mlp", torch.nn.Tanh),
    "LeNet (ReLU), Adam": Model("lenet"),
    "LeNet (ReLU), SGD wd 5e-4": Model(
        "lenet", optimizer="sgd", lr=0.05, weight_decay=5e-4, full=True
    ),
}
ACROSS_SEEDS = ("ReLU MLP, Adam", "ReLU MLP, SGD wd 5e-4", "tanh MLP, Adam")
ACROSS_SEEDS_FULL = (*ACROSS_SEEDS, "LeNet (ReLU), Adam")


def model_of(args, label: str, samples: int | None, seed: int):
    """The model ``label`` trained from ``seed`` (2 epochs with --quick), and a loader of its
    data."""
    x, y = load(args, samples)
    m = MODELS[label]
    model = zoo_model(m.arch, tuple(x.shape[1:]), NUM_CLASSES, m.width, m.depth, seed,
                      activation=m.activation)  # fmt: skip
    epochs = 2 if args.quick else m.epochs
    return trained(model, x, y, epochs, seed, m.lr, m.optimizer, m.weight_decay)


def measure(args, label: str, samples: int | None) -> dict:
    model, data = model_of(args, label, samples, args.seed)
    report = curvkit.analyze(model, data, quantities=["layerwise"], top_k=TOP, progress=False)
    return {"model": label, "P": report.model.num_params, "layers": report.layerwise}


def top_vectors(model: torch.nn.Module, data, layers: list[str]) -> dict[str, torch.Tensor]:
    """Per layer, the top C − 1 eigenvectors of its weight block of the Hessian (curvkit's
    Lanczos on the torch.func backend's block products; one backend, one scan of the data)."""
    with curvkit.model_guard(model):
        backend = curvkit.get_backend("torchfunc")(curvkit.Problem(model, data))
        blocks = {n: backend.operator("hessian", f"{n}.weight") for n in layers}
        return {n: top_eigen(op, TOP, backend.options, 0)[0].vectors for n, op in blocks.items()}


def side(vectors: torch.Tensor, shape: torch.Size, inputs: bool) -> torch.Tensor:
    """An orthonormal basis of the top ``SIDE`` directions that the eigenvectors (columns),
    reshaped to the weight's n × m, share on the input side (rows of the m-dim right singular
    space) or the output side (n-dim)."""
    matrices = vectors.T.reshape(-1, *shape)  # (k, n, m)
    stacked = (
        matrices.reshape(-1, shape[1]) if inputs else matrices.transpose(0, 1).reshape(shape[0], -1)
    )
    u, _, vh = torch.linalg.svd(stacked, full_matrices=False)
    return vh[:SIDE].T if inputs else u[:, :SIDE]


def across_seeds(args, label: str, samples: int | None) -> dict[str, tuple]:
    """Per layer: the overlap of the top C − 1 eigenspaces of two models trained from seeds
    ``args.seed`` and ``args.seed + 1``, and for the first (last) layer the overlap of the
    eigenvectors' input (output) side, whose coordinates the two models share."""
    pair = [model_of(args, label, samples, args.seed + i) for i in range(2)]
    named = list(pair[0][0].named_modules())
    modules = {n: m for n, m in named if isinstance(m, torch.nn.Linear)}
    weights = [n for n, m in named if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    first, last = weights[0], weights[-1]  # a CNN's first Linear sees permutable channels
    vectors = [top_vectors(m, d, list(modules)) for m, d in pair]
    overlaps = {}
    for name, module in modules.items():
        a, b = (v[name] for v in vectors)
        shared = None
        if name in (first, last):
            shape, inputs = module.weight.shape, name == first
            shared = subspace_overlap(side(a, shape, inputs), side(b, shape, inputs))
        overlaps[name] = (subspace_overlap(a, b), shared)
    return overlaps


def main() -> None:
    args = arguments(__doc__, "digits", full="100 epochs, width 512, depth 6, LeNet with SGD")
    samples = 5 if args.quick else None
    labels = [label for label, m in MODELS.items() if args.full or not m.full]
    labels = labels[::3] if args.quick else labels
    results = [measure(args, label, samples) for label in labels]
    compared = ACROSS_SEEDS_FULL if args.full else ACROSS_SEEDS
    pairs = {label: across_seeds(args, label, samples) for label in labels if label in compared}
    rows, rank_ones = [], []
    for r in results:
        for layer_name, layer in r["layers"].items():
            exact, kron = layer.top_eigenvalues, layer.kronecker["top_eigenvalues"]
            gap = relative_gap(exact, kron)
            rank_ones.append(layer.rank1[0])
            rows.append(
                [r["model"], layer_name, "×".join(map(str, layer.shape)), exact[0], kron[0], gap,
                 layer.overlap["hessian"], layer.overlap["ggn"], layer.rank1[0],
                 statistics.fmean(layer.rank1), layer.kronecker["A_top_share"]]
            )  # fmt: skip
    body = table(
        ("model", "layer", "weight n×m", "λ₁ exact", "λ₁ B⊗A", "top gap", "overlap Hess",
         "overlap G", "rank-1 of u₁", "mean rank-1 of top", "λ₁(A)/tr A"),
        rows,
    )  # fmt: skip
    share_vs_rank1 = scipy.stats.spearmanr([r[10] for r in rows], [r[9] for r in rows])[0]
    share_vs_overlap = scipy.stats.spearmanr([r[10] for r in rows], [r[6] for r in rows])[0]
    sizes = {(r["model"], n): layer.shape[0] * layer.shape[1]
             for r in results for n, layer in r["layers"].items()}  # fmt: skip
    seed_rows = [
        [label, n, f"{overlap:.3f}", f"{TOP / sizes[label, n]:.4f}",
         "—" if shared is None else f"{shared:.3f}"]
        for label, overlaps in pairs.items()
        for n, (overlap, shared) in overlaps.items()
    ]  # fmt: skip
    randoms = [TOP / sizes[row[0], row[1]] for row in seed_rows]
    body = [
        f"Top gap = ‖λ_exact − λ_B⊗A‖ / ‖λ_exact‖ over the top C − 1 = {TOP} eigenvalues; overlap "
        f"= ‖UᵀV‖²_F / {TOP} between the top C − 1 eigenvectors of B ⊗ A and of the exact Hessian (or G) "
        "block; rank-1 = σ₁²/Σσ² of an exact eigenvector reshaped to n × m (1 = rank one; a random "
        "vector gives about 1/min(n, m)).",
        "",
        *body,
        "",
        f"λ₁(A)/tr A against the mean rank-1 ratio of the top eigenvectors over all layers: "
        f"Spearman {share_vs_rank1:.2f}; against the Kronecker overlap: {share_vs_overlap:.2f}.",
        "",
        f"Across seeds ({args.seed} and {args.seed + 1}, same data and training): overlap of the "
        f"top C − 1 eigenspaces of each layer's Hessian block, and that of two random "
        f"{TOP}-dimensional subspaces (k/P_l). Hidden units can come out permuted between seeds, "
        "and every layer has hidden units on one side, so the last column compares only the "
        f"side the two models share: the top {SIDE} directions of the eigenvectors reshaped to "
        "n × m, on the input side (pixels) for the first layer and the output side (classes) "
        f"for the last (random: {SIDE}/m or {SIDE}/n).",
        "",
        *table(("model", "layer", "overlap across seeds", "random", "shared side"), seed_rows),
    ]
    seed_overlaps = [float(r[2]) for r in seed_rows]
    shared_overlaps = [float(r[4]) for r in seed_rows if r[4] != "—"]

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
        f"λ₁(A)/tr A ranges {min(r[10] for r in rows):.2f}–{max(r[10] for r in rows):.2f}; its "
        f"rank correlation with the mean rank-1 ratio is {share_vs_rank1:.2f}"
        + (" (a dominant input direction goes with rank-one eigenvectors, as the paper explains)."
           if share_vs_rank1 > 0.5 else " (weak: the input direction does not explain it here)."),
        *(
            [f"Top eigenspaces across seeds: overlaps {min(seed_overlaps):.2f}–"
             f"{max(seed_overlaps):.2f} against random {min(randoms):.4f}–{max(randoms):.3f}"
             + (": high, as claimed" if min(seed_overlaps) > 0.5 else
                ": above random but not high, as the permuted hidden units allow")
             + f"; on the side the models share (first layer's inputs, last layer's outputs) "
             f"{min(shared_overlaps):.2f}–{max(shared_overlaps):.2f}"
             + (": the shared structure is the same across seeds." if min(shared_overlaps) > 0.7
                else ".")]
            if seed_overlaps else []
        ),
    ]  # fmt: skip
    figure = Figure(figsize=(14, 4.6), layout="constrained")
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
    figure.legend(*left.get_legend_handles_labels(), loc="outside right upper", fontsize="x-small")
    right.set(xlabel="index i of the exact eigenvector", ylabel="σ₁²/Σσ² of u_i reshaped", ylim=(0, 1.02),
              title="How close to rank one")  # fmt: skip
    write(
        args,
        "reproduce_wu",
        "Wu et al. 2020: Kronecker structure of layerwise Hessians",
        "A layer's Hessian block ≈ E[M] ⊗ E[aaᵀ] (the decoupling conjecture): its top eigenvalues "
        "and top eigenspace match those of the Kronecker product, and its top eigenvectors reshape "
        "to nearly rank-one matrices.",
        "MLPs 64-64-64-10 (ReLU with Adam lr 1e-2 and with SGD lr 0.05, momentum 0.9, weight "
        "decay 5e-4; tanh with Adam; the ReLU Adam one also after 5 epochs, 256 wide and with 4 "
        "hidden layers) and LeNet (conv 5×5 ×6, ×16, Linear 120-84-10, ReLU, Adam) trained 30 "
        "epochs (unless named) on every training example (--quick: 5 per class); blocks of each weight (bias excluded) of "
        "the mean cross-entropy's Hessian; B ⊗ A from torch.func's per-example factors.",
        body,
        verdict,
        figure,
    )


if __name__ == "__main__":
    run(main)
