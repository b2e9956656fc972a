"""Run configs (YAML + flags), checkpoints, figures and the commands that use them."""

from __future__ import annotations

import io
import os
import pickle
import re
import sys
import textwrap
import warnings

import pytest
import torch
import yaml

import curvkit
from curvkit.cli import main
from curvkit.config import DEFAULTS, build, load_checkpoint, load_config
from curvkit.plot import plot_report
from curvkit.report import Report

PNG = b"\x89PNG\r\n\x1a\n"


def write(path, text):
    path.write_text(textwrap.dedent(text))
    return path


def test_config_file_and_flags(tmp_path):
    path = write(
        tmp_path / "run.yaml",
        """
        model: {name: digits-cnn, epochs: 3}
        data: {samples_per_class: 20}
        top_k: 12
        options: {trace_matvecs: 30, hessian: {density_steps: 20}}
        """,
    )
    config = load_config(path, {"top_k": 4, "seed": None, "data": {"batch_size": 64}})
    assert config["model"] == {**DEFAULTS["model"], "name": "digits-cnn", "epochs": 3}
    assert config["data"]["samples_per_class"] == 20 and config["data"]["batch_size"] == 64
    assert config["top_k"] == 4  # the flag wins; an unset flag (None) changes nothing
    assert config["seed"] == 0 and config["backend"] == "torchfunc"
    assert load_config(None) == DEFAULTS


@pytest.mark.parametrize(
    "text, match",
    [
        ("topk: 3", "unknown config key 'topk'.*the keys are model, data"),
        ("top_k: ten", "'top_k' must be a int, got 'ten'"),
        ("seed: true", "'seed' must be a int"),
        ("model: {name: resnet}", "'model' is 'resnet'; use one of digits-mlp, digits-cnn"),
        ("model: {layers: 3}", r"model\.layers.*model takes name, factory, checkpoint, epochs"),
        ("data: imagenet", "'data' is 'imagenet'; use one of digits"),
        ("dtype: float16", "'dtype' is 'float16'; use one of float64, float32"),
        ("device: tpu", "'device' is 'tpu'"),
        ("data: {batch_size: 0}", "'data.batch_size' must be positive"),
        ("data: {classes: 3}", "data.classes apply to the gaussian-mixture data set only"),
        ("data: {name: gaussian-mixture, separation: far}", "'data.separation' must be a float"),
        ("quantities: [hessian, spectra]", r"unknown quantities \['spectra'\]; choose from"),
        ('quantities: ["hessian,ggn"]', r"\(separated by spaces, not commas\)"),
        ("[1, 2]", "must be a mapping"),
        ("a: [", "not valid YAML"),
        ("model: 5", "'model' in .* must be a zoo name, a factory .* or a mapping .*, got 5"),
        ("data: [digits]", "'data' in .* must be a zoo name, .*, got \\['digits'\\]"),
    ],
)
def test_bad_configs_name_the_key(tmp_path, text, match):
    """Also a model or data that is neither a name nor a mapping (a raw TypeError before)."""
    with pytest.raises(curvkit.InvalidInputError, match=match):
        load_config(write(tmp_path / "bad.yaml", text))


def test_an_unreadable_config_file_gets_one_sentence(tmp_path):
    """A folder or a binary file: IsADirectoryError and UnicodeDecodeError before."""
    (tmp_path / "binary.yaml").write_bytes(b"\xff\xfe")
    for path, why in ((tmp_path, "Is a directory"), (tmp_path / "binary.yaml", "UnicodeDecode")):
        with pytest.raises(curvkit.InvalidInputError, match=f"cannot be read \\({why}"):
            load_config(path)


def test_configs_are_read_safely(tmp_path):
    """yaml.safe_load: a tag that would construct a Python object is an error, not a call."""
    marker = tmp_path / "ran"
    text = f"top_k: !!python/object/apply:os.system ['touch {marker}']"
    with pytest.raises(curvkit.InvalidInputError, match="not valid YAML"):
        load_config(write(tmp_path / "evil.yaml", text))
    assert not marker.exists()


