"""analyze() end to end on the digits MLP: spectra against dense eigvalsh, report round trip,
the model given back untouched, and clear errors for bad requests."""

from __future__ import annotations

import json
import math
import os
import re

import numpy as np
import pytest
import torch

import curvkit
from curvkit.comparison import compare_reports
from curvkit.errors import BackendNotFoundError, InvalidInputError
from curvkit.plot import spectral_density
from curvkit.quantities.spectrum import count_outliers
from curvkit.report import Report
from tests.conftest import requires

QUICK_TRACE = {"trace_matvecs": 6, "density_probes": 1, "density_steps": 5}


@pytest.fixture(scope="module")
def report(digits_problem):
    model, loader = digits_problem
    return curvkit.analyze(model, loader, backend="torchfunc", top_k=12, progress=False)


def test_top_eigenvalues_match_dense(report, dense_mlp_eigen):
    for name in ("hessian", "ggn", "residual"):
        exact = dense_mlp_eigen[name][0][:12]
        got = np.array(getattr(report, name).top_eigenvalues)
        assert getattr(report, name).converged
        np.testing.assert_allclose(got, exact, rtol=1e-4, err_msg=name)


def test_traces_within_error_bars_and_a_few_percent(report, dense_mlp):
    for name, dense in (("hessian", dense_mlp["hessian"]), ("ggn", dense_mlp["ggn"])):
        exact = float(torch.trace(dense))
        s = getattr(report, name)
        assert abs(s.trace - exact) < 4 * s.trace_stderr + 1e-12, name
        assert abs(s.trace - exact) < 0.03 * abs(exact), name


def test_ggn_trace_is_exact_from_the_class_means_pass(report, dense_mlp, digits_problem):
    """With classmeans on the per-example route, G's trace is Σ‖δ_{i,c'}‖²/N (1e-10 of the dense
    trace, stderr 0) and no Hutch++ products are spent on it; asked for alone, it is estimated."""
    exact = float(torch.trace(dense_mlp["ggn"]))
    assert report.ggn.trace == report.classmeans.trace["total"] == pytest.approx(exact, rel=1e-10)
    assert report.ggn.trace_stderr == 0.0
    assert report.ggn.provenance["trace"].routine == "per-example factors"
    assert report.matvecs["ggn"] == report.ggn.provenance["top_eigenvalues"].matvecs + (
        report.ggn.provenance["density"].matvecs
    )
    alone = curvkit.analyze(*digits_problem, quantities=["ggn"], top_k=3, progress=False)
    assert alone.ggn.trace_stderr > 0 and alone.ggn.provenance["trace"].routine == "curvkit.hutch++"


def test_layer_profiles_are_against_the_reports_hessian(report):
    """Without layer densities, each block's top-k profile is compared with the report's own
    full-Hessian eigenvalues (k = 12: both lists; a block smaller than k would shorten it)."""
    full = np.array(report.hessian.top_eigenvalues)
    for name, layer in report.layerwise.items():
        block = np.array(layer.top_eigenvalues)
        k = min(len(block), len(full))
        expected = np.mean(np.abs(block[1:k] / block[0] - full[1:k] / full[0]))
        assert layer.profile_distance == pytest.approx(expected, rel=1e-12), name
        assert layer.spectrum_distance is None


def test_trace_and_density_switched_off(digits_problem, dense_mlp_eigen):
    """trace_matvecs 0 and density_probes 0: the top eigenvalues alone (still those of the dense
    matrices), no estimator products, NaN traces and empty densities that the summary, the
    figures and a comparison accept; G's trace stays exact from the class-means pass, free."""
    report = curvkit.analyze(
        *digits_problem,
        quantities=["hessian", "ggn", "classmeans", "layerwise"],
        top_k=3,
        options={"trace_matvecs": 0, "density_probes": 0},
        progress=False,
    )
    for name in ("hessian", "ggn"):
        s = getattr(report, name)
        np.testing.assert_allclose(s.top_eigenvalues, dense_mlp_eigen[name][0][:3], rtol=1e-4)
        assert s.density["grid"] == [] and "density" not in s.provenance
        assert report.matvecs[name] == s.provenance["top_eigenvalues"].matvecs
    assert math.isnan(report.hessian.trace) and "trace" not in report.hessian.provenance
    assert report.ggn.trace == report.classmeans.trace["total"] > 0
    assert all(math.isnan(layer.trace) for layer in report.layerwise.values())
    assert "off" in str(report)
    assert spectral_density(report) is None
    data = report.to_dict()
    assert all(check.passed for check in compare_reports(data, data, "same"))


