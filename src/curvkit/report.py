"""The Report: what ``analyze`` returns, with stable keys (see DESIGN.md, "Report contract").

Numbers are plain floats, lists are lists, eigenvalues descend; error estimates sit beside their
numbers under ``*_stderr`` keys. ``to_dict`` gives the contract; ``save`` writes YAML or JSON
(by suffix) atomically; ``Report.load`` reads it back.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import tempfile
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from torch import Tensor

from curvkit.errors import (
    NAME_CHARS,
    CurvkitError,
    InvalidInputError,
    MissingDependencyError,
    cut,
    first_line,
)

QUANTITIES = ("hessian", "ggn", "residual", "classmeans", "layerwise")


@dataclass
class Provenance:
    """Where a number came from: backend, routine, matvecs used, passes over the data, wall
    time, derived or native, and a note (e.g. which product route ran)."""

    backend: str
    routine: str
    matvecs: int = 0
    seconds: float = 0.0
    derived: bool = False
    note: str = ""
    passes: int = 0


@dataclass
class ModelInfo:
    num_params: int
    num_classes: int
    num_samples: int
    fingerprint: str
    dtype: str = ""
    device: str = ""
    mode: str = "eval"


@dataclass
class Spectrum:
    """Top eigenvalues, trace ± stderr, SLQ density and outlier count of one matrix."""

    top_eigenvalues: list[float]
    trace: float
    trace_stderr: float
    density: dict[str, Any] = field(repr=False)
    n_outliers: int
    converged: bool
    provenance: dict[str, Provenance] = field(repr=False)
    eigenvectors: Tensor | None = field(default=None, repr=False, compare=False)
    # λ_n / λ_{n+1} at the outliers' edge (n = n_outliers): the count's margin; None for n = 0
    outlier_gap: float | None = None


@dataclass
class ClassMeans:
    """Papyan's class-mean structure of G (see curvkit.quantities.classmeans)."""

    counts: list[int]
    class_gram: list[list[float]] = field(repr=False)
    group_gram: list[list[float]] = field(repr=False)
    eigenvalues: dict[str, list[float]] = field(repr=False)
    trace: dict[str, float]
    trace_stderr: dict[str, float]
    overlap: dict[str, float]
    coordinates: dict[str, Any] = field(repr=False)
    excluded_classes: list[int]
    provenance: dict[str, Provenance] = field(repr=False)
    skipped: dict[str, str] = field(default_factory=dict)  # terms not computed, with the reason
    # Papyan's claims against G (see curvkit.quantities.classmeans); absent in older reports
    ritz_eigenvalues: list[float] = field(default_factory=list, repr=False)
    gap: dict[str, float] = field(default_factory=dict)
    confidence_spread: float | None = None


@dataclass
class Layer:
    """One layer's Hessian block against its Kronecker approximation (curvkit.quantities.layerwise)."""

    shape: list[int]
    trace: float
    trace_stderr: float
    max_eigenvalue: float
    top_eigenvalues: list[float]
    kronecker: dict[str, Any]
    overlap: dict[str, float]
    rank1: list[float]
    closest_to_full: bool
    provenance: dict[str, Provenance] = field(repr=False)
    spectrum_distance: float | None = None  # only with options.layer_density
    profile_distance: float | None = None  # when the full Hessian's top eigenvalues are known


