"""Kronecker factors where B ⊗ A is exact, the Kronecker eigenpairs, and the trace regulariser
(the factors and the layerwise quantity against dense references: tests/test_backends.py)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import curvkit
from curvkit.problem import model_guard
from curvkit.quantities.layerwise import kronecker_top, psd_eigh
from tests import reference
from tests.conftest import backend_params, make_backend


@pytest.mark.parametrize("backend", backend_params("kronecker_factors"))
def test_single_example_gauss_newton_block_is_kronecker(backend, digits_problem):
    """For one example the layer's G block is exactly M ⊗ a aᵀ (1e-10)."""
    model, loader = digits_problem
    x, y = reference.all_data(loader)
    data = [(x[:1], y[:1])]
    with model_guard(model):
        factors = make_backend(backend, model, data).kronecker_factors()
    g = reference.dense_ggn(model, x[:1])
    block = g[:2048, :2048]  # layer "0": weight 32 × 64 comes first
    assert reference.rel_err(torch.kron(factors["0"].B, factors["0"].A), block) < 1e-10


@pytest.mark.parametrize("backend", backend_params("kronecker_factors"))
def test_convolution_block_is_kronecker_when_every_position_sees_the_same_patch(backend):
    """A 1×1 convolution on spatially constant images (identical examples, so expectations are
    products): the exact G block of its weight is B ⊗ A (1e-10). Summing A over the 9 positions
    instead of averaging, as BackPACK's KFLR does, would be 9 times too large."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, kernel_size=1),
        torch.nn.Tanh(),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 3 * 3, 5),
    ).double()
    x = torch.randn(1, 3, 1, 1, dtype=torch.float64).expand(4, 3, 3, 3).contiguous()
    data = [(x, torch.tensor([0, 1, 2, 3]))]
    with model_guard(model):
        factors = make_backend(backend, model, data).kronecker_factors()
    block = reference.dense_ggn(model, x)[:12, :12]  # the conv weight (4 × 3) comes first
    assert reference.rel_err(torch.kron(factors["0"].B, factors["0"].A), block) < 1e-10


class SequenceMLP(torch.nn.Module):
    """A Linear over the last axis of (batch, 8 rows, 8 pixels): one weight for every row."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.rows, self.head = torch.nn.Linear(8, 6), torch.nn.Linear(48, 10)
        self.flat, self.act = torch.nn.Flatten(), torch.nn.Tanh()
        self.double()

    def forward(self, x):
        return self.head(self.flat(self.act(self.rows(x))))


@pytest.mark.parametrize("backend", backend_params("kronecker_factors"))
def test_linear_over_positions_has_the_convolution_factors(backend):
    """A Linear applied to every row of the image is a 1 × 1 convolution over the 8 rows: B is
    its bias's G block and A the mean over rows of the inputs' outer products (1e-10 against
    the definitions), or a clear refusal (BackPACK takes 2-D inputs only); before, torch.func's
    factors crashed and the minimal adapter's summed over the features."""
    x, y = curvkit.datasets.digits_tensors(samples_per_class=4)
    data = [(x[:24].view(-1, 8, 8), y[:24]), (x[24:].view(-1, 8, 8), y[24:])]
    model = SequenceMLP()
    inputs = torch.cat([batch for batch, _ in data])
    expected = reference.kronecker_factors(model, inputs, reference.dense_ggn(model, inputs))
    try:
        with model_guard(model):
            factors = make_backend(backend, model, data).kronecker_factors()
    except curvkit.UnsupportedError as error:
        assert backend == "backpack" and "Only 2d inputs" in str(error)
        return
    for name in ("rows", "head"):
        assert reference.rel_err(factors[name].B, expected[name][0]) < 1e-10, name
        assert reference.rel_err(factors[name].A, expected[name][1]) < 1e-10, name


class DoubledLinear(torch.nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


class Conv1dNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.head = torch.nn.Conv1d(1, 3, 5, stride=4), torch.nn.Linear(45, 10)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x[:, None])).flatten(1))


