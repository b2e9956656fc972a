"""The loss: what every backend consults about ℓ(f, y), written once.

Cross-entropy ``ℓ(f, y) = −log softmax(f)_y`` has the output Hessian ``H(f) = diag p − p pᵀ``
(p = softmax f, independent of y), the square-root factors ``S = [sqrt(p_c) (e_c − p)]_c`` with
``S Sᵀ = H``, and the Gauss–Newton surrogate ``½ (f − f̄)ᵀ H(f̄) (f − f̄)`` (f̄ and H held constant),
whose Hessian at f = f̄ is H. Papyan's ``δ_{i,c} = J_iᵀ S_i[:, c]``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from curvkit.errors import UnsupportedError


class CrossEntropy:
    """Cross-entropy on logits of shape (batch, classes); every method sums over the batch."""

    name = "cross_entropy"

    def sum(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Σ over the batch of ℓ(f(x_i), y_i); divide by N for the data-set loss."""
        return nn.functional.cross_entropy(logits, labels, reduction="sum")

    def module(self, reduction: str = "sum") -> nn.Module:
        """The loss as a torch module, for libraries that take one (BackPACK, curvlinops)."""
        return nn.CrossEntropyLoss(reduction=reduction)

    def output_hessian_product(self, logits: Tensor, u: Tensor) -> Tensor:
        """``H(f) u = p ⊙ u − p (pᵀ u)`` per example; u is (..., batch, classes)."""
        p = logits.softmax(dim=-1)
        return p * u - p * (p * u).sum(dim=-1, keepdim=True)

    def sqrt_output_hessian(self, logits: Tensor) -> Tensor:
        """``S`` with ``S Sᵀ = diag p − p pᵀ``, ``S[:, c] = sqrt(p_c) (e_c − p)``: (batch, C, C)."""
        p = logits.softmax(dim=1)
        eye = torch.eye(p.shape[1], dtype=p.dtype, device=p.device)
        return (eye[None] - p[:, :, None]) * p.sqrt()[:, None, :]

    def gauss_newton_surrogate(self, logits: Tensor) -> Tensor:
        """Σ over the batch of ``½ (f − f̄)ᵀ H(f̄) (f − f̄)``: zero at f̄, with Hessian H(f̄)."""
        fixed = logits.detach()
        d = logits - fixed
        return 0.5 * (d * self.output_hessian_product(fixed, d)).sum()

    def residual_surrogate(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Σ over the batch of ``ḡᵀ f`` with ``ḡ = ∂ℓ/∂f = p − e_y`` held constant: its Hessian
        in θ is ``Σ_c ḡ_c ∇²_θ f_c = Hess − G``, so the residual takes one product, not two."""
        fixed = logits.detach()
        onehot = nn.functional.one_hot(labels, fixed.shape[1]).to(fixed.dtype)
        return ((fixed.softmax(dim=1) - onehot) * logits).sum()


LOSSES = {"cross_entropy": CrossEntropy}


def make_loss(name: str) -> CrossEntropy:
    """The loss object named ``name``; an unknown name is an UnsupportedError listing the known."""
    if name not in LOSSES:
        raise UnsupportedError(f"loss {name!r} is not supported; use one of {', '.join(LOSSES)}.")
    return LOSSES[name]()
