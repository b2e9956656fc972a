"""The reference backend: torch.func transforms over ``functional_call``.

Hessian–vector products are forward-over-reverse (``jvp`` of ``grad``); G–vector products are
``jvp`` → output Hessian ``diag p − p pᵀ`` → ``vjp``; per-example Jacobians are ``vmap`` over
``jacrev``. Every product streams over the data one batch at a time. ``dense_hessian`` and
``dense_ggn`` materialise P × P matrices for the tests' references on small models.
"""

from __future__ import annotations

import copy
import time

import torch
from torch import Tensor
from torch.func import functional_call, grad, jacrev, jvp, vjp, vmap

from curvkit.backend import (
    Backend,
    ClassDeltas,
    KroneckerFactors,
    Provenance,
    kronecker_layers,
    kronecker_shape,
    unfolded_input,
)
from curvkit.errors import InvalidInputError

DENSE_LIMIT_BYTES = 2 * 1024**3


def output_hessian_product(logits: Tensor, u: Tensor) -> Tensor:
    """``(diag p − p pᵀ) u`` per example, with p = softmax(logits): the CE loss Hessian."""
    p = torch.softmax(logits, dim=1)
    return p * u - p * (p * u).sum(dim=1, keepdim=True)


def sqrt_output_hessian(logits: Tensor) -> Tensor:
    """``S`` with ``S Sᵀ = diag p − p pᵀ``, ``S[:, c'] = sqrt(p_{c'}) (e_{c'} − p)``; shape (B, C, C)."""
    p = torch.softmax(logits, dim=1)
    eye = torch.eye(p.shape[1], dtype=p.dtype, device=p.device)
    return (eye[None] - p[:, :, None]) * p.sqrt()[:, None, :]