def test_weights_layerwise_does_not_cover_are_named():
    """A Conv1d weight, and a Linear whose weight a parametrization computes from other
    Parameters (orthogonal), are not analysed layer by layer: said, no longer silently left
    out (the parametrized one was, until the eighth adversarial pass)."""
    x, y = curvkit.datasets.digits_tensors(samples_per_class=4)
    model = Conv1dNet().double()
    with pytest.warns(UserWarning, match=r"Conv2d layers only; it leaves out conv \(Conv1d\)"):
        report = curvkit.analyze(model, [(x, y)], quantities=["layerwise"], top_k=2,
                                 progress=False, options={"trace_matvecs": 0})  # fmt: skip
    assert list(report.layerwise) == ["head"]
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 8),
        torch.nn.Tanh(),
        torch.nn.utils.parametrizations.orthogonal(torch.nn.Linear(8, 10)),
    ).double()
    with pytest.warns(UserWarning, match=r"leaves out 2 \(ParametrizedLinear\)"):
        report = curvkit.analyze(model, [(x, y)], quantities=["layerwise"], top_k=2,
                                 progress=False, options={"trace_matvecs": 0})  # fmt: skip
    assert list(report.layerwise) == ["0"]


@pytest.mark.parametrize("backend", backend_params("kronecker_factors", minimal=False))
def test_a_layer_class_that_overrides_forward_gets_no_kronecker_factors(backend):
    """Its output is 2(W a + b), not W a + b: factors read off its input and output would make
    B four times too small, silently. Its exact block is still analysed (the top eigenvalues of
    a DoubledLinear and of a Linear whose weight is doubled differ by exactly 4: same function,
    W ↦ 2W scales the block by 1/4); BackPACK refuses the unknown module."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 8), torch.nn.Tanh(), DoubledLinear(8, 10))
    plain = copy.deepcopy(torch.nn.Sequential(*model[:2], torch.nn.Linear(8, 10))).double()
    model = model.double()
    with torch.no_grad():
        plain[2].weight.copy_(2 * model[2].weight), plain[2].bias.copy_(2 * model[2].bias)
    x, y = curvkit.datasets.digits_tensors(samples_per_class=4)
    kwargs = dict(quantities=["layerwise"], top_k=2, progress=False, skip_unsupported=True,
                  options={"trace_matvecs": 0, "density_probes": 0})  # fmt: skip
    report = curvkit.analyze(model, [(x, y)], backend, **kwargs)
    if report.layerwise is None:
        assert backend == "backpack" and "does not support module 2 (DoubledLinear)" in str(
            report.skipped["layerwise"]
        )
        return
    layer = report.layerwise["2"]
    assert "overrides Linear.forward" in layer.kronecker["skipped"]
    assert "skipped" not in report.layerwise["0"].kronecker
    exact = curvkit.analyze(plain, [(x, y)], backend, **kwargs).layerwise["2"].top_eigenvalues
    np.testing.assert_allclose(layer.top_eigenvalues, 4 * np.array(exact), rtol=1e-6)


@pytest.mark.parametrize("backend", backend_params("kronecker_factors", minimal=False))
@pytest.mark.parametrize("setting", [{"groups": 2}, {"padding_mode": "circular"}])
def test_a_grouped_or_circular_convolution_gets_no_kronecker_factors(backend, setting):
    """A is defined on the zero-padded patches of every input channel: curvlinops' A of a
    circularly padded layer was 30 % off (zero padding), of a grouped one 88 % off, silently.
    Every backend leaves such a layer's factors out with the reason and analyses its block;
    a plain convolution in the same model keeps its factors."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Unflatten(1, (1, 8, 8)), torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.Tanh(),
        torch.nn.Conv2d(4, 4, 3, padding=1, **setting), torch.nn.Tanh(), torch.nn.Flatten(),
        torch.nn.Linear(256, 10),
    ).double()  # fmt: skip
    x, y = curvkit.datasets.digits_tensors(samples_per_class=2)
    report = curvkit.analyze(
        model, [(x, y)], backend, ["layerwise"], top_k=2, progress=False, skip_unsupported=True,
        options={"trace_matvecs": 0, "density_probes": 0},
    )  # fmt: skip
    if report.layerwise is None:  # BackPACK: no rule for circular padding or groups
        assert backend == "backpack", report.skipped
        return
    assert (
        "has no Kronecker factors of curvkit's definition"
        in report.layerwise["3"].kronecker["skipped"]
    )
    assert report.layerwise["3"].top_eigenvalues
    assert "skipped" not in report.layerwise["1"].kronecker


