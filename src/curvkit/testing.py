"""Helpers for a user's own test suite.

>>> from curvkit.testing import assert_backends_agree                      # doctest: +SKIP
>>> assert_backends_agree(model, loader, ["torchfunc", "backpack"])        # doctest: +SKIP
"""

from curvkit.comparison import assert_backends_agree

__all__ = ["assert_backends_agree"]
