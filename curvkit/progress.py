"""Progress bars on stderr, shown only when asked for and stderr is a terminal."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


def progress_bar(*, total: int | None = None, desc: str = "", enabled: bool = True) -> tqdm:
    """A tqdm bar (a context manager) that stays silent unless ``enabled`` and stderr is a TTY."""
    show = enabled and sys.stderr.isatty()
    return tqdm(total=total, desc=desc, disable=not show, leave=False, file=sys.stderr)
