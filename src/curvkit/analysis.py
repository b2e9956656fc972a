"""``analyze``: one call from a model and its data to a Report, through any backend."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from curvkit import __version__
from curvkit.backend import MATRICES, Backend
from curvkit.choice import AUTO_ORDER, choice_path, saved_choice
from curvkit.distributed import (
    Group,
    all_gather_objects,
    check_usable,
    checked_on_every_rank,
    current_group,
    rank,
    same_on_every_rank,
    stop_all_on_failure,
)
from curvkit.errors import (
    CurvkitError,
    InvalidInputError,
    MissingDependencyError,
    UnsupportedError,
    first_line,
    memory_text,
    shown,
    warn,
)
from curvkit.layers import kronecker_layers
from curvkit.linalg import Options
from curvkit.linalg.operator import flag, integer, least_vectors, trace
from curvkit.loss import make_loss
from curvkit.problem import (
    DEFAULT_CACHE_MB,
    Problem,
    callers_contexts_lifted,
    differentiable_kernels,
    fingerprint,
    model_guard,
    random_state_kept,
)
from curvkit.progress import computing, log
from curvkit.quantities.classmeans import classmeans
from curvkit.quantities.layerwise import layerwise
from curvkit.quantities.spectrum import spectrum
from curvkit.registry import backend_names, backends, get_backend
from curvkit.report import QUANTITIES, ModelInfo, Report


def options_mapping(options: Mapping[str, Any] | Options | None) -> Mapping[str, Any] | None:
    """``options`` as given, or the fields of an ``Options`` (all but progress) as a dict."""
    if not isinstance(options, Options):
        return options
    return {
        f.name: getattr(options, f.name)
        for f in dataclasses.fields(Options)
        if f.name != "progress"
    }


def make_options(
    options: Mapping[str, Any] | None, progress: bool, quantity: str | None = None
) -> Options:
    """Options from a mapping, with the overrides under ``options[quantity]`` applied; unknown
    keys are rejected with the list of known ones."""
    if options is not None and not isinstance(options, Mapping):
        raise InvalidInputError(
            f"options must map option names to values, e.g. {{'trace_matvecs': 99}}, got "
            f"{shown(options)}."
        )
    options = dict(options or {})
    known = {f.name for f in dataclasses.fields(Options)} - {"progress"}
    unknown = sorted(str(k) for k in set(options) - known - set(QUANTITIES))
    for name in QUANTITIES:
        if name in options and not isinstance(options[name], Mapping):
            raise InvalidInputError(f"option {name!r} must map option names to values.")
        unknown += sorted(f"{name}.{key}" for key in set(options.get(name, {})) - known)
    if unknown:
        listed = ", ".join(k if len(k) <= 40 else shown(k) for k in unknown[:5])
        raise InvalidInputError(
            f"unknown option(s) {listed}; the options are {', '.join(sorted(known))}, "
            f"each also settable for one quantity under its name ({', '.join(QUANTITIES)})."
        )
    merged = {k: v for k, v in options.items() if k in known}
    if quantity is not None:
        merged.update(options.get(quantity, {}))
    made = Options(**merged, progress=progress)
    strangers = [shown(n) for n in made.backend if n not in backend_names()]
    if strangers:
        raise InvalidInputError(
            f"option 'backend' has settings for unknown backend(s) {', '.join(strangers[:5])}; "
            f"the registered backends are {', '.join(backend_names())}."
        )
    for name in made.backend:  # every installed backend's settings, used now or not
        try:
            get_backend(name).settings(made)
        except MissingDependencyError:  # its settings are checked once it is installed
            continue
    return made


def default_top_k(num_classes: int, num_params: int) -> int:
    """2C: enough to see Papyan's C outliers of G and the start of the bulk."""
    return min(num_params, max(10, 2 * num_classes))


