"""Backend registry (entry points, third-party plugins) and the command line."""

from __future__ import annotations

import re

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


def test_third_party_backend_through_entry_point(plugin_backend):
    """A distribution on sys.path declares a backend; curvkit finds it without changes."""
    plugin_backend(
        "fake",
        """
        from curvkit.adapters.torchfunc import TorchFuncBackend

        class Plugin(TorchFuncBackend):
            name = "fake"
        """,
    )
    assert "fake" in backend_names()
    assert get_backend("fake").__name__ == "Plugin"


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
            "--no-plots",
        ]
    )
    assert code == 0
    assert [p.name for p in tmp_path.iterdir()] == ["report.yaml"]
    data = yaml.safe_load((tmp_path / "report.yaml").read_text())
    assert len(data["ggn"]["top_eigenvalues"]) == 3
    assert data["model"]["num_samples"] == 1797


def test_cli_warnings_are_one_line_each(tmp_path, capsys):
    """A warning on the command line reads "curvkit: warning: …", without Python's path of the
    entry script and its line ``sys.exit(main())``."""
    code = main(["analyze", "--epochs", "1", "--quantities", "hessian", "--top-k", "1",
                 "--samples-per-class", "5", "--backend", "auto", "--choice-file",
                 str(tmp_path / "none.yaml"), "--output", str(tmp_path), "--quiet",
                 "--no-plots"])  # fmt: skip
    assert code == 0
    lines = capsys.readouterr().err.splitlines()
    assert lines and lines[0].startswith("curvkit: warning: backend='auto' used")
    assert all(line.startswith("curvkit: warning: ") for line in lines), lines


def test_cli_analyze_quick_uses_the_quick_settings_unless_set(tmp_path):
    """--quick: compare's settings (top-k 5, 30 trace products, SLQ 2 × 20), recorded in the
    report's run config; a --top-k given beside it wins."""
    args = [
        "analyze",
        "--quick",
        "--epochs",
        "1",
        "--quantities",
        "hessian",
        "--quiet",
        "--no-plots",
    ]
    assert main([*args, "--output", str(tmp_path / "a")]) == 0
    data = yaml.safe_load((tmp_path / "a" / "report.yaml").read_text())
    assert len(data["hessian"]["top_eigenvalues"]) == 5
    assert data["hessian"]["provenance"]["trace"]["matvecs"] == 30
    assert data["hessian"]["provenance"]["density"]["matvecs"] == 2 * 20
    assert data["config"]["run"]["options"]["trace_matvecs"] == 30
    assert main([*args, "--top-k", "3", "--output", str(tmp_path / "b")]) == 0
    data = yaml.safe_load((tmp_path / "b" / "report.yaml").read_text())
    assert len(data["hessian"]["top_eigenvalues"]) == 3


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


@pytest.mark.parametrize(
    "arguments, match",
    [
        (["analyze", "--top-k", "0"], "top_k must be an integer ≥ 1"),
        (["analyze", "--seed", "-1"], "seed must be an integer in"),
        (["analyze", "--backend", "BackPACK"], "unknown backend 'BackPACK'"),
        (["compare", "--backends", "torchfunc,nope"], "unknown backend 'nope'"),
        (["compare", "--backends", "torchfunc"], "compare needs at least two backends"),
        (["compare", "--rtol", "-1"], "rtol must be a finite number ≥ 0"),
        (["bench", "--quantities", "hessian", "hessain"], "unknown quantities"),
    ],
)
def test_cli_argument_errors_come_before_training(arguments, match, monkeypatch, capsys):
    """Before: the digits MLP was trained for 30 epochs first (2 s on 2 cores)."""

    def no_training(*args, **kwargs):
        raise AssertionError("trained before checking the arguments")

    monkeypatch.setattr("curvkit.config.build", no_training)
    assert main([*arguments, "--quiet"]) == 2
    assert match in capsys.readouterr().err


@pytest.mark.parametrize(
    "environment, match",
    [
        ({"WORLD_SIZE": "two"}, "WORLD_SIZE is 'two', not a number of processes"),
        (
            {"WORLD_SIZE": "2"},
            "WORLD_SIZE is 2, but torch.distributed cannot start from the "
            "environment (.*RANK expected, but not set)",
        ),  # fmt: skip
    ],
)
def test_a_bad_torchrun_environment_is_refused(environment, match, monkeypatch, capsys):
    """WORLD_SIZE set outside torchrun: raw ValueErrors from int() and torch's rendezvous."""
    monkeypatch.delenv("RANK", raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr("curvkit.config.build", lambda *a, **k: pytest.fail("the work started"))
    assert main(["analyze", "--quiet"]) == 2
    assert re.search(match, capsys.readouterr().err)


def test_cli_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out == f"curvkit {curvkit.__version__}\n"


def test_cli_backends_table(capsys):
    assert main(["backends"]) == 0
    assert "torchfunc" in capsys.readouterr().out