def test_density_is_normalised(report):
    d = report.hessian.density
    assert np.trapezoid(d["values"], d["grid"]) == pytest.approx(1.0, abs=1e-3)


def test_report_contract_and_round_trip(report, tmp_path):
    data = report.to_dict()
    assert set(data["model"]) >= {"num_params", "num_classes", "num_samples", "fingerprint"}
    for name in ("hessian", "ggn", "residual"):
        block = data[name]
        assert set(block) >= {
            "top_eigenvalues",
            "trace",
            "trace_stderr",
            "density",
            "n_outliers",
            "provenance",
        }
        assert block["top_eigenvalues"] == sorted(block["top_eigenvalues"], reverse=True)
        assert isinstance(block["trace"], float) and isinstance(block["top_eigenvalues"][0], float)
        assert block["provenance"]["top_eigenvalues"]["routine"] == "curvkit.lanczos"
        n, top = block["n_outliers"], block["top_eigenvalues"]  # the count's margin λn/λn+1
        assert block["outlier_gap"] == (top[n - 1] / top[n] if n else None)
    assert data["model"]["num_params"] == 2410 and data["model"]["num_samples"] == 300
    for suffix in (".yaml", ".json"):
        path = report.save(tmp_path / f"r{suffix}")
        assert Report.load(path).to_dict() == data
    assert "hessian" in str(report) and "λ1" in str(report)


def test_a_report_with_nan_traces_is_strict_json_and_reads_back(digits_problem, tmp_path):
    """Traces switched off are NaN; JSON has no NaN (Python wrote it anyway: jq and
    JavaScript's JSON.parse refuse such a file), so it is written as the string "NaN" and read
    back as the float."""
    model, loader = digits_problem
    report = curvkit.analyze(model, loader, quantities=["hessian"], top_k=2, progress=False,
                             options={"trace_matvecs": 0, "density_probes": 0})  # fmt: skip
    path = report.save(tmp_path / "report.json")
    text = path.read_text()
    json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in the JSON"))
    assert '"trace": "NaN"' in text
    loaded = Report.load(path)
    assert math.isnan(loaded.hessian.trace) and isinstance(loaded.hessian.trace, float)
    assert loaded.hessian.top_eigenvalues == report.hessian.top_eigenvalues


def test_the_summary_says_off_for_class_mean_terms_without_tr_g(digits_problem):
    """On the gradient route tr G comes from Hutch++, so with traces off the within term is
    NaN: the summary said "within nan (nan%)" and "(nan%)" after every term."""
    model, loader = digits_problem
    report = curvkit.analyze(model, loader, quantities=["classmeans"], top_k=2, progress=False,
                             options={"trace_matvecs": 0, "density_probes": 0,
                                      "class_sums": "gradients"})  # fmt: skip
    line = next(line for line in str(report).splitlines() if line.startswith("class means"))
    assert line.endswith("+ within off") and "nan" not in line, line


def test_save_rejects_unknown_suffix_and_leaves_no_file(report, tmp_path):
    with pytest.raises(InvalidInputError, match="yaml"):
        report.save(tmp_path / "r.txt")
    assert list(tmp_path.iterdir()) == []


