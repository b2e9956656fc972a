"""Sankar et al. (2021): layerwise Hessians over training; the middle layers' spectrum is the
closest to the full Hessian's; penalising the middle layers' Hessian trace regularises.

    python benchmarks/reproduce/sankar.py [--quick | --full] [--data mnist --root DIR] [--device cuda]

In the paper's regime: inputs standardised per feature, ReLU MLPs whose middle layers hold most
of the parameters (64 → 96 → … → 96 → 10, L weight layers), trained with Adam (lr 1e-3).

1. **Which layer is closest in shape**, for depths L = 3, 5, 8 and 3 seeds (``--full``: L = 3–8,
   5 seeds), after 20 epochs, by two measures of curvkit's layerwise quantity: the normalised
   1-Wasserstein distance between the layer's and the full Hessian's SLQ densities
   (``spectrum_distance``) and the distance of their top-10 profiles λ_i/λ_1
   (``profile_distance``). Beside them |tr_l/(P_l λ_l) − tr/(P λ)|, the difference of the mean
   eigenvalues over λ_max, which W1 on λ/λ_max axes tracks when both densities are mostly a
   spike at zero. Error bars: the spread over seeds, each seed drawing its own probes.
2. **λ_max and trace over training**, full and per layer (L = 4, epochs 0–100).
3. **The trace penalty** (γ = 3e-3 on the middle half of the layers, SGD, see
   benchmarks/bench_trace_penalty.py) in two settings: the 64-64-64-10 MLP on raw inputs with
   1000 training digits, and the middle-heavy 96-96-96 MLP on standardised inputs with 300.
   Each seed trains both γ from the same initialisation; the test is a paired t-test on the
   test-accuracy differences (10 seeds; ``--full``: 64). These small digits MLPs train on the
   CPU whatever ``--device`` says.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import numpy as np
import scipy.stats
import torch
from common import accuracy, arguments, load, run, table, trained, write
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

import curvkit
from curvkit.datasets import tensor_loader
from curvkit.models import zoo_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_trace_penalty import run as train_with_penalty  # noqa: E402
from bench_trace_penalty import split, standardised

WIDTH = 96
GAMMA = 3e-3
TOP = 10
SHAPE_OPTIONS = {
    "trace_matvecs": 30,
    "density_probes": 3,
    "density_steps": 40,
    "layer_density": True,
}
TRAJECTORY_OPTIONS = {"trace_matvecs": 30, "density_probes": 1, "density_steps": 10}
PENALTY_SETTINGS = {  # label: (training examples per class, standardised, hidden widths, epochs)
    "64-64-64, raw inputs, 1000 train": (100, False, (64, 64, 64), 40),
    "96-96-96, standardised, 300 train": (30, True, (WIDTH,) * 3, 100),
}


def network(x: torch.Tensor, depth: int, seed: int) -> torch.nn.Module:
    """The middle-heavy ReLU MLP with ``depth`` weight layers for inputs like ``x``."""
    return zoo_model(
        "mlp", tuple(x.shape[1:]), 10, WIDTH, depth - 1, seed, activation=torch.nn.ReLU
    ).to(x.device)


def shapes(args, x, y, depth: int, seed: int, epochs: int) -> list[dict]:
    """One trained network's layers: position, size, trace share and the three distances."""
    model, data = trained(network(x, depth, seed), x, y, epochs, seed, lr=1e-3)
    report = curvkit.analyze(
        model, data, quantities=["hessian", "layerwise"], top_k=TOP, seed=seed,
        progress=False, options=SHAPE_OPTIONS,
    )  # fmt: skip
    full = report.hessian
    mean_full = full.trace / (report.model.num_params * full.top_eigenvalues[0])
    rows = []
    for position, layer in enumerate(report.layerwise.values(), start=1):
        size = layer.shape[0] * layer.shape[1]
        rows.append(
            {
                "depth": depth, "seed": seed, "position": position, "size": size,
                "share": layer.trace / full.trace,
                "w1": layer.spectrum_distance, "profile": layer.profile_distance,
                "mean": abs(layer.trace / (size * layer.max_eigenvalue) - mean_full),
                "accuracy": accuracy(model, data),
            }
        )  # fmt: skip
    return rows


