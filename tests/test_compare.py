"""Cross-backend comparison, the benchmark, per-model choices and backend="auto"."""

from __future__ import annotations

import pytest
import torch
import yaml

import curvkit
from curvkit.benchmark import bench
from curvkit.choice import load_choices
from curvkit.cli import main
from curvkit.comparison import assert_backends_agree, compare, compare_reports
from curvkit.problem import fingerprint
from tests.conftest import backend_params, installed, requires

ALL = sorted(  # the installed backends, torchfunc (the reference) first
    installed(backend_params(minimal=False)),
    key=lambda n: n != "torchfunc",
)


def kinds(checks):
    return {c.path: (c.kind, c.passed) for c in checks}


def test_comparison_rules():
    """Each kind of number with its tolerance: one passing and one failing case each."""
    reference = {
        "hessian": {
            "top_eigenvalues": [1.0, 1e-6],
            "trace": 2.0,
            "trace_stderr": 0.01,
            "n_outliers": 1,
            "provenance": {"top_eigenvalues": "not compared"},
        },
        "classmeans": {
            "overlap": {"ggn": 0.9},
            "counts": [3, 4],
            "gap": {"ritz": 9.7e-5},
            # one example per class: the within-class term is 0 up to rounding
            "eigenvalues": {"own": [1.0], "within": [3e-16]},
            "trace": {"total": 5.0, "within": 3.6e-15},
            "trace_stderr": {"total": 0.0, "within": 0.0},
        },
        # top-2 of a rank-1 block: the second eigenvector is any vector of the null space
        "layerwise": {"0": {"top_eigenvalues": [1.0, 1e-31], "rank1": [0.9, 0.3]}},
        "timings": {"hessian": 1.0},
    }
    close = {
        "hessian": {
            # 5e-4 relative on λ1; 5e-5 on a tiny eigenvalue is within atol · λ1 = 1e-4
            "top_eigenvalues": [1.0005, 5e-5],
            "trace": 2.05,  # 3.5 standard errors of sqrt(0.01² + 0.01²)
            "trace_stderr": 0.01,
            "n_outliers": 1,
            "provenance": {"top_eigenvalues": "different"},
        },
        # a gap is relative already: 1.1e-6 off a 1e-4 gap (1 %) is within atol = 1e-4
        "classmeans": {
            "overlap": {"ggn": 0.91},
            "counts": [3, 4],
            "gap": {"ritz": 9.6e-5},
            # rounding against rounding: on the scale of the largest term (was 5e7 × allowed)
            "eigenvalues": {"own": [1.0], "within": [8e-16]},
            "trace": {"total": 5.0, "within": 1.8e-15},
            "trace_stderr": {"total": 0.0, "within": 0.0},
        },
        "layerwise": {"0": {"top_eigenvalues": [1.0, 2e-31], "rank1": [0.91, 0.7]}},
        "timings": {"hessian": 9.0},
    }
    checks = compare_reports(reference, close, "other")
    assert all(c.passed for c in checks), [c for c in checks if not c.passed]
    assert kinds(checks) == {
        "hessian.top_eigenvalues[0]": ("iterative", True),
        "hessian.top_eigenvalues[1]": ("iterative", True),
        "hessian.trace": ("stochastic", True),
        "hessian.n_outliers": ("iterative", True),
        "classmeans.overlap.ggn": ("subspace", True),
        "classmeans.counts[0]": ("count", True),
        "classmeans.counts[1]": ("count", True),
        "classmeans.gap.ritz": ("iterative", True),
        "classmeans.eigenvalues.own[0]": ("iterative", True),
        "classmeans.eigenvalues.within[0]": ("iterative", True),
        "classmeans.trace.total": ("stochastic", True),
        "classmeans.trace.within": ("stochastic", True),
        "layerwise.0.top_eigenvalues[0]": ("iterative", True),
        "layerwise.0.top_eigenvalues[1]": ("iterative", True),
        "layerwise.0.rank1[0]": ("subspace", True),
    }
    far = {
        "hessian": {
            "top_eigenvalues": [1.002, 2e-4],
            "trace": 2.06,
            "trace_stderr": 0.01,
            "n_outliers": 1,
        },
        "classmeans": {
            "overlap": {"ggn": 0.93},
            "counts": [3, 5],
            "gap": {"ritz": 3e-4},
            "eigenvalues": {"own": [1.0], "within": [2e-4]},
            "trace": {"total": 5.0, "within": 1e-7},
            "trace_stderr": {"total": 0.0, "within": 0.0},
        },
        "layerwise": {"0": {"top_eigenvalues": [1.0, 2e-31], "rank1": [0.95, 0.3]}},
    }
    failed = {c.path for c in compare_reports(reference, far, "other") if not c.passed}
    assert failed == {
        "hessian.top_eigenvalues[0]",
        "hessian.top_eigenvalues[1]",
        "hessian.trace",
        "classmeans.overlap.ggn",
        "classmeans.counts[1]",
        "classmeans.gap.ritz",
        "classmeans.eigenvalues.within[0]",
        "classmeans.trace.within",
        "layerwise.0.rank1[0]",
    }