def test_a_key_given_twice_is_refused(tmp_path):
    """PyYAML keeps the last of two equal keys without a word (``top_k: 3`` then ``top_k: 4``
    ran with 4); merged defaults may still be overridden."""
    with pytest.raises(curvkit.InvalidInputError, match="key 'top_k' is given twice"):
        load_config(write(tmp_path / "twice.yaml", "top_k: 3\ntop_k: 4\n"))
    with pytest.raises(curvkit.InvalidInputError, match="key 'trace_matvecs' is given twice"):
        load_config(
            write(tmp_path / "nested.yaml", "options: {trace_matvecs: 5, trace_matvecs: 7}")
        )
    merged = "options: {<<: {trace_matvecs: 5, lanczos_tol: 1.0e-8}, trace_matvecs: 7}"
    options = load_config(write(tmp_path / "merged.yaml", merged))["options"]
    assert options == {"trace_matvecs": 7, "lanczos_tol": 1e-8}


class Exploit:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoints_load_weights_only(tmp_path):
    model = curvkit.models.digits_mlp()
    torch.save(model.state_dict(), tmp_path / "good.pt")
    state = load_checkpoint(tmp_path / "good.pt")
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    marker = tmp_path / "ran"
    with open(tmp_path / "evil.pt", "wb") as handle:
        pickle.dump({"weight": Exploit(marker)}, handle, protocol=2)  # torch.load's own
    with pytest.raises(curvkit.InvalidInputError, match="weights_only=True refused it"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()
    with pytest.raises(curvkit.InvalidInputError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_factory_model_and_data_with_checkpoint(tmp_path, monkeypatch):
    write(
        tmp_path / "userproject.py",
        """
        import torch
        from curvkit.datasets import digits_loader

        def make_model():
            torch.manual_seed(5)
            return torch.nn.Sequential(torch.nn.Linear(64, 10))

        def make_loader():
            return digits_loader(batch_size=50, samples_per_class=5)

        def broken():
            raise ValueError("no weights here")

        def a_number():
            return 5

        NOT_A_FUNCTION = 3.14
        """,
    )
    monkeypatch.chdir(tmp_path)  # found in the working folder, without PYTHONPATH=.
    monkeypatch.setattr("sys.path", [p for p in sys.path if p not in ("", str(tmp_path))])
    torch.manual_seed(1)
    trained = torch.nn.Sequential(torch.nn.Linear(64, 10)).double()
    torch.save(trained.state_dict(), tmp_path / "weights.pt")
    config = load_config(
        None,
        {
            "model": {
                "factory": "userproject:make_model",
                "checkpoint": str(tmp_path / "weights.pt"),
            },
            "data": "userproject:make_loader",
        },
    )
    model, data = build(config, progress=False)
    assert torch.equal(model[0].weight, trained[0].weight)
    assert model[0].weight.dtype == torch.float64
    assert sum(len(y) for _, y in data) == 50
    assert config["model"]["epochs"] is None  # a factory model is never trained
    assert str(tmp_path) not in sys.path  # searched for the import only, last
    with pytest.raises(curvkit.InvalidInputError, match="cannot import the model factory"):
        build(load_config(None, {"model": "userproject:nothing"}), progress=False)
    with pytest.raises(curvkit.InvalidInputError, match="model.epochs apply to zoo models only"):
        load_config(None, {"model": {"factory": "userproject:make_model", "epochs": 3}})
    with pytest.raises(curvkit.InvalidInputError, match="'builtins:exit' exited"):
        build(load_config(None, {"model": "builtins:exit"}), progress=False)
    for model, match in (
        ("userproject:broken", "'userproject:broken' raised ValueError: no weights here; fix"),
        ("userproject:NOT_A_FUNCTION", "'userproject:NOT_A_FUNCTION' is a float, not a function"),
    ):
        with pytest.raises(curvkit.InvalidInputError, match=match):
            build(load_config(None, {"model": model}), progress=False)
    with pytest.raises(curvkit.InvalidInputError, match="returned a int, not a re-iterable"):
        build(load_config(None, {"data": "userproject:a_number"}), progress=False)


@pytest.mark.slow  # the vision extra: importing torchvision takes seconds
def test_torchvision_data_sets_are_local_only(tmp_path):
    """FakeData stands in for the real sets in tests; a real set missing from root is an error
    that says where to put it, and nothing is downloaded."""
    config = load_config(None, {"data": {"name": "fake", "samples_per_class": 3}, "top_k": 3})
    config["model"]["epochs"] = 1
    model, data = build(config, progress=False)
    labels = torch.cat([y for _, y in data])
    assert torch.bincount(labels).tolist() == [3] * 10
    report = curvkit.analyze(model, data, quantities=["ggn"], top_k=3, progress=False)
    assert report.model.num_samples == 30
    missing = load_config(None, {"data": {"name": "mnist", "root": str(tmp_path)}})
    with pytest.raises(curvkit.InvalidInputError, match="MNIST is not in .*never downloads"):
        build(missing, progress=False)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(curvkit.InvalidInputError, match="needs a local folder"):
        build(load_config(None, {"data": "cifar10"}), progress=False)


def test_per_quantity_options(digits_problem):
    model, loader = digits_problem
    options = {"density_steps": 30, "density_probes": 2, "hessian": {"density_steps": 20}}
    report = curvkit.analyze(
        model, loader, quantities=["hessian", "ggn"], top_k=3, progress=False, options=options
    )
    assert report.hessian.provenance["density"].matvecs == 2 * 20
    assert report.ggn.provenance["density"].matvecs == 2 * 30
    assert report.config["quantity_options"] == {"hessian": {"density_steps": 20}}
    with pytest.raises(curvkit.InvalidInputError, match=r"unknown option\(s\) hessian.steps"):
        curvkit.analyze(model, loader, progress=False, options={"hessian": {"steps": 3}})


@pytest.fixture(scope="module")
def full_report():
    model, loader = curvkit.models.trained_digits_mlp(
        epochs=5, progress=False, samples_per_class=20
    )
    quick = {"trace_matvecs": 30, "density_probes": 2, "density_steps": 20}
    return curvkit.analyze(model, loader, top_k=12, progress=False, options=quick)


@pytest.mark.slow  # seven figures rendered; the CLI tests render the spectra's in the quick run
def test_every_figure_is_written(full_report, tmp_path):
    files = plot_report(full_report, tmp_path)
    names = {f.name for f in files}
    assert names == {
        "spectral_density.png",
        "top_eigenvalues.png",
        "class_gram.png",
        "hierarchy.png",
        "layers.png",
    }
    for f in files:
        assert f.read_bytes()[:8] == PNG and f.stat().st_size > 10_000
    partial = Report.from_dict({**full_report.to_dict(), "classmeans": None, "layerwise": None})
    assert {f.name for f in plot_report(partial, tmp_path / "partial")} == {
        "spectral_density.png",
        "top_eigenvalues.png",
    }


def test_layers_figure_without_traces():
    """Traces switched off (NaN): the legend and the summary say so ("nan" before) and λ_max
    keeps its log axis (a NaN made min() NaN, which drew a linear axis)."""
    from curvkit.plot import layers

    x, y = curvkit.datasets.digits_tensors(samples_per_class=4)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 8), torch.nn.Tanh(), torch.nn.Linear(8, 10))
    report = curvkit.analyze(model.double(), [(x, y)], quantities=["layerwise"], top_k=2,
                             progress=False, options={"trace_matvecs": 0})  # fmt: skip
    assert re.search(r"8×64\s+off\s", str(report))
    left = layers(report).axes[0]
    assert left.get_yscale() == "log"
    assert "trace tr(H_l): not computed" in [t.get_text() for t in left.get_legend().get_texts()]


