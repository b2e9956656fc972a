"""Cross-backend agreement: run several backends on one model and compare every reported number.

Each number of a backend's report is checked against the reference backend's (the first one) by
its kind, because the backends compute different kinds of numbers in different ways:

- ``iterative`` (eigenvalues, Gram entries, class-mean spectra, Kronecker eigenvalues): every
  backend converges to the same value, to its solver's tolerance. Passes when
  ``|a − b| ≤ rtol·|b| + atol·scale``, scale the largest magnitude in the same list (λ1 for a
  spectrum): Lanczos-type errors are absolute, about tol·‖A‖, so tiny eigenvalues are compared
  on the scale of the largest (for Papyan's spectra of the G terms, the largest of them all:
  a within-class spectrum that is 0 up to rounding is not its own scale). Defaults rtol 1e-3,
  atol 1e-4: PyHessian's power iteration
  (Rayleigh-quotient stopping rule) is the loosest routine, measured at ≤ 2e-6 relative here.
  Papyan's gaps ‖λ − μ‖/‖λ‖ are relative already, so their scale is 1 (a gap of 1e-4 between
  nearly equal spectra moves by the eigenvalues' relative error: 1 % on PyHessian with C = 2).
- ``stochastic`` (anything with a ``*_stderr`` beside it: traces): libraries draw different
  probes, so the estimates agree only within their error bars. Passes when
  ``|a − b| ≤ sigmas·sqrt(σ_a² + σ_b²)`` plus rounding (1e-8·max(|b|, the spectrum's largest
  |λ|, the largest of the numbers beside it): an exact trace of H = Hess − G is 0 up to
  rounding in a ReLU network, a within-class term with one example per class too); default 4
  standard errors.
- ``subspace`` (overlaps, rank-one ratios, spectrum distances in [0, 1]): they depend on
  eigenvectors, which are ill-conditioned when eigenvalues nearly coincide; compared with the
  absolute tolerance ``subspace_atol`` (default 0.02; 5e-4 measured on the digits MLP). A
  rank-one ratio of an eigenvalue at rounding level (1e-10 of the largest: top-k beyond the
  block's rank) is not compared, its eigenvector being any vector of the null space.
- ``density``: the 1-Wasserstein distance between the two SLQ densities, on an axis divided by
  the reference's largest |λ|, at most ``density_tol`` (default 0.02); the libraries draw
  different probes, and five probes of one library differed by ≤ 1e-3 between seeds, two
  libraries by ≤ 2e-3, on the digits MLP.
- ``count`` (sample counts, class counts, parameter counts): equal.

Provenance, timings, matvec and data-pass counts, versions, configs and the hierarchy's plot coordinates
(eigenvector signs are arbitrary) are not compared.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from curvkit.analysis import analyze, check_arguments
from curvkit.backend import MATRICES
from curvkit.errors import InvalidInputError, shown
from curvkit.linalg import Options
from curvkit.linalg.krylov import normalised_w1
from curvkit.linalg.operator import flag
from curvkit.registry import backend_list, installed_backends
from curvkit.report import Report

NOT_COMPARED = {
    "provenance",
    "timings",
    "matvecs",
    "data_passes",
    "backend",
    "config",
    "skipped",
    "versions",
    "coordinates",
    "converged",
    "fingerprint",
    "dtype",
    "device",
    "mode",
}
DEFAULT_TOLERANCES = {
    "rtol": 1e-3,
    "atol": 1e-4,
    "sigmas": 4.0,
    "subspace_atol": 0.02,
    "density_tol": 0.02,
}
QUICK_TOP_K = 5
QUICK_OPTIONS = {"trace_matvecs": 30, "density_probes": 2, "density_steps": 20}
QUICK_SETTINGS = (
    f"top-k {QUICK_TOP_K}, {QUICK_OPTIONS['trace_matvecs']} trace products, SLQ "
    f"{QUICK_OPTIONS['density_probes']} × {QUICK_OPTIONS['density_steps']}"
)
SUBSPACE = {"overlap", "rank1", "spectrum_distance", "profile_distance"}
RELATIVE = {"gap"}  # ‖λ − μ‖ / ‖λ‖: its error is the eigenvalues' relative error, on scale 1
SPECTRA = {"eigenvalues"}  # Papyan's terms' spectra: on the scale of the largest of them all
PER_EIGENVECTOR = {"rank1"}  # one number per top eigenvector (of top_eigenvalues beside it)
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
    scale: float = 1.0  # what the error is relative to: λ1 for a spectrum, |b| for a trace

    @property
    def relative_error(self) -> float:
        return self.error / self.scale if self.scale > 0 else self.error

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
    """The checks of every backend against the reference, and what some backends could not do.

    ``reference`` is the backend whose counts the others are held to; each quantity's numbers
    are held to ``references[quantity]``, the first backend (``reference`` when it could) that
    computed it. A quantity that fewer than two backends computed is ``uncompared`` (with
    why), and the backends do not ``agree`` then: nothing vouches for its numbers."""

    reference: str
    reports: dict[str, Report]
    checks: list[Check]
    skipped: dict[str, dict[str, str]] = field(default_factory=dict)  # backend -> quantity -> why
    references: dict[str, str] = field(default_factory=dict)  # quantity -> its reference
    uncompared: dict[str, str] = field(default_factory=dict)  # quantity -> why

    @property
    def agree(self) -> bool:
        return not self.uncompared and all(c.passed for c in self.checks)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def power(self) -> dict[str, float]:
        """For each compared matrix's λ1 and trace: the smallest relative error ε of a backend's
        matrix (all of it scaled by 1 + ε) that the check catches, the allowed error over the
        value (the largest over the backends)."""
        numbers = {f"{m}.{n}" for m in MATRICES for n in ("top_eigenvalues[0]", "trace")}
        power: dict[str, float] = {}
        for c in self.checks:
            if c.path in numbers and c.expected:
                power[c.path] = max(power.get(c.path, 0.0), c.allowed / abs(c.expected))
        return power

    def worst(self, n: int = 10) -> list[Check]:
        return sorted(self.checks, key=lambda c: c.ratio, reverse=True)[:n]

    def __str__(self) -> str:
        verdict = (
            f"DISAGREE ({len(self.failures)} numbers)"
            if self.failures
            else f"NOT COMPARED: {', '.join(self.uncompared)}"
            if self.uncompared
            else "agree"
        )
        others = [b for b in self.reports if b != self.reference]
        lines = [
            f"{', '.join(others)} against {self.reference}: {len(self.checks)} numbers, {verdict}"
        ]
        for quantity, why in self.uncompared.items():
            lines.append(f"  {quantity} not compared: {why}")
        for quantity, name in self.references.items():
            if name != self.reference:
                lines.append(f"  {quantity} against {name} ({self.reference} skipped it)")
        lines.append("worst: error / allowed, kind, number, value vs reference")
        for c in self.worst():
            lines.append(
                f"  {c.ratio:9.3g}  {c.kind:10s} {c.backend}:{c.path}  "
                f"{c.value:.6g} vs {c.expected:.6g}"
            )
        power = self.power()
        if power:
            lines.append(
                "power: a backend whose matrix is off by a factor 1 + ε fails when ε exceeds "
                + ", ".join(f"{eps:.1e} ({path})" for path, eps in power.items())
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
    rtol: float = DEFAULT_TOLERANCES["rtol"],
    atol: float = DEFAULT_TOLERANCES["atol"],
    sigmas: float = DEFAULT_TOLERANCES["sigmas"],
    subspace_atol: float = DEFAULT_TOLERANCES["subspace_atol"],
    density_tol: float = DEFAULT_TOLERANCES["density_tol"],
    top_k: int | None = None,
    seed: int = 0,
    options: Mapping[str, Any] | Options | None = None,
    progress: bool = False,
    thorough: bool = False,
) -> Comparison:
    """Run ``backends`` (default: all installed) with the same seed and options and check every
    number against the reference: torchfunc when it is among them, else the first (tolerances in
    the module docstring).

    By default a quick check for CI: ``top_k`` 5 and ``QUICK_OPTIONS`` (30 trace products, SLQ
    2 probes × 20 steps) unless given; eigenvalues are compared as tightly as ever, traces
    within their (larger) error bars, and the output states the power of both checks.
    ``thorough=True`` uses analyze's defaults. A backend that cannot compute a quantity for
    this model is listed in ``skipped`` with the reason and not compared; the quantity is held
    to the first backend that computed it, and one that fewer than two backends computed is
    ``uncompared``, which the verdict states (the backends do not ``agree`` then).
    """
    # checked before the quick options are merged in (a list, say) and before any run
    quantities, top_k, seed, options = check_arguments(None, quantities, top_k, seed, options)
    if not flag("thorough", thorough):
        top_k = QUICK_TOP_K if top_k is None else top_k
        options = {**QUICK_OPTIONS, **(options or {})}
    tolerances = checked_tolerances(
        rtol=rtol, atol=atol, sigmas=sigmas, subspace_atol=subspace_atol, density_tol=density_tol
    )
    names = compared_backends(backends)
    reports = {
        name: analyze(
            model,
            data,
            backend=name,
            quantities=quantities,
            top_k=top_k,
            seed=seed,
            options=options,
            progress=progress,
            skip_unsupported=True,
        )
        for name in names
    }
    reference, found = names[0], {name: report.to_dict() for name, report in reports.items()}
    checks = [  # the counts, then each quantity against the first backend that computed it
        check
        for name in names[1:]
        for check in compare_reports(
            {"model": found[reference]["model"]}, found[name], name, **tolerances
        )
    ]
    references, uncompared = {}, {}
    for quantity in reports[reference].config["quantities"]:
        computed = [name for name in names if found[name].get(quantity) is not None]
        if len(computed) < 2:
            uncompared[quantity] = (
                f"only {computed[0]} computed it" if computed else "no backend computed it"
            )
        if computed:
            references[quantity] = computed[0]
            expected = {quantity: found[computed[0]][quantity]}
            for name in computed[1:]:
                checks += compare_reports(expected, found[name], name, **tolerances)
    skipped = {name: report.skipped for name, report in reports.items() if report.skipped}
    return Comparison(reference, reports, checks, skipped, references, uncompared)


def compared_backends(backends: Sequence[str] | None) -> list[str]:
    """The backends to compare (default: all installed), the reference first: torchfunc when
    it is among them; at least two."""
    names = backend_list(backends)
    if "torchfunc" in names:
        names.insert(0, names.pop(names.index("torchfunc")))
    if len(names) < 2:
        raise InvalidInputError(
            f"compare needs at least two backends, got {names}; installed: {installed_backends()}."
        )
    return names


def assert_backends_agree(
    model: nn.Module, data: Iterable, backends: Sequence[str] | None = None, **kwargs: Any
) -> Comparison:
    """``compare`` for a user's own test suite: raises AssertionError listing the disagreements."""
    comparison = compare(model, data, backends, **kwargs)
    if not comparison.agree:
        raise AssertionError(str(comparison))
    return comparison