def where(position: int, depth: int) -> str:
    return "first" if position == 1 else "last" if position == depth else "inner"


def closest(rows: list[dict], key: str) -> dict[str, int]:
    """How many networks have their closest layer (smallest ``key``) first, inner or last, and
    how many in the two layers next to the output."""
    counts = {"first": 0, "inner": 0, "last": 0, "last two": 0}
    for model in {(r["depth"], r["seed"]) for r in rows}:
        layers = [r for r in rows if (r["depth"], r["seed"]) == model]
        best = min(layers, key=lambda r: r[key])
        counts[where(best["position"], best["depth"])] += 1
        counts["last two"] += best["position"] >= best["depth"] - 1
    return counts


def mean_sd(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.3g} ± {spread:.2g}"


def trajectory(args, x, y, stops: tuple[int, ...]) -> list[dict]:
    """Train the L = 4 network, pausing at each epoch in ``stops`` for the Hessian and layers."""
    model, data = network(x, 4, args.seed), tensor_loader(x, y, 1000)
    results, done = [], 0
    for stop in stops:
        if stop > done:
            trained(model, x, y, stop - done, args.seed + done, lr=1e-3)
            done = stop
        report = curvkit.analyze(
            model, data, quantities=["hessian", "layerwise"], top_k=5, seed=args.seed,
            progress=False, options=TRAJECTORY_OPTIONS,
        )  # fmt: skip
        results.append({"epoch": stop, "accuracy": accuracy(model, data), "report": report})
    return results


def penalty(seeds: int, quick: bool) -> dict[str, dict]:
    """Per setting: each seed's runs without and with the penalty, and the paired test."""
    results = {}
    for label, (per_class, standardise, hidden, epochs) in PENALTY_SETTINGS.items():
        data = split(0, per_class, standardise)
        epochs = 2 if quick else epochs
        pairs = [
            [train_with_penalty(g, s, epochs, data, hidden, trace_probes=50) for g in (0.0, GAMMA)]
            for s in range(seeds)
        ]
        gains = [100 * (with_["accuracy"] - without["accuracy"]) for without, with_ in pairs]
        sd = statistics.stdev(gains) if seeds > 1 else float("nan")
        t = scipy.stats.t.ppf(0.975, seeds - 1) if seeds > 1 else float("nan")
        power = t + scipy.stats.t.ppf(0.8, seeds - 1) if seeds > 1 else float("nan")
        results[label] = {
            "pairs": pairs,
            "gain": statistics.fmean(gains),
            "sd": sd,
            "half_width": t * sd / seeds**0.5,
            "p": scipy.stats.ttest_1samp(gains, 0.0).pvalue if seeds > 1 else float("nan"),
            "detectable": power * sd / seeds**0.5,
            "seeds_for_0.1": int(np.ceil((2.8 * sd / 0.1) ** 2)) if seeds > 1 else None,
            "trace_ratio": statistics.fmean(w["trace"] for _, w in pairs)
            / statistics.fmean(n["trace"] for n, _ in pairs),
            "test_size": len(data[3]),
        }
    return results


