"""Model features that some libraries cannot handle, found once per Problem before anything is
computed.

A backend declares in ``Backend.limits`` which primitives each feature breaks for its library;
``Backend.refusal`` then refuses a quantity that needs such a primitive, naming the feature, and
a native routine that it breaks is replaced by curvkit's own (provenance says why).

- ``shared_parameters``: one Parameter reachable under several names, a module that runs
  more than once per forward pass (weight tying, ``Sequential(a, b, a)``), or a Parameter used
  directly besides its module (``h @ self.fc.weight.T``);
- ``forward_hooks`` / ``backward_hooks``: hooks registered on the model's modules or globally;
- ``parametrizations``: ``torch.nn.utils.parametrize`` (e.g. ``weight_norm``);
- ``asymmetric_padding``: a Conv2d with ``padding="same"`` and an even kernel span
  (dilation · (kernel − 1) odd), which torch pads by one more at the end than at the start;
  the libraries' unfolds take one padding per side;
- ``functional_transforms``: a forward pass that torch.func's transforms refuse
  (``torch.utils.checkpoint``'s saved-tensor hooks, a buffer updated in place), found by
  trying ``torch.func.grad`` on the example;
- ``per_example_transforms``: a forward pass that ``vmap`` over the examples cannot batch
  (Python control flow on the input's values, PReLU's batching rule), found by trying it on
  copies of the example;
- ``asymmetric_hessian``: a forward pass whose second derivatives torch itself gets wrong
  (torch's ``weight_norm``: autograd's Hessian products 2e-3 off symmetric, λ₁ 1.3715 for
  1.3717 by finite differences), found as products that break the Hessian's symmetry; every
  backend's Hessian products come from those derivatives, so the Hessian is refused;
- ``jvp_of_jacrev`` / ``jvp_of_grad``: a forward pass whose Hessian-vector products these
  compositions of torch.func's transforms (curvlinops' Hessian; torchfunc's forward-over-reverse
  route) cannot take (no forward-mode derivative of ``silu_backward``) or get wrong (torch's
  ``layer_norm`` with affine weights, 3–8 % off: pytorch/pytorch#196700), found by comparing two
  products on the example with autograd's double backward.

A forward pass that autograd itself cannot differentiate twice (``EmbeddingBag``) is no
feature but a refusal: every backend's products need second derivatives. The transform checks
hold CHECK_VECTORS vectors of the parameters' size; when these do not fit half the memory
budget the three transform features are set as unchecked, so the routes they guard are refused
rather than trusted. The symmetry check is then skipped too, and the Hessian trusted: it is
every backend's, so refusing it for want of memory would leave no route at all.
"""

from __future__ import annotations

import copy
import warnings
from collections import Counter
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn.modules import module as module_globals
from torch.nn.utils import parametrize
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from curvkit.errors import UnsupportedError, first_line, listed

FORWARD_HOOKS = ("_forward_hooks", "_forward_pre_hooks")
UNCHECKED = ("jvp_of_jacrev", "jvp_of_grad", "per_example_transforms")  # tried on the example
BACKWARD_HOOKS = ("_backward_hooks", "_backward_pre_hooks")


# vectors of the selected parameters' size that the transform checks hold at their peak:
# two tangents, their exact products, the compositions' products and their flat copies
CHECK_VECTORS = 8
# and, for the symmetry check of a float32 model in float64 (``_asymmetry``), beside them: the
# copy's parameters, tangents, products and double backward's gradients, each twice as wide
WIDE_CHECK_VECTORS = 16


