"""The exceptions curvkit raises: one sentence saying what is wrong and what to do."""

from __future__ import annotations

import reprlib
from typing import Any


def first_line(error: BaseException) -> str:
    """The first line of an exception's message ("" when it has none), for quoting it."""
    return next(iter(str(error).splitlines()), "")


def shown(value: Any) -> str:
    """``repr(value)`` cut to a line, for error messages (a value may be huge or nested)."""
    short = reprlib.Repr()
    short.maxlevel, short.maxstring, short.maxother = 2, 40, 40
    return short.repr(value)


class CurvkitError(Exception):
    """Base class of every error curvkit raises on purpose."""


class InvalidInputError(CurvkitError, ValueError):
    """The model, the data or a request is not usable as given."""


class UnsupportedError(CurvkitError):
    """A backend cannot compute what was asked for this model or loss."""


class BackendNotFoundError(CurvkitError, KeyError):
    """No backend of that name is registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class MissingDependencyError(CurvkitError, ImportError):
    """A backend's library is not installed."""


class PeerFailedError(CurvkitError):
    """Under torch.distributed, another rank failed during the analysis (its error is quoted)."""