@dataclass
class Report:
    backend: str
    model: ModelInfo
    hessian: Spectrum | None = None
    ggn: Spectrum | None = None
    residual: Spectrum | None = None
    classmeans: ClassMeans | None = None
    layerwise: dict[str, Layer] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    matvecs: dict[str, int] = field(default_factory=dict)
    data_passes: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # quantity -> why the backend could not
    config: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str | None] = field(default_factory=dict)

    def __repr__(self) -> str:
        """One line (``print(report)`` gives the summary table, ``report.hessian`` etc. the
        numbers, whose reprs leave out densities, Gram matrices and provenance)."""
        done = [q for q in QUANTITIES if getattr(self, q) is not None]
        m = self.model
        return (
            f"Report(backend={self.backend!r}, P={m.num_params}, C={m.num_classes}, "
            f"N={m.num_samples}, quantities={done}, skipped={sorted(self.skipped)})"
        )

    # -- tables ---------------------------------------------------------------------------------
    def numbers(self) -> list[dict[str, Any]]:
        """Every number of the report as a tidy table, one row each: the backend, the quantity
        (``layerwise/<layer>`` per layer), the number's name (a field, ``[i]`` for the i-th
        entry of a list, ``.key`` for a dict's entry), its value, and the routine that gave
        it where the provenance records one. Densities, Gram matrices and coordinates are left
        out (arrays, not numbers to compare across runs)."""
        parts: list[tuple[str, Any]] = [
            (q, getattr(self, q))
            for q in ("hessian", "ggn", "residual", "classmeans")
            if getattr(self, q) is not None
        ]
        parts += [(f"layerwise/{n}", layer) for n, layer in (self.layerwise or {}).items()]
        rows = []
        for quantity, part in parts:
            backend = self.config.get("backends", {}).get(quantity.split("/")[0], self.backend)
            for f in dataclasses.fields(part):
                if f.name in NOT_NUMBERS:
                    continue
                provenance = part.provenance.get(f.name.removesuffix("_stderr"))
                for name, value in _leaves(f.name, getattr(part, f.name)):
                    rows.append(
                        {
                            "backend": backend,
                            "quantity": quantity,
                            "name": name,
                            "value": value,
                            "routine": provenance.routine if provenance else None,
                        }
                    )
        return rows

    def to_pandas(self) -> Any:
        """``numbers()`` as a pandas DataFrame (pandas is not a dependency of curvkit)."""
        try:
            import pandas
        except ImportError as error:
            raise MissingDependencyError(
                "Report.to_pandas needs pandas: pip install pandas, or use report.numbers(), "
                "the same table as a list of dicts."
            ) from error
        return pandas.DataFrame(self.numbers())

    # -- serialisation --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The report as plain Python types (the contract's keys), quantities not run omitted."""
        return _plain(self)

    def save(self, path: str | os.PathLike) -> Path:
        """Write YAML (``.yaml``/``.yml``) or JSON (``.json``) atomically: never a half-written file."""
        path = Path(path)
        write_atomically(path, _dump(self.to_dict(), path))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Report:
        """Read a report written by ``save``; a file that is not one is an InvalidInputError."""
        path = Path(path)
        try:
            with open(path) as handle:
                if path.suffix == ".json":
                    data = _map_leaves(json.load(handle), _json_number)
                else:
                    data = read_yaml(handle)
            return cls.from_dict(data)
        except FileNotFoundError as error:
            raise InvalidInputError(f"report {path} does not exist.") from error
        except OSError as error:  # a folder, unreadable
            raise InvalidInputError(
                f"cannot read the report {path} ({error.strerror or error})."
            ) from error
        except (TypeError, KeyError, AttributeError, ValueError, yaml.YAMLError) as error:
            raise InvalidInputError(
                f"{path} is not a curvkit report ({type(error).__name__}: "
                f"{first_line(error)[:120]}); give a "
                "report.yaml or report.json written by curvkit analyze or Report.save."
            ) from error

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Report:
        """The Report of ``to_dict``'s output; a field of another type than the dataclasses
        declare is a TypeError naming it (a hand-edited report drew raw errors in plot)."""

        def section(kind: type, d: dict, where: str) -> Any:
            provenance = {n: _typed(Provenance, v, f"{where}.provenance.{n}")
                          for n, v in d.get("provenance", {}).items()}  # fmt: skip
            return _typed(kind, {**d, "provenance": provenance}, where)

        def optional(kind: type, key: str) -> Any:
            return None if data.get(key) is None else section(kind, data[key], key)

        layerwise = data.get("layerwise")
        if layerwise is not None:
            layerwise = {n: section(Layer, v, f"layerwise.{n}") for n, v in layerwise.items()}
        return _typed(
            cls,
            {
                **{k: v for k, v in data.items() if k in typing.get_type_hints(cls)},
                "model": _typed(ModelInfo, data["model"], "model"),
                "hessian": optional(Spectrum, "hessian"),
                "ggn": optional(Spectrum, "ggn"),
                "residual": optional(Spectrum, "residual"),
                "classmeans": optional(ClassMeans, "classmeans"),
                "layerwise": layerwise,
            },
            "report",
        )

    # -- summary --------------------------------------------------------------------------------
    def __str__(self) -> str:
        m = self.model
        lines = [
            f"curvkit report — backend {self.backend}",
            f"model: {m.num_params} parameters, {m.num_classes} classes, {m.num_samples} examples "
            f"({m.dtype}, {m.device}, {m.mode} mode)",
        ]
        rows = [("matrix", "λ1", "λ2", "λk", "trace ± stderr", "outliers (λn/λn+1)", "seconds")]
        for name in ("hessian", "ggn", "residual"):
            s: Spectrum | None = getattr(self, name)
            if s is None:
                continue
            top = s.top_eigenvalues
            rows.append(
                (
                    name,
                    _g(top[0]),
                    _g(top[1]) if len(top) > 1 else "",
                    _g(top[-1]),
                    "off" if math.isnan(s.trace) else f"{_g(s.trace)} ± {_g(s.trace_stderr)}",
                    f"{s.n_outliers}" + (f" ({s.outlier_gap:.3g})" if s.outlier_gap else ""),
                    f"{self.timings.get(name, 0.0):.1f}",
                )
            )
        if len(rows) > 1:
            lines.append("")
            lines += _table(rows)
        if self.classmeans is not None:
            t = self.classmeans.trace

            def term(k: str) -> str:  # tr G off (trace_matvecs 0): the within term and shares
                if math.isnan(t[k]):
                    return f"{k} off"
                share = t[k] / t["total"] if t["total"] else math.nan
                return f"{k} {_g(t[k])}" + ("" if math.isnan(share) else f" ({share:.0%})")

            lines += [
                "",
                "class means (Papyan): tr G = " + " + ".join(term(k) for k in t if k != "total"),
                "overlap of span{δ_c} with top-C eigenspace: "
                + ", ".join(f"{k} {v:.3f}" for k, v in self.classmeans.overlap.items()),
            ]
            gap, spread = self.classmeans.gap, self.classmeans.confidence_spread
            if gap:  # reports before these numbers have none
                lines.append(
                    f"G's top-C eigenvalues against G_class's: relative gap {gap['class']:.3f}; "
                    f"against G on span{{δ_c}} (Rayleigh–Ritz): {gap['ritz']:.3f}; spread of "
                    "log10 √p within classes "
                    + ("n/a (no class has two examples)" if spread is None else f"{spread:.2f}")
                )
        if self.layerwise:
            rows = [
                (
                    "layer",
                    "shape",
                    "trace",
                    "λ_max",
                    "Kronecker λ1",
                    "overlap H",
                    "rank-1",
                    "W1 to full",
                    "profile to full",
                )
            ]
            for name, layer in self.layerwise.items():
                rows.append(
                    (
                        name + (" *" if layer.closest_to_full else ""),
                        "×".join(map(str, layer.shape)),
                        "off" if math.isnan(layer.trace) else _g(layer.trace),
                        _g(layer.max_eigenvalue),
                        _g(layer.kronecker["top_eigenvalues"][0])
                        if layer.kronecker["top_eigenvalues"]
                        else "skipped",
                        "—"
                        if math.isnan(layer.overlap["hessian"])
                        else f"{layer.overlap['hessian']:.3f}",
                        f"{layer.rank1[0]:.3f}",
                        "" if layer.spectrum_distance is None else f"{layer.spectrum_distance:.3f}",
                        "" if layer.profile_distance is None else f"{layer.profile_distance:.3f}",
                    )
                )
            lines += [
                "",
                "layers (Wu et al., Sankar et al.; * closest to the full spectrum in W1; profile: "
                "mean |λ_i/λ_1 − full's|, i ≤ k):",
            ]
            lines += _table(rows)
            lines += [
                f"Kronecker factors of layer {name} skipped: {layer.kronecker['skipped']}."
                for name, layer in self.layerwise.items()
                if "skipped" in layer.kronecker
            ]
        return "\n".join(lines)