# -- running ------------------------------------------------------------------------------------
def checked_tolerances(**tolerances: Any) -> dict[str, float]:
    """The tolerances as given, each a finite number ≥ 0 (0: exact agreement)."""
    for name, value in tolerances.items():
        if (
            isinstance(value, bool)
            or not isinstance(value, numbers.Real)
            or not 0 <= value < math.inf
        ):
            raise InvalidInputError(f"{name} must be a finite number ≥ 0, got {shown(value)}.")
    return tolerances


# -- comparing ----------------------------------------------------------------------------------


@dataclass
class _Tolerances:
    rtol: float
    atol: float
    sigmas: float
    subspace_atol: float
    density_tol: float


def compare_reports(
    expected: Mapping[str, Any], actual: Mapping[str, Any], backend: str, **tolerances: float
) -> list[Check]:
    """The checks of one report's dict (or any part of it) against a reference's."""
    tol = _Tolerances(**{**DEFAULT_TOLERANCES, **tolerances})
    return list(_compare_trees(dict(expected), dict(actual), backend, tol))


def _compare_trees(
    expected: dict[str, Any],
    actual: dict[str, Any],
    backend: str,
    tol: _Tolerances,
    parents: tuple[str, ...] = (),
) -> Iterator[Check]:
    for key, want in expected.items():
        if key in NOT_COMPARED or key.endswith("_stderr") or key not in actual:
            continue  # a quantity the other backend skipped has no key
        got, stderr_key = actual[key], f"{key}_stderr"
        path = ".".join((*parents, key))
        if key == "density":
            if want["grid"] or got["grid"]:  # both empty: densities switched off
                yield _density_check(want, got, path, backend, tol)
        elif isinstance(want, dict) and stderr_key not in expected and key not in SPECTRA:
            yield from _compare_trees(want, got, backend, tol, (*parents, key))
        else:
            errors = (expected.get(stderr_key), actual.get(stderr_key))
            top = expected.get("top_eigenvalues")  # a spectrum's scale, for its trace's rounding
            norm = max((abs(v) for v in top), default=0.0) if isinstance(top, list) else 0.0
            if key in PER_EIGENVECTOR and isinstance(top, list) and isinstance(want, list):
                # the eigenvector of an eigenvalue at rounding level is any null-space vector
                defined = next((i for i, v in enumerate(top) if abs(v) <= 1e-10 * norm), len(top))
                want, got = want[:defined], got[:defined]
            yield from _leaf_checks((*parents, key), want, got, backend, errors, tol, norm)