@pytest.mark.slow
def test_all_backends_agree_on_the_digits_mlp(digits_problem):
    model, loader = digits_problem
    comparison = assert_backends_agree(
        model, loader, ALL, quantities=["hessian", "classmeans"], top_k=5
    )
    assert comparison.reference == "torchfunc"
    assert {c.backend for c in comparison.checks} == set(ALL[1:])
    assert {c.kind for c in comparison.checks} >= {"iterative", "stochastic", "density", "count"}
    assert "agree" in str(comparison)


def test_a_wrong_backend_is_caught(digits_problem, plugin_backend):
    """A plugin whose G is 1 % too large: its eigenvalues fail, assert_backends_agree says so."""
    plugin_backend(
        "skewed",
        """
        from curvkit.adapters.torchfunc import TorchFuncBackend

        class Plugin(TorchFuncBackend):
            name = "skewed"

            def batch_ggnvp(self, x, y, V, param):
                return 1.01 * super().batch_ggnvp(x, y, V, param)
        """,
    )
    model, loader = digits_problem
    with pytest.raises(AssertionError, match=r"skewed:ggn.top_eigenvalues\[0\]"):
        assert_backends_agree(model, loader, ["torchfunc", "skewed"], quantities=["ggn"], top_k=3)


@pytest.mark.slow
def test_unsupported_quantities_are_listed_not_fatal(digits_problem):
    """A quantity one backend cannot compute is listed with the reason, not an error; computed
    by one backend alone, nothing vouches for it: the verdict says so (before: "agree", with
    only the sizes compared)."""
    model, loader = digits_problem
    comparison = compare(model, loader, ["pyhessian", "torchfunc"], quantities=["layerwise"])
    assert comparison.reference == "torchfunc"
    assert "kronecker_factors" in comparison.skipped["pyhessian"]["layerwise"]
    assert {c.path.split(".")[0] for c in comparison.checks} == {"model"}  # only the sizes
    assert comparison.uncompared == {"layerwise": "only torchfunc computed it"}
    assert not comparison.agree and "NOT COMPARED: layerwise" in str(comparison)
    with pytest.raises(curvkit.InvalidInputError, match="at least two backends"):
        compare(model, loader, ["torchfunc"])


@requires("backpack")
@requires("pyhessian")
def test_a_quantity_the_reference_skipped_is_held_to_the_next_backend():
    """torch.func cannot transform an nn.DataParallel model: BackPACK's and PyHessian's Hessian
    numbers are held to each other (before: to nothing, and the verdict was "agree" on the
    sizes alone), and the class means that PyHessian alone computes leave them uncompared;
    bench, whose reference is torch.func, says so and points to compare."""
    torch.manual_seed(0)
    model = torch.nn.DataParallel(
        torch.nn.Sequential(
            torch.nn.Linear(64, 8), torch.nn.Tanh(), torch.nn.Linear(8, 10)
        ).double()
    )
    x, y = curvkit.datasets.digits_tensors(samples_per_class=4)
    comparison = compare(model, [(x, y)], quantities=["hessian", "classmeans"], top_k=3)
    assert comparison.reference == "torchfunc"
    assert comparison.references == {"hessian": "backpack", "classmeans": "pyhessian"}
    held = {c.backend for c in comparison.checks if c.path.startswith("hessian.top_eigen")}
    assert held >= {"pyhessian"} and all(c.passed for c in comparison.checks)
    assert comparison.uncompared == {"classmeans": "only pyhessian computed it"}
    assert not comparison.agree
    assert "hessian against backpack (torchfunc skipped it)" in str(comparison)
    with pytest.raises(curvkit.UnsupportedError, match="bench holds every backend to torch.func"):
        bench(model, [(x, y)], quantities=["hessian"], top_k=3, repeats=1)


