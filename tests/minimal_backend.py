"""A minimal per-batch backend as a third party would write one: plain autograd, batch sums only;
curvkit's base class does the rest. The tests hold it to the same dense references as the others."""

from __future__ import annotations

import torch
from torch import Tensor

from curvkit.backend import Backend
from curvkit.layers import unfolded_input


class MinimalBackend(Backend):
    name = "minimal"
    capabilities = dict.fromkeys(
        ("hvp", "ggnvp", "class_deltas", "kronecker_factors", "block_products"), "native"
    )

    def _forward(self, x: Tensor, param: str | None) -> tuple[Tensor, list[Tensor]]:
        model, params = self.working_copy()
        names = self.problem.selected(param)
        return model(x), [params[self.problem.names.index(n)] for n in names]

    def batch_hvp(self, x: Tensor, y: Tensor, V: Tensor, param: str | None) -> Tensor:
        logits, params = self._forward(x, param)
        criterion = self.problem.loss.curvature_criterion(logits, y)  # the loss's Hessian
        grads = torch.autograd.grad(criterion, params, create_graph=True)
        columns = zip(*self.problem.split_columns(V, param).values())
        return torch.stack(
            [self.problem.flatten(torch.autograd.grad(grads, params, v, retain_graph=True))
             for v in columns], dim=1)  # fmt: skip

    def batch_ggnvp(self, x: Tensor, y: Tensor, V: Tensor, param: str | None) -> Tensor:
        logits, params = self._forward(x, param)
        dummy = torch.zeros_like(logits, requires_grad=True)  # J v by the double-vjp trick
        transposed = torch.autograd.grad(logits, params, dummy, create_graph=True)
        products = []
        for v in zip(*self.problem.split_columns(V, param).values()):
            (jv,) = torch.autograd.grad(transposed, dummy, v, retain_graph=True)
            hjv = self.problem.loss.output_hessian_product(logits.detach(), jv)
            products.append(self.problem.flatten(
                torch.autograd.grad(logits, params, hjv, retain_graph=True)))  # fmt: skip
        return torch.stack(products, dim=1)

    def batch_class_deltas(self, x: Tensor, y: Tensor) -> Tensor:
        logits, params = self._forward(x, None)
        sqrt_h = self.problem.loss.sqrt_output_hessian(logits.detach())  # (B, C, C)
        b, c = logits.shape
        cotangents = logits.new_zeros(b, c, b, c)  # [i, c'] selects example i, column c' of S_i
        cotangents[torch.arange(b), :, torch.arange(b), :] = sqrt_h.transpose(1, 2)
        grads = torch.autograd.grad(
            logits, params, cotangents.reshape(b * c, b, c), is_grads_batched=True
        )
        return torch.cat([g.reshape(b, c, -1) for g in grads], dim=2)

    def batch_kronecker(self, x: Tensor, y: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
        model, _ = self.working_copy()
        modules, (layers, _), seen = dict(model.named_modules()), self.kronecker_plan(), {}
        handles = [modules[n].register_forward_hook(
            lambda _m, args, out, n=n: seen.__setitem__(n, (args[0], out))) for n in layers]  # fmt: skip
        try:
            logits = model(x)
        finally:
            for handle in handles:
                handle.remove()
        sqrt_h = self.problem.loss.sqrt_output_hessian(logits.detach())
        sums = {}
        for n in layers:
            inputs, z = seen[n]
            b = 0
            for column in sqrt_h.unbind(dim=2):  # g_{i,c'} = J_zᵀ S_i[:, c'], over positions
                (gz,) = torch.autograd.grad(logits, z, column, retain_graph=True)
                if isinstance(modules[n], torch.nn.Conv2d):  # (B, n, H, W)
                    gz = gz.flatten(start_dim=2).sum(-1)
                elif gz.dim() > 2:  # a Linear over (B, *positions, n)
                    gz = gz.flatten(1, -2).sum(1)
                b = b + gz.T @ gz
            a = unfolded_input(modules[n], inputs.detach())
            sums[n] = (b, torch.einsum("bil,bjl->ij", a, a) / a.shape[-1])
        return sums