def model_features(
    model: nn.Module, example: Tensor, selected: list[str] | None = None, room: int | None = None
) -> dict[str, str]:
    """The features of ``model`` among those above, each with the words that say where; one
    forward pass on ``example`` (a batch of one, without gradients) counts module calls.
    ``room``: how many vectors of the selected parameters' size fit half the memory budget
    (None: no limit known); with fewer than CHECK_VECTORS the transforms are not tried and
    count as broken, so that no backend relies on them unchecked."""
    features = {}
    shared = _shared(model, example)
    if shared:
        features["shared_parameters"] = shared
    for feature, attributes in (
        ("forward_hooks", FORWARD_HOOKS),
        ("backward_hooks", BACKWARD_HOOKS),
    ):
        hooked = _hooked(model, attributes)
        if hooked:
            features[feature] = f"{feature.replace('_', ' ')} on {hooked}"
    parametrized = [
        n or "<root>" for n, m in model.named_modules() if parametrize.is_parametrized(m)
    ]
    if parametrized:
        features["parametrizations"] = f"parametrized module(s) {listed(parametrized)}"
    unequal = [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Conv2d)
        and m.padding == "same"
        and any(d * (k - 1) % 2 for d, k in zip(m.dilation, m.kernel_size))
    ]
    if unequal:
        features["asymmetric_padding"] = (
            f"padding='same' that torch pads unequally (an even kernel span) in module(s) "
            f"{listed(unequal)}"
        )
    # the transforms are tried in the selected parameters (default: all), the products the
    # backends take: derivatives in the other parameters are never asked for
    params = {
        name: p.detach()
        for name, p in model.named_parameters()
        if selected is None or name in selected
    }
    refused = _untransformable(model, example, params)
    if refused and "backward_hooks" not in features:  # those are refused for their own reason
        features["functional_transforms"] = refused
    if room is not None and room < CHECK_VECTORS:
        unchecked = (
            f"transforms curvkit could not check (the check's {CHECK_VECTORS} vectors of the "
            "parameters' size exceed half the memory budget)"
        )
        features.update(dict.fromkeys(UNCHECKED, unchecked))
    elif not refused and "backward_hooks" not in features:
        wide = room is None or room >= CHECK_VECTORS + WIDE_CHECK_VECTORS
        features.update(_second_order_faults(model, example, params, wide))
        unbatchable = _unbatchable(model, example, params)
        if unbatchable:
            features["per_example_transforms"] = unbatchable
    return features


def _untransformable(model: nn.Module, example: Tensor, params: dict[str, Tensor]) -> str:
    """Why torch.func cannot differentiate the model's forward pass ("" when it can): the
    gradient of the summed logits through ``functional_call``, as torch.func backends take it."""

    def total(values: dict[str, Tensor]) -> Tensor:
        return torch.func.functional_call(model, values, (example,)).sum()

    try:
        torch.func.grad(total)(params)
    except Exception as error:  # noqa: BLE001 (whatever it raises, torch.func cannot run it)
        first = first_line(error).split(". ")[0][:160] or type(error).__name__
        return f"a forward pass that torch.func cannot transform ({first})"
    return ""


def _unbatchable(model: nn.Module, example: Tensor, params: dict[str, Tensor]) -> str:
    """Why torch.func cannot batch per-example derivatives (``vmap`` over the examples of
    ``jacrev``, as torchfunc's per-example Jacobians for the class sums and Kronecker factors;
    "" when it can): e.g. Python control flow on the input's values, or an operation whose
    batching rule mixes the two vmapped axes (PReLU's backward). Tried on three copies of the
    example and two random combinations of the logits (6 P numbers, where the Jacobians would
    take B·C·P), so that the two axes differ in size; each copy's Jacobian must equal
    ``jacrev``'s on the example alone, with gradients on (under ``no_grad``, as torchfunc runs
    it, vmap's Jacobians of ``linalg.det`` came out 245 off: torchfunc's exact tr G 1.06e7 for
    87.4)."""
    generator = torch.Generator(device=example.device).manual_seed(0)
    with torch.no_grad():
        out = torch.func.functional_call(model, params, (example,))
    mix = torch.randn(out.shape[-1], 2, generator=generator, dtype=out.dtype, device=out.device)

    def combined(values: dict[str, Tensor], x: Tensor) -> Tensor:
        return torch.func.functional_call(model, values, (x.unsqueeze(0),)).squeeze(0) @ mix

    with warnings.catch_warnings():  # vmap's fallback warnings (jacrev vmaps too) unshown
        warnings.simplefilter("ignore")
        try:
            with torch.no_grad():
                copies = example.expand(3, *example.shape[1:])
                batched = torch.func.vmap(torch.func.jacrev(combined), in_dims=(None, 0))(
                    params, copies
                )
        except Exception as error:  # noqa: BLE001 (whatever it raises, vmap cannot run it)
            first = first_line(error).split(". ")[0][:120].rstrip(".") or type(error).__name__
            return f"a forward pass that torch.func cannot vmap over examples ({first})"
        alone = torch.func.jacrev(combined)(params, example[0])
    # relative to the Jacobian's norm, summed parameter by parameter (no flat copies: 8 P
    # numbers at the peak, within CHECK_VECTORS)
    error = sum(float((batched[n] - alone[n]).square().sum()) for n in params)
    norm = 3 * sum(float(alone[n].square().sum()) for n in params)
    off = (error / max(norm, 1e-300)) ** 0.5
    if off > _rounding(next(iter(alone.values())).dtype):
        return (
            f"a forward pass whose per-example Jacobians torch.func's vmap gets wrong ({off:.0e} "
            "off jacrev's on the example alone; a torch batching-rule bug such as linalg.det's)"
        )
    return ""


