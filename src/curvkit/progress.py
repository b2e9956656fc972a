"""Progress on stderr: bars on a terminal, named after the quantity being computed, and one
line per finished quantity when stderr is not a terminal (a log file, CI), where bars are off."""

from __future__ import annotations

import contextlib
import contextvars
import sys
from collections.abc import Iterator

from tqdm.auto import tqdm

_QUANTITY: contextvars.ContextVar[str] = contextvars.ContextVar("curvkit_quantity", default="")


@contextlib.contextmanager
def computing(quantity: str) -> Iterator[None]:
    """Name the bars opened inside after ``quantity`` ("hessian: Lanczos")."""
    token = _QUANTITY.set(quantity)
    try:
        yield
    finally:
        _QUANTITY.reset(token)


def progress_bar(*, total: int | None = None, desc: str = "", enabled: bool = True) -> tqdm:
    """A tqdm bar (a context manager) that stays silent unless ``enabled`` and stderr is a TTY."""
    show = enabled and sys.stderr.isatty()
    quantity = _QUANTITY.get()
    desc = f"{quantity}: {desc}" if quantity else desc
    return tqdm(total=total, desc=desc, disable=not show, leave=False, file=sys.stderr)


def log(message: str, enabled: bool = True) -> None:
    """One line on stderr when ``enabled`` and stderr is not a terminal (bars are off there)."""
    if enabled and not sys.stderr.isatty():
        print(f"curvkit: {message}", file=sys.stderr, flush=True)