def test_kronecker_top_matches_dense_product():
    g = torch.Generator().manual_seed(0)
    b, a = torch.randn(4, 4, generator=g).double(), torch.randn(5, 5, generator=g).double()
    b, a = b @ b.T, a @ a.T
    values, _ = kronecker_top(psd_eigh(b), psd_eigh(a), 6)
    exact = np.linalg.eigvalsh(torch.kron(b, a).numpy())[::-1][:6]
    np.testing.assert_allclose(values.numpy(), exact, rtol=1e-10)


def test_trace_penalty_is_unbiased_and_differentiable(digits_problem, dense_mlp):
    model, loader = digits_problem
    x, y = reference.all_data(loader)
    g = torch.Generator().manual_seed(0)
    loss = torch.nn.functional.cross_entropy
    penalty = curvkit.layer_trace_penalty(
        model, loss, x, y, layers=["2"], num_probes=400, generator=g
    )
    exact = float(torch.trace(dense_mlp["hessian"][2080:2400, 2080:2400]))
    # Rademacher Hutchinson: stderr ≈ sqrt(2 Σ_{i≠j} H_ij² / K); 10 % is > 4 stderr here
    assert float(penalty.detach()) == pytest.approx(exact, rel=0.1)
    model.zero_grad(set_to_none=True)


