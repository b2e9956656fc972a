"""``analyze``: one call from a model and its data to a Report, through any backend."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from curvkit import __version__
from curvkit.backend import MATRICES, Options
from curvkit.errors import InvalidInputError
from curvkit.problem import Problem, model_guard
from curvkit.quantities.classmeans import classmeans
from curvkit.quantities.layerwise import layerwise
from curvkit.quantities.spectrum import spectrum
from curvkit.registry import get_backend
from curvkit.report import QUANTITIES, ModelInfo, Report


def make_options(options: Mapping[str, Any] | None, progress: bool) -> Options:
    """Options from a mapping, rejecting unknown keys with the list of known ones."""
    options = dict(options or {})
    known = {f.name for f in dataclasses.fields(Options)} - {"progress"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise InvalidInputError(
            f"unknown option(s) {', '.join(unknown)}; the options are {', '.join(sorted(known))}."
        )
    return Options(**options, progress=progress)


def default_top_k(num_classes: int, num_params: int) -> int:
    """2C: enough to see Papyan's C outliers of G and the start of the bulk."""
    return min(num_params, max(10, 2 * num_classes))


def analyze(
    model: nn.Module,
    data: Iterable,
    backend: str = "torchfunc",
    quantities: Sequence[str] | None = None,
    top_k: int | None = None,
    seed: int = 0,
    progress: bool = True,
    loss: str = "cross_entropy",
    params: Sequence[str] | None = None,
    options: Mapping[str, Any] | None = None,
) -> Report:
    """Measure the curvature of ``model``'s loss on ``data`` with one backend.

    ``data`` is any re-iterable of ``(inputs, labels)`` batches; the loss is the mean over
    examples. ``quantities`` (default: all) are among ``hessian``, ``ggn``, ``residual`` (= Hess − G),
    ``classmeans`` and ``layerwise``; ``top_k`` eigenvalues are reported per spectrum (default 2C). The model runs
    in eval mode and comes back exactly as it was. Stochastic estimates are seeded by ``seed``.

    >>> report = curvkit.analyze(model, loader, backend="torchfunc")  # doctest: +SKIP
    >>> report.hessian.top_eigenvalues[:3]                           # doctest: +SKIP
    """
    names = list(QUANTITIES if quantities is None else quantities)
    unknown = [q for q in names if q not in QUANTITIES]
    if unknown or not names:
        raise InvalidInputError(
            f"unknown quantities {unknown}; choose from {', '.join(QUANTITIES)}."
            if unknown
            else f"quantities is empty; choose from {', '.join(QUANTITIES)} or pass None for all."
        )
    backend_cls = get_backend(backend)
    opts = make_options(options, progress)
    with model_guard(model):
        problem = Problem(model, data, loss=loss, params=params)
        k = top_k if top_k is not None else default_top_k(problem.num_classes, problem.num_params)
        if not 1 <= k <= problem.num_params:
            raise InvalidInputError(
                f"top_k={k} but the model has {problem.num_params} parameters; choose "
                f"1 ≤ top_k ≤ {problem.num_params}."
            )
        engine = backend_cls(problem, opts)
        report = Report(
            backend=backend,
            model=ModelInfo(
                num_params=problem.num_params,
                num_classes=problem.num_classes,
                num_samples=problem.num_samples,
                fingerprint=problem.fingerprint(),
                dtype=str(problem.dtype).removeprefix("torch."),
                device=str(problem.device),
                mode="eval",
            ),
            config={
                "backend": backend,
                "quantities": names,
                "top_k": k,
                "seed": seed,
                "loss": loss,
                "params": list(problem.names),
                "options": {f: v for f, v in dataclasses.asdict(opts).items() if f != "progress"},
            },
            versions={
                "curvkit": __version__,
                "torch": torch.__version__,
                backend: backend_cls.version(),
            },
        )
        for name in names:
            start = time.perf_counter()
            if name in MATRICES:
                result = spectrum(engine, name, k, seed)
                report.matvecs[name] = sum(p.matvecs for p in result.provenance.values())
            elif name == "classmeans":
                result = classmeans(engine, k, seed, spectra=report)
            else:
                result = layerwise(engine, k, seed, spectra=report)
            setattr(report, name, result)
            report.timings[name] = time.perf_counter() - start
    return report
