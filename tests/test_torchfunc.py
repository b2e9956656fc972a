"""The torch.func backend's dense matrices and both its product routes (its default products,
class sums and factors are tested with every other backend in tests/test_backends.py) against
the dense references built directly with torch.func (float64, 1e-8 relative: both sides are
exact up to rounding)."""

from __future__ import annotations

import pytest
import torch

from curvkit.adapters.torchfunc import ROUTES
from curvkit.datasets import digits_tensors, tensor_loader
from curvkit.linalg import Options
from curvkit.problem import Problem
from curvkit.registry import get_backend
from tests import reference

RTOL = 1e-8


def test_dense_matrices_match_reference(digits_problem):
    """On 40 digits in batches of 24 + 16: the batches' unequal sizes must weight the mean (a
    dense Hessian costs P products per example, so a subset keeps this test quick)."""
    model, _ = digits_problem
    x, y = digits_tensors(samples_per_class=4)
    loader = tensor_loader(x, y, batch_size=24)
    assert [labels.numel() for _, labels in loader] == [24, 16]
    backend = get_backend("torchfunc")(Problem(model, loader))
    assert reference.rel_err(backend.dense_hessian(), reference.dense_hessian(model, x, y)) < RTOL
    assert reference.rel_err(backend.dense_ggn(), reference.dense_ggn(model, x)) < RTOL


@pytest.mark.parametrize("route", ROUTES)
def test_both_product_routes_match_the_dense_matrices(case, route):
    """Forward-over-reverse and reverse-over-reverse, on blocks of 1 and 5 columns and on a
    layer's block, against the dense matrices (1e-8 relative: exact up to rounding); the
    residual Hess − G in one product, exactly zero on a parameter the logits are linear in."""
    model, loader, dense = case
    options = Options(backend={"torchfunc": {"products": route}}, block_size=3)  # 5 → 3 + 2
    backend = get_backend("torchfunc")(Problem(model, loader), options)
    V = torch.randn(backend.problem.num_params, 5, dtype=torch.float64)
    for matrix, product in (("hessian", backend.hvp), ("ggn", backend.ggnvp)):
        assert reference.rel_err(product(V), dense[matrix] @ V) < RTOL
        assert reference.rel_err(product(V[:, 0]), dense[matrix] @ V[:, 0]) < RTOL
        name = backend.problem.names[0]
        where = backend.problem.slice_of(name)
        block = dense[matrix][where, where]
        assert reference.rel_err(product(V[where], name), block @ V[where]) < RTOL
    assert backend.operator("ggn").note() == f"products: {route}"
    residual = backend.operator("residual")  # one product of the residual surrogate
    assert reference.rel_err(residual.matmat(V), (dense["hessian"] - dense["ggn"]) @ V) < RTOL
    assert residual.cost == 1 and residual.note() == f"products: {route}"
    last = backend.problem.names[-1]  # the output layer's bias: f is linear in it
    where = backend.problem.slice_of(last)
    assert torch.equal(backend.operator("residual", last).matmat(V[where]), 0 * V[where])


def test_auto_route_says_what_it_measured(digits_problem):
    backend = get_backend("torchfunc")(Problem(*digits_problem))
    backend.hvp(torch.ones(backend.problem.num_params, 4, dtype=torch.float64))
    assert set(backend.chosen_routes) == {("hessian", "2–7 vectors")}
    assert backend.product_note("hessian").startswith("products (measured faster): ")
    assert backend.product_note("hessian").endswith(" for 2–7 vectors")
