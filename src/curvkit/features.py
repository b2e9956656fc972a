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
- ``uncopied_forward``: a forward pass that a deep copy of the model runs on the original's
  parameters (a function assigned on an instance, ``lin.forward = lambda x: ...``, or
  ``torch.compile(model.forward)``: deepcopy shares functions), so that products on the
  copies the libraries work on would differentiate nothing (a raw "appears to not have been
  used in the graph" from BackPACK and curvlinops);
- ``asymmetric_padding``: a Conv2d with ``padding="same"`` and an even kernel span
  (dilation · (kernel − 1) odd), which torch pads by one more at the end than at the start;
  the libraries' unfolds take one padding per side;
- ``overridden_call``: a module whose class overrides ``nn.Module.__call__`` (work done
  around ``forward``, such as scaling its output), which BackPACK's hooks and converter never
  see (its exact traces and class means were those of the model without it: tr G 6.32 for
  25.51); torch's own wrappers (``torch.fx`` graph modules, ``torch.compile``) only call
  ``forward``;
- ``padding_modes``: a convolution that pads with ``padding_mode`` "circular", "reflect" or
  "replicate", which BackPACK's unfolds take as zeros (its exact traces and class means 0.2 %
  off on a digits CNN, with no error bar);
- ``functional_transforms``: a forward pass that torch.func's transforms refuse
  (``torch.utils.checkpoint``'s saved-tensor hooks, a buffer updated in place), found by
  trying ``torch.func.grad`` on the examples;
- ``per_example_transforms``: a forward pass that ``vmap`` over the examples cannot batch
  (Python control flow on the input's values, PReLU's batching rule, a user's ``vmap`` rule
  that reverses the examples), found by trying it on the examples;
- ``wrong_hessian``: a forward pass whose second derivatives autograd itself gets wrong, found
  as Hessian products that break the Hessian's symmetry (torch's ``weight_norm``: 2e-3 off,
  λ₁ 1.3715 for 1.3717) or, where backward's gradient is the derivative of the forward's
  values, that differ steadily from finite differences of that gradient (a user's
  ``autograd.Function`` whose backward computes without gradients: 46 % off, λ₁ 0.77 for
  0.99); a forward that stops gradients on purpose (``.detach()``, straight-through
  estimators) is held to symmetry only. Every backend's Hessian products come from those
  derivatives, so the Hessian is refused;
