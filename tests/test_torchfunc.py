"""The torch.func backend's dense matrices (its products, class sums and factors are tested with
every other backend in tests/test_backends.py) against the dense references built directly with
torch.func (float64, 1e-8 relative: both sides are exact up to rounding)."""

from __future__ import annotations

from curvkit.problem import Problem
from curvkit.registry import get_backend
from tests import reference

RTOL = 1e-8


def test_dense_matrices_match_reference(digits_problem, dense_mlp):
    model, loader = digits_problem
    assert [y.numel() for _, y in loader] == [128, 128, 44]  # an unequal last batch
    backend = get_backend("torchfunc")(Problem(model, loader))
    assert reference.rel_err(backend.dense_hessian(), dense_mlp["hessian"]) < RTOL
    assert reference.rel_err(backend.dense_ggn(), dense_mlp["ggn"]) < RTOL