@pytest.mark.slow
def test_bench_choice_and_auto(digits_problem, tmp_path):
    model, loader = digits_problem
    result = bench(model, loader, ["torchfunc", "backpack"], ["ggn"], repeats=1, top_k=3)
    assert [r.backend for r in result.rows] == ["torchfunc", "backpack"]
    assert all(r.status == "ok" and r.agrees and r.seconds > 0 for r in result.rows)
    assert result.reference.startswith("dense torch.func")
    assert all(r.max_relative_error < 1e-8 for r in result.rows)  # Lanczos to 1e-6 residual
    files = result.save(tmp_path / "bench")
    assert yaml.safe_load(files[0].read_text())["rows"][0]["quantity"] == "ggn"
    assert "| ggn | backpack |" in files[1].read_text()

    choice_file = tmp_path / "choices.yaml"
    result.save_choice(choice_file)
    fingerprint = curvkit.Problem(model, loader).fingerprint()
    assert load_choices(choice_file)[fingerprint]["choices"] == result.choices
    with pytest.warns(UserWarning, match="choice saved in"):
        report = curvkit.analyze(
            model,
            loader,
            backend="auto",
            quantities=["ggn"],
            top_k=3,
            progress=False,
            choice_file=choice_file,
        )
    assert report.config["backends"] == result.choices
    assert report.backend == result.choices["ggn"]


@pytest.mark.slow
def test_auto_without_choice_falls_back_in_order(digits_problem, tmp_path):
    """No saved choice: BackPACK first; where it lacks a layer (LayerNorm), the next backend."""
    _, loader = digits_problem
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 8), torch.nn.LayerNorm(8), torch.nn.Tanh(), torch.nn.Linear(8, 10)
    ).double()
    with pytest.warns(UserWarning, match="no saved choice"):
        report = curvkit.analyze(
            model,
            loader,
            backend="auto",
            quantities=["hessian", "classmeans"],
            top_k=3,
            progress=False,
            choice_file=tmp_path / "none.yaml",
        )
    assert report.config["backends"] == {"hessian": "backpack", "classmeans": "torchfunc"}
    assert report.backend == "auto" and not report.skipped


def test_auto_says_which_saved_choice_it_could_not_use(digits_problem, tmp_path):
    """A choice saved on a machine with another backend: the fallback says so (before: "no
    saved choice for this model")."""
    model, data = digits_problem
    file = tmp_path / "choices.yaml"
    file.write_text(yaml.safe_dump({fingerprint(model): {"choices": {"ggn": "elsewhere"}}}))
    with pytest.warns(UserWarning, match=r"names \{'ggn': 'elsewhere'\}, not installed here; "
                      "for each quantity, the first installed backend"):  # fmt: skip
        curvkit.analyze(model, data, "auto", ["ggn"], top_k=2, options={"trace_matvecs": 6,
                        "density_probes": 0}, progress=False, choice_file=file)  # fmt: skip


@requires("backpack")
def test_auto_falls_through_a_saved_choice_that_refuses_the_model(digits_problem, tmp_path):
    """A choice saved before the model gained a feature its backend cannot handle (a forward
    hook, which BackPACK's class means refuse): the whole auto run failed with BackPACK's
    refusal. That quantity now falls through to the documented order, and the warning says
    which saved choice refused."""
    model, data = digits_problem
    hooked = model[1].register_forward_hook(lambda module, args, output: 2 * output)
    file = tmp_path / "choices.yaml"
    file.write_text(yaml.safe_dump({fingerprint(model): {"choices": {"classmeans": "backpack"}}}))
    try:
        with pytest.warns(UserWarning, match=r"but \{'classmeans': 'backpack'\} refused this "
                          "model; for the rest, the first installed backend"):  # fmt: skip
            report = curvkit.analyze(model, data, "auto", ["classmeans"], top_k=2,
                                     options={"trace_matvecs": 6, "density_probes": 0},
                                     progress=False, choice_file=file)  # fmt: skip
    finally:
        hooked.remove()
    assert report.classmeans is not None and report.config["backends"]["classmeans"] != "backpack"


@pytest.mark.parametrize(
    "content, match",
    [
        (
            None,
            "cannot be read \\(\\[Errno 21\\] Is a directory",
        ),  # a folder: was IsADirectoryError
        (b"\xff\xfe", "cannot be read \\('utf-8' codec"),  # was UnicodeDecodeError
        ("- a\n", "is not a mapping"),
        ("FINGERPRINT: 5\n", "holds no mapping of choices for this model"),  # was AttributeError
        ("FINGERPRINT: {choices: [ggn]}\n", "holds no mapping of choices for this model"),
    ],
)
def test_a_bad_choice_file_is_one_clear_error(content, match, tmp_path):
    model = torch.nn.Linear(64, 10).double()
    path = tmp_path / "choices.yaml"
    if content is None:
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content.replace("FINGERPRINT", fingerprint(model)))
    with pytest.raises(curvkit.InvalidInputError, match=match):
        curvkit.analyze(model, [(torch.zeros(2, 64).double(), torch.tensor([0, 1]))],
                        backend="auto", progress=False, choice_file=path)  # fmt: skip


