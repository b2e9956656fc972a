"""BackPACK backend: ``SqrtGGNExact`` factors for Papyan's δ, ``backpack.hessianfree`` products.

BackPACK's ``extend`` changes a module in place (hooks, stored inputs), after which torch.func
fails on it; this adapter therefore extends a deep copy of the user's model and never touches
the original. Everything BackPACK stores on the copy's parameters is removed after each batch.
"""

from __future__ import annotations

import copy
import time
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from curvkit.backend import Backend, ClassDeltas, KroneckerFactors, Provenance, kronecker_layers
from curvkit.errors import MissingDependencyError, UnsupportedError

OTHER_BACKENDS = "torchfunc, pyhessian"


class BackPACKBackend(Backend):
    """BackPACK (Dangel et al. 2020): one backward pass gives every δ_{i,c'} of a batch."""

    name = "backpack"
    library = "backpack-for-pytorch"
    extra = "backpack"
    capabilities = {
        "hvp": "native",  # backpack.hessianfree.hvp (double backward)
        "ggnvp": "native",  # backpack.hessianfree.ggnvp (R-op, output Hessian, L-op)
        "class_deltas": "native",  # SqrtGGNExact
        "kronecker_factors": "native",  # KFLR
    }

    @classmethod
    def check_available(cls) -> None:
        try:
            import backpack  # noqa: F401
        except ImportError as error:
            raise MissingDependencyError(
                "backend 'backpack' needs BackPACK; install it with pip install 'curvkit[backpack]'."
            ) from error

    def __init__(self, problem, options=None) -> None:
        super().__init__(problem, options)
        self._plain, self._plain_params = self._copy_model()
        self._copy: nn.Module | None = None
        self._copy_params: list[Tensor] = []
        self._loss: nn.Module | None = None

    def _copy_model(self) -> tuple[nn.Module, list[Tensor]]:
        """A deep copy in eval mode, only the selected parameters requiring gradients."""
        model = copy.deepcopy(self.problem.model).eval()
        named = dict(model.named_parameters())
        selected = set(self.problem.names)
        for n, p in named.items():
            p.requires_grad_(n in selected)
        return model, [named[n] for n in self.problem.names]

    # -- the extended copy ----------------------------------------------------------------------
    def _extended(self) -> tuple[nn.Module, list[Tensor], nn.Module]:
        """A second deep copy, extended by BackPACK (hooks), with the selected parameters mapped."""
        if self._copy is None:
            from backpack import extend

            model, params = self._copy_model()
            if not isinstance(model, nn.Sequential):
                try:
                    model = extend(model, use_converter=True)
                except Exception as error:
                    raise UnsupportedError(
                        f"BackPACK cannot convert the {type(self.problem.model).__name__} model to "
                        f"a Sequential-like graph ({type(error).__name__}: {error}); use one of "
                        f"{OTHER_BACKENDS}."
                    ) from error
            else:
                extend(model)
            # the converter keeps the parameter tensors, possibly under new names: map by identity
            remaining = {id(p) for p in model.parameters()}
            if not all(id(p) in remaining for p in params):
                raise UnsupportedError(
                    "BackPACK's converter replaced the model's parameters; use one of "
                    f"{OTHER_BACKENDS}."
                )
            self._copy, self._copy_params = model, params
            self._loss = extend(nn.CrossEntropyLoss(reduction="sum"))
        return self._copy, self._copy_params, self._loss

    def _unsupported(self, error: Exception, extension: str) -> UnsupportedError:
        message = str(error)
        culprits = [
            f"{name or '<root>'} ({type(m).__name__})"
            for name, m in self.problem.model.named_modules()
            if str(type(m)) in message
        ]
        where = ", ".join(culprits) if culprits else message
        return UnsupportedError(
            f"BackPACK's {extension} does not support module {where}; use one of {OTHER_BACKENDS}."
        )

    # -- primitives -----------------------------------------------------------------------------
    def _products(self, v: Tensor, product: Any) -> Tensor:
        """Σ over batches of ``product(summed loss, output, params, v)``, divided by N."""
        vs = self.problem.unflatten(v)
        total = self.zeros()
        for x, y in self.problem.batches():
            output = self._plain(x)
            loss = self.problem.loss_sum(output, y)
            total += self.problem.flatten(product(loss, output, self._plain_params, vs))
        return total / self.problem.num_samples

    def hvp(self, v: Tensor) -> Tensor:
        from backpack.hessianfree.hvp import hessian_vector_product

        return self._products(
            v, lambda loss, _out, params, vs: hessian_vector_product(loss, params, vs)
        )

    def ggnvp(self, v: Tensor) -> Tensor:
        from backpack.hessianfree.ggnvp import ggn_vector_product_from_plist

        return self._products(v, ggn_vector_product_from_plist)

    def _backward_with(self, extension: Any, loss: Tensor, name: str) -> None:
        from backpack import backpack

        try:
            with backpack(extension), warnings.catch_warnings():
                # BackPACK's hooks fire on outputs when inputs need no gradient: harmless
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                loss.backward()
        except NotImplementedError as error:
            raise self._unsupported(error, name) from error

    def kronecker_factors(self) -> dict[str, KroneckerFactors]:
        """KFLR factors summed over batches: with a summed loss BackPACK gives per batch
        ``[Σ_i M_i, (1/B) Σ_i a_i a_iᵀ]`` (Conv2d: bias-GGN factor and unfolded patches)."""
        from backpack.extensions import KFLR

        model, params, loss_fn = self._extended()
        names = kronecker_layers(self.problem)
        weights = {n: params[self.problem.names.index(f"{n}.weight")] for n in names}
        sums = {n: None for n in names}
        for x, y in self.problem.batches():
            self._backward_with(KFLR(), loss_fn(model(x), y), "KFLR")
            for n, w in weights.items():
                b, a = w.kflr
                batch = (b, a * x.shape[0])
                sums[n] = batch if sums[n] is None else (sums[n][0] + b, sums[n][1] + batch[1])
            for q in params:
                if hasattr(q, "kflr"):
                    del q.kflr
                q.grad = None
        n = self.problem.num_samples
        return {
            name: KroneckerFactors(b.detach() / n, a.detach() / n) for name, (b, a) in sums.items()
        }

    def class_deltas(self) -> ClassDeltas:
        """Σ_{y_i=c} δ_{i,c'} from ``SqrtGGNExact``: with a summed CE loss its factor for
        example i and class c' is exactly ``sqrt(p_{i,c'}) J_iᵀ(e_{c'} − p_i)``."""
        from backpack.extensions import SqrtGGNExact

        start = time.perf_counter()
        model, params, loss_fn = self._extended()
        c, p = self.problem.num_classes, self.problem.num_params
        sums = torch.zeros(c, c, p, dtype=self.problem.dtype, device=self.problem.device)
        counts = torch.zeros(c, dtype=torch.long)
        square_norm_sum = 0.0
        for x, y in self.problem.batches():
            self._backward_with(SqrtGGNExact(), loss_fn(model(x), y), "SqrtGGNExact")
            # (C, B, *shape) per parameter -> (B, C, P)
            factors = torch.cat([q.sqrt_ggn_exact.flatten(start_dim=2) for q in params], dim=2)
            deltas = factors.transpose(0, 1)
            sums.index_add_(0, y, deltas)
            counts += torch.bincount(y.cpu(), minlength=c)
            square_norm_sum += float((deltas**2).sum())
            for q in params:
                del q.sqrt_ggn_exact
                q.grad = None
        provenance = Provenance(
            self.name, "backpack.SqrtGGNExact", seconds=time.perf_counter() - start
        )
        return ClassDeltas(sums, counts, square_norm_sum, provenance)