def check_arguments(
    backend: str | None,
    quantities: Sequence[str] | str | None,
    top_k: int | None,
    seed: int,
    options: Mapping[str, Any] | Options | None,
    loss: str = "cross_entropy",
) -> tuple[list[str], int | None, int, Mapping[str, Any] | None]:
    """The arguments of ``analyze`` that need no model, checked (the command line checks them
    before it trains): the quantities' names (once each), top_k, seed, the loss, the options
    and the backend (``None``: any)."""
    if isinstance(quantities, str):  # one name
        quantities = [quantities]
    names = list(dict.fromkeys(QUANTITIES if quantities is None else quantities))
    unknown = [q for q in names if q not in QUANTITIES]
    if unknown or not names:
        raise InvalidInputError(
            f"unknown quantities {shown(unknown)}; choose from {', '.join(QUANTITIES)}."
            if unknown
            else f"quantities is empty; choose from {', '.join(QUANTITIES)} or pass None for all."
        )
    if top_k is not None:
        top_k = integer("top_k", top_k, 1)
    seed = integer("seed", seed, 0, 2**63 - 1)  # torch's generators take a signed 64-bit seed
    make_loss(loss)
    options = options_mapping(options)
    for quantity in [None, *QUANTITIES]:  # also the sections of quantities not asked for
        make_options(options, False, quantity)
    if backend not in (None, "auto"):
        get_backend(backend)
    return names, top_k, seed, options


@contextlib.contextmanager
def library_failures_said(backend: str, quantity: str) -> Iterator[None]:
    """A wrapped library's (or torch's) own exception while computing ``quantity`` as an
    UnsupportedError that names the backend and quotes it, the original chained: a model
    feature no check foresaw (a forward that registers a tensor of torch.func's transform as a
    buffer broke curvlinops' next product with torch's internal assert) gets one sentence
    and the advice of other backends, not a library's traceback. Memory errors and curvkit's
    own errors pass as they are."""
    try:
        yield
    except (CurvkitError, MemoryError):
        raise
    except Exception as error:  # noqa: BLE001 (any library failure, said in one sentence)
        raise UnsupportedError(
            f"backend {backend!r} failed while computing {quantity} on this model "
            f"({type(error).__name__}: {first_line(error).rstrip('.') or 'no message'})."
        ) from error