# libyaml's safe dumper and loader when PyYAML was built with it: the same documents, 4× and 7×
# faster than the pure-Python ones on a 400 kB report
SAFE_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _typed(kind: type, values: dict[str, Any], where: str) -> Any:
    """``kind(**values)`` after checking each value against the field's declared type."""
    hints = typing.get_type_hints(kind)
    for name, value in values.items():
        if name in hints:
            _check_type(value, hints[name], f"{where}.{name}")
    return kind(**values)


def _check_type(value: Any, hint: Any, where: str) -> None:
    """A TypeError naming ``where`` when ``value`` is not of the type ``hint`` (floats take
    ints; containers are checked element by element)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or (isinstance(hint, type) and isinstance(value, hint) and hint is not bool
                       and not (hint is int and isinstance(value, bool))):  # fmt: skip
        return
    if origin in (types.UnionType, typing.Union):
        for option in args:
            try:
                return _check_type(value, option, where)
            except TypeError:
                continue
    elif hint is float and isinstance(value, numbers.Real) and not isinstance(value, bool):
        return
    elif hint is bool and isinstance(value, bool):
        return
    elif origin is list and isinstance(value, list):
        for i, item in enumerate(value):
            _check_type(item, args[0], f"{where}[{i}]")
        return
    elif origin is dict and isinstance(value, dict):
        for key, item in value.items():
            _check_type(key, args[0], f"{where} key")
            _check_type(item, args[1], f"{where}.{key}")
        return
    elif hint is type(None) and value is None:
        return
    kind = hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")
    raise TypeError(f"{cut(where, NAME_CHARS)} is {cut(repr(value), NAME_CHARS)}, not {kind}")


def yaml_text(data: Any) -> str:
    """``data`` (plain Python types) as YAML, keys in their order."""
    return yaml.dump(data, Dumper=SAFE_DUMPER, sort_keys=False)


def read_yaml(stream: Any) -> Any:
    """A YAML document (text or a file) as plain Python types; nothing else is constructed."""
    return yaml.load(stream, Loader=SAFE_LOADER)


def write_atomically(path: Path, text: str) -> None:
    """Write through a temporary file and a rename: readers never see a half-written file.
    The file gets the permissions of an ordinary new file (0666 less the umask), not the
    temporary file's 0600, so colleagues on a shared machine can read it."""
    check_writable(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException as error:
        os.unlink(tmp)
        if isinstance(error, OSError):
            raise CurvkitError(
                f"could not write {path} ({error.strerror or error}); any earlier file there is "
                "unchanged."
            ) from error
        raise


def check_writable(folder: Path, flag: str | None = None) -> None:
    """Create ``folder`` and try a file in it, so that a bad output path fails before the work
    (a path that is a file, read-only, on a full disk, a folder where report.yaml will go) with
    one InvalidInputError, naming the command line's ``flag`` that set it; a name the system
    refuses (too long, a NUL byte) too."""
    where = f" ({flag} on the command line)" if flag else ""
    try:
        if (folder / "report.yaml").is_dir():
            raise InvalidInputError(
                f"{folder / 'report.yaml'} is a folder, where the report.yaml file will go; "
                f"remove it or choose another output folder{where}."
            )
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder) as probe:
            probe.write(b"curvkit")
            probe.flush()
            os.fsync(probe.fileno())
    except (OSError, ValueError) as error:
        why = getattr(error, "strerror", None) or error
        raise InvalidInputError(
            f"cannot write into the folder {cut(str(folder), NAME_CHARS)} ({why}); choose "
            f"another{where}."
        ) from error