def main() -> None:
    args = arguments(__doc__, "digits", full="depths 3–8 and 5 seeds; 64 seeds for the penalty")
    if args.quick:
        depths, seeds, epochs, stops, penalty_seeds, samples = (3,), (0,), 2, (0, 1), 2, 5
    elif args.full:
        depths, seeds, epochs, stops, penalty_seeds, samples = (
            range(3, 9),
            range(5),
            20,
            (0, 1, 3, 10, 30, 100),
            64,
            None,
        )
    else:
        depths, seeds, epochs, stops, penalty_seeds, samples = (
            (3, 5, 8),
            range(3),
            20,
            (0, 1, 3, 10, 30, 100),
            10,
            None,
        )
    x, y = load(args, samples)
    x = standardised(x, x)
    rows = [r for d in depths for s in seeds for r in shapes(args, x, y, d, s, epochs)]
    path = trajectory(args, x, y, stops)
    tests = penalty(penalty_seeds, args.quick)

    shape_rows = []
    for depth in depths:
        for position in range(1, depth + 1):
            at = [r for r in rows if r["depth"] == depth and r["position"] == position]
            shape_rows.append(
                [depth, f"{position} ({where(position, depth)})", at[0]["size"],
                 mean_sd([r["share"] for r in at]), mean_sd([r["w1"] for r in at]),
                 mean_sd([r["mean"] for r in at]), mean_sd([r["profile"] for r in at])]
            )  # fmt: skip
    by_w1, by_profile = closest(rows, "w1"), closest(rows, "profile")
    models = len({(r["depth"], r["seed"]) for r in rows})
    log_w1, log_mean = np.log([r["w1"] for r in rows]), np.log([r["mean"] for r in rows])
    tracks = float(np.corrcoef(log_w1, log_mean)[0, 1])
    ratio = np.exp(log_w1 - log_mean)
    profile_vs_mean = float(
        scipy.stats.spearmanr([r["profile"] for r in rows], [r["mean"] for r in rows])[0]
    )
    accuracies = [r["accuracy"] for r in rows if r["position"] == 1]

    layer_names = list(path[0]["report"].layerwise)
    full_max = [r["report"].hessian.top_eigenvalues[0] for r in path]
    full_trace = [r["report"].hessian.trace for r in path]
    path_rows = [
        [r["epoch"], f"{100 * r['accuracy']:.1f} %", full_max[i], full_trace[i],
         *(f"{r['report'].layerwise[n].max_eigenvalue:.3g} / {r['report'].layerwise[n].trace:.3g}"
           for n in layer_names)]
        for i, r in enumerate(path)
    ]  # fmt: skip
    layer_max = {n: [r["report"].layerwise[n].max_eigenvalue for r in path] for n in layer_names}
    layer_trace = {n: [r["report"].layerwise[n].trace for r in path] for n in layer_names}
    tracking = {n: correlation(full_max, layer_max[n]) for n in layer_names}
    peak = int(np.argmax(full_max))

    def fall(values: list[float]) -> float:
        return values[-1] / max(values)

    penalty_rows = [
        [label, f"{100 * statistics.fmean(n['accuracy'] for n, _ in t['pairs']):.2f}",
         f"{100 * statistics.fmean(w['accuracy'] for _, w in t['pairs']):.2f}",
         f"{t['gain']:+.2f} ± {t['half_width']:.2f}", f"{t['p']:.2g}", f"{t['detectable']:.2f}",
         t["seeds_for_0.1"], f"{t['trace_ratio']:.2f}"]
        for label, t in tests.items()
    ]  # fmt: skip
    body = [
        f"**1. Closest layer in shape** ({models} networks: depths {list(depths)} × "
        f"{len(seeds)} seeds, training accuracy {min(accuracies):.1%}–{max(accuracies):.1%}). "
        "Per layer, mean ± sd over seeds: share of the full trace, the W1 distance of the "
        "densities on λ/λ_max axes, |tr_l/(P_l λ_l) − tr/(P λ)| (mean eigenvalue over λ_max, "
        "against the full Hessian's), and the top-10 profile distance mean_i |λ_i/λ_1 − full's|.",
        "",
        *table(
            ("L", "layer", "P_l", "trace share", "W1", "mean-eigenvalue diff.", "profile"),
            shape_rows,
        ),  # fmt: skip
        "",
        f"Closest layer by W1: first {by_w1['first']}, inner {by_w1['inner']}, last "
        f"{by_w1['last']} of {models}; by the top-10 profile: first {by_profile['first']}, "
        f"inner {by_profile['inner']}, last {by_profile['last']} (one of the two layers next to "
        f"the output: {by_profile['last two']}). Over all layers, log W1 against "
        f"log |mean-eigenvalue difference|: Pearson {tracks:.2f}, W1 / difference "
        f"{np.median(ratio):.2f} (median; {ratio.min():.2f}–{ratio.max():.2f}); the profile "
        f"distance against the same difference: Spearman {profile_vs_mean:.2f}.",
        "",
        f"**2. Over training** (L = 4, seed {args.seed}): λ_max / trace of the full Hessian and "
        "of each layer's weight block.",
        "",
        *table(
            (
                "epoch",
                "train acc",
                "full λ_max",
                "full trace",
                *(f"layer {i}" for i in range(1, len(layer_names) + 1)),
            ),
            path_rows,
        ),  # fmt: skip
        "",
        "Last checkpoint against the peak (λ_max, trace): full "
        f"{fall(full_max):.2g}, {fall(full_trace):.2g}; "
        + ", ".join(
            f"layer {i}: {fall(layer_max[n]):.2g}, {fall(layer_trace[n]):.2g}"
            for i, n in enumerate(layer_names, start=1)
        )
        + ". Correlation over checkpoints of log λ_max(layer) with log λ_max(full): "
        + ", ".join(f"layer {i}: {c:.2f}" for i, c in enumerate(tracking.values(), start=1))
        + ".",
        "",
        f"**3. Trace penalty** γ = {GAMMA:g} on the middle half, {penalty_seeds} seeds, each "
        "paired with γ = 0 from the same initialisation; test accuracy in points (one test "
        f"example = {100 / tests[next(iter(tests))]['test_size']:.3f} points in the first "
        "setting); the difference with its 95 % confidence interval, the paired t-test's p, the "
        "smallest difference it detects with 80 % power, and the seeds needed for +0.1 points.",
        "",
        *table(
            (
                "setting",
                "γ = 0 acc %",
                "γ acc %",
                "difference",
                "p",
                "detectable",
                "seeds for 0.1",
                "trace ratio",
            ),
            penalty_rows,
        ),  # fmt: skip
    ]
    verdict = [
        "Closest layer by the density distance W1: an inner layer in "
        f"{by_w1['inner']} of {models} networks"
        + (" — reproduces in this regime (standardised inputs, middle-heavy ReLU networks); "
           if by_w1["inner"] > models / 2 else " — does not reproduce; ")
        + (
            f"but W1 tracks the difference of mean eigenvalues over λ_max (log Pearson "
            f"{tracks:.2f}, ratio {np.median(ratio):.2f}), so it ranks layers by "
            "tr_l/(P_l λ_l), effective rank over block size, more than by shape."
            if tracks > 0.8
            else f"W1 does not simply track the difference of mean eigenvalues (log Pearson "
            f"{tracks:.2f})."
        ),
        f"Closest layer by the top-10 profile, which does not depend on block size: inner in "
        f"{by_profile['inner']}, last in {by_profile['last']}, first in {by_profile['first']} of "
        f"{models}, one of the two layers next to the output in {by_profile['last two']}"
        + (": the middle layers' spectrum is the closest in shape, as claimed."
           if by_profile["inner"] > models / 2
           else ": for the shape of the top of the spectrum the claim does not hold; the layers "
           "nearest the output are the closest." if by_profile["last two"] > models / 2
           else ": for the shape of the top of the spectrum the claim does not hold."),
        f"Over training the full λ_max peaks at epoch {path[peak]['epoch']} and ends at "
        f"{fall(full_max):.2g}× its peak (trace {fall(full_trace):.2g}×); every layer's λ_max "
        + ("tracks the full one (log correlation ≥ 0.5)."
           if min(tracking.values()) >= 0.5 else "does not track the full one in every layer.")
        + (" Both fall after the early rise, as the paper says." if fall(full_max) < 0.5
           and fall(full_trace) < 0.5 else ""),
        *(f"Trace penalty, {label}: the penalised trace × {t['trace_ratio']:.2f}, test accuracy "
          f"{t['gain']:+.2f} ± {t['half_width']:.2f} points (p = {t['p']:.2g}); with "
          f"{penalty_seeds} seeds the test detects ≥ {t['detectable']:.2f} points, so +0.1 "
          f"would need about {t['seeds_for_0.1']} seeds"
          + (": a significant gain, as claimed." if t["p"] < 0.05 and t["gain"] > 0 else
             ": a significant loss." if t["p"] < 0.05 else ": no significant change.")
          for label, t in tests.items()),
    ]  # fmt: skip
    figure = Figure(figsize=(11, 8.4), layout="constrained")
    (shape_axes, track_axes), (max_axes, trace_axes) = figure.subplots(2, 2)
    for depth in depths:
        means, sds = [], []
        for position in range(1, depth + 1):
            values = [
                r["profile"] for r in rows if r["depth"] == depth and r["position"] == position
            ]
            means.append(statistics.fmean(values))
            sds.append(statistics.stdev(values) if len(values) > 1 else 0.0)
        shape_axes.errorbar(
            range(1, depth + 1), means, sds, marker="o", capsize=3, label=f"L = {depth}"
        )
    shape_axes.set(xlabel="layer (1 = first)", ylabel="top-10 profile distance to the full Hessian",
                   title="Shape of the top spectrum: closest layer = lowest")  # fmt: skip
    shape_axes.legend(fontsize="small")
    track_axes.loglog([r["mean"] for r in rows], [r["w1"] for r in rows], "o", alpha=0.6)
    span = [min(r["mean"] for r in rows), max(r["mean"] for r in rows)]
    track_axes.loglog(span, span, "k:", label="W1 = difference")
    track_axes.set(xlabel="|tr_l/(P_l λ_l) − tr/(P λ)|", ylabel="W1 of the densities (λ/λ_max)",
                   title="What the density distance measures")  # fmt: skip
    track_axes.xaxis.set_minor_formatter(NullFormatter())
    track_axes.legend(fontsize="small")
    epochs_axis = [max(r["epoch"], 0.5) for r in path]
    max_axes.loglog(epochs_axis, full_max, "k-o", label="full Hessian")
    trace_axes.loglog(epochs_axis, full_trace, "k-o", label="full Hessian")
    for i, n in enumerate(layer_names, start=1):
        max_axes.loglog(epochs_axis, layer_max[n], ".-", label=f"layer {i}")
        trace_axes.loglog(epochs_axis, layer_trace[n], ".-", label=f"layer {i}")
    max_axes.set(
        xlabel="epoch (0 drawn at 0.5)", ylabel="λ_max", title="λ_max over training (L = 4)"
    )
    trace_axes.set(
        xlabel="epoch (0 drawn at 0.5)", ylabel="trace", title="Trace over training (L = 4)"
    )
    max_axes.legend(fontsize="small")
    write(
        args,
        "reproduce_sankar",
        "Sankar et al. 2021: layerwise Hessians and the trace regulariser",
        "Layerwise λ_max and trace evolve like the full Hessian's during training; the middle "
        "layers' spectrum is the closest to the full spectrum; penalising the middle layers' "
        "Hessian trace during training finds flatter minima and generalises better.",
        f"Inputs standardised per feature; ReLU MLPs 64 → {WIDTH} → … → {WIDTH} → 10 trained "
        f"with Adam lr 1e-3, batches of 64; curvkit (torch.func) with top {TOP} eigenvalues, "
        "Hutch++ traces with 30 products and SLQ densities with 3 probes × 40 steps for the "
        "shape part; the regulariser as in benchmarks/bench_trace_penalty.py (SGD lr 0.05, "
        "momentum 0.9, batches of 50, one probe per step; its trace with 50 probes).",
        body,
        verdict,
        figure,
    )


def correlation(a: list[float], b: list[float]) -> float:
    """Pearson correlation of log a and log b (how closely two curves move together)."""
    return float(np.corrcoef(np.log(a), np.log(b))[0, 1])


if __name__ == "__main__":
    run(main)