@differentiable_kernels()
@callers_contexts_lifted()
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
    options: Mapping[str, Any] | Options | None = None,
    skip_unsupported: bool = False,
    choice_file: str | os.PathLike | None = None,
    process_group: Group = None,
    cache_mb: float = DEFAULT_CACHE_MB,
) -> Report:
    """Measure the curvature of ``model``'s loss on ``data`` with one backend.

    ``data`` is any re-iterable of ``(inputs, labels)`` batches; the loss is the mean over
    examples. ``quantities`` (default: all) are among ``hessian``, ``ggn``, ``residual`` (= Hess − G),
    ``classmeans`` and ``layerwise``; ``top_k`` eigenvalues are reported per spectrum (default 2C). The model runs
    in eval mode and comes back exactly as it was. Stochastic estimates are seeded by ``seed``.
    With ``skip_unsupported``, a quantity the backend cannot compute for this model is left out
    and the reason recorded in ``report.skipped`` instead of raising UnsupportedError.
    ``backend="auto"`` uses the per-quantity choice that ``curvkit bench --save-choice`` stored
    for this model (in ``choice_file``, see curvkit.choice), else the first installed backend of
    ``curvkit.choice.AUTO_ORDER`` that can compute each quantity; it warns which it used.
    Under torch.distributed (an initialised process group with several ranks, or
    ``process_group``) each rank passes its shard of the data (see curvkit.distributed) and every
    rank gets the whole data set's report; progress bars show on rank 0 only.
    The loader is read once and its batches kept on the model's device when they fit in
    ``cache_mb`` MiB (see Problem; 0 reads it on every pass).

    >>> report = curvkit.analyze(model, loader, backend="torchfunc")  # doctest: +SKIP
    >>> report.hessian.top_eigenvalues[:3]                           # doctest: +SKIP
    """
    group = current_group(process_group)
    check_usable(group)
    with checked_on_every_rank(group):  # a rank's bad argument stops every rank
        names, top_k, seed, options = check_arguments(
            backend, quantities, top_k, seed, options, loss
        )
        progress = flag("progress", progress)
        skip_unsupported = flag("skip_unsupported", skip_unsupported)
        if choice_file is not None and not isinstance(choice_file, (str, os.PathLike)):
            raise InvalidInputError(f"choice_file must be a path, got {shown(choice_file)}.")
    if isinstance(params, Iterator):  # a generator, read once
        params = list(params)
    selection = params  # compared as a set of names: the selection takes the model's order
    if params is not None and not isinstance(params, str) and isinstance(params, Iterable):
        selection = sorted(params, key=str)
    # the ranks' products are summed: every rank must compute the same thing
    same_on_every_rank(
        "analyze",
        {"backend": backend, "quantities": names, "top_k": top_k, "seed": seed, "loss": loss,
         "params": selection, "options": options, "skip_unsupported": skip_unsupported},
        group,
    )  # fmt: skip
    progress = progress and rank(group) == 0
    settings = {
        "top_k": top_k,
        "seed": seed,
        "progress": progress,
        "loss": loss,
        "params": params,
        "options": options,
        "process_group": process_group,
        "cache_mb": cache_mb,
    }
    if backend == "auto":
        return _analyze_auto(model, data, names, settings, skip_unsupported, choice_file)
    backend_cls = get_backend(backend)
    opts = make_options(options, progress)
    per_quantity = {name: make_options(options, progress, name) for name in names}
    with model_guard(model), random_state_kept(model):
        problem = Problem(model, data, loss=loss, params=params, group=group, cache_mb=cache_mb)
        k = top_k if top_k is not None else default_top_k(problem.num_classes, problem.num_params)
        if not 1 <= k <= problem.num_params:
            raise InvalidInputError(
                f"top_k={k} but the model has {problem.num_params} parameters; choose "
                f"1 ≤ top_k ≤ {problem.num_params}."
            )
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
                "quantity_options": {
                    q: dict(options[q]) for q in QUANTITIES if q in (options or {})
                },
            },
            versions={
                "curvkit": __version__,
                "torch": torch.__version__,
                backend: backend_cls.version(),
            },
        )
        try:
            engine = backend_cls(problem, opts)
        except UnsupportedError as error:
            if not skip_unsupported:
                raise
            report.skipped = dict.fromkeys(names, str(error))
            return report
        for name in names:  # every request checked before anything is computed
            engine.configure(per_quantity[name])
            # every rank's answer (memory differs between machines): refused if any refuses
            # first what no backend can do (the same on every rank: the smallest budget decides)
            reason = memory_shortfall(engine, name, k)
            if not reason:
                reasons = all_gather_objects(engine.refusal(name), problem.group)
                reason = next((r for r in reasons if r), None)
                if reason:
                    reason = f"{reason}; {advice(problem, name, backend, per_quantity[name])}"
            if reason:
                error = UnsupportedError(f"{reason}.")
                if not skip_unsupported:
                    raise error
                report.skipped[name] = str(error)
        todo = [n for n in names if n not in report.skipped]
        log(
            f"{backend} on {problem.num_samples} examples, P = {problem.num_params}: "
            f"{', '.join(todo)}",
            progress,
        )
        exact_trace = False  # G's trace from the class-means pass's per-example factors
        if {"ggn", "classmeans"} <= set(todo):
            engine.configure(per_quantity["classmeans"])
            route, _ = engine.class_sums_route()
            exact_trace = all(all_gather_objects(route == "per-example", problem.group))
        with stop_all_on_failure(problem.group):  # no rank waits for a failed one
            for name in todo:
                start, passes = time.perf_counter(), engine.passes
                engine.configure(per_quantity[name])
                try:
                    with computing(name), library_failures_said(backend, name):
                        result = _compute(
                            engine, name, k, seed, report, not (name == "ggn" and exact_trace)
                        )
                except UnsupportedError as error:  # found only while computing
                    advised = f"{str(error).rstrip('.')}; {advice(problem, name, backend, per_quantity[name])}."
                    if not skip_unsupported or problem.group is not None:  # maybe this rank only
                        raise UnsupportedError(advised) from error
                    report.skipped[name] = advised
                    continue
                setattr(report, name, result)
                report.timings[name] = time.perf_counter() - start
                report.data_passes[name] = engine.passes - passes
                if name in MATRICES:
                    report.matvecs[name] = sum(p.matvecs for p in result.provenance.values())
                log(
                    f"{name} done in {report.timings[name]:.1f} s "
                    f"({report.data_passes[name]} passes over the data)",
                    progress,
                )
            if exact_trace and report.ggn is not None:
                engine.configure(per_quantity["ggn"])
                _ggn_trace(engine, report, seed)
    return report