class TiedLayers(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = torch.nn.Linear(64, 8), torch.nn.Linear(8, 8)
        self.third, self.head = torch.nn.Linear(8, 8), torch.nn.Linear(8, 10)
        self.third.weight = self.second.weight

    def forward(self, x):
        hidden = torch.tanh(self.second(torch.tanh(self.first(x))))
        return self.head(torch.tanh(self.third(hidden)))


@pytest.mark.parametrize(
    "arguments, match",
    [
        ({"num_probes": 0}, "num_probes must be an integer ≥ 1, got 0"),  # was NaN
        ({"num_probes": -1}, "num_probes must be an integer ≥ 1, got -1"),  # was -0.0
        ({"layers": "second"}, "layers must be a list of layer names, got the string"),
        ({"layers": ["second", "second"]}, "second and second name one weight more than once"),
        ({"layers": ["second", "third"]}, "second and third name one weight more than once"),
        ({"layers": ["head"], "frozen": True}, "weight of layer head does not require gradients"),
        ({"reduction": "none"}, "loss_fn must return a scalar .* got \\(20,\\)"),
        # these were raw TypeErrors
        ({"layers": [["second"]]}, r"layers \['second'\] are not Linear or Conv2d modules"),
        ({"generator": 5}, "generator must be a CPU torch.Generator"),
        ({"loss_fn": None}, "loss_fn must be a function"),
        ({"inputs": [[0.0] * 64]}, "inputs and targets must be torch tensors, got list"),
        # a raw "differentiated Tensor ... not used in the graph" (its weight is computed anew)
        ({"layers": ["head"], "weight_norm": True}, "weight of layer head is parametrized"),
    ],
)
def test_trace_penalty_refuses_what_it_would_get_wrong(arguments, match):
    """Each used to return a silently wrong number (NaN, −0, a block counted twice with
    independent probes, a string read as single-letter layer names) or a raw autograd error."""
    model = TiedLayers().double()
    model.head.weight.requires_grad_(not arguments.pop("frozen", False))
    if arguments.pop("weight_norm", False):
        torch.nn.utils.parametrizations.weight_norm(model.head)
    reduction = arguments.pop("reduction", "mean")
    x, y = curvkit.datasets.digits_tensors(samples_per_class=2)

    def loss(logits, labels):
        return torch.nn.functional.cross_entropy(logits, labels, reduction=reduction)

    given = {"model": model, "loss_fn": loss, "inputs": x, "targets": y, "layers": ["second"]}
    with pytest.raises(curvkit.InvalidInputError, match=match):
        curvkit.layer_trace_penalty(**{**given, **arguments})


def test_trace_penalty_gradient_matches_finite_differences(digits_problem):
    """With the probes fixed (same generator seed), the penalty vᵀ H_S(θ) v is a smooth function
    of θ (tanh MLP); its autograd gradient along a random direction u matches the central
    difference (p(θ + εu) − p(θ − εu)) / 2ε. In float64 with ε = 1e-5 the truncation error is
    O(ε²) ≈ 1e-10 and the rounding error ≈ 1e-16 / ε ≈ 1e-11 relative: 1e-6 is generous."""
    model, loader = digits_problem
    model = copy.deepcopy(model)
    x, y = reference.all_data(loader)
    loss = torch.nn.functional.cross_entropy

    def penalty() -> torch.Tensor:
        generator = torch.Generator().manual_seed(1)
        return curvkit.layer_trace_penalty(
            model, loss, x, y, layers=["0"], num_probes=2, generator=generator
        )

    params = list(model.parameters())
    grads = torch.autograd.grad(penalty(), params)
    torch.manual_seed(2)
    direction = [torch.randn_like(p) for p in params]
    analytic = sum(float((g * u).sum()) for g, u in zip(grads, direction))
    eps = 1e-5
    values = []
    for sign in (1, -1):
        with torch.no_grad():
            for p, u in zip(params, direction):
                p.add_(sign * eps * u)
        values.append(float(penalty().detach()))
        with torch.no_grad():
            for p, u in zip(params, direction):
                p.sub_(sign * eps * u)
    numeric = (values[0] - values[1]) / (2 * eps)
    assert abs(analytic) > 1e-3  # the penalty depends on every layer through the activations
    assert numeric == pytest.approx(analytic, rel=1e-6)


def test_factor_eigenpairs_leave_zero_rows_out_of_lapack():
    """A factor with exactly zero rows and columns (a convolution's padding on a 1×1 input:
    4239 of 4608 in a ResNet-18 layer, on which torch's eigh failed to converge): the zero rows
    give eigenvalue 0 with unit eigenvectors, the rest LAPACK's eigenpairs; together an
    orthonormal eigenbasis with the dense spectrum (to float32 rounding of the input, 1e-6)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, generator=g, dtype=torch.float64)
    matrix = torch.zeros(9, 9, dtype=torch.float64)
    live = torch.tensor([0, 2, 3, 5, 6, 8])
    matrix[live[:, None], live] = x @ x.T
    values, vectors = psd_eigh(matrix.float())
    assert vectors.dtype == torch.float64
    torch.testing.assert_close(matrix @ vectors, vectors * values, rtol=0, atol=1e-6)
    torch.testing.assert_close(vectors.T @ vectors, torch.eye(9, dtype=torch.float64))
    torch.testing.assert_close(
        values.sort().values, torch.linalg.eigvalsh(matrix), rtol=0, atol=1e-6
    )


def test_trace_penalty_of_an_attention_model_in_training():
    """torch's fused attention kernel has no second derivative (a raw RuntimeError before):
    the penalty's forward runs attention through the math kernel. Against the dense Hessian
    block of the attention's output projection: 400 probes, 10 % (as above)."""
    from tests.test_reliability import Attending, digits_batches

    model = Attending().train()
    (x, y), _ = digits_batches()
    loss = torch.nn.functional.cross_entropy
    g = torch.Generator().manual_seed(0)
    penalty = curvkit.layer_trace_penalty(
        model, loss, x, y, layers=["attention.out_proj"], num_probes=400, generator=g
    )
    penalty.backward()
    weight = model.attention.out_proj.weight
    params = {n: p.detach() for n, p in model.named_parameters()}
    with curvkit.problem.differentiable_kernels():
        block = torch.func.jacrev(
            torch.func.grad(
                lambda w: loss(
                    torch.func.functional_call(
                        model, {**params, "attention.out_proj.weight": w}, (x,)
                    ),
                    y,
                )
            )
        )(weight.detach())
    exact = float(block.reshape(weight.numel(), -1).trace())
    assert float(penalty.detach()) == pytest.approx(exact, rel=0.1)
