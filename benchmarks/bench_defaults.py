"""Error against cost for the default run's stochastic estimates, to choose the defaults.

    python benchmarks/bench_defaults.py

On the embedded problem (the digits MLP trained as ``curvkit analyze`` trains it, P = 2410,
N = 1797) the dense Hessian, G and H = Hess − G are built column by column from products, so
the exact trace and spectrum are known. For each setting, over 5 seeds:

- trace: Hutch++ with m products, the mean |error| and the mean reported stderr, both divided
  by Σ|λ_i| (tr H is 0 for a ReLU network, so |tr| cannot be the scale), and the mean of
  |error| / stderr (≈ 0.8 when the stderr is honest);
- density: SLQ with p probes × s steps, the 1-Wasserstein distance between its spectral measure
  (Ritz values θ_j with weights τ_j, averaged over probes) and the exact one (each eigenvalue
  weight 1/P), divided by λ_max.

Writes benchmarks/results/defaults_cpu.md.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np
import torch

from curvkit.config import build, load_config
from curvkit.linalg.krylov import slq_density
from curvkit.linalg.trace import hutch_plus_plus
from curvkit.problem import Problem
from curvkit.registry import get_backend

RESULTS = Path(__file__).parent / "results"
SEEDS = range(5)


def measure_w1(nodes: np.ndarray, weights: np.ndarray, exact: np.ndarray) -> float:
    """W1 between Σ w_j δ(θ_j) (weights summing to 1) and the uniform measure on ``exact``."""
    points = np.concatenate([nodes, exact])
    masses = np.concatenate([weights / weights.sum(), -np.full(len(exact), 1 / len(exact))])
    order = np.argsort(points)
    cdf_gap = np.cumsum(masses[order])[:-1]
    return float(np.sum(np.abs(cdf_gap) * np.diff(points[order])))


def main() -> None:
    torch.set_num_threads(2)
    model, data = build(load_config(None), progress=False)
    backend = get_backend("torchfunc")(Problem(model, data))
    p = backend.problem.num_params
    eye = torch.eye(p, dtype=torch.float64)
    dense = {"hessian": backend.hvp(eye), "ggn": backend.ggnvp(eye)}
    dense["residual"] = dense["hessian"] - dense["ggn"]
    dense = {name: (matrix + matrix.T) / 2 for name, matrix in dense.items()}  # rounding
    lines = [
        "# Error against cost of the default estimates (embedded problem, P = 2410, CPU)",
        "",
        "Produced by `python benchmarks/bench_defaults.py`; means over 5 seeds.",
        "",
        "## Trace: Hutch++ with m products",
        "",
        "| matrix | m | mean abs. error / Σ abs λ | mean stderr / Σ abs λ | mean error / stderr |",
        "|---|---|---|---|---|",
    ]
    for name, matrix in dense.items():
        exact_trace = float(torch.trace(matrix))
        scale = float(torch.linalg.eigvalsh(matrix).abs().sum())
        for m in (9, 30, 60, 99, 198):
            errors, stderrs = [], []
            for seed in SEEDS:
                estimate = hutch_plus_plus(lambda V: matrix @ V, p, m, seed=seed)
                errors.append(abs(estimate.value - exact_trace))
                stderrs.append(estimate.stderr)
            ratio = statistics.mean(e / s for e, s in zip(errors, stderrs))
            lines.append(
                f"| {name} | {m} | {statistics.mean(errors) / scale:.2e} | "
                f"{statistics.mean(stderrs) / scale:.2e} | {ratio:.2f} |"
            )
    lines += [
        "",
        "## Density: SLQ with p probes × s steps, W1 to the exact spectrum / λ_max",
        "",
        "| matrix | p × s | products | mean W1 / λ_max | max over seeds |",
        "|---|---|---|---|---|",
    ]
    for name, matrix in dense.items():
        exact = torch.linalg.eigvalsh(matrix).numpy()
        scale = float(np.abs(exact).max())
        for probes, steps in ((1, 30), (3, 20), (3, 30), (5, 30), (3, 50), (5, 50), (10, 80)):
            distances = []
            for seed in SEEDS:
                result = slq_density(
                    lambda V: matrix @ V, p, num_probes=probes, num_steps=steps, seed=seed
                )
                nodes = result.nodes.numpy().ravel()
                weights = result.weights.numpy().ravel() / probes
                distances.append(measure_w1(nodes, weights, exact) / scale)
            lines.append(
                f"| {name} | {probes} × {steps} | {probes * steps} | "
                f"{statistics.mean(distances):.2e} | {max(distances):.2e} |"
            )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "defaults_cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