def test_layers_figure_of_zero_curvature_draws_without_warnings():
    """A model whose hidden layer is zero (its weights zero, as is the next layer's) has zero
    curvature in every layer's weight block: the figure's log axis drew them with
    matplotlib's "no positive values" warning."""
    from curvkit.plot import layers

    x, y = curvkit.datasets.digits_tensors(samples_per_class=4)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 8), torch.nn.Tanh(), torch.nn.Linear(8, 10))
    with torch.no_grad():
        for p in (model[0].weight, model[0].bias, model[2].weight):
            p.zero_()
    report = curvkit.analyze(model.double(), [(x, y)], quantities=["layerwise"], top_k=2,
                             progress=False, options={"trace_matvecs": 0})  # fmt: skip
    assert all(layer.top_eigenvalues == [0.0, 0.0] for layer in report.layerwise.values())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layers(report).savefig(io.BytesIO())


@pytest.mark.slow
def test_class_means_route_report_is_summarised_saved_and_drawn(tmp_path):
    """On the means route (no group means δ_(c,c')): the summary names its terms, the report
    round-trips with the skipped terms, and the hierarchy shows the class means alone."""
    model, loader = curvkit.models.trained_digits_mlp(
        epochs=2, progress=False, samples_per_class=10
    )
    options = {"class_sums": "means", "trace_matvecs": 6, "density_probes": 1}
    report = curvkit.analyze(model, loader, quantities=["classmeans"], top_k=3, progress=False,
                             options=options)  # fmt: skip
    assert "+ cross_within " in str(report) and "+ within " not in str(report)
    report.save(tmp_path / "report.yaml")
    loaded = Report.load(tmp_path / "report.yaml")
    assert set(loaded.classmeans.skipped) == {"cross", "within"}
    assert "hierarchy.png" in {f.name for f in plot_report(loaded, tmp_path)}


