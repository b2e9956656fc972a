"""Per-model backend choices: what ``curvkit bench --save-choice`` stores and ``backend="auto"`` reads.

The choice file is YAML, keyed by the model fingerprint (architecture, parameter names and
shapes, dtype, device type)::

    3f9a...:
      model: Sequential, P = 2410, float64, cpu
      choices: {hessian: backpack, ggn: backpack, classmeans: backpack, ...}
      seconds: {hessian: {backpack: 1.2, torchfunc: 3.0, ...}, ...}

Its place: the ``path`` argument, else ``$CURVKIT_CHOICE_FILE``, else
``$XDG_CACHE_HOME/curvkit/choices.yaml`` (``~/.cache/curvkit/choices.yaml``).

Without a saved choice, ``auto`` takes the first installed backend of ``AUTO_ORDER`` for every
quantity, and the next one for a quantity the first cannot compute for the model.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from curvkit.errors import InvalidInputError, first_line
from curvkit.report import write_atomically

# backpack: exact traces and one-pass class means, the fastest products measured on CPU here;
# torchfunc: in the core, handles any functional model; then curvlinops, and pyhessian (no
# Kronecker factors, licence unclear)
AUTO_ORDER = ("backpack", "torchfunc", "curvlinops", "pyhessian")


def choice_path(path: str | os.PathLike | None = None) -> Path:
    """Where the choices live (see the module docstring)."""
    if path is not None:
        return Path(path)
    if os.environ.get("CURVKIT_CHOICE_FILE"):
        return Path(os.environ["CURVKIT_CHOICE_FILE"])
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "curvkit" / "choices.yaml"


def load_choices(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """All stored choices (empty when there is no file yet)."""
    file = choice_path(path)
    if not file.exists():
        return {}
    try:
        data = yaml.safe_load(file.read_text()) or {}
    except (OSError, UnicodeDecodeError) as error:
        raise InvalidInputError(
            f"the choice file {file} cannot be read ({first_line(error)}); give the path of a "
            "readable file, or none."
        ) from error
    except yaml.YAMLError as error:
        raise InvalidInputError(
            f"the choice file {file} is not valid YAML ({error}); delete it or fix it."
        ) from error
    if not isinstance(data, dict):
        raise InvalidInputError(f"the choice file {file} is not a mapping; delete it or fix it.")
    return data


def saved_choice(fingerprint: str, path: str | os.PathLike | None = None) -> dict[str, str]:
    """The stored {quantity: backend} for a model fingerprint, or {}."""
    entry = load_choices(path).get(fingerprint) or {}
    choices = entry.get("choices") if isinstance(entry, dict) else entry
    if not isinstance(choices or {}, dict):
        raise InvalidInputError(
            f"the choice file {choice_path(path)} holds no mapping of choices for this model; "
            "delete it or fix it."
        )
    return dict(choices or {})


def save_choice(
    fingerprint: str,
    description: str,
    choices: Mapping[str, str],
    seconds: Mapping[str, Mapping[str, float]],
    path: str | os.PathLike | None = None,
) -> Path:
    """Store (or replace) the choice for one fingerprint, writing the file atomically."""
    file = choice_path(path)
    data = load_choices(file)
    data[fingerprint] = {
        "model": description,
        "choices": dict(choices),
        "seconds": {q: dict(per_backend) for q, per_backend in seconds.items()},
    }
    write_atomically(file, yaml.safe_dump(data, sort_keys=False))
    return file