def _compute(
    engine: Backend, name: str, k: int, seed: int, report: Report, estimate_trace: bool = True
) -> Any:
    """One quantity's result (the spectra already in ``report`` are reused)."""
    if name in MATRICES:
        return spectrum(engine, name, k, seed, estimate_trace)
    if name == "classmeans":
        return classmeans(engine, k, seed, spectra=report)
    return layerwise(engine, k, seed, spectra=report)


def _ggn_trace(engine: Backend, report: Report, seed: int) -> None:
    """Fill in tr G, left out of the G spectrum because the class-means pass sums it exactly,
    Σ_i Σ_c' ‖δ_{i,c'}‖² / N, from its per-example factors (no Hutch++ products); estimated
    now when that pass did not run on the per-example route after all."""
    g, means = report.ggn, report.classmeans
    if means is not None and means.trace_stderr["total"] == 0.0:
        g.trace, g.trace_stderr = means.trace["total"], 0.0
        g.provenance["trace"] = dataclasses.replace(
            means.provenance["deltas"], note="exact, Σ‖δ_{i,c'}‖²/N from the class-means pass"
        )
        return
    if not engine.options.trace_matvecs:  # switched off
        return
    estimate, g.provenance["trace"] = trace(engine.operator("ggn"), engine.options, seed + 1)
    g.trace, g.trace_stderr = float(estimate.value), float(estimate.stderr)
    report.matvecs["ggn"] += g.provenance["trace"].matvecs
    report.timings["ggn"] += g.provenance["trace"].seconds


def memory_shortfall(engine: Backend, quantity: str, k: int) -> str | None:
    """Why ``quantity`` cannot run in half the memory budget (None when it can), found before
    anything is computed: the fewest vectors that curvkit's routines hold at once
    (``least_vectors``; a density for the spectra, and for layerwise when asked) of its
    largest operator (a layer's block for layerwise, unless it adds the full Hessian's
    density). Every backend is held to it: the libraries' own iterations hold a similar
    number (curvlinops' ARPACK 2k + 1 in float64)."""
    problem, options = engine.problem, engine.options
    size, density = problem.num_params, quantity in MATRICES
    if quantity == "layerwise":
        density = options.layer_density
        if not density:  # the largest layer's block (none: refused for that, see refusal)
            blocks = [problem.size_of(f"{n}.weight") for n in kronecker_layers(problem)]
            size = max(blocks, default=0)
    least = least_vectors(k, size, options, density)
    need, budget = least * size * problem.dtype.itemsize, engine.memory_budget()
    if budget is None or need <= budget:
        return None
    return (
        f"{quantity} needs at least {memory_text(need)} for curvkit's Krylov routines "
        f"({least} vectors of {size} numbers: Lanczos's basis for the top {min(k, size)} "
        f"beside its Ritz vectors, or one SLQ probe), beyond half the memory budget, "
        f"{memory_text(budget)}; lower top_k or density_steps, or select fewer parameters "
        "with params=[...]"
    )


