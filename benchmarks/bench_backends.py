"""Backends side by side in one run: products, per-example factors, eigen/trace/density routines,
the class-mean pass, the embedded default run before and after a commit, and top-10 eigenvalues
against the peer libraries. Writes benchmarks/results/backends_<device>[_<only>].md.

    python benchmarks/bench_backends.py [--device cpu|cuda] [--only SECTION] [--before COMMIT]

``--before COMMIT`` (for ``embedded_run``) checks the commit out into a temporary worktree and
runs the same default analysis with it in a subprocess, so both columns come from one run.

Times are medians of repeats after a warm-up; ratios are taken within this one run because the
machines are shared. Peak memory is measured in a fresh subprocess per measurement (CPU: growth
of the peak resident set; CUDA: torch.cuda.max_memory_allocated).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

import curvkit
from curvkit.datasets import digits_loader, digits_tensors
from curvkit.linalg.operator import density, top_eigen, trace
from curvkit.models import digits_cnn, digits_mlp, mlp, train
from curvkit.problem import Problem, model_guard
from curvkit.quantities.classmeans import classmeans
from curvkit.registry import get_backend

RESULTS = Path(__file__).parent / "results"


def median_time(fn: Callable[[], object], repeats: int = 5) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def models(device: str, dtype=torch.float64) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    wide = mlp(64, (512, 128), 10).to(dtype)
    return {
        "digits MLP": digits_mlp(dtype=dtype),
        "wide MLP": wide,
        "CNN": digits_cnn(dtype=dtype),
    }


def trained(name: str, device: str) -> tuple[torch.nn.Module, torch.utils.data.DataLoader]:
    model = models(device)[name]
    train(model, digits_loader(batch_size=64, shuffle=True), epochs=15, progress=False)
    return model.to(device), _loader(600, 128, device)


def _loader(n: int, batch: int, device: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first n digits; beyond 1797, repeated copies with a little noise."""
    x, y = digits_tensors()
    copies = -(-n // len(y))
    noise = torch.randn(
        (copies - 1) * len(y), x.shape[1], generator=torch.Generator().manual_seed(0)
    )
    x = torch.cat([x, x.repeat(copies - 1, 1) + 0.01 * noise.to(x)])[:n].to(device)
    y = y.repeat(copies)[:n].to(device)
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]


def _gradient(problem: Problem) -> None:
    total = None
    for x, y in problem.batches():
        g = torch.autograd.grad(problem.loss.sum(problem.model(x), y), problem.params)
        total = g if total is None else [a + b for a, b in zip(total, g)]


def table(rows: list[list[str]]) -> str:
    head = "| " + " | ".join(rows[0]) + " |\n|" + "---|" * len(rows[0]) + "\n"
    return head + "".join("| " + " | ".join(r) + " |\n" for r in rows[1:])


# -- measurements ------------------------------------------------------------------------------
def products(device: str) -> str:
    """Issue 3/4: HVP and GVP cost as multiples of a gradient, per backend."""
    rows = [
        ["model", "P", "backend", "gradient ms", "HVP ms", "HVP / grad", "GVP ms", "GVP / grad"]
    ]
    for name, model in models(device).items():
        model = model.to(device)
        data = _loader(600, 128, device)
        with model_guard(model):
            problem = Problem(model, data)
            v = torch.randn(problem.num_params, dtype=problem.dtype, device=device)
            grad_t = median_time(lambda: _gradient(problem))
            for backend_name in ("torchfunc", "backpack", "pyhessian"):
                backend = get_backend(backend_name)(problem)
                hvp_t = median_time(lambda: backend.hvp(v))
                gvp_t = median_time(lambda: backend.ggnvp(v))
                rows.append(
                    [
                        name,
                        str(problem.num_params),
                        backend_name,
                        f"{grad_t * 1e3:.1f}",
                        f"{hvp_t * 1e3:.1f}",
                        f"{hvp_t / grad_t:.1f}",
                        f"{gvp_t * 1e3:.1f}",
                        f"{gvp_t / grad_t:.1f}",
                    ]
                )
    return table(rows)