def _rounding(dtype: torch.dtype) -> float:
    """How far two torch.func routes to the same derivatives may differ by rounding, relative:
    10⁴ ulps in float64; in float32 1e-2, as a GPU's TF32 convolutions and batched kernels
    round to 1e-3 (the faults found: layer_norm's 3e-2 in float64, 6e-2 in float32; det's
    of order 1)."""
    return 1e4 * torch.finfo(dtype).eps if dtype == torch.float64 else 1e-2


def _probe(model: nn.Module, example: Tensor) -> Callable[[dict[str, Tensor]], Tensor]:
    """``½‖f‖² + Σf`` on the example as a function of the parameters: its Hessian holds the
    second derivatives of every operation of the forward pass."""

    def objective(values: dict[str, Tensor]) -> Tensor:
        out = torch.func.functional_call(model, values, (example,))
        return 0.5 * (out * out).sum() + out.sum()

    return objective


def _tangents(params: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    """Two fixed random directions in the parameters, as (2, *shape) per parameter."""
    generator = torch.Generator(device=device).manual_seed(0)
    return {
        n: torch.randn((2, *p.shape), generator=generator, dtype=p.dtype, device=p.device)
        for n, p in params.items()
    }


def _second_order_faults(
    model: nn.Module, example: Tensor, params: dict[str, Tensor], wide: bool = True
) -> dict[str, str]:
    """The compositions of torch.func's transforms whose products with the Hessian of
    ``_probe`` fail, or differ from autograd's double backward beyond rounding; and
    ``asymmetric_hessian`` when double backward itself is wrong (``_asymmetry``; ``wide``:
    a float32 model may be checked on a float64 copy)."""
    tangents = _tangents(params, example.device)
    objective = _probe(model, example)

    def flat(products: dict[str, Tensor]) -> Tensor:
        return torch.cat([products[n].reshape(2, -1) for n in params], dim=1)

    try:
        exact = _double_backward(objective, params, tangents)
    except (NotImplementedError, RuntimeError) as error:
        raise UnsupportedError(
            "torch cannot differentiate the model's forward pass twice "
            f"({first_line(error)[:160].rstrip('.')}), as every curvature product needs; "
            "replace that operation by one torch differentiates twice."
        ) from error
    faults = {}
    off, rounding = _asymmetry(model, example, params, exact, flat(tangents), wide)
    if off > rounding:
        faults["asymmetric_hessian"] = (
            "a forward pass whose second derivatives torch gets wrong (Hessian products "
            f"{off:.0e} off symmetric; a torch bug such as weight_norm's)"
        )
    compositions = {
        "jvp_of_jacrev": torch.func.jacrev(objective),
        "jvp_of_grad": torch.func.grad(objective),
    }
    rounding = _rounding(exact.dtype)
    for feature, gradient_of in compositions.items():
        words = feature.replace("_", " ")
        try:  # as curvlinops and torchfunc run them: without gradients (silu fails only so),
            with torch.no_grad(), warnings.catch_warnings():  # vmap's fallback warnings unshown
                warnings.simplefilter("ignore")
                product = torch.func.vmap(
                    lambda t, grad_of=gradient_of: torch.func.jvp(grad_of, (params,), (t,))[1]
                )(tangents)
        except Exception as error:  # noqa: BLE001 (whatever it raises, that route cannot run)
            first = first_line(error).split(". ")[0][:120].rstrip(".") or type(error).__name__
            faults[feature] = (
                f"a forward pass whose Hessian products torch.func's {words} cannot take ({first})"
            )
            continue
        off = float((flat(product) - exact).norm() / exact.norm().clamp_min(1e-300))
        if off > rounding:
            faults[feature] = (
                f"a forward pass whose Hessian products torch.func's {words} gets wrong "
                f"({off:.0e} off autograd's; a torch bug such as layer_norm's)"
            )
    return faults


def _asymmetry(
    model: nn.Module,
    example: Tensor,
    params: dict[str, Tensor],
    exact: Tensor,
    directions: Tensor,
    wide: bool,
) -> tuple[float, float]:
    """How far autograd's Hessian products ``exact`` = H [t₀ t₁] (rows, of ``_probe``) are
    from symmetric, ``|t₁ᵀ H t₀ − t₀ᵀ H t₁|`` over the products' scale, and the rounding
    allowed. A Hessian is symmetric; double backward of some operations is not (torch's
    weight_norm: 2e-3 off in float64), and every backend's Hessian products come from
    autograd or torch.func, which share those formulas. A float32 model is checked on a float64
    copy, where rounding (1e-18 measured) cannot hide a fault of 1e-4; when no copy can be
    made (the model has no float64 form) or none fits the memory budget (not ``wide``), in
    float32 with 1e-3 allowed."""
    rounding = _rounding(torch.float64)
    if exact.dtype != torch.float64:
        widened = _float64_products(model, example, params) if wide else None
        if widened is None:
            rounding = 1e-3
        else:
            directions, exact = widened
    t, h = directions.double(), exact.double()
    forth, back = float(t[1] @ h[0]), float(t[0] @ h[1])
    scale = float(t[1].norm() * h[0].norm() + t[0].norm() * h[1].norm()) / 2
    return abs(forth - back) / max(scale, 1e-300), rounding


def _float64_products(
    model: nn.Module, example: Tensor, params: dict[str, Tensor]
) -> tuple[Tensor, Tensor] | None:
    """The two directions and autograd's Hessian products of ``_probe`` on a float64 copy of
    the model, as (2, P) each; None when the model has no float64 form."""
    try:
        double = copy.deepcopy(model).double()
        double_params = {n: p.detach() for n, p in double.named_parameters() if n in params}
        double_example = example.double() if example.is_floating_point() else example
        tangents = _tangents(double_params, example.device)
        exact = _double_backward(_probe(double, double_example), double_params, tangents)
    except Exception:  # noqa: BLE001 (whatever fails, the model is checked in its precision)
        return None
    return torch.cat([tangents[n].reshape(2, -1) for n in params], dim=1), exact


def _double_backward(
    objective: Callable[[dict[str, Tensor]], Tensor],
    params: dict[str, Tensor],
    tangents: dict[str, Tensor],
) -> Tensor:
    """The Hessian of ``objective`` at ``params`` times each of the tangents' two rows, by
    autograd's double backward (the reference the compositions are held to), as (2, P)."""
    with torch.enable_grad():
        leaves = {n: p.clone().requires_grad_() for n, p in params.items()}
        gradient = torch.autograd.grad(
            objective(leaves), list(leaves.values()), create_graph=True, allow_unused=True
        )
        first = next(iter(params.values()))
        exact = first.new_zeros(2, sum(p.numel() for p in params.values()))
        for i in range(2):
            inner = sum(  # ⟨∇, t_i⟩ over the gradients that depend on the parameters
                (g * tangents[n][i]).sum()
                for n, g in zip(leaves, gradient)
                if g is not None and g.requires_grad
            )
            if isinstance(inner, Tensor):
                rows = torch.autograd.grad(
                    inner,
                    list(leaves.values()),
                    retain_graph=True,
                    allow_unused=True,
                    materialize_grads=True,
                )
                exact[i] = torch.cat([h.reshape(-1) for h in rows]).to(exact)
    return exact


class _LowPrecisionOps(TorchDispatchMode):
    """Records the first operation that returns a float16 or bfloat16 tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.found = ""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        if not self.found:
            low = [
                t.dtype
                for t in tree_leaves(out)
                if isinstance(t, Tensor) and t.dtype in (torch.float16, torch.bfloat16)
            ]
            if low:
                self.found = f"{func} returns {low[0]}"
        return out


def low_precision(model: nn.Module, example: Tensor) -> str:
    """The first operation of a forward pass on ``example`` that computes in float16 or
    bfloat16 (autocast inside forward, or ``.half()`` on an activation), "" when none does or
    the pass cannot be watched."""
    watcher = _LowPrecisionOps()
    try:
        with torch.no_grad(), watcher:
            model(example)
    except Exception:  # noqa: BLE001 (a forward the mode cannot watch: nothing found)
        return ""
    return watcher.found


def module_calls(model: nn.Module, example: Tensor) -> tuple[Counter[str], Tensor]:
    """How often each module holding parameters runs in a forward pass on ``example``, with
    gradients on every parameter (the guard around the features restores requires_grad), and
    the output."""
    calls: Counter[str] = Counter()
    handles = [
        m.register_forward_pre_hook(lambda *_, name=name: calls.update([name]))
        for name, m in model.named_modules()
        if next(m.parameters(recurse=False), None) is not None
    ]
    try:
        for p in model.parameters():
            p.requires_grad_(True)
        with torch.enable_grad():
            output = model(example)
    finally:
        for handle in handles:
            handle.remove()
    return calls, output


def _shared(model: nn.Module, example: Tensor) -> str:
    """Parameters that enter the forward pass more than once: tied (one Parameter under
    several names), in a module that runs several times, or a Linear's or Conv2d's used
    directly besides its layer (``h @ self.fc.weight.T``; counted as edges into the Parameter's
    gradient accumulator in one example's graph, where the layer itself makes one)."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    tied = [" = ".join(group) for group in names.values() if len(group) > 1]
    calls, output = module_calls(model, example)
    uses = _uses(output)
    reused = [f"module {n} runs {k} times per forward pass" for n, k in calls.items() if k > 1]
    direct = [  # a layer's forward uses each of its parameters once per call
        f"parameter {name}.{attribute} is used {uses[id(p)]} times per forward pass"
        for name, m in model.named_modules()
        if type(m).forward in (nn.Linear.forward, nn.Conv2d.forward) and calls[name] == 1
        for attribute, p in m.named_parameters(recurse=False)
        if uses[id(p)] > 1 and len(names[id(p)]) == 1
    ]
    shared = [f"shared parameters {listed(tied)}"] * bool(tied)
    return "; ".join(shared + reused[:3] + direct[:3])


def _uses(output: Tensor) -> Counter[int]:
    """How often each leaf tensor (by id) enters the autograd graph of ``output``."""
    uses: Counter[int] = Counter()
    if output.grad_fn is None:
        return uses
    seen, stack = {output.grad_fn}, [output.grad_fn]
    while stack:
        for node, _ in stack.pop().next_functions:
            if node is None:
                continue
            leaf = getattr(node, "variable", None)
            if leaf is not None:
                uses[id(leaf)] += 1
            elif node not in seen:
                seen.add(node)
                stack.append(node)
    return uses


def _hooked(model: nn.Module, attributes: tuple[str, ...]) -> str:
    modules = [
        name or "<root>"
        for name, m in model.named_modules()
        if any(getattr(m, a, None) for a in attributes)
    ]
    if any(getattr(module_globals, f"_global{a}", None) for a in attributes):
        modules.append("every module (global hooks)")
    return f"module(s) {listed(modules)}" if modules else ""