# fields that hold arrays or records, not numbers to tabulate
NOT_NUMBERS = {"density", "class_gram", "group_gram", "coordinates", "provenance", "eigenvectors"}


def _leaves(name: str, value: Any) -> Iterator[tuple[str, float]]:
    """The numbers inside ``value`` (lists and dicts opened), each with its path from ``name``."""
    if isinstance(value, numbers.Real):
        yield name, value
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _leaves(f"{name}[{i}]", item)
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _leaves(f"{name}.{key}", item)


def _g(x: float) -> str:
    return f"{x:.4g}"


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    out.insert(1, "  ".join("-" * w for w in widths))
    return out


def _plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if value is None or isinstance(value, Tensor):
                continue
            out[f.name] = _plain(value)
        return out
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, Tensor):
        return obj.tolist()
    if isinstance(obj, str):
        return str(obj)  # plain str, also for subclasses such as torch's version string
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return obj.item()
    return obj


# JSON has no NaN or infinity: a report writes them as these strings and reads them back
JSON_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _json_name(value: Any) -> Any:
    if not isinstance(value, float) or math.isfinite(value):
        return value
    return "NaN" if math.isnan(value) else "Infinity" if value > 0 else "-Infinity"


def _json_number(value: Any) -> Any:
    return JSON_NONFINITE.get(value, value) if isinstance(value, str) else value


def _map_leaves(value: Any, function: Callable[[Any], Any]) -> Any:
    """``value`` with ``function`` applied to every leaf inside its dicts and lists."""
    if isinstance(value, dict):
        return {k: _map_leaves(v, function) for k, v in value.items()}
    if isinstance(value, list):
        return [_map_leaves(v, function) for v in value]
    return function(value)


def _dump(data: dict[str, Any], path: Path) -> str:
    if path.suffix in (".yaml", ".yml"):
        return yaml_text(data)
    if path.suffix == ".json":
        return json.dumps(_map_leaves(data, _json_name), indent=1, allow_nan=False)
    raise InvalidInputError(
        f"cannot tell the format of {str(path)!r}; name the file *.yaml, *.yml or *.json."
    )
