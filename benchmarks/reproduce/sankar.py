"""Sankar et al. (2021): layerwise Hessians over training; the middle layers' spectrum is the
closest to the full Hessian's; penalising the middle layers' Hessian trace regularises.

    python benchmarks/reproduce/sankar.py [--quick] [--data mnist --root DIR]

A tanh MLP (64-64-64-64-10, four weight layers) is trained on the digits (Adam, lr 1e-3) and
analysed at checkpoints (curvkit, torch.func backend): the full Hessian's λ_max and trace, every
layer block's λ_max and trace, and each block's spectrum_distance (W1 between the block's and the
full Hessian's densities, each divided by its own λ_max). The regulariser part trains the ReLU
MLP of benchmarks/bench_trace_penalty.py with and without γ · layer_trace_penalty on the digits.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import numpy as np
from common import accuracy, arguments, load, run, table, write
from matplotlib.figure import Figure

import curvkit
from curvkit.datasets import tensor_loader
from curvkit.models import train, zoo_model
from curvkit.quantities.layerwise import middle_layers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_trace_penalty import run as train_with_penalty  # noqa: E402
from bench_trace_penalty import split

GAMMA = 3e-3
OPTIONS = {"trace_matvecs": 30, "density_probes": 3, "density_steps": 40, "layer_density": True}


def checkpoints(args, samples: int | None, stops: tuple[int, ...]) -> tuple[list[dict], list[str]]:
    """Train, pausing at each epoch in ``stops`` to analyse the Hessian and its layer blocks;
    also returns the model's middle layers."""
    x, y = load(args, samples)
    model = zoo_model("mlp", tuple(x.shape[1:]), 10, width=64, depth=3, seed=args.seed)
    data = tensor_loader(x, y, 1000)
    results, done = [], 0
    for stop in stops:
        if stop > done:
            loader = tensor_loader(x, y, 64, shuffle=True, seed=args.seed + done)
            train(model, loader, stop - done, lr=1e-3, seed=args.seed + done, progress=False)
            done = stop
        report = curvkit.analyze(
            model,
            data,
            quantities=["hessian", "layerwise"],
            top_k=5,
            progress=False,
            options=OPTIONS,
        )
        results.append({"epoch": stop, "accuracy": accuracy(model, data), "report": report})
    return results, middle_layers(model)


def correlation(a: list[float], b: list[float]) -> float:
    """Pearson correlation of log a and log b (how closely two curves move together)."""
    return float(np.corrcoef(np.log(a), np.log(b))[0, 1])


