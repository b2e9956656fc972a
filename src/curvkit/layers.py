"""Layer helpers for the Kronecker factors: which layers, their weight's matrix shape, their
inputs as (batch, m, positions), and the number of output positions of a convolution."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from curvkit.errors import memory_text

if TYPE_CHECKING:
    from curvkit.problem import Problem


def kronecker_layers(problem: Problem) -> list[str]:
    """Names of the Linear and Conv2d modules whose weight is among the selected parameters."""
    selected = set(problem.names)
    return [
        name
        for name, m in problem.model.named_modules()
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and f"{name}.weight" in selected
    ]


def kronecker_plan(problem: Problem, budget: float | None) -> tuple[list[str], dict[str, str]]:
    """The Kronecker layers whose factors fit ``budget`` bytes, and each left-out layer with the
    reason. Memory: every kept layer's B (n × n) and A (m × m), summed over the data beside one
    batch's part, and the largest kept pair decomposed in float64 (matrices and eigenvectors:
    16 bytes per entry). Layers are kept smallest first, so a few huge factors (a Linear on
    flattened images) do not cost the others theirs; no budget (None) keeps every layer."""
    modules = dict(problem.model.named_modules())
    shapes = {name: kronecker_shape(modules[name]) for name in kronecker_layers(problem)}
    squares = {name: n * n + m * m for name, (n, m) in shapes.items()}
    size = problem.dtype.itemsize
    kept: list[str] = []
    skipped: dict[str, str] = {}
    for name in sorted(squares, key=squares.get):
        outside = (
            _overridden_forward(modules[name])
            or _unusual_convolution(modules[name])
            or _input_unseen(problem, name)
        )
        if outside:
            skipped[name] = outside
            continue
        need = 2 * size * sum(squares[k] for k in [*kept, name]) + 16 * squares[name]
        if budget is None or need <= budget:
            kept.append(name)
            continue
        n, m = shapes[name]
        others = f"{len(kept)} smaller layer{'s' * (len(kept) != 1)}"
        skipped[name] = (
            f"its Kronecker factors B ({n} × {n}) and A ({m} × {m}) with those of the {others} "
            f"need {memory_text(need)}, beyond half the memory budget, {memory_text(budget)}; the exact "
            "block is analysed without them"
        )
    return [name for name in shapes if name in kept], skipped


def _overridden_forward(module: torch.nn.Module) -> str:
    """Why a subclass of Linear or Conv2d that overrides ``forward`` gets no Kronecker factors
    ("" for the layers themselves): its output need not be ``W a + b``, on which they rest."""
    base = torch.nn.Conv2d if isinstance(module, torch.nn.Conv2d) else torch.nn.Linear
    if type(module).forward is base.forward:
        return ""
    return (
        f"its class {type(module).__name__} overrides {base.__name__}.forward, so its output "
        "need not be W a + b, on which the Kronecker factors rest; the exact block is analysed "
        "without them"
    )


def _input_unseen(problem: Problem, name: str) -> str:
    """Why a layer whose input the libraries' hooks cannot see gets no Kronecker factors (""
    for others): its forward never runs, as its parent uses the weight directly
    (MultiheadAttention its ``out_proj``), or it gets its input as a keyword argument, which
    forward hooks are not given (raw errors from torchfunc and curvlinops before). A layer
    that runs several times is a shared one, refused for the whole model by
    ``Backend.limits``."""
    calls, by_keyword = problem.module_calls
    if not calls[name]:
        return (
            "its forward never runs (its parent uses the weight directly, as MultiheadAttention "
            "does its out_proj), so there is no layer input and output to read Kronecker "
            "factors from; the exact block is analysed without them"
        )
    if name in by_keyword:
        return (
            "the model gives it its input as a keyword argument (layer(input=x)), which the "
            "libraries' hooks cannot read Kronecker factors from (pass it positionally); the "
            "exact block is analysed without them"
        )
    return ""


def _unusual_convolution(module: torch.nn.Module) -> str:
    """Why a Conv2d with groups or non-zero padding gets no Kronecker factors ("" for others):
    A is defined on the zero-padded patches of every input channel (curvlinops computed its A
    of a circularly padded layer on zero padding, 30 % off, and of a grouped one 88 % off)."""
    if not isinstance(module, torch.nn.Conv2d) or (
        module.groups == 1 and module.padding_mode == "zeros"
    ):
        return ""
    return (
        f"its groups={module.groups}, padding_mode={module.padding_mode!r} has no Kronecker "
        "factors of curvkit's definition (groups=1, zero padding); the exact block is analysed "
        "without them"
    )


def kronecker_shape(module: torch.nn.Module) -> tuple[int, int]:
    """(n, m) of a layer's weight as a matrix: out features × (in features · kernel size)."""
    weight = module.weight
    return weight.shape[0], weight[0].numel()


def output_positions(model: torch.nn.Module, names: list[str], x: Tensor) -> dict[str, int]:
    """Output positions T per layer from one example's forward pass through ``model`` (the
    adapter's copy: the hooks are removed afterwards): H·W for Conv2d; for Linear the product
    of the axes between the batch and the features (1 on flat inputs)."""
    modules = dict(model.named_modules())
    positions: dict[str, int] = {}

    def record(name: str):
        def hook(module: torch.nn.Module, _args: Any, output: Tensor) -> None:
            positions[name] = output[0].numel() // module.weight.shape[0]

        return hook

    handles = [modules[n].register_forward_hook(record(n)) for n in names]
    try:
        with torch.no_grad():
            model(x[:1])
    finally:
        for handle in handles:
            handle.remove()
    return positions


def unfolded_input(module: torch.nn.Module, inputs: Tensor) -> Tensor:
    """A layer's input as (batch, m, positions): Conv2d's unfolded patches; a Linear's input
    features, with the axes between the batch and the features as positions (one on flat
    inputs), as for a 1 × 1 convolution."""
    if isinstance(module, torch.nn.Conv2d):  # groups=1, zero padding (kronecker_plan)
        padding = module.padding
        if padding == "valid":
            padding = (0, 0)
        elif padding == "same":  # as torch pads: the odd one of a total at the end
            totals = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size)]
            inputs = torch.nn.functional.pad(
                inputs, [side for t in reversed(totals) for side in (t // 2, t - t // 2)]
            )
            padding = (0, 0)
        return torch.nn.functional.unfold(
            inputs, module.kernel_size, module.dilation, padding, module.stride
        )
    return inputs.reshape(inputs.shape[0], -1, inputs.shape[-1]).transpose(1, 2)