- ``surrogate_gradients``: a forward pass whose gradients, as backward computes them, are not
  the derivatives of its outputs' values (found as above): straight-through estimators and
  ``.detach()`` on purpose, a wrong backward formula by mistake (a ``torch.library`` op whose
  ``register_autograd`` doubles a tanh's derivative: λ₁ 4.67 for 1.37). No backend refuses it (every
  one computes the curvature of autograd's derivatives, as training uses them); the problem
  warns that the numbers are those, and checked for symmetry only;
- ``wrong_jacobian_products``: a forward pass whose Jacobian products J v by the double-vjp
  trick (G's products on BackPACK, PyHessian and torchfunc's reverse route) fail or disagree
  with backward's own uᵀ J v = ⟨Jᵀu, v⟩ (an ``autograd.Function`` with a
  ``once_differentiable`` backward gives zeros: G's λ₁ 0.17 for 0.67); G and the Hessian are
  refused;
- ``rop_hessian``: a forward pass whose Hessian products by the same trick on the gradient
  (BackPACK's R-op Hessian products, a third derivative) fail or disagree with double
  backward's (a ``ConvTranspose2d`` with ``output_padding``: torch's third derivative passes
  it on to a plain convolution, a raw RuntimeError on BackPACK's first product); BackPACK's
  Hessian products are refused;
- ``jvp_of_jacrev`` / ``jvp_of_grad`` / ``forward_mode``: a forward pass whose products these
  routes of torch.func's transforms (curvlinops' Hessian; torchfunc's forward-over-reverse
  route; curvlinops' G, by jvp of the logits) cannot take (no forward-mode derivative of
  ``silu_backward``, an ``autograd.Function`` without ``jvp``) or get wrong (torch's
  ``layer_norm`` with affine weights, 3–8 % off: pytorch/pytorch#196700), found by comparing
  two products on the examples with autograd's.

A forward pass that autograd itself cannot differentiate twice (``EmbeddingBag``) is no
feature but a refusal: every backend's products need second derivatives. The transform checks
hold CHECK_VECTORS vectors of the parameters' size; when these do not fit half the memory
budget the transform features are set as unchecked, so the routes they guard are refused
rather than trusted. The autograd checks are then skipped too, and the Hessian and G trusted:
they are every backend's, so refusing them for want of memory would leave no route at all.
Without room for WIDE_CHECK_VECTORS more (a float64 copy of a float32 model) only the symmetry
is checked, in the model's precision.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules import module as module_globals
from torch.nn.utils import parametrize
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

from curvkit.errors import InvalidInputError, UnsupportedError, first_line, listed

FORWARD_HOOKS = ("_forward_hooks", "_forward_pre_hooks")
# the features tried on the examples with torch.func (unchecked when they do not fit)
UNCHECKED = ("jvp_of_jacrev", "jvp_of_grad", "forward_mode", "per_example_transforms")
BACKWARD_HOOKS = ("_backward_hooks", "_backward_pre_hooks")


# vectors of the selected parameters' size that the transform checks hold at their peak:
# two tangents, their exact products, the compositions' products and their flat copies
CHECK_VECTORS = 8
# and, for the autograd checks of a float32 model in float64 (``_autograd_faults``), beside
# them: the copy's parameters, tangents and products, and the finite differences' shifted
# parameters, gradients and two differences, each twice as wide
WIDE_CHECK_VECTORS = 24
# the finite differences' step (``_steady_gap``), relative to the parameters' norm: in float64
# rounding (1e-16 / step) and truncation (step²) both stay near 1e-10
FINITE_STEP = 1e-5
# and how far derivatives may be from them, relative: far above those 1e-10 (held to 1e4 ulps,
# a digits MLP's gradients were 3e-11 off with steps h and h/4 agreeing by chance), far below
# the faults found (2e-1 and beyond)
FINITE_TOLERANCE = 1e-6
# and the move of the point they are taken at (``_moved``), relative to the same norm
FINITE_SHIFT = 1e-3


def model_features(
    model: nn.Module, examples: Tensor, selected: list[str] | None = None, room: int | None = None
) -> dict[str, str]:
    """The features of ``model`` among those above, each with the words that say where, found
    on ``examples`` (a batch of one or two: the data's first and, where the problem found one,
    the one with the largest logits, as a fault of the derivatives may show on large
    activations alone); one forward pass on the first counts module calls.
    ``room``: how many vectors of the selected parameters' size fit half the memory budget
    (None: no limit known); with fewer than CHECK_VECTORS the transforms are not tried and
    count as broken, so that no backend relies on them unchecked."""
    features = {}
    shared = _shared(model, examples[:1])
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
    uncopied = _uncopied(model, examples[:1])
    if uncopied:
        features["uncopied_forward"] = uncopied
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
    called = [
        n or "<root>"
        for n, m in model.named_modules()
        if type(m).__call__ is not nn.Module.__call__
        and getattr(type(m).__call__, "__module__", "").partition(".")[0] != "torch"
    ]
    if called:
        features["overridden_call"] = (
            f"a __call__ overriding nn.Module's in module(s) {listed(called)}"
        )
    padded = [
        f"{n} ({m.padding_mode!r})"
        for n, m in model.named_modules()
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
        and m.padding_mode != "zeros"
        and (m.padding == "same" or (m.padding != "valid" and any(m.padding)))
    ]
    if padded:
        features["padding_modes"] = f"padding other than zeros in module(s) {listed(padded)}"
    # the transforms are tried in the selected parameters (default: all), the products the
    # backends take: derivatives in the other parameters are never asked for
    params = {
        name: p.detach()
        for name, p in model.named_parameters()
        if selected is None or name in selected
    }
    refused = _untransformable(model, examples, params)
    if refused and "backward_hooks" not in features:  # those are refused for their own reason
        features["functional_transforms"] = refused
    if room is not None and room < CHECK_VECTORS:
        unchecked = (
            f"transforms curvkit could not check (the check's {CHECK_VECTORS} vectors of the "
            "parameters' size exceed half the memory budget)"
        )
        features.update(dict.fromkeys(UNCHECKED, unchecked))
    elif "backward_hooks" not in features:
        wide = room is None or room >= CHECK_VECTORS + WIDE_CHECK_VECTORS
        try:
            faults, exact = _autograd_faults(model, examples, params, wide)
        except UnsupportedError:  # no second derivatives: every backend's products need them
            raise
        except Exception:  # noqa: BLE001 (functional_call cannot run what torch.func refuses,
            if not refused:  # nn.DataParallel: left to the backends that run it as it is)
                raise
            faults = {}
        features.update(faults)
        if not refused:
            features.update(_transform_faults(model, examples, params, exact))
            unbatchable = _unbatchable(model, examples, params)
            if unbatchable:
                features["per_example_transforms"] = unbatchable
    return features


@contextlib.contextmanager
def state_kept(model: nn.Module) -> Iterator[None]:
    """Every module's attributes as the same objects after the block, also on error, and the
    contents of those that are dicts or sets: its registered Parameters, buffers and
    submodules, its hook dictionaries. A forward may rebind a buffer, add a submodule or a
    buffer on its first call (under a torch.func transform a tensor of that transform, which
    the next transform tripped over: a raw internal assert), or keep a counter; a library may
    replace a Parameter; and ``torch.func.functional_call`` leaves its arguments in place of
    the Parameters of a module reachable by two names (pytorch/pytorch#164759)."""
    saved = [
        (m, dict(vars(m)), [(v, v.copy()) for v in vars(m).values() if isinstance(v, (dict, set))])
        for m in model.modules()
    ]  # fmt: skip
    try:
        yield
    finally:
        for m, attributes, containers in saved:
            current = vars(m)
            for name in current.keys() - attributes.keys():
                del current[name]
            current.update(attributes)
            for container, contents in containers:
                container.clear()
                container.update(contents)


def _call(model: nn.Module, values: dict[str, Tensor], x: Tensor) -> Tensor:
    """The model's output on ``x`` at the parameters ``values``, with its buffers passed too:
    a forward that rebinds one (``self.calls = self.calls + 1``) then leaves no tensor of a
    finished transform on the model for the next check to trip over, nor does one that adds an
    attribute (``state_kept``)."""
    with state_kept(model):
        return torch.func.functional_call(model, {**dict(model.named_buffers()), **values}, (x,))


def _untransformable(model: nn.Module, examples: Tensor, params: dict[str, Tensor]) -> str:
    """Why torch.func cannot differentiate the model's forward pass ("" when it can): the
    gradient of the summed logits through ``functional_call``, as torch.func backends take it."""

    def total(values: dict[str, Tensor]) -> Tensor:
        return _call(model, values, examples).sum()

    try:
        torch.func.grad(total)(params)
    except Exception as error:  # noqa: BLE001 (whatever it raises, torch.func cannot run it)
        first = first_line(error).split(". ")[0][:160] or type(error).__name__
        return f"a forward pass that torch.func cannot transform ({first})"
    return ""


def _unbatchable(model: nn.Module, examples: Tensor, params: dict[str, Tensor]) -> str:
    """Why torch.func cannot batch per-example derivatives (``vmap`` over the examples of
    ``jacrev``, as torchfunc's per-example Jacobians for the class sums and Kronecker factors;
    "" when it can): e.g. Python control flow on the input's values, or an operation whose
    batching rule mixes the two vmapped axes (PReLU's backward) or the examples (a user's
    ``vmap`` rule that reverses them: torchfunc's exact tr G 6.3445 for 6.3228). Tried on
    the examples as (first, second, second), an order no reversal or mean keeps, and two
    random combinations of the logits (6 P numbers, where the Jacobians would take B·C·P), so
    that the two axes differ in size; each row's Jacobian must equal ``jacrev``'s on its
    example alone, with gradients on (under ``no_grad``, as torchfunc runs it, vmap's
    Jacobians of ``linalg.det`` came out 245 off: torchfunc's exact tr G 1.06e7 for 87.4)."""
    generator = torch.Generator(device=examples.device).manual_seed(0)
    with torch.no_grad():
        out = _call(model, params, examples[:1])
    mix = torch.randn(out.shape[-1], 2, generator=generator, dtype=out.dtype, device=out.device)

    def combined(values: dict[str, Tensor], x: Tensor) -> Tensor:
        return _call(model, values, x.unsqueeze(0)).squeeze(0) @ mix

    with warnings.catch_warnings():  # vmap's fallback warnings (jacrev vmaps too) unshown
        warnings.simplefilter("ignore")
        try:
            rows = [0, 1, 1] if len(examples) > 1 else [0, 0, 0]
            with torch.no_grad():
                batched = torch.func.vmap(torch.func.jacrev(combined), in_dims=(None, 0))(
                    params, examples[rows]
                )
        except Exception as error:  # noqa: BLE001 (whatever it raises, vmap cannot run it)
            first = first_line(error).split(". ")[0][:120].rstrip(".") or type(error).__name__
            return f"a forward pass that torch.func cannot vmap over examples ({first})"
        # relative to the Jacobians' norm, summed parameter by parameter, one example's at a
        # time (no flat copies: 8 P numbers at the peak, within CHECK_VECTORS)
        error = norm = 0.0
        for i in sorted(set(rows)):
            alone = tree_map(Tensor.detach, torch.func.jacrev(combined)(params, examples[i]))
            for k in (k for k, row in enumerate(rows) if row == i):
                error += sum(float((batched[n][k] - alone[n]).square().sum()) for n in params)
                norm += sum(float(alone[n].square().sum()) for n in params)
    off = (error / max(norm, 1e-300)) ** 0.5
    if off > _rounding(next(iter(params.values())).dtype):
        return (
            f"a forward pass whose per-example Jacobians torch.func's vmap gets wrong ({off:.0e} "
            "off jacrev's on each example alone; a torch batching-rule bug such as linalg.det's)"
        )
    return ""


def _rounding(dtype: torch.dtype) -> float:
    """How far two torch.func routes to the same derivatives may differ by rounding, relative:
    10⁴ ulps in float64; in float32 1e-2, as a GPU's TF32 convolutions and batched kernels
    round to 1e-3 (the faults found: layer_norm's 3e-2 in float64, 6e-2 in float32; det's
    of order 1)."""
    return 1e4 * torch.finfo(dtype).eps if dtype == torch.float64 else 1e-2


def _probe(model: nn.Module, examples: Tensor) -> Callable[[dict[str, Tensor]], Tensor]:
    """``½‖f‖² + Σf`` on the examples as a function of the parameters: its Hessian holds the
    second derivatives of every operation of the forward pass."""

    def objective(values: dict[str, Tensor]) -> Tensor:
        out = _call(model, values, examples)
        return 0.5 * (out * out).sum() + out.sum()

    return objective


def _tangents(params: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    """Two fixed random directions in the parameters, as (2, *shape) per parameter."""
    generator = torch.Generator(device=device).manual_seed(0)
    return {
        n: torch.randn((2, *p.shape), generator=generator, dtype=p.dtype, device=p.device)
        for n, p in params.items()
    }


def _autograd_faults(
    model: nn.Module, examples: Tensor, params: dict[str, Tensor], wide: bool
) -> tuple[dict[str, str], Tensor]:
    """``wrong_hessian``, ``wrong_jacobian_products``, ``rop_hessian`` and ``surrogate_gradients`` when
    autograd's own derivatives of the forward pass, on which every backend's products rest,
    disagree with each other; and autograd's Hessian products of ``_probe`` (2, P), the
    reference for torch.func's routes.

    A Hessian is symmetric (double backward of torch's weight_norm is 2e-3 off: λ₁ 1.3715 for
    1.3717), and where autograd's gradient is the derivative of the forward's values its
    products are the derivatives of that gradient (a user's ``autograd.Function`` whose
    backward computes without gradients loses terms, symmetric ones too: 46 % off the
    differences of its gradients). A forward that stops gradients on purpose (``.detach()``,
    straight-through estimators) has a gradient that is not the values' derivative; its
    Hessian is then held to symmetry only. G's products take J v by the double-vjp trick
    ∂/∂u ⟨Jᵀu, v⟩ (BackPACK's R-op, torchfunc's reverse route, the surrogates' double
    backward), which must give uᵀ J v = ⟨Jᵀu, v⟩ of backward itself (a ``once_differentiable``
    backward gives zeros: G's λ₁ 0.17 for 0.67). And ``surrogate_gradients`` where backward's
    uᵀ J t itself differs from the differences of uᵀ f. Differences are taken in float64 (on a
    copy of a float32 model, when ``wide``: the copy fits the memory budget); without them only
    the identities are checked, in float32 with 1e-3 allowed."""
    tangents = _tangents(params, examples.device)
    exact = _double_backward(_probe(model, examples), params, tangents)
    rop = _rop_gap(_probe(model, examples), params, tangents, exact)
    form = _float64_form(model, examples, params) if wide else None
    products = exact
    rounding = _rounding(torch.float64) if exact.dtype == torch.float64 else 1e-3
    if form is not None:
        model, examples, unmoved = form
        params = _moved(unmoved)
        tangents = _tangents(params, examples.device)
        products = _double_backward(_probe(model, examples), params, tangents)
        rounding = _rounding(torch.float64)
    off = _asymmetry(_flat(tangents, params), products)
    cotangent, inner, bounds, jacobian = _backward_products(model, examples, params, tangents)
    trick = (
        float("inf")
        if jacobian is None
        else float(((jacobian @ cotangent - inner).abs() / bounds).max())
    )
    hessian_gap = first_order = 0.0
    if form is not None:

        def projected(values: dict[str, Tensor]) -> Tensor:
            return (_logits_of(model, examples)(values) @ cotangent).reshape(1)

        first_order = _steady_gap(projected, params, tangents, inner[:, None])
        if first_order <= FINITE_TOLERANCE:  # the gradient is the values' derivative: H too
            gradient = _gradient_of(_probe(model, examples))
            hessian_gap = _steady_gap(gradient, params, tangents, products)
        else:  # confirmed at the model's own point: a backward that recomputes the forward
            # (torch.utils.checkpoint) runs on the module's parameters, not functional_call's
            own = _backward_products(model, examples, unmoved, tangents)[1]
            first_order = _steady_gap(projected, unmoved, tangents, own[:, None])
    faults = {}
    if off > rounding or hessian_gap > FINITE_TOLERANCE:
        evidence = (
            f"{off:.0e} off symmetric"
            if off > rounding
            else f"{hessian_gap:.0e} off the differences of the gradients"
        )
        faults["wrong_hessian"] = (
            f"a forward pass whose second derivatives autograd gets wrong (Hessian products "
            f"{evidence}; a torch bug such as weight_norm's, or an autograd.Function whose "
            "backward does not differentiate)"
        )
    if first_order > FINITE_TOLERANCE:
        faults["surrogate_gradients"] = (
            f"gradients that are not the derivatives of the model's outputs (backward's uᵀJ t "
            f"{first_order:.0e} off their differences: straight-through estimators and "
            ".detach() make them so on purpose, a wrong backward formula of an "
            "autograd.Function or torch.library op by mistake)"
        )
    if rop:
        faults["rop_hessian"] = (
            "a forward pass whose Hessian products by the double-vjp trick on its gradient "
            f"(an R-op, a third derivative) torch gets wrong ({rop}; a torch bug such as "
            "ConvTranspose2d's with output_padding)"
        )
    if trick > rounding:
        evidence = f"{trick:.0e} off backward's" if trick < float("inf") else "failing"
        faults["wrong_jacobian_products"] = (
            "a forward pass whose Jacobian products by the double-vjp trick autograd gets "
            f"wrong ({evidence}; an autograd.Function whose backward does not differentiate)"
        )
    return faults, exact


def _transform_faults(
    model: nn.Module, examples: Tensor, params: dict[str, Tensor], exact: Tensor
) -> dict[str, str]:
    """The routes of torch.func's transforms whose products fail, or differ from autograd's
    beyond rounding: the Hessian products of ``_probe`` (``exact``) as jvp of jacrev and as jvp
    of grad, and the logits' Jacobian products as jvp (``forward_mode``)."""
    tangents = _tangents(params, examples.device)
    objective = _probe(model, examples)
    # jvp's reference (where the double-vjp trick fails, only jvp's own failure counts)
    jacobian = _backward_products(model, examples, params, tangents)[3]
    routes = {
        "jvp_of_jacrev": ("Hessian", torch.func.jacrev(objective), exact),
        "jvp_of_grad": ("Hessian", torch.func.grad(objective), exact),
        "forward_mode": ("Jacobian", _logits_of(model, examples), jacobian),
    }
    rounding = _rounding(exact.dtype)
    faults = {}
    for feature, (what, function, reference) in routes.items():
        words = "jvp" if feature == "forward_mode" else feature.replace("_", " ")
        try:  # as curvlinops and torchfunc run them: without gradients (silu fails only so),
            with torch.no_grad(), warnings.catch_warnings():  # vmap's fallback warnings unshown
                warnings.simplefilter("ignore")
                product = torch.func.vmap(
                    lambda t, f=function: torch.func.jvp(f, (params,), (t,))[1]
                )(tangents)
        except Exception as error:  # noqa: BLE001 (whatever it raises, that route cannot run)
            first = first_line(error).split(". ")[0][:120].rstrip(".") or type(error).__name__
            faults[feature] = (
                f"a forward pass whose {what} products torch.func's {words} cannot take ({first})"
            )
            continue
        if reference is None:
            continue
        got = product if isinstance(product, Tensor) else _flat(product, params)
        off = float((got - reference).norm() / reference.norm().clamp_min(1e-300))
        if off > rounding:
            faults[feature] = (
                f"a forward pass whose {what} products torch.func's {words} gets wrong "
                f"({off:.0e} off autograd's; a torch bug such as layer_norm's)"
            )
    return faults


def _flat(rows: dict[str, Tensor], params: dict[str, Tensor]) -> Tensor:
    """Per-parameter (2, *shape) tensors as one (2, P)."""
    return torch.cat([rows[n].reshape(2, -1) for n in params], dim=1)


def _asymmetry(directions: Tensor, products: Tensor) -> float:
    """How far Hessian products ``products`` = H [t₀ t₁] (rows) are from symmetric,
    ``|t₁ᵀ H t₀ − t₀ᵀ H t₁|`` over the products' scale."""
    t, h = directions.double(), products.double()
    forth, back = float(t[1] @ h[0]), float(t[0] @ h[1])
    scale = float(t[1].norm() * h[0].norm() + t[0].norm() * h[1].norm()) / 2
    return abs(forth - back) / max(scale, 1e-300)


def _moved(params: dict[str, Tensor]) -> dict[str, Tensor]:
    """The parameters moved by FINITE_SHIFT of their norm in a fixed random direction. At a
    kink of the point itself (a ReLU on a zero bias over blank pixels, as at initialisation; a
    tie in max pooling) autograd's one-sided derivatives differ from central differences at
    every step (2e-2 on a zero-bias CNN on the digits): a moved point sits on none."""
    generator = torch.Generator(device=next(iter(params.values())).device).manual_seed(1)
    directions = {
        n: torch.randn(p.shape, generator=generator, dtype=p.dtype, device=p.device)
        for n, p in params.items()
    }
    norm, length = _norm(params.values()), _norm(directions.values())
    scale = FINITE_SHIFT * max(norm, 1.0) / max(length, 1e-300)
    return {n: p + scale * directions[n] for n, p in params.items()}


def _steady_gap(
    function: Callable[[dict[str, Tensor]], Tensor],
    params: dict[str, Tensor],
    tangents: dict[str, Tensor],
    derivatives: Tensor,
) -> float:
    """How far ``derivatives`` (rows: those of ``function``, parameters ↦ flat tensor, along
    each tangent) are from central differences, relative to their size; 0 unless differences
    with steps h and h/4 agree to a tenth of that (a kink of ReLU or max pooling, or curvature
    within the step, moves them; a wrong derivative does not). h moves the parameters by
    FINITE_STEP of their norm."""
    norm = _norm(params.values())
    off = spread = size = 0.0  # squared norms, summed over the two tangents
    for i, derivative in enumerate(derivatives):
        direction = {n: t[i] for n, t in tangents.items()}
        length = _norm(direction.values())
        coarse, fine = (
            _central_difference(
                function,
                params,
                direction,
                FINITE_STEP * max(norm, 1.0) / max(length, 1e-300) / fraction,
            )
            for fraction in (1, 4)
        )
        off += float((fine - derivative).square().sum())
        spread += float((coarse - fine).square().sum())
        size += max(float(derivative.square().sum()), float(fine.square().sum()))
    gap, spread = (off / max(size, 1e-300)) ** 0.5, (spread / max(size, 1e-300)) ** 0.5
    return gap if 10 * spread < gap else 0.0


def _norm(tensors: Iterable[Tensor]) -> float:
    """The Euclidean norm of the tensors taken together."""
    return float(sum(t.square().sum() for t in tensors)) ** 0.5


def _central_difference(
    function: Callable[[dict[str, Tensor]], Tensor],
    params: dict[str, Tensor],
    direction: dict[str, Tensor],
    step: float,
) -> Tensor:
    """``(function(θ + h t) − function(θ − h t)) / 2h``, without a graph (parameters outside
    the selection may require gradients)."""
    with torch.no_grad():
        plus = function({n: p + step * direction[n] for n, p in params.items()})
        minus = function({n: p - step * direction[n] for n, p in params.items()})
    return (plus - minus) / (2 * step)


def _float64_form(
    model: nn.Module, examples: Tensor, params: dict[str, Tensor]
) -> tuple[nn.Module, Tensor, dict[str, Tensor]] | None:
    """The model, examples and parameters in float64: themselves when the parameters are, else a
    copy of the model; None when the model has no float64 form."""
    if all(p.dtype == torch.float64 for p in params.values()):
        return model, examples, params
    try:
        double = deep_copy(model).double()
        double_params = {n: p.detach() for n, p in double.named_parameters() if n in params}
        double_examples = examples.double() if examples.is_floating_point() else examples
        with torch.no_grad():
            double(double_examples)
    except Exception:  # noqa: BLE001 (whatever fails, the model is checked in its precision)
        return None
    return double, double_examples, double_params


def deep_copy(model: nn.Module) -> nn.Module:
    """``copy.deepcopy(model)``, also when a forward pass under autograd left a computed tensor
    on a module (spectral_norm's ``weight``, rebuilt from its parameters by a pre-hook on every
    forward): such tensors are copied detached, and left on the model as they were."""
    computed = [
        (vars(m), name, value)
        for m in model.modules()
        for name, value in vars(m).items()
        if isinstance(value, Tensor) and value.grad_fn is not None
    ]
    for attributes, name, value in computed:
        attributes[name] = value.detach()
    try:
        return copy.deepcopy(model, _uncopyable(model))
    except Exception as error:  # noqa: BLE001 (whatever deepcopy raises, it cannot copy it)
        raise InvalidInputError(
            f"curvkit copies the model for the libraries, and copy.deepcopy fails on it "
            f"({type(error).__name__}: {first_line(error)}); make the model deep-copyable."
        ) from error
    finally:
        for attributes, name, value in computed:
            attributes[name] = value


def _uncopyable(model: nn.Module) -> dict[int, Any]:
    """A deepcopy memo that shares the modules' plain attributes deepcopy cannot copy (a
    ``torch.library`` custom op kept as the activation: "cannot pickle _DispatchModule"),
    as it shares functions."""
    memo: dict[int, Any] = {}
    for m in model.modules():
        for value in vars(m).values():
            if isinstance(value, (Tensor, nn.Module, dict, list, tuple, set)):
                continue
            try:
                copy.deepcopy(value)
            except Exception:  # noqa: BLE001 (whatever deepcopy raises, it is shared)
                memo[id(value)] = value
    return memo


def _logits_of(model: nn.Module, examples: Tensor) -> Callable[[dict[str, Tensor]], Tensor]:
    """The examples' logits, flat, as a function of the parameters."""

    def logits(values: dict[str, Tensor]) -> Tensor:
        return _call(model, values, examples).reshape(-1)

    return logits


def _gradient_of(
    objective: Callable[[dict[str, Tensor]], Tensor],
) -> Callable[[dict[str, Tensor]], Tensor]:
    """The flat gradient of ``objective`` by autograd, as a function of the parameters."""

    def gradient(values: dict[str, Tensor]) -> Tensor:
        with torch.enable_grad():
            leaves = {n: v.detach().requires_grad_() for n, v in values.items()}
            grads = torch.autograd.grad(
                objective(leaves), list(leaves.values()), allow_unused=True, materialize_grads=True
            )
        return torch.cat([g.reshape(-1) for g in grads])

    return gradient


def _backward_products(
    model: nn.Module, examples: Tensor, params: dict[str, Tensor], tangents: dict[str, Tensor]
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """With u a fixed random cotangent on the examples' flat logits: u; ``⟨Jᵀu, t⟩`` for each
    tangent's two rows, Jᵀu by backward, and the bounds ``‖Jᵀu‖ ‖t‖`` of their size, as (2,)
    each; and J t by the double-vjp trick J t = ∂/∂u ⟨Jᵀu, t⟩, as BackPACK's R-op and
    torchfunc's reverse route take it, as (2, outputs), or None where the trick fails. One
    forward and one backward give both: with u as a cotangent that requires gradients, the
    trick's first pull is Jᵀu itself (a backward that cannot build a graph, a numpy one, is
    run again without)."""
    with torch.enable_grad():
        leaves = {n: p.clone().requires_grad_() for n, p in params.items()}
        logits = _logits_of(model, examples)(leaves)
        generator = torch.Generator(device=logits.device).manual_seed(2)
        cotangent = torch.randn(
            logits.shape, generator=generator, dtype=logits.dtype, device=logits.device
        )
        u = cotangent.clone().requires_grad_()
        try:
            pulled = torch.autograd.grad(
                logits, list(leaves.values()), u, create_graph=True, materialize_grads=True
            )
        except (NotImplementedError, RuntimeError):
            u, logits = None, _logits_of(model, examples)(leaves)
            pulled = torch.autograd.grad(
                logits, list(leaves.values()), cotangent, materialize_grads=True
            )
        jacobian = None
        if u is not None:
            try:
                jacobian = torch.stack(
                    [_trick_row(pulled, leaves, tangents, i, u) for i in range(2)]
                )
            except (NotImplementedError, RuntimeError):
                pass
    inner = sum((g[None] * tangents[n]).reshape(2, -1).sum(1) for n, g in zip(leaves, pulled))
    norms = sum(g.square().sum() for g in pulled) ** 0.5 * _flat(tangents, params).norm(dim=1)
    return cotangent, inner.detach(), norms.detach().clamp_min(1e-300), jacobian


def _trick_row(
    pulled: tuple[Tensor, ...],
    leaves: dict[str, Tensor],
    tangents: dict[str, Tensor],
    i: int,
    u: Tensor,
) -> Tensor:
    """∂/∂u ⟨Jᵀu, t_i⟩ = J t_i from ``pulled`` = Jᵀu built with a graph (zeros where no
    pulled gradient depends on u: a ``once_differentiable`` backward)."""
    inner = sum((g * tangents[n][i]).sum() for n, g in zip(leaves, pulled) if g.requires_grad)
    if not isinstance(inner, Tensor):
        return torch.zeros_like(u).detach()
    return torch.autograd.grad(
        inner, u, retain_graph=True, allow_unused=True, materialize_grads=True
    )[0].detach()


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
            if not isinstance(inner, Tensor):
                continue
            try:
                rows = torch.autograd.grad(
                    inner,
                    list(leaves.values()),
                    retain_graph=True,
                    allow_unused=True,
                    materialize_grads=True,
                )
            except (NotImplementedError, RuntimeError) as error:
                raise UnsupportedError(
                    "torch cannot differentiate the model's forward pass twice "
                    f"({first_line(error)[:160].rstrip('.')}), as every curvature product "
                    "needs; replace that operation by one torch differentiates twice."
                ) from error
            exact[i] = torch.cat([h.reshape(-1) for h in rows]).to(exact)
    return exact


def _rop_gap(
    objective: Callable[[dict[str, Tensor]], Tensor],
    params: dict[str, Tensor],
    tangents: dict[str, Tensor],
    exact: Tensor,
) -> str:
    """How far the Hessian products of ``objective`` by the double-vjp trick on its gradient g,
    H t = ∂/∂w ⟨∂⟨g, w⟩/∂θ, t⟩ at w = 0 (BackPACK's R-op Hessian products), are from double
    backward's ``exact`` (2, P), as words ("" within rounding): the trick differentiates the
    forward pass three times, which torch cannot for every operation (the double backward
    of a ConvTranspose2d with output_padding passes it on to a plain convolution: a raw
    RuntimeError on BackPACK's first Hessian product)."""
    with torch.enable_grad():
        leaves = {n: p.clone().requires_grad_() for n, p in params.items()}
        gradient = torch.autograd.grad(
            objective(leaves), list(leaves.values()), create_graph=True, allow_unused=True
        )
        live = [(n, g) for n, g in zip(leaves, gradient) if g is not None and g.requires_grad]
        if not live:
            return ""
        weights = [torch.zeros_like(g, requires_grad=True) for _, g in live]
        try:
            pulled = torch.autograd.grad(
                [g for _, g in live], list(leaves.values()), weights, create_graph=True,
                allow_unused=True, materialize_grads=True,
            )  # fmt: skip
            inner = [
                sum((g * tangents[n][i]).sum() for n, g in zip(leaves, pulled)) for i in range(2)
            ]
            rows = exact.new_zeros(exact.shape)
            for i in range(2):
                if isinstance(inner[i], Tensor) and inner[i].requires_grad:
                    pieces = torch.autograd.grad(
                        inner[i], weights, retain_graph=True, allow_unused=True,
                        materialize_grads=True,
                    )  # fmt: skip
                    found = dict(zip((n for n, _ in live), pieces))
                    rows[i] = torch.cat(
                        [found[n].reshape(-1) if n in found else torch.zeros_like(p).reshape(-1)
                         for n, p in params.items()]
                    ).to(rows)  # fmt: skip
        except (NotImplementedError, RuntimeError, ValueError, TypeError) as error:
            return f"failing: {first_line(error)[:120].rstrip('.')}"
    off = float((rows - exact).abs().max() / exact.abs().max().clamp_min(1e-300))
    return f"{off:.0e} off double backward's" if off > _rounding(exact.dtype) else ""


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


def module_calls(model: nn.Module, example: Tensor) -> tuple[Counter[str], set[str], Tensor]:
    """How often each module holding parameters runs in a forward pass on ``example``, with
    gradients on every parameter (the guard around the features restores requires_grad), the
    modules given no positional input (``layer(input=x)``: hooks see no input), and the
    output."""
    calls: Counter[str] = Counter()
    by_keyword: set[str] = set()

    def count(name: str, args: tuple[Any, ...]) -> None:
        calls.update([name])
        if not args:
            by_keyword.add(name)

    handles = [
        m.register_forward_pre_hook(
            lambda _, args, kwargs, name=name: count(name, args), with_kwargs=True
        )
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
    return calls, by_keyword, output


def _shared(model: nn.Module, example: Tensor) -> str:
    """Parameters that enter the forward pass more than once: tied (one Parameter under
    several names), in a module that runs several times, or a Linear's or Conv2d's used
    directly besides its layer (``h @ self.fc.weight.T``; counted as edges into the Parameter's
    gradient accumulator in one example's graph, where the layer itself makes one)."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    tied = [" = ".join(group) for group in names.values() if len(group) > 1]
    calls, _, output = module_calls(model, example)
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


def _uncopied(model: nn.Module, example: Tensor) -> str:
    """The parameters a deep copy's forward pass on ``example`` reaches on the original model
    rather than on the copy, in words ("" for none). Run after ``module_calls``, which lets
    every parameter require gradients (and a copy takes that over)."""
    try:
        twin = deep_copy(model)
        with torch.enable_grad():
            output = twin(example)
    except Exception:  # noqa: BLE001 (the backends that copy the model say why it fails)
        return ""
    names = {id(p): n for n, p in model.named_parameters()}
    reached = [names[i] for i in _uses(output) if i in names] if isinstance(output, Tensor) else []
    if not reached:
        return ""
    return (
        f"a forward pass that a copy of the model runs on the model's own parameters "
        f"{listed(sorted(reached))} (a function assigned on an instance, such as "
        "module.forward = lambda x: ..., which copy.deepcopy shares: define forward in the "
        "class)"
    )


def _uses(output: Tensor) -> Counter[int]:
    """How often each leaf tensor (by id) enters the autograd graph of ``output``."""
    return Counter(id(node.variable) for node in _graph_edges(output) if hasattr(node, "variable"))


def _graph_edges(output: Tensor) -> Iterator[Any]:
    """The node each edge of ``output``'s autograd graph leads to: every inner node once, a
    leaf's gradient accumulator once per edge into it."""
    if output.grad_fn is None:
        return
    seen, stack = {output.grad_fn}, [output.grad_fn]
    while stack:
        for node, _ in stack.pop().next_functions:
            if node is None or node in seen:
                continue
            yield node
            if not hasattr(node, "variable"):
                seen.add(node)
                stack.append(node)


def kept_graphs(model: nn.Module) -> dict[Any, str]:
    """The autograd nodes of the computed tensors kept on the model's modules (attributes, also
    in lists, tuples and dicts, and buffers), by where they are kept, for ``stale_graphs``."""
    return {
        leaf.grad_fn: f"{name}.{attribute}" if name else attribute
        for name, m in model.named_modules()
        for attribute, value in [*vars(m).items(), *m.named_buffers(recurse=False)]
        if attribute not in ("_parameters", "_buffers", "_modules")
        for leaf in tree_leaves(value)
        if isinstance(leaf, Tensor) and leaf.grad_fn is not None
    }


def stale_graphs(kept: dict[Any, str], output: Tensor) -> list[str]:
    """Where the computed tensors that ``output``'s graph reaches are kept, of ``kept`` (taken
    before the forward pass that made ``output``): a tensor computed from the parameters once,
    outside the forward pass (``self.w2 = self.w * 2`` in ``__init__``), whose graph backward
    frees after one use and which functional calls leave at the old parameters. A tensor the
    forward pass rebuilds (spectral_norm's ``weight``, by a pre-hook) is a new node."""
    return sorted({kept[node] for node in _graph_edges(output) if node in kept})


def _hooked(model: nn.Module, attributes: tuple[str, ...]) -> str:
    modules = [
        name or "<root>"
        for name, m in model.named_modules()
        if any(getattr(m, a, None) for a in attributes)
    ]
    if any(getattr(module_globals, f"_global{a}", None) for a in attributes):
        modules.append("every module (global hooks)")
    return f"module(s) {listed(modules)}" if modules else ""