def test_cli_analyze_with_config_writes_report_and_figures(tmp_path, capsys):
    path = write(
        tmp_path / "run.yaml",
        f"""
        model: {{epochs: 1}}
        data: {{samples_per_class: 10}}
        quantities: [ggn]
        top_k: 3
        output: {tmp_path / "out"}
        """,
    )
    assert main(["analyze", "--config", str(path), "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed == load_config(path)
    assert main(["analyze", "--config", str(path), "--seed", "2", "--quiet"]) == 0
    data = yaml.safe_load((tmp_path / "out" / "report.yaml").read_text())
    assert data["config"]["run"]["seed"] == 2 and data["model"]["num_samples"] == 100
    assert (tmp_path / "out" / "spectral_density.png").read_bytes()[:8] == PNG
    figures = tmp_path / "figures"
    assert main(["plot", str(tmp_path / "out" / "report.yaml"), "--output", str(figures)]) == 0
    assert (figures / "top_eigenvalues.png").exists()
    assert main(["plot", str(tmp_path / "missing.yaml")]) == 2
    assert main(["analyze", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.slow  # FakeData: the vision extra
@pytest.mark.parametrize("name, num_params", [("mlp", 1482), ("lenet", 21386)])
def test_zoo_models_are_sized_by_the_data(name, num_params):
    """mlp (width 16, depth 2, tanh) and LeNet on FakeData's 8×8 images (flat 64 features)."""
    config = load_config(
        None,
        {
            "model": {"name": name, "width": 16, "epochs": 1},
            "data": {"name": "fake", "samples_per_class": 2},
        },
    )
    model, data = build(config, progress=False)
    assert sum(p.numel() for p in model.parameters()) == num_params
    report = curvkit.analyze(model, data, quantities=["ggn"], top_k=2, progress=False)
    assert report.model.num_classes == 10 and report.ggn.top_eigenvalues[0] > 0


@pytest.mark.slow  # imports scikit-learn (2–3 s)
def test_digits_are_scikit_learns():
    """curvkit reads digits.csv.gz itself: the same pixels and labels as scikit-learn's loader."""
    from sklearn.datasets import load_digits

    data, target = load_digits(return_X_y=True)
    x, y = curvkit.datasets.digits_tensors()
    assert torch.equal(x * 16, torch.as_tensor(data)) and torch.equal(y, torch.as_tensor(target))


def test_gaussian_mixture_has_the_chosen_classes_and_separation():
    """Every pair of class means is ``separation`` apart and the classes are balanced; a config
    builds it and sizes the mlp by it. The sample means' distance differs from 5 by the noise
    along μ_a − μ_b (standard deviation √(2/n) = 0.05 for n = 800) plus a bias ‖noise‖²/(2·5) ≈
    (64·2/800)/10 = 0.016: 0.3 allows 5 standard deviations and the bias."""
    x, y = curvkit.datasets.gaussian_mixture_tensors(4, separation=5.0, samples_per_class=800)
    assert x.shape == (3200, 64) and torch.bincount(y).tolist() == [800] * 4
    means = torch.stack([x[y == c].mean(0) for c in range(4)])
    distances = torch.pdist(means)
    assert torch.allclose(distances, torch.full_like(distances, 5.0), atol=0.3)
    with pytest.raises(curvkit.InvalidInputError, match="2 ≤ classes ≤ features"):
        curvkit.datasets.gaussian_mixture_tensors(5, features=4)
    config = load_config(
        None,
        {
            "model": {"name": "mlp", "width": 8, "depth": 1, "epochs": 5},
            "data": {
                "name": "gaussian-mixture",
                "classes": 3,
                "samples_per_class": 20,
                "features": 6,
            },
        },
    )
    model, data = build(config, progress=False)
    assert torch.bincount(torch.cat([y for _, y in data])).tolist() == [20] * 3
    assert sum(p.numel() for p in model.parameters()) == (6 + 1) * 8 + (8 + 1) * 3


@pytest.mark.slow  # the vision extra
def test_resnet18_for_small_images():
    model = curvkit.models.zoo_model("resnet18", (3, 16, 16), 10)
    assert model(torch.zeros(2, 3, 16, 16, dtype=torch.float64)).shape == (2, 10)
    assert model.conv1.stride == (1, 1) and isinstance(model.maxpool, torch.nn.Identity)
    with pytest.raises(curvkit.InvalidInputError, match="flat square inputs"):
        curvkit.models.zoo_model("lenet", (10,), 10)


@pytest.mark.parametrize(
    "edit, match",
    [
        ({"top_eigenvalues": ["a", 1.0]}, r"hessian.top_eigenvalues\[0\] is 'a', not float"),
        ({"trace": "big"}, "hessian.trace is 'big', not float"),
        ({"density": "x"}, r"hessian.density is 'x', not dict\[str, Any\]"),
        (
            {"density": {"grid": [0.0, 1.0], "values": [1.0]}},
            "spectral_density.png cannot be drawn",
        ),
    ],
)
def test_an_edited_report_is_refused_in_one_sentence(tmp_path, capsys, edit, match):
    """A report whose numbers were edited into other types drew raw TypeErrors in ``curvkit
    plot`` (``'>' not supported between 'str' and 'int'``), and one whose density's grid and
    values differ in length a raw ValueError from matplotlib. Loading now checks each field
    against the type the Report declares, and a figure that cannot be drawn is one sentence."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 10)).double()
    x, y = curvkit.datasets.digits_tensors(samples_per_class=3)
    report = curvkit.analyze(model, [(x, y)], quantities=["hessian"], top_k=2, progress=False,
                             options={"trace_matvecs": 6, "density_probes": 1, "density_steps": 5})  # fmt: skip
    data = report.to_dict()
    data["hessian"].update(edit)
    path = tmp_path / "report.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["plot", str(path)]) == 2
    err = capsys.readouterr().err
    assert re.search(match, err) and "Traceback" not in err and err.count("\n") == 1
