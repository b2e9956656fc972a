"""Benchmark the installed backends on one model, quantity by quantity, and pick the fastest
correct one per quantity.

For every backend and quantity: one warm-up run, then ``repeats`` timed runs of
``analyze(model, data, backend, [quantity])``; reported are the median wall time, the peak memory
of one run (CPU: growth of the resident set, sampled every 2 ms; CUDA:
``torch.cuda.max_memory_allocated`` above the start), the matrix–vector products, and the error
against a reference. The reference is torch.func with Lanczos to 1e-10; when P is small enough
(``DENSE_LIMIT`` parameters) its eigenvalues and traces of the Hessian, G and H are replaced by
dense ones (``torch.linalg.eigvalsh``). A backend agrees when every number passes
``curvkit.compare``'s tolerances against that reference; the choice per quantity is the fastest
backend that agrees.
"""

from __future__ import annotations

import ctypes
import gc
import math
import os
import statistics
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from curvkit.analysis import analyze, check_arguments
from curvkit.backend import MATRICES
from curvkit.choice import save_choice
from curvkit.comparison import compare_reports
from curvkit.errors import CurvkitError, UnsupportedError
from curvkit.linalg import Options
from curvkit.linalg.operator import integer
from curvkit.problem import (
    Problem,
    callers_contexts_lifted,
    differentiable_kernels,
    model_guard,
)
from curvkit.registry import backend_list, get_backend
from curvkit.report import Report, write_atomically, yaml_text

DENSE_LIMIT = 4000  # parameters; eigvalsh of a 4000 × 4000 matrix takes seconds


@dataclass
class BenchRow:
    """One backend on one quantity."""

    backend: str
    quantity: str
    status: str  # "ok", or why the backend could not compute the quantity
    seconds: float = math.nan  # median of the repeats
    runs: list[float] = field(default_factory=list)
    peak_mib: float = math.nan
    matvecs: int = 0
    max_relative_error: float = math.nan  # iterative numbers, relative to their scale (λ1, ...)
    worst_ratio: float = math.nan  # error / allowed over every number: ≤ 1 agrees
    agrees: bool = False