@pytest.mark.parametrize(
    "arguments, match",
    [
        ({"backends": ["torchfunc", "torchfunc"]}, "backend torchfunc is named more than once"),
        ({"backends": "torchfunc"}, r"at least two backends, got \['torchfunc'\]"),
        ({"rtol": -1}, "rtol must be a finite number ≥ 0, got -1"),
        ({"sigmas": float("nan")}, "sigmas must be a finite number ≥ 0, got nan"),
        ({"atol": "1e-8"}, "atol must be a finite number ≥ 0, got '1e-8'"),
        ({"thorough": "no"}, "thorough must be true or false, got 'no'"),  # read as true
        ({"options": [1, 2]}, "options must map option names to values"),  # a raw TypeError
    ],
)
def test_bad_comparisons_are_refused_before_any_run(arguments, match):
    """A backend compared with itself always agrees, a negative tolerance always disagrees:
    both refused with one sentence before any backend runs (the loader would raise)."""
    with pytest.raises(curvkit.InvalidInputError, match=match):
        compare(
            torch.nn.Linear(64, 10), None, **{"backends": ["torchfunc", "backpack"], **arguments}
        )
    with pytest.raises(curvkit.InvalidInputError, match="repeats must be an integer ≥ 1, got 0"):
        bench(torch.nn.Linear(64, 10), None, backends=["torchfunc"], repeats=0)
    # before: the reference ran, then each backend's row failed with the bad option
    with pytest.raises(curvkit.InvalidInputError, match="'trace_matvecs' \\(0: off\\) must be"):
        bench(torch.nn.Linear(64, 10), None, backends=["torchfunc"], options={"trace_matvecs": 1})


def test_cli_compare_exit_codes(capsys):
    args = ["compare", "--backends", "torchfunc,backpack", "--quantities", "ggn"]
    args += ["--top-k", "3", "--epochs", "1", "--samples-per-class", "10", "--quiet"]
    assert main(args) == 0
    assert "agree" in capsys.readouterr().out
    # no tolerance at all: BackPACK's exact trace differs from torch.func's Hutch++ estimate
    assert main([*args, "--rtol", "0", "--atol", "0", "--sigmas", "0"]) == 1
    assert "DISAGREE" in capsys.readouterr().out
    assert main(["compare", "--backends", "torchfunc,nope", "--epochs", "0", "--quiet"]) == 2


@pytest.mark.slow
def test_cli_bench_saves_tables_and_choice(tmp_path, capsys):
    code = main(
        [
            "bench",
            "--backends",
            "torchfunc,backpack",
            "--quantities",
            "ggn",
            "--top-k",
            "3",
            "--epochs",
            "1",
            "--samples-per-class",
            "10",
            "--repeats",
            "1",
            "--output",
            str(tmp_path),
            "--save-choice",
            "--choice-file",
            str(tmp_path / "choices.yaml"),
            "--quiet",
        ]
    )
    assert code == 0
    assert (tmp_path / "bench.md").exists() and (tmp_path / "bench.yaml").exists()
    (entry,) = load_choices(tmp_path / "choices.yaml").values()
    assert entry["choices"]["ggn"] in ("torchfunc", "backpack")
    assert "saved in" in capsys.readouterr().out


@pytest.mark.slow
def test_pyhessian_top_eigenvalues_of_an_indefinite_matrix(cnn_problem):
    """PyHessian's power iteration finds the largest |λ|: on the CNN's residual H (eigenvalues
    ≈ ±0.15) it returned −0.153 among the "top" four until the adapter used Lanczos for H."""
    model, loader = cnn_problem
    options = {"trace_matvecs": 30, "density_probes": 3, "density_steps": 30}
    comparison = assert_backends_agree(
        model, loader, ["torchfunc", "pyhessian"], quantities=["residual"], top_k=4, options=options
    )
    provenance = comparison.reports["pyhessian"].residual.provenance["top_eigenvalues"]
    assert provenance.derived and "largest |λ|" in provenance.note


def test_exact_zero_traces_agree_up_to_rounding():
    """tr H is 0 in a ReLU network: an exact 0 against a dense sum's 1e-17 agrees (rounding on
    the spectrum's scale), a real difference of 1e-6 λ1 does not."""
    want = {"residual": {"top_eigenvalues": [0.01, 0.005], "trace": 1e-17, "trace_stderr": 0.0}}
    for value, agrees in ((0.0, True), (1e-8, False)):
        got = {"residual": {"top_eigenvalues": [0.01, 0.005], "trace": value, "trace_stderr": 0.0}}
        (trace,) = [c for c in compare_reports(want, got, "x") if c.path == "residual.trace"]
        assert trace.passed == agrees