def _factor_pass(args: tuple[str, str, str]) -> tuple[float, float]:
    """In a fresh process: time of one class-delta pass and the peak-memory growth in MiB."""
    backend_name, model_name, device = args
    torch.manual_seed(0)
    model = models(device)[model_name].to(device)
    data = _loader(600, 128, device)
    with model_guard(model):
        backend = get_backend(backend_name)(Problem(model, data))
        base = _peak(device)
        backend.class_deltas()  # the first pass sets the peak (a warm-up before would hide it)
        memory = _peak(device) - base
        start = time.perf_counter()
        backend.class_deltas()
        return time.perf_counter() - start, memory


def _peak(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _in_subprocess(fn, args):
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, (args,))


def factors(device: str) -> str:
    """Issue 4: BackPACK SqrtGGNExact vs torch.func vmap(jacrev) for all δ_{i,c'} (600 digits)."""
    rows = [
        [
            "model",
            "torchfunc s/pass",
            "backpack s/pass",
            "speed-up",
            "torchfunc peak MiB",
            "backpack peak MiB",
        ]
    ]
    for model_name in models(device):
        tf = _in_subprocess(_factor_pass, ("torchfunc", model_name, device))
        bp = _in_subprocess(_factor_pass, ("backpack", model_name, device))
        rows.append(
            [
                model_name,
                f"{tf[0]:.3f}",
                f"{bp[0]:.3f}",
                f"{tf[0] / bp[0]:.1f}×",
                f"{tf[1]:.0f}",
                f"{bp[1]:.0f}",
            ]
        )
    return table(rows)


def eigen_routines(device: str) -> str:
    """Issue 5: PyHessian's power iteration vs curvkit's Lanczos for the top-10 Hessian eigenvalues,
    PyHessian's Hutchinson vs Hutch++, and both SLQs at the same resolution."""
    model, data = trained("digits MLP", device)
    rows = [["routine", "setting", "HVPs", "seconds", "max rel. error of top-10 / trace error"]]
    with model_guard(model):
        problem = Problem(model, data)
        exact = np.linalg.eigvalsh(get_backend("torchfunc")(problem).dense_hessian().cpu().numpy())
        top = exact[::-1][:10]
        exact_trace = exact.sum()
        for tol in (1e-6, 1e-8):
            backend = get_backend("torchfunc")(problem, curvkit.Options(lanczos_tol=tol))
            start = time.perf_counter()
            result, prov = top_eigen(backend.operator("hessian"), 10, backend.options, 0)
            err = np.abs(result.values.cpu().numpy() - top).max() / abs(top).max()
            rows.append(
                [
                    "curvkit.lanczos",
                    f"tol {tol:g}",
                    str(prov.matvecs),
                    f"{time.perf_counter() - start:.2f}",
                    f"{err:.1e}",
                ]
            )
        for tol in (1e-3, 1e-5, 1e-7):
            backend = get_backend("pyhessian")(
                problem, curvkit.Options(backend={"pyhessian": {"power_tol": tol}})
            )
            start = time.perf_counter()
            result, prov = top_eigen(backend.operator("hessian"), 10, backend.options, 0)
            err = np.abs(result.values.cpu().numpy() - top).max() / abs(top).max()
            rows.append(
                [
                    "pyhessian.eigenvalues",
                    f"tol {tol:g}",
                    f"{prov.matvecs - 10} (+10 checks)",
                    f"{time.perf_counter() - start:.2f}",
                    f"{err:.1e}",
                ]
            )
        for method, name in (
            ("hutch++", "torchfunc"),
            ("hutchinson", "torchfunc"),
            (None, "pyhessian"),
        ):
            opts = curvkit.Options(trace_method=method or "hutchinson", trace_matvecs=99)
            backend = get_backend(name)(problem, opts)
            start = time.perf_counter()
            est, prov = trace(backend.operator("hessian"), backend.options, 1)
            rows.append(
                [
                    prov.routine,
                    "99 probes",
                    str(prov.matvecs),
                    f"{time.perf_counter() - start:.2f}",
                    f"{abs(est.value - exact_trace) / abs(exact_trace):.1%} (stderr {est.stderr / abs(exact_trace):.1%})",
                ]
            )
        for name in ("torchfunc", "pyhessian"):
            backend = get_backend(name)(
                problem, curvkit.Options(density_probes=5, density_steps=50)
            )
            start = time.perf_counter()
            _, prov = density(backend.operator("hessian"), backend.options, 2)
            rows.append(
                [
                    prov.routine,
                    "5 probes × 50 steps",
                    str(prov.matvecs),
                    f"{time.perf_counter() - start:.2f}",
                    "—",
                ]
            )
    return table(rows)