def main() -> None:
    args = arguments(__doc__, "digits")
    stops, samples, seeds, epochs = (
        ((0, 1, 2), 5, 1, 2) if args.quick else ((0, 1, 3, 10, 30, 100), None, 2, 40)
    )
    results, middle = checkpoints(args, samples, stops)
    layer_names = list(results[0]["report"].layerwise)
    rows = []
    for r in results:
        rep = r["report"]
        closest = next(n for n, layer in rep.layerwise.items() if layer.closest_to_full)
        rows.append(
            [r["epoch"], f"{100 * r['accuracy']:.1f} %", rep.hessian.top_eigenvalues[0],
             rep.hessian.trace,
             *(f"{rep.layerwise[n].max_eigenvalue:.3g} / {rep.layerwise[n].trace:.3g} / "
               f"{rep.layerwise[n].spectrum_distance:.3f}" for n in layer_names),
             closest]
        )  # fmt: skip
    full_max = [r["report"].hessian.top_eigenvalues[0] for r in results]
    tracking = {
        n: correlation(full_max, [r["report"].layerwise[n].max_eigenvalue for r in results])
        for n in layer_names
    }
    distance = {
        n: statistics.fmean(r["report"].layerwise[n].spectrum_distance for r in results)
        for n in layer_names
    }
    closest = min(distance, key=distance.get)

    data = split(args.seed)
    penalty = {
        gamma: [train_with_penalty(gamma, seed, epochs, data) for seed in range(seeds)]
        for gamma in (0.0, GAMMA)
    }

    def mean_sd(gamma: float, key: str, scale: float = 1.0) -> str:
        values = [r[key] * scale for r in penalty[gamma]]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.fmean(values):.3g} ± {spread:.2g}"

    body = [
        "Per layer: λ_max / trace / spectrum_distance of the weight's Hessian block "
        "(spectrum_distance 0 = the same shape of density as the full Hessian).",
        "",
        *table(("epoch", "train acc", "full λ_max", "full trace", *layer_names, "closest"), rows),
        "",
        "Correlation over checkpoints of log λ_max(layer) with log λ_max(full): "
        + ", ".join(f"{n}: {c:.2f}" for n, c in tracking.items())
        + ". Mean spectrum_distance: "
        + ", ".join(f"{n}: {d:.3f}" for n, d in distance.items())
        + ".",
        "",
        f"Trace regulariser (ReLU MLP 64-64-64-10, digits 1000 train / 797 test, SGD, {epochs} "
        f"epochs, {seeds} seed(s), mean ± sd; penalised layers: the middle half):",
        "",
        *table(
            ("γ", "test accuracy %", "train loss", "penalised layers' trace"),
            [
                [g, mean_sd(g, "accuracy", 100), mean_sd(g, "loss"), mean_sd(g, "trace")]
                for g in penalty
            ],
        ),
    ]
    trace_drop = statistics.fmean(r["trace"] for r in penalty[GAMMA]) / statistics.fmean(
        r["trace"] for r in penalty[0.0]
    )
    accuracy_change = 100 * (
        statistics.fmean(r["accuracy"] for r in penalty[GAMMA])
        - statistics.fmean(r["accuracy"] for r in penalty[0.0])
    )
    noise = (
        100 * max(statistics.stdev(r["accuracy"] for r in runs) for runs in penalty.values())
        if seeds > 1
        else float("nan")
    )
    if seeds == 1:
        effect = "one seed, so no conclusion on accuracy."
    elif abs(accuracy_change) <= 2 * noise:
        effect = (
            f"within twice the seeds' spread ({noise:.1f} points): flatter, but the paper's "
            "accuracy gain does not show at this size."
        )
    else:
        effect = "better accuracy, as claimed." if accuracy_change > 0 else "worse accuracy here."
    verdict = [
        f"Closest layer to the full spectrum (mean over checkpoints): {closest}; the middle half "
        f"is {middle}: " + ("reproduces." if closest in middle else "does not reproduce here."),
        "Per-layer λ_max against the full λ_max over training, log correlation "
        + ", ".join(f"{n}: {c:.2f}" for n, c in tracking.items())
        + (
            ": every layer follows the full Hessian."
            if min(tracking.values()) > 0.5
            else ": not every layer follows the full Hessian here."
        ),
        f"γ = {GAMMA:g} multiplies the penalised layers' trace by {trace_drop:.2f} and changes test "
        f"accuracy by {accuracy_change:+.1f} points: {effect}",
    ]
    figure = Figure(figsize=(11, 4.2), layout="constrained")
    left, right = figure.subplots(1, 2)
    epochs_axis = [max(r["epoch"], 0.5) for r in results]
    left.loglog(epochs_axis, full_max, "k-o", label="full Hessian")
    right.loglog(
        epochs_axis, [r["report"].hessian.trace for r in results], "k-o", label="full Hessian"
    )
    for n in layer_names:
        left.loglog(
            epochs_axis, [r["report"].layerwise[n].max_eigenvalue for r in results], ".-", label=n
        )
        right.loglog(epochs_axis, [r["report"].layerwise[n].trace for r in results], ".-", label=n)
    left.set(xlabel="epoch (0 drawn at 0.5)", ylabel="λ_max", title="λ_max over training")
    right.set(xlabel="epoch (0 drawn at 0.5)", ylabel="trace", title="Trace over training")
    left.legend(fontsize="small")
    write(
        args,
        "reproduce_sankar",
        "Sankar et al. 2021: layerwise Hessians and the trace regulariser",
        "Layerwise λ_max and trace evolve like the full Hessian's during training; the middle "
        "layers' spectrum is the closest to the full spectrum; penalising the middle layers' "
        "Hessian trace during training finds flatter minima and generalises better.",
        f"Tanh MLP 64-64-64-64-10 trained with Adam lr 1e-3 (batches of 64) on the data, "
        f"analysed at epochs {list(stops)} (top 5 eigenvalues, Hutch++ traces with 30 products, "
        "SLQ densities with 3 probes × 40 steps, of the Hessian and every weight block); the regulariser as in benchmarks/bench_trace_penalty.py.",
        body,
        verdict,
        figure,
    )


if __name__ == "__main__":
    run(main)
