"""Shared test problems: a trained digits MLP (float64, P = 2410) on a 300-example subset
with an unequal last batch (128 + 128 + 44), and its dense references.

The MLP uses tanh, not ReLU: a piecewise-linear network has Hess = G almost everywhere, and
every test of the residual H = Hess − G would then compare zeros."""

from __future__ import annotations

import pytest
from torch import nn

from curvkit.datasets import digits_loader
from curvkit.models import digits_cnn, digits_mlp, train
from tests import reference


@pytest.fixture(scope="session")
def digits_problem():
    loader = digits_loader(batch_size=128, samples_per_class=30)
    model = train(
        digits_mlp(activation=nn.Tanh),
        digits_loader(batch_size=32, samples_per_class=30, shuffle=True),
        epochs=20,
        progress=False,
    )
    return model, loader


@pytest.fixture(scope="session")
def cnn_problem():
    loader = digits_loader(batch_size=64, samples_per_class=10)
    model = train(
        digits_cnn(),
        digits_loader(batch_size=20, samples_per_class=10, shuffle=True),
        epochs=10,
        progress=False,
    )
    return model, loader


@pytest.fixture(scope="session")
def dense_mlp(digits_problem):
    model, loader = digits_problem
    x, y = reference.all_data(loader)
    return {
        "hessian": reference.dense_hessian(model, x, y),
        "ggn": reference.dense_ggn(model, x),
        "deltas": reference.papyan_deltas(model, x),
        "labels": y,
    }