SCALING_WIDTHS = (256, 256)  # P = 85 k: C² P floats = 68 MB, one batch of 64 factors 435 MB


def _classmean_pass(args: tuple[str, int, str]) -> tuple[float, float]:
    backend_name, n, device = args
    torch.manual_seed(0)
    model = mlp(64, SCALING_WIDTHS, 10).to(device=device, dtype=torch.float64)
    data = _loader(n, 64, device)
    with model_guard(model):
        backend = get_backend(backend_name)(Problem(model, data))
        base = _peak(device)  # in a fresh process, before the first pass
        start = time.perf_counter()
        backend.class_deltas()
        return time.perf_counter() - start, _peak(device) - base


def classmean_scaling(device: str) -> str:
    """Issue 6: time and peak memory of the class-mean pass as N grows 12-fold (P = 85 k)."""
    rows = [["backend", "N", "seconds", "peak growth MiB", "N·C·P floats would be MiB"]]
    p = sum(w.numel() for w in mlp(64, SCALING_WIDTHS, 10).parameters())
    for backend_name in ("torchfunc", "backpack", "pyhessian"):
        for n in (600, 1797, 7188):
            seconds, mib = _in_subprocess(_classmean_pass, (backend_name, n, device))
            rows.append(
                [
                    backend_name,
                    str(n),
                    f"{seconds:.2f}",
                    f"{mib:.0f}",
                    f"{n * 10 * p * 8 / 2**20:.0f}",
                ]
            )
    return table(rows)


def classmean_overlap(device: str) -> str:
    """Issue 6: overlap of span{δ_c} with the top-C eigenspaces, and the cost of both routes."""
    rows = [
        [
            "model",
            "overlap G",
            "overlap Hessian",
            "class-mean pass s",
            "Lanczos top-C of G s",
            "Lanczos matvecs",
        ]
    ]
    for name in ("digits MLP", "CNN"):
        model, data = trained(name, device)
        with model_guard(model):
            backend = get_backend("backpack")(Problem(model, data))
            result = classmeans(backend, top_k=10)
            _, prov = top_eigen(backend.operator("ggn"), 10, backend.options, 0)
        rows.append(
            [
                name,
                f"{result.overlap['ggn']:.3f}",
                f"{result.overlap['hessian']:.3f}",
                f"{result.provenance['deltas'].seconds:.2f}",
                f"{prov.seconds:.2f}",
                str(prov.matvecs),
            ]
        )
    return table(rows)


def block_products(device: str) -> str:
    """Issue 7: a layer's Hessian-block product with respect to that layer alone vs a slice of the
    full product (MLP 64-256-256-256-10, P = 150 k, 1797 digits in batches of 512)."""
    torch.manual_seed(0)
    model = mlp(64, (256, 256, 256), 10).to(device=device, dtype=torch.float64)
    data = _loader(1797, 512, device)
    rows = [["backend", "layer", "block size", "block ms", "slice of full ms", "speed-up"]]
    with model_guard(model):
        problem = Problem(model, data)
        for backend_name in ("torchfunc", "backpack", "curvlinops"):
            backend = get_backend(backend_name)(problem)
            for name in ("0.weight", "6.weight"):
                size = problem.params[problem.names.index(name)].numel()
                v = torch.randn(size, dtype=torch.float64, device=device)
                block = backend.operator("hessian", name).matvec
                where = problem.slice_of(name)

                def sliced(v: torch.Tensor, where: slice = where) -> torch.Tensor:
                    embedded = torch.zeros(problem.num_params, dtype=v.dtype, device=v.device)
                    embedded[where] = v
                    return backend.hvp(embedded)[where]

                block_t = median_time(lambda: block(v), repeats=3)
                slice_t = median_time(lambda: sliced(v), repeats=3)
                rows.append(
                    [
                        backend_name,
                        name,
                        str(size),
                        f"{block_t * 1e3:.0f}",
                        f"{slice_t * 1e3:.0f}",
                        f"{slice_t / block_t:.1f}×",
                    ]
                )
    return table(rows)


