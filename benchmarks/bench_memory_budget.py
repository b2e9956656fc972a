"""Peak memory of the Hessian's Krylov routines against the memory budget (CURVKIT_MEMORY_MB).

    python benchmarks/bench_memory_budget.py

A wide MLP on the digits (64 → 2000 → 1000 → 10, P = 2.14 M, float32, 40 examples), the
Hessian on torchfunc with analyze's defaults (top_k 20: Lanczos up to 320 products, Hutch++ with
99, SLQ 3 × 30), once per budget, each run in its own process so that its peak resident set
(ru_maxrss) is its own. Half the budget is what curvkit's routines may hold; "none" leaves it
to the machine's available memory. Writes benchmarks/results/memory_budget_cpu.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
BUDGETS = ["none", "4000", "2000", "1200", "800"]  # MiB

RUN = """
import json, resource, time, warnings
import torch
from torch import nn
import curvkit
from curvkit.datasets import digits_tensors
torch.manual_seed(0)
torch.set_num_threads(2)
x, y = digits_tensors(samples_per_class=4)
x = x.float()
model = nn.Sequential(nn.Linear(64, 2000), nn.Tanh(), nn.Linear(2000, 1000), nn.Tanh(),
                      nn.Linear(1000, 10))
start = time.perf_counter()
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    report = curvkit.analyze(model, [(x[:20], y[:20]), (x[20:], y[20:])], "torchfunc",
                             ["hessian"], progress=False)
seconds = time.perf_counter() - start
hessian = report.hessian
print(json.dumps({
    "seconds": seconds,
    "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "converged": hessian.converged,
    "lambda_1": hessian.top_eigenvalues[0],
    "trace": hessian.trace,
    "stderr": hessian.trace_stderr,
    "products": sum(p.matvecs for p in hessian.provenance.values()),
    "notes": [part for p in hessian.provenance.values() for part in p.note.split("; ")
              if part and not part.startswith(("products", "forward", "reverse"))],
}))
"""


def main() -> None:
    rows = []
    for budget in BUDGETS:
        env = dict(os.environ)
        env.pop("CURVKIT_MEMORY_MB", None)
        if budget != "none":
            env["CURVKIT_MEMORY_MB"] = budget
        done = subprocess.run([sys.executable, "-c", RUN], env=env, capture_output=True, text=True)
        if done.returncode:  # a refusal: its sentence
            rows.append((budget, {"refused": done.stderr.strip().splitlines()[-1]}))
        else:
            rows.append((budget, json.loads(done.stdout.strip().splitlines()[-1])))
        print(budget, rows[-1][1], flush=True)
    lines = [
        "# Peak memory against the memory budget (`benchmarks/bench_memory_budget.py`)",
        "",
        f"CPU, 2 threads; torch {__import__('torch').__version__}; an MLP 64 → 2000 → 1000 → 10 "
        "(P = 2 141 010, float32: 8.2 MiB a vector) on "
        "40 digits; the Hessian on torchfunc with analyze's defaults (top_k 20). Each budget in "
        "its own process; peak = the process's maximum resident set (libraries included).",
        "",
        "| CURVKIT_MEMORY_MB | half of it | seconds | products | peak MiB | converged | λ₁ | tr ± stderr | what the budget changed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for budget, r in rows:
        half = "available memory / 2" if budget == "none" else f"{float(budget) / 2:g} MiB"
        if "refused" in r:
            lines.append(f"| {budget} | {half} | | | | | | | refused: {r['refused']} |")
            continue
        changed = "; ".join(r["notes"]) or "nothing"
        lines.append(
            f"| {budget} | {half} | {r['seconds']:.1f} | {r['products']} | {r['peak_mib']:.0f} "
            f"| {r['converged']} | {r['lambda_1']:.6g} | {r['trace']:.4g} ± {r['stderr']:.2g} "
            f"| {changed} |"
        )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "memory_budget_cpu.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
