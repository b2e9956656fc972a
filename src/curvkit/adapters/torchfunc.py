"""The reference backend: torch.func transforms and autograd over ``functional_call``.

Products with a block of k vectors, in one of two routes (setting ``products``):

- ``forward-over-reverse``: Hessian products as ``jvp`` of ``grad``, G products as ``jvp`` →
  output Hessian → ``vjp``, each ``vmap``-ed over the k columns;
- ``reverse-over-reverse``: one gradient with ``create_graph`` and a batched double backward
  (``autograd.grad(..., is_grads_batched=True)``); G products as J v by the double-vjp trick,
  then the output Hessian, then a batched vjp;
- ``auto`` (default): each route timed once on the first batch for each matrix and class of
  block widths (1, 2–7, ≥ 8 vectors), the faster kept (provenance notes which). Which is faster depends on the model, the
  block width and the device: on 2 CPU cores reverse-over-reverse for single vectors and MLPs,
  forward-over-reverse for blocks on a CNN (benchmarks/results/products_cpu.md). The routes
  agree to rounding; the measurement is kept for the process (per architecture, parameters and
  width class), so reruns in one process are bit-identical, and across processes when a route
  is named. Where ``jvp`` of ``grad`` fails or is wrong for the model (feature ``jvp_of_grad``),
  only reverse-over-reverse runs.

Per-example Jacobians are ``vmap`` over ``jacrev``. ``dense_hessian`` (reverse over reverse:
``torch.func.hessian``, forward over ``jacrev``, is 3–8 % off through ``layer_norm``) and
``dense_ggn`` materialise P × P matrices for references on small models.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from functools import partial

import torch
from torch import Tensor
from torch.func import functional_call, grad, jacrev, jvp, vjp, vmap

from curvkit.backend import Backend
from curvkit.errors import InvalidInputError, UnsupportedError, first_line
from curvkit.features import state_kept
from curvkit.layers import unfolded_input

DENSE_LIMIT_BYTES = 2 * 1024**3
ROUTES = ("forward-over-reverse", "reverse-over-reverse")
# the route measured faster, per model architecture, selected parameters, matrix and width class:
# measured once per process, so that reruns in one process are bit-identical
MEASURED_ROUTES: dict[tuple, str] = {}
Tensors = dict[str, Tensor]
Objective = Callable[[Tensor, Tensor], Tensor]  # (logits, labels) ↦ a scalar summed over the batch


def map_columns(product: Callable[[Tensors], Tensors], columns: Tensors) -> Tensors:
    """``product`` applied to each of the k columns {name: (k, *shape)}: vmap for k > 1."""
    if next(iter(columns.values())).shape[0] > 1:
        return vmap(product)(columns)
    single = product({n: c[0] for n, c in columns.items()})
    return {n: t[None] for n, t in single.items()}


def batched_grad(
    outputs: Sequence[Tensor], inputs: Sequence[Tensor], columns: Sequence[Tensor]
) -> tuple[Tensor, ...]:
    """Vector–Jacobian products of ``outputs`` with k columns given as (k, *shape) tensors:
    one batched backward (a plain one for k = 1, which skips vmap's overhead). An output that
    does not depend on the inputs adds nothing, an input that no output depends on gets zeros
    (under the residual surrogate the last layer's gradient is constant in θ)."""
    k = columns[0].shape[0]
    curved = [(o, c) for o, c in zip(outputs, columns) if o.requires_grad]
    grads: Sequence[Tensor | None] = [None] * len(inputs)
    if curved and k == 1:
        grads = torch.autograd.grad(
            [o for o, _ in curved], inputs, [c[0] for _, c in curved],
            retain_graph=True, allow_unused=True,
        )  # fmt: skip
        grads = [None if g is None else g[None] for g in grads]
    elif curved:
        grads = torch.autograd.grad(
            [o for o, _ in curved], inputs, [c for _, c in curved],
            is_grads_batched=True, retain_graph=True, allow_unused=True,
        )  # fmt: skip
    return tuple(
        torch.zeros(k, *t.shape, dtype=t.dtype, device=t.device) if g is None else g
        for g, t in zip(grads, inputs)
    )


def width_class(columns: int) -> str:
    """The block widths that share one measured route: the ratio changes mostly from one
    vector to a few and from a few to many."""
    return "1 vector" if columns == 1 else "2–7 vectors" if columns < 8 else "≥ 8 vectors"


def _faster(routes: dict[str, Callable[[], Tensor]]) -> str:
    """The route whose second call (the first warms up) takes the least wall time; a route the
    model's operations do not support (e.g. no forward-mode AD for weight_norm) is left out."""
    seconds = {}
    for name, run in routes.items():
        try:
            run()
        except NotImplementedError:
            continue
        start = time.perf_counter()
        run()
        seconds[name] = time.perf_counter() - start
    return min(seconds, key=seconds.get)


class TorchFuncBackend(Backend):
    """torch.func: the reference every other backend is tested against."""

    name = "torchfunc"
    library = "torch"
    default_settings = {"products": "auto"}
    choices = {"products": ("auto", *ROUTES)}
    capabilities = {
        "hvp": "native",
        "ggnvp": "native",
        "class_deltas": "native",
        "kronecker_factors": "native",
        "block_products": "native",
        "per_example_jacobians": "native",
        "dense": "native",
    }
    # torch.func's transforms cannot run full backward hooks (autograd.Functions without
    # setup_context), nor a forward they refuse (curvkit.features)
    limits = {
        **{
            feature: ("hvp", "ggnvp", "class_deltas", "kronecker_factors")
            for feature in ("backward_hooks", "functional_transforms")
        },
        "jvp_of_grad": (ROUTES[0],),  # the other route instead
        "forward_mode": (ROUTES[0],),
        "per_example_transforms": ("class_deltas", "kronecker_factors"),
    }

    def __init__(self, *args, **kwargs) -> None:
        self.chosen_routes: dict[tuple[str, str], str] = {}
        self._aliases: dict[str, str] | None = None  # every parameter/buffer name → first name
        self._buffers: dict[str, Tensor] = {}
        super().__init__(*args, **kwargs)

    def _params(self, param: str | None = None) -> Tensors:
        values = dict(zip(self.problem.names, self.problem.params))
        return {n: values[n].detach() for n in self.problem.selected(param)}

    def _logits(self, params: Tensors, x: Tensor) -> Tensor:
        """The model's logits with ``params`` in place of the selected parameters.

        functional_call swaps module attributes by name and restores them afterwards: each
        attribute must be named exactly once. A Parameter held by two modules (weight tying)
        is swapped in both; a module registered under two names (``Sequential(a, b, a)``) only
        once (swapping it twice restored plain tensors in place of the user's Parameters). The
        buffers are passed too, so that a forward that rebinds one (a call counter) changes
        only the stand-in that functional_call swaps out again."""
        model = self.problem.model
        if self._aliases is None:  # once: this is on every product's path
            self._buffers = dict(model.named_buffers())
            first = {id(t): n for n, t in [*model.named_parameters(), *model.named_buffers()]}
            self._aliases, seen = {}, set()
            named = [
                *model.named_parameters(remove_duplicate=False),
                *model.named_buffers(remove_duplicate=False),
            ]
            for name, tensor in named:
                owner, _, attribute = name.rpartition(".")
                slot = (id(model.get_submodule(owner)), attribute)
                if slot not in seen:
                    seen.add(slot)
                    self._aliases[name] = first[id(tensor)]
        values = {**self._buffers, **params}
        swapped = {n: values[first] for n, first in self._aliases.items() if first in values}
        with state_kept(model):  # what a forward adds holds tensors of this transform
            return functional_call(model, swapped, (x,), tie_weights=False)

    # -- per-batch primitives -------------------------------------------------------------------
    def batch_hvp(self, x: Tensor, y: Tensor, V: Tensor, param: str | None) -> Tensor:
        return self._product("hessian", x, y, V, param)

    def batch_ggnvp(self, x: Tensor, y: Tensor, V: Tensor, param: str | None) -> Tensor:
        return self._product("ggn", x, y, V, param)

    def batch_residual(self, x: Tensor, y: Tensor, V: Tensor, param: str | None) -> Tensor:
        return self._product("residual", x, y, V, param)

    def _product(self, matrix: str, x: Tensor, y: Tensor, V: Tensor, param: str | None) -> Tensor:
        residual = self.problem.loss.residual_surrogate
        routes = {
            ("hessian", ROUTES[0]): self._hvp_forward,
            ("hessian", ROUTES[1]): self._hvp_reverse,
            ("ggn", ROUTES[0]): self._ggnvp_forward,
            ("ggn", ROUTES[1]): self._ggnvp_reverse,
            ("residual", ROUTES[0]): partial(self._hvp_forward, objective=residual),
            ("residual", ROUTES[1]): partial(self._hvp_reverse, objective=residual),
        }
        route, wrong = self.config["products"], self.broken_by(ROUTES[0])
        if route == ROUTES[0] and wrong:
            raise UnsupportedError(
                f"torch.func's {route} products are not right for a model with {wrong}; set "
                f"products: {ROUTES[1]} in the torchfunc settings."
            )
        if route == "auto":
            key = (matrix, width_class(V.shape[1]))
            if key not in self.chosen_routes:
                measured = (self.problem.fingerprint(), tuple(self.problem.names), *key)
                if measured not in MEASURED_ROUTES:
                    MEASURED_ROUTES[measured] = _faster(
                        {
                            r: (lambda r=r: routes[matrix, r](x, y, V, param))
                            for r in ROUTES[bool(wrong) :]
                        }
                    )
                self.chosen_routes[key] = MEASURED_ROUTES[measured]
            route = self.chosen_routes[key]
        try:
            return routes[matrix, route](x, y, V, param)
        except NotImplementedError as error:  # an operation without the derivative it needs
            raise UnsupportedError(
                f"torch.func's {route} products fail on this model "
                f"({first_line(error)}); set products: "
                f"{'reverse-over-reverse' if route == ROUTES[0] else 'forward-over-reverse'} in "
                "the torchfunc settings."
            ) from error

    def product_note(self, matrix: str) -> str:
        if self.config["products"] != "auto":
            return f"products: {self.config['products']}"
        chosen = {k: r for (m, k), r in sorted(self.chosen_routes.items()) if m == matrix}
        return "products (measured faster): " + ", ".join(f"{r} for {k}" for k, r in chosen.items())

    def _hvp_forward(
        self, x: Tensor, y: Tensor, V: Tensor, param: str | None, objective: Objective | None = None
    ) -> Tensor:
        """Products with the Hessian of ``objective(logits, y)`` (the loss's by default)."""
        params = self._params(param)
        objective = objective or self.problem.loss.curvature_criterion
        gradient = grad(lambda p: objective(self._logits(p, x), y))
        with torch.no_grad():  # the transforms differentiate anyway; nothing else is recorded
            hv = map_columns(
                lambda t: jvp(gradient, (params,), (t,))[1], self.problem.split_columns(V, param)
            )
        return self.problem.join_columns([hv[n] for n in params])

    def _hvp_reverse(
        self, x: Tensor, y: Tensor, V: Tensor, param: str | None, objective: Objective | None = None
    ) -> Tensor:
        """As ``_hvp_forward``, by double backward."""
        params = {n: t.requires_grad_() for n, t in self._params(param).items()}
        objective = objective or self.problem.loss.curvature_criterion
        with torch.enable_grad():
            value = objective(self._logits(params, x), y)
            gradient = torch.autograd.grad(value, list(params.values()), create_graph=True)
            columns = self.problem.split_columns(V, param)
            hv = batched_grad(gradient, list(params.values()), [columns[n] for n in params])
        return self.problem.join_columns(hv)

    def _ggnvp_forward(self, x: Tensor, y: Tensor, V: Tensor, param: str | None) -> Tensor:
        params = self._params(param)
        loss = self.problem.loss

        def logits_of(p: Tensors) -> Tensor:
            return self._logits(p, x)

        with torch.no_grad():
            logits, pullback = vjp(logits_of, params)

            def product(t: Tensors) -> Tensors:
                _, jv = jvp(logits_of, (params,), (t,))
                return pullback(loss.output_hessian_product(logits, jv))[0]

            gv = map_columns(product, self.problem.split_columns(V, param))
        return self.problem.join_columns([gv[n] for n in params])

    def _ggnvp_reverse(self, x: Tensor, y: Tensor, V: Tensor, param: str | None) -> Tensor:
        """J v = ∂/∂u ⟨Jᵀu, v⟩ (the double-vjp trick), then Jᵀ H J v, batched over columns."""
        params = {n: t.requires_grad_() for n, t in self._params(param).items()}
        with torch.enable_grad():
            logits = self._logits(params, x)
            dummy = torch.zeros_like(logits, requires_grad=True)
            pulled = torch.autograd.grad(logits, list(params.values()), dummy, create_graph=True)
            columns = self.problem.split_columns(V, param)
            jv = batched_grad(pulled, [dummy], [columns[n] for n in params])[0]
            hjv = self.problem.loss.output_hessian_product(logits.detach(), jv)
            gv = batched_grad([logits], list(params.values()), [hjv])
        return self.problem.join_columns(gv)

    def jacobians(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Logits (B, C) and per-example Jacobians ``J_i = ∂f(x_i)/∂θ`` as one (B, C, P) tensor."""
        params = self._params()

        def single(p: Tensors, xi: Tensor) -> Tensor:
            return self._logits(p, xi.unsqueeze(0)).squeeze(0)

        with torch.no_grad():  # the transform differentiates anyway; parameters left out of
            # the selection would otherwise record a graph behind the B × C × P Jacobians
            jac = vmap(jacrev(single), in_dims=(None, 0))(params, x)
            flat = torch.cat(
                [jac[n].reshape(*jac[n].shape[:2], -1) for n in self.problem.names], dim=2
            )
            logits = self._logits(params, x)
        return logits, flat

    def batch_class_deltas(self, x: Tensor, y: Tensor) -> Tensor:
        logits, jac = self.jacobians(x)
        return torch.einsum("bkc,bkp->bcp", self.problem.loss.sqrt_output_hessian(logits), jac)

    def batch_kronecker(self, x: Tensor, y: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
        """Per-example Kronecker factors, summed exactly (the reference for the libraries').

        Linear: ``Σ_i J_zᵀ H_i J_z`` at the pre-activation z and ``Σ_i a_i a_iᵀ``. Conv2d, and a
        Linear over inputs with axes between the batch and the features (T positions, as a
        1 × 1 convolution): the Jacobian summed over output positions (the bias's Gauss–Newton
        block) and ``Σ_i (1/T) Σ_s ã_{i,s} ã_{i,s}ᵀ`` over the T unfolded patches.
        """
        model, _ = self.working_copy()
        layers, _ = self.kronecker_plan()
        modules = dict(model.named_modules())
        recorded: dict[str, tuple[Tensor, torch.Size]] = {}  # layer input, per-example z shape
        shifts: Tensors = {}

        def hook(name: str):
            def record_or_shift(module, args, output):
                if name in shifts:  # inside the Jacobian: z ↦ z + shift, differentiated at 0
                    return output + shifts[name]
                recorded[name] = (args[0].detach(), output.shape[1:])
                return output

            return record_or_shift

        def logits_of_shift(shift: Tensors, xi: Tensor) -> Tensor:
            shifts.update({n: t.unsqueeze(0) for n, t in shift.items()})
            try:
                return model(xi.unsqueeze(0)).squeeze(0)
            finally:
                shifts.clear()

        handles = [modules[name].register_forward_hook(hook(name)) for name in layers]
        try:
            with torch.no_grad():
                sqrt_h = self.problem.loss.sqrt_output_hessian(model(x))
            zeros = {
                n: torch.zeros(recorded[n][1], dtype=sqrt_h.dtype, device=sqrt_h.device)
                for n in layers
            }
            jac = vmap(jacrev(logits_of_shift), in_dims=(None, 0))(zeros, x)  # (B, C, *z)
        finally:
            for handle in handles:
                handle.remove()
        sums = {}
        for name in layers:
            jz = jac[name]  # (B, C, n, H, W) for Conv2d, (B, C, *positions, n) for Linear
            if isinstance(modules[name], torch.nn.Conv2d):
                jz = jz.flatten(start_dim=3).sum(-1)
            elif jz.dim() > 3:
                jz = jz.flatten(2, -2).sum(2)
            v = torch.einsum("bkc,bkn->bcn", sqrt_h, jz)
            a = unfolded_input(modules[name], recorded[name][0])
            sums[name] = (
                torch.einsum("bcn,bcm->nm", v, v).detach(),
                torch.einsum("bil,bjl->ij", a, a) / a.shape[-1],
            )
        return sums

    # -- dense references -----------------------------------------------------------------------
    def _check_dense_size(self) -> None:
        p = self.problem.num_params
        needed = p * p * self.problem.dtype.itemsize * 3
        if needed > DENSE_LIMIT_BYTES:
            raise InvalidInputError(
                f"a dense P × P matrix for P = {p} needs about {needed / 1024**3:.1f} GiB; use the "
                "matrix-free quantities instead (dense references are for small models)."
            )

    def dense_hessian(self) -> Tensor:
        """The P × P Hessian of the data-set loss (small models only); refused where a model
        feature makes torch's second derivatives wrong."""
        self._check_dense_size()
        self.require("hvp")
        flat = self.problem.flatten([p.detach() for p in self.problem.params])
        loss = self.problem.loss

        def batch_hessian(x: Tensor, y: Tensor) -> Tensor:  # reverse over reverse: see features
            return jacrev(
                grad(lambda f: loss.curvature_criterion(self._logits(self.problem.named(f), x), y))
            )(flat)

        return self.data_mean(batch_hessian)

    def dense_ggn(self) -> Tensor:
        """The P × P Gauss–Newton matrix ``(1/N) Σ_i J_iᵀ H_i J_i``, from the per-example
        factors (refused where vmap's per-example Jacobians are wrong or fail)."""
        self._check_dense_size()
        self.require("class_deltas")
        p = self.problem.num_params

        def batch_ggn(x: Tensor, y: Tensor) -> Tensor:
            factors = self.batch_class_deltas(x, y).reshape(-1, p)
            return factors.T @ factors

        return self.data_mean(batch_ggn)