def _state(model):
    return (
        [p.detach().clone() for p in model.parameters()],
        [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        [p.requires_grad for p in model.parameters()],
        [m.training for m in model.modules()],
        [dict(m._forward_hooks) for m in model.modules()],
    )


def test_model_is_untouched(digits_problem):
    model, loader = digits_problem
    model.train()
    model[0].weight.grad = torch.ones_like(model[0].weight)
    model[2].bias.requires_grad_(False)
    handle = model[0].register_forward_hook(lambda *a: None)
    try:
        before = _state(model)
        curvkit.analyze(
            model,
            loader,
            quantities=["hessian"],
            top_k=2,
            progress=False,
            options={"trace_matvecs": 6, "density_probes": 1, "density_steps": 5},
        )
        after = _state(model)
        for a, b in zip(
            before[0] + [g for g in before[1] if g is not None],
            after[0] + [g for g in after[1] if g is not None],
        ):
            assert torch.equal(a, b)
        assert [g is None for g in before[1]] == [g is None for g in after[1]]
        assert before[2:] == after[2:]
        torch.func.grad(
            lambda p: torch.func.functional_call(model, p, (loader.dataset[:5][0],)).sum()
        )({n: p.detach() for n, p in model.named_parameters()})
    finally:
        handle.remove()
        model[0].weight.grad = None
        model[2].bias.requires_grad_(True)
        model.eval()


def test_same_seed_same_report(digits_problem):
    model, loader = digits_problem
    kwargs = dict(
        quantities=["ggn"],
        top_k=3,
        progress=False,
        options={"trace_matvecs": 9, "density_probes": 2, "density_steps": 10},
    )
    one = curvkit.analyze(model, loader, seed=1, **kwargs).to_dict()
    two = curvkit.analyze(model, loader, seed=1, **kwargs).to_dict()
    three = curvkit.analyze(model, loader, seed=2, **kwargs).to_dict()
    for d in (one, two, three):
        for p in d["ggn"]["provenance"].values():
            p["seconds"] = 0.0
        d.pop("timings")
    assert one == two
    assert one["ggn"]["trace"] != three["ggn"]["trace"]
    np.testing.assert_allclose(
        one["ggn"]["top_eigenvalues"], three["ggn"]["top_eigenvalues"], rtol=1e-6
    )


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"backend": "nope"}, BackendNotFoundError, "torchfunc"),
        ({"quantities": ["curvature"]}, InvalidInputError, "hessian"),
        ({"quantities": []}, InvalidInputError, "empty"),
        ({"top_k": 10**6}, InvalidInputError, "top_k"),
        ({"options": {"lanczos_tolerance": 1}}, InvalidInputError, "lanczos_tol"),
        ({"loss": "mse"}, curvkit.InvalidInputError, "cross_entropy"),
        ({"params": ["0.nope"]}, InvalidInputError, "0.weight"),
        (
            {"params": ["2.bias", "0.weight", "2.bias"]},
            InvalidInputError,
            "the Parameter 2.bias more than once",
        ),
    ],
)
def test_bad_requests_raise_clear_errors(digits_problem, kwargs, error, match):
    model, loader = digits_problem
    with pytest.raises(error, match=match):
        curvkit.analyze(model, loader, progress=False, **kwargs)


def test_count_outliers_rule():
    bulk = list(np.linspace(1.0, 0.8, 12))
    assert count_outliers([50.0, 30.0, 20.0] + bulk) == 3
    assert count_outliers(bulk) == 0
    assert count_outliers([1.0, -1.0]) == 0
    # a flat top: small steps over a flatter bulk are not outliers
    flat = [0.0323, 0.0316, 0.031, 0.0305, 0.03, 0.0296, 0.0293, 0.029, 0.0288, 0.0286]
    assert count_outliers(flat + [0.0281 - 1e-5 * i for i in range(10)]) == 0


@requires("pyhessian")
def test_an_unsupported_quantity_fails_before_anything_is_computed(digits_problem):
    """PyHessian has no Kronecker factors: asked for the Hessian and layerwise, it says so after
    the data's scan, before any product."""
    model, loader = digits_problem
    passes = []

    class Counting:
        def __iter__(self):
            passes.append(1)
            yield from loader

    with pytest.raises(curvkit.UnsupportedError, match="kronecker_factors, which layerwise needs"):
        curvkit.analyze(model, Counting(), backend="pyhessian", quantities=["hessian", "layerwise"])
    assert len(passes) == 1