class TorchFuncBackend(Backend):
    """torch.func: the reference every other backend is tested against."""

    name = "torchfunc"
    library = "torch"
    extra = None
    capabilities = {
        "hvp": "native",
        "ggnvp": "native",
        "class_deltas": "native",
        "kronecker_factors": "native",
        "block_products": "native",
        "per_example_jacobians": "native",
        "dense": "native",
    }

    # -- functional helpers ---------------------------------------------------------------------
    def _params(self) -> dict[str, Tensor]:
        return {n: p.detach() for n, p in zip(self.problem.names, self.problem.params)}

    def _logits(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(self.problem.model, params, (x,))

    def _loss(self, params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return self.problem.loss_sum(self._logits(params, x), y)

    # -- primitives -----------------------------------------------------------------------------
    def _hvp(self, params: dict[str, Tensor], tangent: dict[str, Tensor]) -> Tensor:
        """Σ_batches ∇²L v with respect to ``params`` only (the others held fixed), flat."""
        total = 0
        with torch.no_grad():  # the transforms differentiate anyway; nothing else is recorded
            for x, y in self.problem.batches():
                _, hv = jvp(grad(lambda p: self._loss(p, x, y)), (params,), (tangent,))
                total = total + torch.cat([hv[n].flatten() for n in params])
        return self.problem.all_reduce(total / self.problem.num_samples)

    def _ggnvp(self, params: dict[str, Tensor], tangent: dict[str, Tensor]) -> Tensor:
        """Σ_batches Jᵀ H_out J v with respect to ``params`` only, flat."""
        total = 0
        with torch.no_grad():
            for x, _ in self.problem.batches():
                logits, jv = jvp(lambda p: self._logits(p, x), (params,), (tangent,))
                _, pullback = vjp(lambda p: self._logits(p, x), params)
                (gv,) = pullback(output_hessian_product(logits.detach(), jv))
                total = total + torch.cat([gv[n].flatten() for n in params])
        return self.problem.all_reduce(total / self.problem.num_samples)

    def hvp(self, v: Tensor) -> Tensor:
        return self._hvp(self._params(), self.problem.named(v))

    def ggnvp(self, v: Tensor) -> Tensor:
        return self._ggnvp(self._params(), self.problem.named(v))

    def block_matvec(self, matrix: str, name: str):
        """Products with one parameter's block, differentiating with respect to it alone."""
        if matrix not in ("hessian", "ggn"):
            return super().block_matvec(matrix, name)
        product = self._hvp if matrix == "hessian" else self._ggnvp
        param = {name: self._params()[name]}
        return lambda v: product(param, {name: v.view_as(param[name])})

    def jacobians(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Logits (B, C) and per-example Jacobians ``J_i = ∂f(x_i)/∂θ`` as one (B, C, P) tensor."""
        params = self._params()

        def single(p: dict[str, Tensor], xi: Tensor) -> Tensor:
            return self._logits(p, xi.unsqueeze(0)).squeeze(0)

        jac = vmap(jacrev(single), in_dims=(None, 0))(params, x)
        flat = torch.cat([jac[n].flatten(start_dim=2) for n in self.problem.names], dim=2)
        with torch.no_grad():
            logits = self._logits(params, x)
        return logits, flat

    def class_deltas(self) -> ClassDeltas:
        start = time.perf_counter()
        c, p = self.problem.num_classes, self.problem.num_params
        self.check_batch_memory("torch.func's per-example Jacobians", 2 * c * p)
        sums = torch.zeros(c, c, p, dtype=self.problem.dtype, device=self.problem.device)
        counts = torch.zeros(c, dtype=torch.long)
        square_norm_sum = 0.0
        for x, y in self.problem.batches_with_progress("class sums", self.options.progress):
            logits, jac = self.jacobians(x)
            deltas = torch.einsum("bkc,bkp->bcp", sqrt_output_hessian(logits), jac)
            sums.index_add_(0, y, deltas)
            counts += torch.bincount(y.cpu(), minlength=c)
            square_norm_sum += float((deltas**2).sum())
        provenance = Provenance(
            self.name, "torch.func.vmap(jacrev)", seconds=time.perf_counter() - start
        )
        return ClassDeltas(sums, counts, square_norm_sum, provenance).all_reduced(self.problem)

    def kronecker_factors(self) -> dict[str, KroneckerFactors]:
        """Per-example Kronecker factors, summed exactly (the reference for BackPACK's KFLR).

        Linear: ``B = (1/N) Σ_i J_zᵀ H_i J_z`` at the pre-activation z, ``A = (1/N) Σ_i a_i a_iᵀ``.
        Conv2d: B from the Jacobian summed over output positions (the bias's Gauss–Newton
        block), ``A = (1/N) Σ_i (1/T) Σ_s ã_{i,s} ã_{i,s}ᵀ`` over the T unfolded patches.
        """
        layers = kronecker_layers(self.problem)
        model = copy.deepcopy(self.problem.model).eval()
        modules = dict(model.named_modules())
        recorded: dict[str, tuple[Tensor, torch.Size]] = {}  # layer input, per-example z shape
        shifts: dict[str, Tensor] = {}

        def hook(name: str):
            def record_or_shift(module, args, output):
                if name in shifts:  # inside the Jacobian: z ↦ z + shift, differentiated at 0
                    return output + shifts[name]
                recorded[name] = (args[0].detach(), output.shape[1:])
                return output

            return record_or_shift

        def logits_of_shift(shift: dict[str, Tensor], xi: Tensor) -> Tensor:
            shifts.update({n: t.unsqueeze(0) for n, t in shift.items()})
            try:
                return model(xi.unsqueeze(0)).squeeze(0)
            finally:
                shifts.clear()

        handles = [modules[name].register_forward_hook(hook(name)) for name in layers]
        sums = {
            name: [
                torch.zeros(s, s, dtype=self.problem.dtype, device=self.problem.device)
                for s in kronecker_shape(modules[name])
            ]
            for name in layers
        }
        try:
            for x, _ in self.problem.batches_with_progress("Kronecker", self.options.progress):
                with torch.no_grad():
                    sqrt_h = sqrt_output_hessian(model(x))
                zeros = {n: x.new_zeros(recorded[n][1]) for n in layers}
                jac = vmap(jacrev(logits_of_shift), in_dims=(None, 0))(zeros, x)  # (B, C, *z)
                for name in layers:
                    jz = jac[name]
                    if jz.dim() > 3:  # convolution: sum over output positions
                        jz = jz.flatten(start_dim=3).sum(-1)
                    v = torch.einsum("bkc,bkn->bcn", sqrt_h, jz)
                    sums[name][0] += torch.einsum("bcn,bcm->nm", v, v)
                    a = unfolded_input(modules[name], recorded[name][0])
                    sums[name][1] += torch.einsum("bil,bjl->ij", a, a) / a.shape[-1]
        finally:
            for handle in handles:
                handle.remove()
        n, reduce = self.problem.num_samples, self.problem.all_reduce
        return {
            name: KroneckerFactors(reduce(b.detach() / n), reduce(a.detach() / n))
            for name, (b, a) in sums.items()
        }

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
        total = torch.zeros(flat.numel(), flat.numel(), dtype=flat.dtype, device=flat.device)
        for x, y in self.problem.batches():
            total += torch.func.hessian(lambda f: self._loss(self.problem.named(f), x, y))(flat)
        return self.problem.all_reduce(total / self.problem.num_samples)

    def dense_ggn(self) -> Tensor:
        """The P × P Gauss–Newton matrix ``(1/N) Σ_i J_iᵀ (diag p_i − p_i p_iᵀ) J_i``."""
        self._check_dense_size()
        p = self.problem.num_params
        total = torch.zeros(p, p, dtype=self.problem.dtype, device=self.problem.device)
        for x, _ in self.problem.batches():
            logits, jac = self.jacobians(x)
            factors = torch.einsum("bkc,bkp->bcp", sqrt_output_hessian(logits), jac).reshape(-1, p)
            total += factors.T @ factors
        return self.problem.all_reduce(total / self.problem.num_samples)
