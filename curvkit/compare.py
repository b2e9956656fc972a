"""Cross-backend agreement: run several backends on one model and compare every reported number.

Each number of a backend's report is checked against the reference backend's (the first one) by
its kind, because the backends compute different kinds of numbers in different ways:

- ``iterative`` (eigenvalues, Gram entries, class-mean spectra, Kronecker eigenvalues): every
  backend converges to the same value, to its solver's tolerance. Passes when
  ``|a − b| ≤ rtol·|b| + atol·scale``, scale the largest magnitude in the same list (λ1 for a
  spectrum): Lanczos-type errors are absolute, about tol·‖A‖, so tiny eigenvalues are compared
  on the scale of the largest. Defaults rtol 1e-3, atol 1e-4: PyHessian's power iteration
  (Rayleigh-quotient stopping rule) is the loosest routine, measured at ≤ 2e-6 relative here.
- ``stochastic`` (anything with a ``*_stderr`` beside it: traces): libraries draw different
  probes, so the estimates agree only within their error bars. Passes when
  ``|a − b| ≤ sigmas·sqrt(σ_a² + σ_b²)`` plus rounding (1e-8·|b|); default 4 standard errors.
- ``subspace`` (overlaps, rank-one ratios, spectrum distances in [0, 1]): they depend on
  eigenvectors, which are ill-conditioned when eigenvalues nearly coincide; compared with the
  absolute tolerance ``subspace_atol`` (default 0.05).
- ``density``: the 1-Wasserstein distance between the two SLQ densities, on an axis divided by
  the reference's λ1, at most ``density_tol`` (default 0.05); SLQ's probes differ per library.
- ``count`` (sample counts, class counts, parameter counts): equal.

Provenance, timings, matvec counts, versions, configs and the hierarchy's plot coordinates
(eigenvector signs are arbitrary) are not compared.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from curvkit.analysis import analyze
from curvkit.errors import CurvkitError, InvalidInputError, UnsupportedError
from curvkit.quantities.layerwise import normalised_w1
from curvkit.registry import backends as backend_table
from curvkit.report import QUANTITIES, Report

NOT_COMPARED = {
    "provenance",
    "timings",
    "matvecs",
    "backend",
    "config",
    "versions",
    "coordinates",
    "converged",
    "fingerprint",
    "dtype",
    "device",
    "mode",
}
SUBSPACE = {"overlap", "rank1", "spectrum_distance"}
COUNTS = {"counts", "num_params", "num_classes", "num_samples", "excluded_classes", "shape"}


@dataclass
class Check:
    """One number of one backend against the reference."""

    path: str
    backend: str
    kind: str
    value: float
    expected: float
    error: float
    allowed: float

    @property
    def passed(self) -> bool:
        return self.error <= self.allowed or (math.isnan(self.value) and math.isnan(self.expected))

    @property
    def ratio(self) -> float:
        """error / allowed: above 1 is a disagreement."""
        if self.passed:
            return self.error / self.allowed if self.allowed > 0 else 0.0
        return (
            math.inf if self.allowed == 0 or math.isnan(self.error) else self.error / self.allowed
        )


@dataclass
class Comparison:
    """The checks of every backend against ``reference``, and what some backends could not do."""

    reference: str
    reports: dict[str, Report]
    checks: list[Check]
    skipped: dict[str, dict[str, str]] = field(default_factory=dict)  # backend -> quantity -> why

    @property
    def agree(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def worst(self, n: int = 10) -> list[Check]:
        return sorted(self.checks, key=lambda c: c.ratio, reverse=True)[:n]

    def __str__(self) -> str:
        verdict = "agree" if self.agree else f"DISAGREE ({len(self.failures)} numbers)"
        others = [b for b in self.reports if b != self.reference]
        lines = [
            f"{', '.join(others)} against {self.reference}: {len(self.checks)} numbers, {verdict}",
            "worst: error / allowed, kind, number, value vs reference",
        ]
        for c in self.worst():
            lines.append(
                f"  {c.ratio:9.3g}  {c.kind:10s} {c.backend}:{c.path}  "
                f"{c.value:.6g} vs {c.expected:.6g}"
            )
        for name, reasons in self.skipped.items():
            for quantity, why in reasons.items():
                lines.append(f"  skipped {name}:{quantity}: {why}")
        return "\n".join(lines)


def compare(
    model: nn.Module,
    data: Iterable,
    backends: Sequence[str] | None = None,
    quantities: Sequence[str] | None = None,
    *,
    rtol: float = 1e-3,
    atol: float = 1e-4,
    sigmas: float = 4.0,
    subspace_atol: float = 0.05,
    density_tol: float = 0.05,
    top_k: int | None = None,
    seed: int = 0,
    options: Mapping[str, Any] | None = None,
    progress: bool = False,
) -> Comparison:
    """Run ``backends`` (default: all installed) with the same seed and options and check every
    number against the reference: torchfunc when it is among them, else the first (tolerances in
    the module docstring).

    A backend that cannot compute a quantity for this model is listed in ``skipped`` with the
    reason, not compared, and not an error.
    """
    names = list(backends) if backends is not None else _installed()
    if "torchfunc" in names:  # the reference backend goes first
        names.insert(0, names.pop(names.index("torchfunc")))
    if len(names) < 2:
        raise InvalidInputError(
            f"compare needs at least two backends, got {names}; installed: {_installed()}."
        )
    wanted = list(quantities) if quantities is not None else list(QUANTITIES)
    reports: dict[str, Report] = {}
    skipped: dict[str, dict[str, str]] = {}
    for name in names:
        reports[name], reasons = _analyze_what_it_can(
            model, data, name, wanted, top_k, seed, options, progress
        )
        if reasons:
            skipped[name] = reasons
    reference = names[0]
    tolerances = _Tolerances(rtol, atol, sigmas, subspace_atol, density_tol)
    expected = reports[reference].to_dict()
    checks = [
        check
        for name in names[1:]
        for check in _compare_trees(expected, reports[name].to_dict(), name, tolerances)
    ]
    return Comparison(reference, reports, checks, skipped)


def assert_backends_agree(
    model: nn.Module, data: Iterable, backends: Sequence[str] | None = None, **kwargs: Any
) -> Comparison:
    """``compare`` for a user's own test suite: raises AssertionError listing the disagreements."""
    comparison = compare(model, data, backends, **kwargs)
    if not comparison.agree:
        raise AssertionError(str(comparison))
    return comparison


