"""Figures of a Report (and of a bench result) as PNG files, with matplotlib (the ``plot`` extra).

Figures are built on ``matplotlib.figure.Figure`` objects, never through pyplot's global state,
so plotting works without a display and does not disturb a user's own figures.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from curvkit.errors import InvalidInputError, MissingDependencyError, first_line
from curvkit.report import Report

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from curvkit.benchmark import BenchResult

COLOURS = {"hessian": "tab:blue", "ggn": "tab:orange", "residual": "tab:green"}
LABELS = {"hessian": "Hessian", "ggn": "Gauss–Newton G", "residual": "H = Hess − G"}


def _figure(width: float = 7.0, height: float = 4.5, **kwargs: Any) -> Figure:
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise MissingDependencyError(
            "plots need matplotlib; install it with pip install 'curvkit[plot]'."
        ) from error
    return Figure(figsize=(width, height), layout="constrained", **kwargs)


def plot_report(report: Report, folder: str | os.PathLike) -> list[Path]:
    """Write every figure the report has data for into ``folder``; returns the files."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    figures = {
        "spectral_density.png": spectral_density,
        "top_eigenvalues.png": top_eigenvalues,
        "class_gram.png": class_gram,
        "hierarchy.png": hierarchy,
        "layers.png": layers,
    }
    written = []
    for name, make in figures.items():
        try:
            figure = make(report)
        except (TypeError, ValueError, KeyError, IndexError) as error:  # an edited report
            raise InvalidInputError(
                f"the report's numbers for {name} cannot be drawn ({type(error).__name__}: "
                f"{first_line(error)[:120]}); draw a report as curvkit wrote it."
            ) from error
        if figure is not None:
            figure.savefig(folder / name, dpi=120)
            written.append(folder / name)
    return written


def _title(report: Report, what: str) -> str:
    m = report.model
    return f"{what}\n{report.backend}, P = {m.num_params}, N = {m.num_samples}, C = {m.num_classes}"


def spectral_density(report: Report) -> Figure | None:
    """SLQ densities on a log scale with the outliers marked: Hessian and G on the left, the
    residual H = Hess − G (a much smaller scale) on the right."""

    def drawn(matrix: str) -> bool:  # computed, with its density (density_probes > 0)
        return getattr(report, matrix) is not None and bool(getattr(report, matrix).density["grid"])

    panels = [[m for m in ("hessian", "ggn") if drawn(m)], [m for m in ("residual",) if drawn(m)]]
    panels = [p for p in panels if p]
    if not panels:
        return None
    figure = _figure(6.0 * len(panels), 4.5)
    for axes, matrices in zip(np.atleast_1d(figure.subplots(1, len(panels))), panels):
        spectra = {m: getattr(report, m) for m in matrices}
        peak = max(max(s.density["values"]) for s in spectra.values())
        for level, (matrix, s) in enumerate(spectra.items()):
            grid, values = np.asarray(s.density["grid"]), np.asarray(s.density["values"])
            colour = COLOURS[matrix]
            sigma = s.density.get("sigma")
            label = LABELS[matrix] + (f" (Gaussian smoothing σ = {sigma:.2g})" if sigma else "")
            axes.semilogy(grid, np.maximum(values, 1e-12), color=colour, label=label)
            outliers = s.top_eigenvalues[: s.n_outliers]
            axes.plot(
                outliers,
                np.full(len(outliers), peak * 4**level * 3),
                "v",
                color=colour,
                label=f"{LABELS[matrix]}: {s.n_outliers} outliers",
            )
        if "ggn" in spectra:  # G ≥ 0: what its curve shows below 0 is the smoothing
            axes.axvline(0, color="grey", linewidth=0.8, linestyle=":",
                         label="λ = 0 (G's density below it is smoothing)")  # fmt: skip
        axes.set_ylim(bottom=max(1e-8, axes.get_ylim()[0]))
        axes.set_xlabel("eigenvalue λ")
        axes.set_ylabel("spectral density (log scale)")
        axes.legend(fontsize="small", loc="center right")
    figure.suptitle(_title(report, "Spectral density (stochastic Lanczos quadrature)"))
    return figure