@dataclass
class BenchResult:
    rows: list[BenchRow]
    reference: str
    device: str
    fingerprint: str
    description: str
    choices: dict[str, str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_markdown(self) -> str:
        lines = [
            f"# curvkit bench: {self.description}",
            "",
            f"Reference: {self.reference}. Seconds: median of the repeats after a warm-up. "
            "Error: the largest deviation of an eigenvalue-type number relative to its scale "
            "(λ1 of the spectrum); agrees: every number within curvkit.comparison's tolerances.",
            "",
            "| quantity | backend | seconds | peak MiB | matvecs | max rel. error | "
            "error / allowed | agrees | chosen |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in self.rows:
            if r.status != "ok":
                lines.append(f"| {r.quantity} | {r.backend} | — | — | — | — | — | {r.status} | |")
                continue
            chosen = "✓" if self.choices.get(r.quantity) == r.backend else ""
            lines.append(
                f"| {r.quantity} | {r.backend} | {r.seconds:.3g} | {r.peak_mib:.0f} | "
                f"{r.matvecs} | {r.max_relative_error:.1e} | {r.worst_ratio:.2g} | "
                f"{'yes' if r.agrees else 'NO'} | {chosen} |"
            )
        return "\n".join(lines) + "\n"

    def __str__(self) -> str:
        return self.to_markdown()

    def save(self, folder: str | os.PathLike) -> list[Path]:
        """Write ``bench.yaml`` and ``bench.md`` into ``folder``."""
        folder = Path(folder)
        paths = [folder / "bench.yaml", folder / "bench.md"]
        write_atomically(paths[0], yaml_text(_plain(self.to_dict())))
        write_atomically(paths[1], self.to_markdown())
        return paths

    def save_choice(self, path: str | os.PathLike | None = None) -> Path:
        """Store the per-quantity choice for this model's fingerprint (see curvkit.choice)."""
        if not self.choices:
            raise CurvkitError("no backend agreed with the reference on any quantity; no choice.")
        seconds: dict[str, dict[str, float]] = {}
        for r in self.rows:
            if r.status == "ok":
                seconds.setdefault(r.quantity, {})[r.backend] = r.seconds
        return save_choice(self.fingerprint, self.description, self.choices, seconds, path)


def bench(
    model: nn.Module,
    data: Iterable,
    backends: Sequence[str] | None = None,
    quantities: Sequence[str] | None = None,
    repeats: int = 3,
    top_k: int | None = None,
    seed: int = 0,
    options: Mapping[str, Any] | Options | None = None,
    progress: bool = False,
) -> BenchResult:
    """Time every backend on every quantity against one reference (see the module docstring)."""
    names = backend_list(backends)
    repeats = integer("repeats", repeats, 1)
    # checked before the reference runs (a bad option would fail every row, one by one)
    wanted, top_k, seed, options = check_arguments(None, quantities, top_k, seed, options)
    common = {"top_k": top_k, "seed": seed, "progress": progress}
    reference, label = _reference(model, data, wanted, common)
    problem = Problem(model, data)
    device = problem.device
    rows = []
    for quantity in wanted:
        for name in names:
            rows.append(
                _measure(model, data, name, quantity, repeats, common, options, reference, device)
            )
    choices = {}
    for quantity in wanted:
        agreeing = [r for r in rows if r.quantity == quantity and r.agrees]
        if agreeing:
            choices[quantity] = min(agreeing, key=lambda r: r.seconds).backend
    description = (
        f"{type(model).__name__}, P = {problem.num_params}, N = {problem.num_samples}, "
        f"{str(problem.dtype).removeprefix('torch.')}, {device}"
    )
    return BenchResult(rows, label, str(device), problem.fingerprint(), description, choices)


def _reference(
    model: nn.Module, data: Iterable, quantities: list[str], common: dict[str, Any]
) -> tuple[dict[str, Any], str]:
    """torch.func with Lanczos to 1e-10, with dense eigenvalues and traces when P is small."""
    try:
        report = analyze(
            model, data, "torchfunc", quantities, options={"lanczos_tol": 1e-10}, **common
        ).to_dict()
        matrices = [q for q in quantities if q in MATRICES]
        if not matrices or report["model"]["num_params"] > DENSE_LIMIT:
            return report, "torch.func, Lanczos to 1e-10"
        with model_guard(model), differentiable_kernels(), callers_contexts_lifted():
            engine = get_backend("torchfunc")(Problem(model, data))
            hessian = engine.dense_hessian() if {"hessian", "residual"} & set(matrices) else None
            ggn = engine.dense_ggn() if {"ggn", "residual"} & set(matrices) else None
    except UnsupportedError as error:
        raise UnsupportedError(
            f"bench holds every backend to torch.func's numbers, but {str(error).rstrip('.')}; "
            "check the backends against each other with curvkit.compare instead."
        ) from error
    dense = {"hessian": hessian, "ggn": ggn}
    if "residual" in matrices:
        dense["residual"] = hessian - ggn
    for matrix in matrices:
        k = len(report[matrix]["top_eigenvalues"])
        values = torch.linalg.eigvalsh(dense[matrix]).flip(0)[:k]
        report[matrix]["top_eigenvalues"] = values.tolist()
        report[matrix]["trace"] = float(torch.trace(dense[matrix]))
        report[matrix]["trace_stderr"] = 0.0
    return report, "dense torch.func eigenvalues and traces; torch.func with Lanczos to 1e-10 else"


def _measure(
    model: nn.Module,
    data: Iterable,
    backend: str,
    quantity: str,
    repeats: int,
    common: dict[str, Any],
    options: Mapping[str, Any] | Options | None,
    reference: dict[str, Any],
    device: torch.device,
) -> BenchRow:
    def run() -> Report:
        return analyze(model, data, backend, [quantity], options=options, **common)

    try:
        report = run()  # warm-up, and the numbers that are checked
    except CurvkitError as error:
        return BenchRow(backend, quantity, status=str(error))
    checks = compare_reports({quantity: reference[quantity]}, report.to_dict(), backend)
    iterative = [c.relative_error for c in checks if c.kind == "iterative"]
    with peak_memory(device) as peak:
        start = time.perf_counter()
        run()
        runs = [time.perf_counter() - start]
    for _ in range(repeats - 1):
        start = time.perf_counter()
        run()
        runs.append(time.perf_counter() - start)
    return BenchRow(
        backend,
        quantity,
        status="ok",
        seconds=statistics.median(runs),
        runs=runs,
        peak_mib=peak["mib"],
        matvecs=report.matvecs.get(quantity, _provenance_matvecs(report, quantity)),
        max_relative_error=max(iterative, default=0.0),
        worst_ratio=max((c.ratio for c in checks), default=0.0),
        agrees=all(c.passed for c in checks),
    )


def _provenance_matvecs(report: Report, quantity: str) -> int:
    """Matvecs recorded in the provenance of a class-mean or layerwise result."""
    result = getattr(report, quantity)
    records = result.provenance.values() if hasattr(result, "provenance") else []
    if isinstance(result, dict):  # layerwise: {layer: Layer}
        records = [p for layer in result.values() for p in layer.provenance.values()]
    return sum(p.matvecs for p in records)


@contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, float]]:
    """Peak memory above the start of the block, in MiB, in ``result["mib"]`` afterwards.

    CUDA: ``max_memory_allocated``. CPU: the resident set size sampled every 2 ms from
    /proc/self/statm (Linux), after glibc's ``malloc_trim`` has returned freed memory to the
    system (else memory freed by an earlier run would be reused unseen); elsewhere NaN.
    """
    result = {"mib": math.nan}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield result
        torch.cuda.synchronize(device)
        result["mib"] = (torch.cuda.max_memory_allocated(device) - start) / 2**20
        return
    statm = Path("/proc/self/statm")
    if not statm.exists():
        yield result
        return
    page = os.sysconf("SC_PAGE_SIZE")
    gc.collect()
    with suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)

    def rss() -> int:
        return int(statm.read_text().split()[1]) * page

    start, peak, done = rss(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            done.wait(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield result
    finally:
        done.set()
        sampler.join()
        result["mib"] = max(peak[0], rss()) / 2**20 - start / 2**20


def _plain(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value
