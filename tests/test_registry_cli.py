"""Backend registry (entry points, third-party plugins) and the command line."""

from __future__ import annotations

import sys
import textwrap

import pytest
import yaml

import curvkit
from curvkit.cli import main
from curvkit.errors import BackendNotFoundError
from curvkit.registry import backend_names, get_backend


def test_builtin_backends_are_listed():
    table = curvkit.backends()
    assert table["torchfunc"]["installed"]
    assert table["torchfunc"]["capabilities"]["hvp"] == "native"


def test_unknown_backend_lists_the_known_ones():
    with pytest.raises(BackendNotFoundError, match="torchfunc"):
        get_backend("nope")


def test_third_party_backend_through_entry_point(tmp_path, monkeypatch):
    """A fake distribution on sys.path declares a backend; curvkit finds it without changes."""
    (tmp_path / "fakebackend.py").write_text(
        textwrap.dedent("""
        from adapters_fake_base import *  # noqa
    """).replace(
            "from adapters_fake_base import *  # noqa",
            textwrap.dedent("""
        from curvkit.adapters.torchfunc import TorchFuncBackend
        class FakeBackend(TorchFuncBackend):
            name = "fake"
    """),
        )
    )
    dist = tmp_path / "fakebackend-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fakebackend\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[curvkit.backends]\nfake = fakebackend:FakeBackend\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "fake" in backend_names()
    assert get_backend("fake").__name__ == "FakeBackend"
    sys.modules.pop("fakebackend", None)


def test_cli_analyze_writes_report(tmp_path, capsys):
    code = main(
        [
            "analyze",
            "--epochs",
            "2",
            "--quantities",
            "ggn",
            "--top-k",
            "3",
            "--output",
            str(tmp_path),
            "--quiet",
        ]
    )
    assert code == 0
    data = yaml.safe_load((tmp_path / "report.yaml").read_text())
    assert len(data["ggn"]["top_eigenvalues"]) == 3
    assert data["model"]["num_samples"] == 1797


def test_cli_usage_errors_exit_2(tmp_path, capsys):
    assert (
        main(
            ["analyze", "--backend", "nope", "--output", str(tmp_path), "--quiet", "--epochs", "0"]
        )
        == 2
    )
    assert "unknown backend" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["frobnicate"])
    assert info.value.code == 2


def test_cli_backends_table(capsys):
    assert main(["backends"]) == 0
    assert "torchfunc" in capsys.readouterr().out