def top_eigenvalues(report: Report) -> Figure | None:
    """Top eigenvalues of Hessian and G beside those of Papyan's own, class and cross terms."""
    series: dict[str, list[float]] = {}
    for matrix in ("hessian", "ggn"):
        s = getattr(report, matrix)
        if s is not None:
            series[LABELS[matrix]] = s.top_eigenvalues
    if report.classmeans is not None:
        names = {"class": "G_class (class means)", "cross": "G_cross", "own": "G_own"}
        for term, label in names.items():
            values = report.classmeans.eigenvalues.get(term) or []
            series[label] = values[: max(len(v) for v in series.values()) if series else None]
    series = {k: [v for v in values if v > 0] for k, values in series.items()}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    figure = _figure()
    axes = figure.add_subplot()
    markers = iter("os^Dvx")
    for label, values in series.items():
        axes.semilogy(range(1, len(values) + 1), values, next(markers), label=label, alpha=0.8)
    if report.classmeans is not None:
        c = report.model.num_classes
        axes.axvline(c + 0.5, color="grey", linestyle=":", label=f"C = {c}")
    axes.xaxis.get_major_locator().set_params(integer=True)
    axes.set_xlabel("index i")
    axes.set_ylabel("eigenvalue λ_i (log scale)")
    axes.set_title(_title(report, "Top eigenvalues: Hessian and G against Papyan's terms"))
    axes.legend(fontsize="small")
    return figure


def class_gram(report: Report) -> Figure | None:
    """The C × C Gram matrix of the class means δ_c."""
    if report.classmeans is None:
        return None
    gram = np.asarray(report.classmeans.class_gram)
    figure = _figure(5.5, 4.8)
    axes = figure.add_subplot()
    limit = np.abs(gram).max() or 1.0
    image = axes.imshow(gram, cmap="RdBu_r", vmin=-limit, vmax=limit)
    figure.colorbar(image, ax=axes, label="⟨δ_c, δ_c'⟩")
    classes = report.classmeans.coordinates.get("classes", list(range(len(gram))))
    axes.set_xticks(range(len(gram)), classes)
    axes.set_yticks(range(len(gram)), classes)
    axes.set_xlabel("class c'")
    axes.set_ylabel("class c")
    axes.set_title(_title(report, "Gram matrix of the class means δ_c"))
    return figure


def hierarchy(report: Report) -> Figure | None:
    """Papyan's three-level hierarchy: class means δ_c (large) and group means δ_{c,c'} (small)
    projected on the top two eigenvectors of G_class; colour = class c."""
    if report.classmeans is None:
        return None
    coordinates = report.classmeans.coordinates
    means = np.asarray(coordinates["class_means"])
    groups = np.asarray(coordinates["group_means"])
    classes = coordinates.get("classes", list(range(len(means))))
    figure = _figure(6.0, 5.5)
    axes = figure.add_subplot()
    try:
        from matplotlib import colormaps

        palette = colormaps["tab10"]
    except (ImportError, KeyError):
        palette = None
    for i, c in enumerate(classes):
        colour = palette(i % 10) if palette is not None else None
        if groups.size:  # δ_(c,c') for c' ≠ c; none on the class-means route
            others = np.array([j for j in range(groups.shape[1]) if j != c])
            axes.scatter(groups[i, others, 0], groups[i, others, 1], s=12, color=colour, alpha=0.6)
        axes.scatter(
            means[i, 0], means[i, 1], s=160, color=colour, edgecolor="black", label=f"class {c}"
        )
        # overlapping means (near the origin, outside this plane) stay identifiable
        axes.annotate(str(c), (means[i, 0], means[i, 1]), fontsize="x-small",
                      xytext=(6, 4), textcoords="offset points")  # fmt: skip
    axes.axhline(0, color="grey", linewidth=0.5)
    axes.axvline(0, color="grey", linewidth=0.5)
    axes.set_xlabel("projection on the 1st eigenvector of G_class")
    axes.set_ylabel("projection on the 2nd eigenvector of G_class")
    spectrum = [v for v in report.classmeans.eigenvalues.get("class") or [] if v > 0]
    shown = (
        f"; this plane holds {sum(spectrum[:2]) / sum(spectrum):.0%} of G_class" if spectrum else ""
    )
    axes.set_title(
        _title(
            report,
            "Class means δ_c (large) and group means δ_(c,c') (small),\n"
            f"both coloured by the example's class c{shown}",
        ),
        fontsize="small",
    )
    axes.legend(fontsize="x-small", ncol=2)
    return figure


