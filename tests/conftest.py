"""Shared test problems: a trained digits MLP (float64, P = 2410) on a 300-example subset
with an unequal last batch (128 + 128 + 44), and its dense references.

The MLP uses tanh, not ReLU: in a ReLU network each layer's own block of H = Hess − G vanishes,
so tr H = 0 and every trace test of H would compare zeros."""

from __future__ import annotations

import sys
import textwrap

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


@pytest.fixture
def plugin_backend(tmp_path, monkeypatch):
    """Register a third-party backend: ``plugin_backend(name, class_source)`` writes a module and
    a dist-info with an entry point in the group ``curvkit.backends`` onto sys.path."""

    def register(name: str, source: str) -> None:
        module = f"plugin_{name}"
        (tmp_path / f"{module}.py").write_text(textwrap.dedent(source))
        dist = tmp_path / f"{module}-1.0.dist-info"
        dist.mkdir()
        (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 1.0\n")
        (dist / "entry_points.txt").write_text(f"[curvkit.backends]\n{name} = {module}:Plugin\n")
        monkeypatch.syspath_prepend(str(tmp_path))
        monkeypatch.delitem(sys.modules, module, raising=False)

    return register
