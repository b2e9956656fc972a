"""Backends by name: built-ins and third-party ones, all through the entry-point group
``curvkit.backends`` (a package adds a backend by declaring an entry point there)."""

from __future__ import annotations

import importlib.metadata
from collections.abc import Sequence

from curvkit.backend import Backend
from curvkit.errors import BackendNotFoundError, InvalidInputError, MissingDependencyError, shown

GROUP = "curvkit.backends"


def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=GROUP)}


def backend_names() -> list[str]:
    """Names of all registered backends, installed libraries or not."""
    return sorted(_entry_points())


def get_backend(name: str) -> type[Backend]:
    """The backend class registered as ``name``, with its library importable.

    Raises BackendNotFoundError for an unknown name (listing the known ones) and
    MissingDependencyError when the backend's library is not installed (naming the extra).
    """
    points = _entry_points()
    if not isinstance(name, str) or name not in points:
        raise BackendNotFoundError(
            f"unknown backend {shown(name)}; the registered backends are {', '.join(sorted(points))}."
        )
    try:
        cls = points[name].load()
    except ImportError as error:
        raise MissingDependencyError(
            f"backend {name!r} could not be imported ({error}); reinstall the package that provides it."
        ) from error
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise BackendNotFoundError(
            f"entry point {name!r} in group {GROUP!r} does not name a curvkit Backend subclass."
        )
    cls.check_available()
    return cls


def backends() -> dict[str, dict]:
    """Every registered backend: whether it is installed, its version and capabilities.

    >>> curvkit.backends()["torchfunc"]["installed"]      # doctest: +SKIP
    True
    """
    table = {}
    for name in backend_names():
        try:
            cls = get_backend(name)
        except MissingDependencyError as error:
            table[name] = {"installed": False, "reason": str(error)}
            continue
        table[name] = {
            "installed": True,
            "library": cls.library,
            "version": cls.version(),
            "extra": cls.extra,
            "capabilities": dict(cls.capabilities),
        }
    return table


def installed_backends() -> list[str]:
    """Names of the registered backends whose libraries are installed."""
    return [name for name, row in backends().items() if row["installed"]]


def backend_list(names: Sequence[str] | str | None) -> list[str]:
    """The backends to run, in order: ``names`` (a list, or one comma-separated string), each
    registered and installed and none twice (a backend compared with itself always agrees);
    None: every installed backend."""
    if names is None:
        return installed_backends()
    if isinstance(names, str):
        names = [name.strip() for name in names.split(",") if name.strip()]
    names = list(names)
    if not names:  # e.g. --backends ",": before, an empty benchmark
        raise InvalidInputError(
            "the list of backends is empty; name at least one (e.g. torchfunc), or none for "
            "every installed backend."
        )
    for name in names:  # unknown or missing backends fail now, not after the first run
        get_backend(name)
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise InvalidInputError(
            f"backend {', '.join(repeated)} is named more than once; name each backend once."
        )
    return names