def advice(problem: Problem, quantity: str, failed: str, options: Options) -> str:
    """Which installed backends can compute ``quantity`` for this problem's model with these
    ``options`` (``class_sums='per-example'`` rules out those without per-example factors),
    from their capabilities, declared limits and own checks (``Backend.refusal``), as advice."""
    able = []
    for name, row in backends().items():
        if name == failed or not row["installed"]:
            continue
        try:
            if get_backend(name)(problem, options).refusal(quantity) is None:
                able.append(name)
        except UnsupportedError:  # e.g. PyHessian under torch.distributed
            continue
    if not able:
        return f"no installed backend can compute {quantity} for this model"
    return f"backend {' or '.join(repr(n) for n in able)} can"


def _analyze_auto(
    model: nn.Module,
    data: Iterable,
    names: list[str],
    settings: dict[str, Any],
    skip_unsupported: bool,
    choice_file: str | os.PathLike | None,
) -> Report:
    """``backend="auto"``: the saved per-quantity choice, else the installed backends in order."""
    installed = [name for name, row in backends().items() if row["installed"]]
    saved = saved_choice(fingerprint(model), choice_file)
    plan = {q: saved[q] for q in names if saved.get(q) in installed}
    report: Report | None = None
    used: dict[str, str] = {}
    for name in dict.fromkeys(plan.values()):  # the saved choices, one run per backend
        group = [q for q in names if plan.get(q) == name]  # a feature the model has gained
        part = analyze(model, data, name, group, **settings, skip_unsupported=True)
        report = _merge(report, part, used)  # since the choice was saved falls through
    for name in [b for b in AUTO_ORDER if b in installed]:  # the rest, in the documented order
        remaining = [q for q in names if q not in used]
        if not remaining:
            break
        part = analyze(model, data, name, remaining, **settings, skip_unsupported=True)
        report = _merge(report, part, used)
    if report is None:
        raise UnsupportedError(f"no installed backend can compute {names} for this model.")
    report.skipped = {q: why for q, why in report.skipped.items() if q not in used}
    if report.skipped and not skip_unsupported:
        raise UnsupportedError(f"no installed backend can compute {sorted(report.skipped)}: "
                               f"{'; '.join(report.skipped.values())}")  # fmt: skip
    where = choice_path(choice_file)
    unusable = {q: b for q, b in saved.items() if q in names and q not in plan}
    refused = {q: b for q, b in plan.items() if used.get(q) != b}
    if refused:
        source = f"the choice saved in {where}, but {shown(refused)} refused this model"
    elif plan:
        source = f"the choice saved in {where}"
    elif unusable:
        source = f"the choice saved in {where} names {shown(unusable)}, not installed here"
    else:
        source = f"no saved choice for this model in {where}"
    if len(plan) < len(names) or refused:
        source += (
            f"; for {'the rest' if plan else 'each quantity'}, the first installed backend of "
            f"{', '.join(AUTO_ORDER)} that can compute it"
        )
    report.backend = used[names[0]] if len(set(used.values())) == 1 else "auto"
    report.config.update(backend="auto", quantities=names, backends=used)
    warn(f"curvkit: backend='auto' used {used} ({source}).")
    return report


def _merge(into: Report | None, part: Report, used: dict[str, str]) -> Report:
    """Add the quantities ``part`` computed to ``into``, noting which backend computed each."""
    done = [q for q in part.config["quantities"] if q not in part.skipped]
    used.update({q: part.backend for q in done})
    if into is None:
        return part
    for q in done:
        setattr(into, q, getattr(part, q))
        into.timings[q] = part.timings[q]
        if q in part.matvecs:
            into.matvecs[q] = part.matvecs[q]
        into.data_passes[q] = part.data_passes[q]
        into.skipped.pop(q, None)
    into.skipped.update({q: why for q, why in part.skipped.items() if q not in used})
    into.versions.update(part.versions)
    return into
