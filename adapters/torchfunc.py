"""The reference backend: torch.func transforms over ``functional_call``.

Hessian products are forward-over-reverse (``jvp`` of ``grad``); G products are ``jvp`` →
output Hessian → ``vjp``; a block of k vectors is one ``vmap`` over the columns. Per-example
Jacobians are ``vmap`` over ``jacrev``. ``dense_hessian`` and ``dense_ggn`` materialise P × P
matrices for references on small models.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.func import functional_call, grad, jacrev, jvp, vjp, vmap

from curvkit.backend import Backend
from curvkit.errors import InvalidInputError
from curvkit.layers import kronecker_layers, unfolded_input

DENSE_LIMIT_BYTES = 2 * 1024**3
Tensors = dict[str, Tensor]


def map_columns(product: Callable[[Tensors], Tensors], columns: Tensors) -> Tensors:
    """``product`` applied to each of the k columns {name: (k, *shape)}: vmap for k > 1."""
    if next(iter(columns.values())).shape[0] > 1:
        return vmap(product)(columns)
    single = product({n: c[0] for n, c in columns.items()})
    return {n: t[None] for n, t in single.items()}


class TorchFuncBackend(Backend):
    """torch.func: the reference every other backend is tested against."""

    name = "torchfunc"
    library = "torch"
    capabilities = {
        "hvp": "native",
        "ggnvp": "native",
        "class_deltas": "native",
        "kronecker_factors": "native",
        "block_products": "native",
        "per_example_jacobians": "native",
        "dense": "native",
    }

    def _params(self, param: str | None = None) -> Tensors:
        values = dict(zip(self.problem.names, self.problem.params))
        return {n: values[n].detach() for n in self.problem.selected(param)}

    def _logits(self, params: Tensors, x: Tensor) -> Tensor:
        return functional_call(self.problem.model, params, (x,))

    # -- per-batch primitives -------------------------------------------------------------------
    def batch_hvp(self, x: Tensor, y: Tensor, V: Tensor, param: str | None) -> Tensor:
        params = self._params(param)
        loss = self.problem.loss
        gradient = grad(lambda p: loss.sum(self._logits(p, x), y))
        with torch.no_grad():  # the transforms differentiate anyway; nothing else is recorded
            hv = map_columns(
                lambda t: jvp(gradient, (params,), (t,))[1], self.problem.split_columns(V, param)
            )
        return self.problem.join_columns([hv[n] for n in params])

    def batch_ggnvp(self, x: Tensor, y: Tensor, V: Tensor, param: str | None) -> Tensor:
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

    def jacobians(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Logits (B, C) and per-example Jacobians ``J_i = ∂f(x_i)/∂θ`` as one (B, C, P) tensor."""
        params = self._params()

        def single(p: Tensors, xi: Tensor) -> Tensor:
            return self._logits(p, xi.unsqueeze(0)).squeeze(0)

        jac = vmap(jacrev(single), in_dims=(None, 0))(params, x)
        flat = torch.cat([jac[n].flatten(start_dim=2) for n in self.problem.names], dim=2)
        with torch.no_grad():
            logits = self._logits(params, x)
        return logits, flat

    def batch_class_deltas(self, x: Tensor, y: Tensor) -> Tensor:
        logits, jac = self.jacobians(x)
        return torch.einsum("bkc,bkp->bcp", self.problem.loss.sqrt_output_hessian(logits), jac)

    def batch_kronecker(self, x: Tensor, y: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
        """Per-example Kronecker factors, summed exactly (the reference for the libraries').

        Linear: ``Σ_i J_zᵀ H_i J_z`` at the pre-activation z and ``Σ_i a_i a_iᵀ``. Conv2d: the
        Jacobian summed over output positions (the bias's Gauss–Newton block) and
        ``Σ_i (1/T) Σ_s ã_{i,s} ã_{i,s}ᵀ`` over the T unfolded patches.
        """
        model, _ = self.working_copy()
        layers = kronecker_layers(self.problem)
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
            jz = jac[name]
            if jz.dim() > 3:  # convolution: sum over output positions
                jz = jz.flatten(start_dim=3).sum(-1)
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
        """The P × P Hessian of the data-set loss (small models only)."""
        self._check_dense_size()
        flat = self.problem.flatten([p.detach() for p in self.problem.params])
        loss = self.problem.loss

        def batch_hessian(x: Tensor, y: Tensor) -> Tensor:
            return torch.func.hessian(
                lambda f: loss.sum(self._logits(self.problem.named(f), x), y)
            )(flat)

        return self.data_mean(batch_hessian)

    def dense_ggn(self) -> Tensor:
        """The P × P Gauss–Newton matrix ``(1/N) Σ_i J_iᵀ H_i J_i``."""
        self._check_dense_size()
        p = self.problem.num_params

        def batch_ggn(x: Tensor, y: Tensor) -> Tensor:
            factors = self.batch_class_deltas(x, y).reshape(-1, p)
            return factors.T @ factors

        return self.data_mean(batch_ggn)