def layers(report: Report) -> Figure | None:
    """Per layer: Hessian-block trace and λ_max (Sankar et al.), and the block's top eigenvalues
    against those of its Kronecker approximation B ⊗ A (Wu et al.)."""
    if not report.layerwise:
        return None
    names = list(report.layerwise)
    figure = _figure(10.0, 4.5)
    left, right = figure.subplots(1, 2)
    x = np.arange(len(names))
    traces = [report.layerwise[n].trace for n in names]
    maxima = [report.layerwise[n].max_eigenvalue for n in names]
    # points, not bars: a bar's length on a log axis depends on where the axis starts
    computed = not all(math.isnan(t) for t in traces)
    left.plot(x, traces, "o", label="trace tr(H_l)" + ("" if computed else ": not computed"))
    left.plot(x, maxima, "s", label="λ_max(H_l)")
    left.set_xticks(x, names)
    left.set_xlabel("layer (module name)")
    shown = [v for v in traces + maxima if not math.isnan(v)]
    positive = bool(shown) and min(shown) > 0
    left.set_ylabel("value (log scale)" if positive else "value")
    left.set_yscale("log" if positive else "linear")
    left.set_title("Per-layer Hessian trace and λ_max")
    left.legend(fontsize="small")
    for i, n in enumerate(names):
        layer = report.layerwise[n]
        # a log axis shows the positive ones (matplotlib warned on a block of zeros)
        exact = [v for v in layer.top_eigenvalues if v > 0]
        kron = [v for v in layer.kronecker["top_eigenvalues"] if v > 0]
        right.semilogy(range(1, len(exact) + 1), exact, "o-", color=f"C{i}", label=f"{n}: exact")
        right.semilogy(range(1, len(kron) + 1), kron, "x--", color=f"C{i}", label=f"{n}: B ⊗ A")
    right.xaxis.get_major_locator().set_params(integer=True)
    right.set_xlabel("index i")
    right.set_ylabel("eigenvalue λ_i (log scale)")
    right.set_title("Layer blocks: exact vs Kronecker top eigenvalues")
    right.legend(fontsize="x-small")
    figure.suptitle(_title(report, "Layerwise structure"))
    return figure


def plot_bench(result: BenchResult, folder: str | os.PathLike) -> Path:
    """Median seconds per quantity and backend, disagreeing backends hatched."""
    rows = [r for r in result.rows if r.status == "ok"]
    quantities = list(dict.fromkeys(r.quantity for r in rows))
    names = list(dict.fromkeys(r.backend for r in rows))
    figure = _figure(8.0, 4.5)
    axes = figure.add_subplot()
    width = 0.8 / max(len(names), 1)
    for j, name in enumerate(names):
        for i, q in enumerate(quantities):
            row = next((r for r in rows if r.backend == name and r.quantity == q), None)
            if row is None:
                continue
            axes.bar(
                i + (j - (len(names) - 1) / 2) * width,
                row.seconds,
                width,
                color=f"C{j}",
                hatch="" if row.agrees else "//",
                label=name if i == 0 else None,
            )
    axes.set_xticks(range(len(quantities)), quantities)
    axes.set_ylabel("median wall time (s)")
    axes.set_xlabel("quantity")
    axes.set_title(f"curvkit bench: {result.description}\n(hatched: disagrees with the reference)")
    axes.legend(fontsize="small")
    path = Path(folder) / "bench.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    return path