def test_reprs_are_short(report):
    """A REPL shows a line for the report and the headline numbers for a quantity, not the
    densities, Gram matrices and provenance (those stay attributes)."""
    assert repr(report).startswith("Report(backend='torchfunc', P=2410, C=10, N=300, ")
    assert len(repr(report)) < 300
    for name in ("hessian", "ggn", "residual", "classmeans"):
        assert len(repr(getattr(report, name))) < 1500, name
    assert "density" not in repr(report.hessian) and report.hessian.density["grid"]
    assert all(len(repr(layer)) < 1500 for layer in report.layerwise.values())


@pytest.mark.parametrize(
    "text", ["a: 1\n", "- 1\n- 2\n", "backend: x\nmodel: {num_params: 1}\n", "{unclosed\n"]
)
def test_loading_a_file_that_is_not_a_report_is_a_clear_error(tmp_path, text):
    path = tmp_path / "other.yaml"
    path.write_text(text)
    with pytest.raises(InvalidInputError, match="is not a curvkit report"):
        Report.load(path)
    with pytest.raises(InvalidInputError, match="does not exist"):
        Report.load(tmp_path / "missing.yaml")
    with pytest.raises(InvalidInputError, match="cannot read the report .* \\(Is a directory\\)"):
        Report.load(tmp_path)


def test_saved_report_has_ordinary_file_permissions(report, tmp_path):
    """0666 less the umask, as `open` would give, not mkstemp's 0600."""
    umask = os.umask(0o022)
    try:
        path = report.save(tmp_path / "report.json")
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644


def test_a_run_without_a_terminal_logs_one_line_per_quantity(digits_problem, capsys):
    """Bars are off when stderr is not a terminal (pytest captures it): one line at the start
    and one per finished quantity, with its time and passes; nothing with progress=False."""
    model, loader = digits_problem
    curvkit.analyze(model, loader, quantities=["hessian", "ggn"], top_k=3, options=QUICK_TRACE)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("curvkit: torchfunc on 300 examples, P = 2410: hessian, ggn")
    assert re.fullmatch(r"curvkit: hessian done in [\d.]+ s \(\d+ passes over the data\)", lines[1])
    assert lines[2].startswith("curvkit: ggn done in") and len(lines) == 3
    curvkit.analyze(model, loader, quantities=["ggn"], top_k=3, progress=False, options=QUICK_TRACE)
    assert capsys.readouterr().err == ""


def test_every_number_in_a_tidy_table(report):
    """``numbers()`` holds each scalar once with its routine; ``to_pandas`` is the same table
    (or, without pandas, a MissingDependencyError naming the fix)."""
    rows = report.numbers()
    by_name = {(r["quantity"], r["name"]): r for r in rows}
    first = by_name["hessian", "top_eigenvalues[0]"]
    assert first["value"] == report.hessian.top_eigenvalues[0] and first["backend"] == "torchfunc"
    assert first["routine"] == report.hessian.provenance["top_eigenvalues"].routine
    assert by_name["ggn", "trace_stderr"]["value"] == report.ggn.trace_stderr
    assert by_name["classmeans", "trace.within"]["value"] == report.classmeans.trace["within"]
    layer = next(iter(report.layerwise))
    assert by_name[f"layerwise/{layer}", "max_eigenvalue"]["value"] > 0
    assert len(by_name) == len(rows) and not any("density" in r["name"] for r in rows)
    try:
        import pandas  # noqa: F401
    except ImportError:
        with pytest.raises(curvkit.MissingDependencyError, match="pip install pandas"):
            report.to_pandas()
    else:
        frame = report.to_pandas()
        assert list(frame.columns) == ["backend", "quantity", "name", "value", "routine"]
        assert len(frame) == len(rows)