def block_costs(device: str) -> str:
    """Issue 21: a product with a block of k vectors, per vector, as multiples of a gradient."""
    rows = [["model", "P", "backend (route)", "k = 1", "k = 4", "k = 16", "passes per block"]]
    variants = [
        ("torchfunc", {"products": "forward-over-reverse"}),
        ("torchfunc", {"products": "reverse-over-reverse"}),
        ("torchfunc", {}),
        ("backpack", {}),
        ("pyhessian", {}),
        ("curvlinops", {}),
    ]
    for name, model in models(device).items():
        model = model.to(device)
        data = _loader(600, 128, device)
        with model_guard(model):
            problem = Problem(model, data)
            grad_t = median_time(lambda: _gradient(problem))
            for backend_name, settings in variants:
                options = curvkit.Options(backend={backend_name: settings})
                backend = get_backend(backend_name)(problem, options)
                cells = []
                for k in (1, 4, 16):
                    V = torch.randn(problem.num_params, k, dtype=problem.dtype, device=device)
                    per_vector = median_time(lambda: backend.hvp(V), repeats=3) / k
                    passes = backend.passes
                    backend.hvp(V)
                    cells.append(f"{per_vector / grad_t:.2f}")
                route = settings.get("products", "auto" if backend_name == "torchfunc" else "")
                label = f"{backend_name} ({route})" if route else backend_name
                if backend_name == "torchfunc" and not settings:
                    label += ": " + backend.product_note("hessian").split(": ", 1)[1]
                rows.append(
                    [name, str(problem.num_params), label, *cells, str(backend.passes - passes)]
                )
    return table(rows)


EMBEDDED_RUN = """
import json, time, sys, warnings
warnings.simplefilter("ignore")
import curvkit
from curvkit.config import build, load_config
model, data = build(load_config(None), progress=False)
start = time.perf_counter()
report = curvkit.analyze(model, data, progress=False)
total = time.perf_counter() - start
print(json.dumps({"file": curvkit.__file__, "total": total, "timings": report.timings, "matvecs": report.matvecs,
                  "passes": getattr(report, "data_passes", {}),
                  "top": report.hessian.top_eigenvalues[:3], "trace": report.hessian.trace}))
"""


def _median_run(results: list[dict]) -> dict:
    """The first run's record with the median total and per-quantity seconds of all."""
    first = results[0]
    return {
        **first,
        "total": statistics.median(r["total"] for r in results),
        "timings": {
            q: statistics.median(r["timings"][q] for r in results) for q in first["timings"]
        },
    }