# -- running ------------------------------------------------------------------------------------
def _installed() -> list[str]:
    return [name for name, row in backend_table().items() if row["installed"]]


def _analyze_what_it_can(
    model: nn.Module,
    data: Iterable,
    backend: str,
    quantities: list[str],
    top_k: int | None,
    seed: int,
    options: Mapping[str, Any] | None,
    progress: bool,
) -> tuple[Report, dict[str, str]]:
    """All quantities in one run; if the backend cannot do one, each on its own, noting why."""
    kwargs = {"top_k": top_k, "seed": seed, "options": options, "progress": progress}
    try:
        return analyze(model, data, backend=backend, quantities=quantities, **kwargs), {}
    except UnsupportedError:
        pass
    report, reasons = None, {}
    for quantity in quantities:
        try:
            part = analyze(model, data, backend=backend, quantities=[quantity], **kwargs)
        except UnsupportedError as error:
            reasons[quantity] = str(error)
            continue
        if report is None:
            report = part
        else:
            setattr(report, quantity, getattr(part, quantity))
    if report is None:
        raise CurvkitError(f"backend {backend!r} could compute none of {quantities}: {reasons}")
    return report, reasons


# -- comparing ----------------------------------------------------------------------------------
@dataclass
class _Tolerances:
    rtol: float
    atol: float
    sigmas: float
    subspace_atol: float
    density_tol: float


def _compare_trees(
    expected: dict[str, Any], actual: dict[str, Any], backend: str, tol: _Tolerances
) -> Iterator[Check]:
    for key, want in expected.items():
        if key in NOT_COMPARED or key.endswith("_stderr") or key not in actual:
            continue  # a quantity the other backend skipped has no key
        got = actual[key]
        if key == "density":
            yield _density_check(want, got, key, backend, expected, tol)
        elif isinstance(want, dict):
            for check in _compare_trees(want, got, backend, tol):
                check.path = f"{key}.{check.path}"
                yield check
        else:
            errors = (expected.get(f"{key}_stderr"), actual.get(f"{key}_stderr"))
            yield from _leaf_checks(key, want, got, backend, errors, tol)


def _leaf_checks(
    key: str, want: Any, got: Any, backend: str, errors: tuple[Any, Any], tol: _Tolerances
) -> Iterator[Check]:
    flat_want, flat_got = list(_flatten(want)), list(_flatten(got))
    if len(flat_want) != len(flat_got):
        yield Check(key, backend, "count", len(flat_got), len(flat_want), math.inf, 0.0)
        return
    scale = max((abs(v) for v in flat_want), default=0.0)
    stderr_want, stderr_got = (list(_flatten(e)) if e is not None else None for e in errors)
    for i, (a, b) in enumerate(zip(flat_got, flat_want)):
        path = key if len(flat_want) == 1 else f"{key}[{i}]"
        error = abs(a - b)
        if key in COUNTS:
            kind, allowed = "count", 0.0
        elif key in SUBSPACE:
            kind, allowed = "subspace", tol.subspace_atol
        elif stderr_want is not None or stderr_got is not None:
            s_want = stderr_want[i] if stderr_want else 0.0
            s_got = stderr_got[i] if stderr_got else 0.0
            kind = "stochastic"
            allowed = tol.sigmas * math.hypot(s_want, s_got) + 1e-8 * abs(b)
        else:
            kind, allowed = "iterative", tol.rtol * abs(b) + tol.atol * scale
        yield Check(path, backend, kind, float(a), float(b), float(error), float(allowed))


def _flatten(value: Any) -> Iterator[float]:
    if isinstance(value, (list, tuple)):
        for item in value:
            yield from _flatten(item)
    elif isinstance(value, dict):  # e.g. classmeans trace_stderr {total, own, ...}
        for item in value.values():
            yield from _flatten(item)
    elif value is None:
        yield math.nan
    else:
        yield float(value)


def _density_check(
    want: dict[str, Any],
    got: dict[str, Any],
    key: str,
    backend: str,
    spectrum: dict[str, Any],
    tol: _Tolerances,
) -> Check:
    scale = max((abs(v) for v in spectrum.get("top_eigenvalues", [])), default=1.0) or 1.0

    def tensors(d: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        return (
            torch.tensor(d["grid"], dtype=torch.float64),
            torch.tensor(d["values"], dtype=torch.float64),
        )

    distance = normalised_w1(*tensors(got), scale, *tensors(want), scale)
    return Check(key, backend, "density", distance, 0.0, distance, tol.density_tol)