def _leaf_checks(
    keys: tuple[str, ...],
    want: Any,
    got: Any,
    backend: str,
    errors: tuple[Any, Any],
    tol: _Tolerances,
    norm: float = 0.0,
) -> Iterator[Check]:
    """Checks of a number, a list, or a dict of numbers with a sibling ``*_stderr``; the kind
    follows the keys on the way (``overlap.ggn`` is a subspace number). ``norm`` (the
    spectrum's largest |λ|) sets the rounding allowed to an exact trace, which can be 0."""
    name = ".".join(keys)
    flat_want, flat_got = dict(_flatten(want, name)), dict(_flatten(got, name))
    if flat_want.keys() != flat_got.keys():
        yield Check(name, backend, "count", len(flat_got), len(flat_want), math.inf, 0.0)
        return
    scale = max((abs(v) for v in flat_want.values()), default=0.0)
    stderr_want, stderr_got = (dict(_flatten(e, name)) if e is not None else {} for e in errors)
    for path, b in flat_want.items():
        a = flat_got[path]
        error = abs(a - b)
        relative_to = 1.0
        if COUNTS.intersection(keys):
            kind, allowed = "count", 0.0
        elif SUBSPACE.intersection(keys):
            kind, allowed = "subspace", tol.subspace_atol
        elif RELATIVE.intersection(keys):
            kind, allowed = "iterative", tol.rtol * abs(b) + tol.atol
        elif stderr_want or stderr_got:
            stderr = math.hypot(stderr_want.get(path, 0.0), stderr_got.get(path, 0.0))
            rounding = 1e-8 * max(abs(b), norm, scale)
            kind, allowed, relative_to = "stochastic", tol.sigmas * stderr + rounding, abs(b)
        else:
            kind, allowed, relative_to = "iterative", tol.rtol * abs(b) + tol.atol * scale, scale
        yield Check(path, backend, kind, float(a), float(b), error, allowed, relative_to)


def _flatten(value: Any, path: str) -> Iterator[tuple[str, float]]:
    """(path, number) pairs: ``key[i]`` for list items, ``key.sub`` for dict entries."""
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _flatten(item, f"{path}[{i}]")
    elif isinstance(value, dict):
        for name, item in value.items():
            yield from _flatten(item, f"{path}.{name}")
    else:
        yield path, math.nan if value is None else float(value)


def _density_check(
    want: dict[str, Any], got: dict[str, Any], path: str, backend: str, tol: _Tolerances
) -> Check:
    """W1 distance of two densities on an axis divided by the reference grid's largest |t|."""
    scale = max(abs(want["grid"][0]), abs(want["grid"][-1])) or 1.0

    def tensors(d: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        return (
            torch.tensor(d["grid"], dtype=torch.float64),
            torch.tensor(d["values"], dtype=torch.float64),
        )

    distance = normalised_w1(*tensors(got), scale, *tensors(want), scale)
    return Check(path, backend, "density", distance, 0.0, distance, tol.density_tol)