def _embedded_run(path: str | None) -> dict:
    """The run in a subprocess importing curvkit from ``path`` (else the installed one); it
    starts in the temporary folder, as the current folder comes first on sys.path."""
    env = dict(os.environ, PYTHONPATH=path) if path else dict(os.environ)
    out = subprocess.run(
        [sys.executable, "-c", EMBEDDED_RUN],
        env=env,
        cwd=tempfile.gettempdir(),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


EMBEDDED_REPEATS = 3  # runs of each, alternating, medians reported: the machine is shared


def embedded_run(device: str, before: str | None = None) -> str:
    """Issue 21: ``curvkit.analyze`` with every default on the embedded problem, per quantity:
    the named commit (in a temporary worktree) and the working tree, alternating, in one run."""
    with tempfile.TemporaryDirectory() as folder:
        paths: dict[str, str | None] = {}
        tree = Path(folder) / "before"
        if before:
            subprocess.run(["git", "worktree", "add", "-q", str(tree), before], check=True)
            if not (tree / "src").is_dir():  # the flat layout before the move to src/
                (tree / "curvkit" / "adapters").symlink_to(tree / "adapters")
            paths[f"before ({before[:7]})"] = str(tree / "src" if (tree / "src").is_dir() else tree)
        paths["after"] = None
        try:
            results: dict[str, list[dict]] = {run: [] for run in paths}
            for _ in range(EMBEDDED_REPEATS):
                for run, path in paths.items():
                    results[run].append(_embedded_run(path))
        finally:
            if before:
                subprocess.run(["git", "worktree", "remove", "--force", str(tree)], check=True)
    runs = {run: _median_run(rs) for run, rs in results.items()}
    rows = [["run", "quantity", "seconds", "matvecs", "data passes"]]
    for run, result in runs.items():
        for quantity, seconds in result["timings"].items():
            rows.append(
                [
                    run,
                    quantity,
                    f"{seconds:.1f}",
                    str(result["matvecs"].get(quantity, "—")),
                    str(result["passes"].get(quantity, "—")),
                ]
            )
        rows.append([run, "**total**", f"{result['total']:.1f}", "", ""])
    text = table(rows) + f"\nSeconds: medians of {EMBEDDED_REPEATS} runs of each, alternating.\n"
    numbers = "; ".join(
        f"{run}: λ1..3 = {', '.join(f'{v:.10g}' for v in r['top'])}, tr = {r['trace']:.5g}"
        for run, r in runs.items()
    )
    files = "; ".join(f"{run}: {r['file']}" for run, r in runs.items())
    return text + f"\nHessian numbers: {numbers}\n\ncurvkit imported from: {files}\n"


def _counted(batches: list) -> tuple[list, list[int]]:
    """A re-iterable over ``batches`` that counts its passes."""
    count = [0]

    class Counted:
        def __iter__(self):
            count[0] += 1
            return iter(batches)

    return Counted(), count


def top_eigen_peers(device: str) -> str:
    """Issue 21: top-10 Hessian eigenvalues on a 200k-parameter MLP and the digits CNN over all
    1797 digits (float64, 3 batches of 599): curvkit against PyHessian, hessian-eigenthings'
    Lanczos and curvlinops + scipy's eigsh, error against a tight reference (curvkit's Lanczos to
    1e-12 on single vectors)."""
    import scipy.sparse.linalg

    rows = [
        [
            "model",
            "P",
            "routine",
            "products",
            "passes",
            "seconds",
            "time / curvkit",
            "max rel. error",
        ]
    ]
    torch.manual_seed(0)
    cases = {"MLP 64-400-400-10": mlp(64, (400, 400), 10).double(), "digits CNN": digits_cnn()}
    for name, model in cases.items():
        train(model, digits_loader(batch_size=64, shuffle=True), epochs=5, progress=False)
        model = model.to(device)
        batches = _loader(1797, 599, device)  # equal batches: some peers average batch means
        results = {}
        with model_guard(model):
            problem = Problem(model, batches)
            tight = get_backend("torchfunc")(
                problem, curvkit.Options(lanczos_tol=1e-12, lanczos_block=1, lanczos_max_iter=400)
            )
            reference, _ = top_eigen(tight.operator("hessian"), 10, tight.options, 7)
            exact = reference.values.cpu().numpy()

            def ours(**options: float) -> tuple[np.ndarray, int, int]:
                """Passes: the scan (which caches the batches) and the products' passes."""
                backend = get_backend("torchfunc")(
                    Problem(model, batches), curvkit.Options(**options)
                )
                result, prov = top_eigen(backend.operator("hessian"), 10, backend.options, 0)
                return result.values.cpu().numpy(), prov.matvecs, 1 + prov.passes

            def eigenthings(max_iter: int | None = None) -> tuple[np.ndarray, int, int]:
                import hessian_eigenthings as he

                loader, count = _counted(batches)
                loss = he.supervised_loss(torch.nn.functional.cross_entropy)
                op = he.HessianOperator(model, loader, loss)
                result = he.lanczos(op, k=10, max_iter=max_iter, which="LA", seed=0)
                values = np.sort(result.eigenvalues.cpu().numpy())[::-1]
                return values, result.iterations, count[0]

            def scipy_eigsh() -> tuple[np.ndarray, int, int]:
                from curvlinops import HessianLinearOperator

                loader, count = _counted(batches)
                params = [p for p in model.parameters() if p.requires_grad]
                op = HessianLinearOperator(
                    model, torch.nn.CrossEntropyLoss(), params, loader, progressbar=False
                ).to_scipy()
                calls = [0]

                def matvec(v):
                    calls[0] += 1
                    return op @ v

                wrapped = scipy.sparse.linalg.LinearOperator(
                    op.shape, matvec=matvec, dtype=op.dtype
                )
                values = scipy.sparse.linalg.eigsh(
                    wrapped, k=10, which="LA", tol=1e-6, return_eigenvectors=False
                )
                return np.sort(values)[::-1], calls[0], count[0]

            def pyhessian_raw() -> tuple[np.ndarray, int, int]:
                from pyhessian import hessian

                loader, count = _counted(batches)
                engine = hessian(
                    model, torch.nn.CrossEntropyLoss(), dataloader=loader, cuda=device == "cuda"
                )
                values, _ = engine.eigenvalues(top_n=10)
                return np.sort(values)[::-1], count[0], count[0]

            for routine, run in (
                ("curvkit torchfunc (defaults)", ours),
                ("curvkit torchfunc (lanczos_tol 1e-3)", lambda: ours(lanczos_tol=1e-3)),
                (
                    "curvkit torchfunc (lanczos_block 2, lanczos_tol 1e-3)",
                    lambda: ours(lanczos_block=2, lanczos_tol=1e-3),
                ),
                ("hessian-eigenthings lanczos (defaults: 20 steps)", eigenthings),
                ("hessian-eigenthings lanczos (25 steps)", lambda: eigenthings(25)),
                ("hessian-eigenthings lanczos (30 steps)", lambda: eigenthings(30)),
                ("hessian-eigenthings lanczos (40 steps)", lambda: eigenthings(40)),
                ("curvlinops + scipy eigsh (tol 1e-6)", scipy_eigsh),
                ("PyHessian eigenvalues (defaults)", pyhessian_raw),
            ):
                start = time.perf_counter()
                values, products, passes = run()
                seconds = time.perf_counter() - start
                results[routine] = seconds
                error = np.abs(values - exact).max() / np.abs(exact).max()
                rows.append(
                    [
                        name,
                        str(problem.num_params),
                        routine,
                        str(products),
                        str(passes),
                        f"{seconds:.2f}",
                        f"{seconds / results['curvkit torchfunc (defaults)']:.2f}",
                        f"{error:.1e}",
                    ]
                )
    return table(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--only", help="run only the sections whose function name contains this")
    parser.add_argument("--before", help="embedded_run: also run this commit, side by side")
    args = parser.parse_args()
    sections = [
        (
            "Products: HVP and G–vector product as multiples of a gradient (600 digits, batches of 128, float64)",
            products,
        ),
        (
            "Per-example per-class factors δ_{i,c'}: one full pass (600 digits, batches of 128, float64)",
            factors,
        ),
        (
            "Eigenvalues, trace and density routines on the trained digits MLP (600 digits)",
            eigen_routines,
        ),
        (
            "Class-mean pass: time and peak memory against N (MLP 64-256-256-10, P = 85 k, batches of 64, fresh process each)",
            classmean_scaling,
        ),
        ("Class-mean span vs top-C eigenspaces (trained models, 600 digits)", classmean_overlap),
        (
            "Layer-block Hessian products: native (one parameter) vs slice of the full product",
            block_products,
        ),
        (
            "Products with a block of k vectors: seconds per vector / seconds per gradient (600 digits, batches of 128, float64)",
            block_costs,
        ),
        ("The embedded default run (curvkit.analyze, every quantity), per quantity", embedded_run),
        (
            "Top-10 Hessian eigenvalues against the peer libraries (1797 digits, float64)",
            top_eigen_peers,
        ),
    ]
    lines = [
        f"# Backends side by side ({args.device}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads)\n",
        f"Command: `python {' '.join(sys.argv)}`\n",
    ]
    for title, fn in sections:
        if args.only and args.only not in fn.__name__:
            continue
        print(f"== {title}", flush=True)
        text = fn(args.device, args.before) if fn is embedded_run else fn(args.device)
        print(text, flush=True)
        lines += [f"## {title}\n", text]
    RESULTS.mkdir(exist_ok=True)
    suffix = f"_{args.only}" if args.only else ""
    out = RESULTS / f"backends_{args.device}{suffix}.md"
    out.write_text("\n".join(lines))
    print(f"written {out}")


if __name__ == "__main__":
    main()
