"""The exceptions curvkit raises: one sentence saying what is wrong and what to do; and its
warnings, attributed to the user's line."""

from __future__ import annotations

import contextlib
import functools
import reprlib
import sys
import warnings
from collections.abc import Iterable
from typing import Any

import torch

QUOTED_CHARS = 300  # of another library's or the user's error, quoted in curvkit's
NAME_CHARS = 80  # of a name in a list (a module's name may be any string)
MESSAGE_CHARS = 1000  # of a whole message: curvkit's longest sentences take about 600


def cut(text: str, most: int) -> str:
    """``text`` if it has at most ``most`` characters, else its start and end around " … "
    (the end of a message holds the advice, the end of a name the parameter)."""
    if len(text) <= most:
        return text
    tail = most // 4
    return f"{text[: most - tail - 3]} … {text[-tail:]}"


def printable(text: str) -> str:
    """``text`` with each character that does not print (a newline, a terminal escape) as its
    escape sequence: a message is one line whatever names went into it (a module named
    ``"a\\nb"`` split curvkit's sentence, and one holding ``"\\x1b[31m"`` coloured the terminal)."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def first_line(error: BaseException) -> str:
    """The first line of an exception's message ("" when it has none), cut to QUOTED_CHARS
    characters, for quoting it (a user's exception may carry a megabyte of text)."""
    line = next(iter(str(error).splitlines()), "")
    return line if len(line) <= QUOTED_CHARS else line[:QUOTED_CHARS] + " …"


def shown(value: Any) -> str:
    """``repr(value)`` cut to a line, for error messages (a value may be huge or nested)."""
    short = reprlib.Repr()
    short.maxlevel, short.maxstring, short.maxother = 2, 40, 40
    return short.repr(value)


def listed(items: Iterable[object], most: int = 5) -> str:
    """The first ``most`` items joined by commas, and how many more there are (for messages:
    a model may have hundreds of modules)."""
    items = [cut(str(item), NAME_CHARS) for item in items]
    more = f" and {len(items) - most} more" if len(items) > most else ""
    return ", ".join(items[:most]) + more


def memory_text(count: float) -> str:
    """A number of bytes in GiB, or in MiB below one GiB."""
    return f"{count / 2**30:.1f} GiB" if count >= 2**30 else f"{count / 2**20:.2f} MiB"


def warn(message: str) -> None:
    """A UserWarning attributed to the first caller outside curvkit (a fixed stacklevel would
    point into curvkit, contextlib or functools' cached_property, depending on the route that
    raised it)."""
    frame, level = sys._getframe(1), 2
    while frame is not None and (
        frame.f_globals.get("__name__", "").partition(".")[0] == "curvkit"
        or frame.f_code.co_filename in (contextlib.__file__, functools.__file__)
    ):
        frame, level = frame.f_back, level + 1
    warnings.warn(cut(printable(message), MESSAGE_CHARS), stacklevel=level)


class CurvkitError(Exception):
    """Base class of every error curvkit raises on purpose; its message is one line cut to
    MESSAGE_CHARS, whatever names or values went into it (a class or module name may be
    100 000 characters long, or hold a newline)."""

    def __str__(self) -> str:
        return cut(printable(super().__str__()), MESSAGE_CHARS)


class InvalidInputError(CurvkitError, ValueError):
    """The model, the data or a request is not usable as given."""


class UnsupportedError(CurvkitError):
    """A backend cannot compute what was asked for this model or loss."""


class BackendNotFoundError(CurvkitError, KeyError):
    """No backend of that name is registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return cut(printable(str(self.args[0])), MESSAGE_CHARS) if self.args else ""


class MissingDependencyError(CurvkitError, ImportError):
    """A backend's library is not installed."""


class PeerFailedError(CurvkitError):
    """Under torch.distributed, another rank failed during the analysis (its error is quoted)."""


def finite(values: Any) -> Any:
    """``values`` (products, class sums, factors, a library's estimates) if they are finite,
    else an InvalidInputError: NaN or Inf would break every routine downstream, or pass through
    them as numbers."""
    if not bool(torch.isfinite(torch.as_tensor(values)).all()):
        raise InvalidInputError(
            "the curvature computations give NaN or Inf: the model's derivatives overflow in "
            "its precision (weights or inputs too large?); curvature is undefined there."
        )
    return values
