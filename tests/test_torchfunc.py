"""The torch.func backend against dense torch.func references (float64, tolerance 1e-8 relative:
both sides are exact up to a few thousand rounding errors of size 1e-16)."""

from __future__ import annotations

import torch

from curvkit.problem import Problem
from curvkit.registry import get_backend
from tests import reference

RTOL = 1e-8


def _backend(model, loader):
    return get_backend("torchfunc")(Problem(model, loader))


def test_hvp_and_ggnvp_match_dense(digits_problem, dense_mlp):
    model, loader = digits_problem
    backend = _backend(model, loader)
    assert [y.numel() for _, y in loader] == [128, 128, 44]  # an unequal last batch
    v = torch.randn(backend.problem.num_params, dtype=torch.float64)
    assert reference.rel_err(backend.hvp(v), dense_mlp["hessian"] @ v) < RTOL
    assert reference.rel_err(backend.ggnvp(v), dense_mlp["ggn"] @ v) < RTOL


def test_dense_matrices_match_reference(digits_problem, dense_mlp):
    backend = _backend(*digits_problem)
    assert reference.rel_err(backend.dense_hessian(), dense_mlp["hessian"]) < RTOL
    assert reference.rel_err(backend.dense_ggn(), dense_mlp["ggn"]) < RTOL


def test_class_deltas_match_per_example_reference(digits_problem, dense_mlp):
    backend = _backend(*digits_problem)
    deltas = backend.class_deltas()
    d, y = dense_mlp["deltas"], dense_mlp["labels"]
    expected = torch.stack([d[y == c].sum(0) for c in range(10)])
    assert reference.rel_err(deltas.sums, expected) < RTOL
    assert deltas.counts.tolist() == [30] * 10
    assert abs(deltas.square_norm_sum - float((d**2).sum())) < RTOL * float((d**2).sum())


def test_ggn_is_second_moment_of_deltas(digits_problem, dense_mlp):
    d = dense_mlp["deltas"].reshape(-1, dense_mlp["ggn"].shape[0])
    assert reference.rel_err(d.T @ d / 300, dense_mlp["ggn"]) < RTOL
