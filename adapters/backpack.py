"""BackPACK backend: ``SqrtGGNExact`` factors for Papyan's δ, ``backpack.hessianfree`` products,
``DiagHessian``/``DiagGGNExact`` for exact traces and ``KFLR``/``KFAC`` for Kronecker factors.

Settings (``options.backend["backpack"]``): ``ggn_trace`` = ``"exact"`` (DiagGGNExact, C
backward passes' worth of work per batch) or ``"mc"`` (DiagGGNMC with ``mc_samples`` sampled
classes, for many classes); ``kronecker`` = ``"kflr"`` (exact B) or ``"kfac"`` (B from
``mc_samples`` sampled classes). Papyan's class sums always use ``SqrtGGNExact``: ``SqrtGGNMC``
samples the class c' and does not say which, so it cannot give per-class factors δ_{i,c'}.

BackPACK's ``extend`` changes a module in place (hooks, stored inputs), after which torch.func
fails on it; this adapter therefore extends a deep copy of the user's model and never touches
the original. Everything BackPACK stores on the copy's parameters is removed after each batch.
"""

from __future__ import annotations

import math
import re
import time
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from curvkit.backend import (
    Backend,
    ClassDeltas,
    KroneckerFactors,
    Provenance,
    kronecker_layers,
    output_positions,
)
from curvkit.distributed import all_gather_objects
from curvkit.errors import InvalidInputError, MissingDependencyError, UnsupportedError
from curvkit.linalg import TraceEstimate

OTHER_BACKENDS = "torchfunc, pyhessian"
STORED = ("sqrt_ggn_exact", "kflr", "kfac", "diag_h", "diag_ggn_exact", "diag_ggn_mc")


class BackPACKBackend(Backend):
    """BackPACK (Dangel et al. 2020): one backward pass gives every δ_{i,c'} of a batch."""

    name = "backpack"
    library = "backpack-for-pytorch"
    extra = "backpack"
    capabilities = {
        "hvp": "native",  # backpack.hessianfree.hvp (double backward)
        "ggnvp": "native",  # backpack.hessianfree.ggnvp (R-op, output Hessian, L-op)
        "class_deltas": "native",  # SqrtGGNExact
        "kronecker_factors": "native",  # KFLR (exact) or KFAC (Monte Carlo)
        "trace": "native",  # sum of DiagHessian / DiagGGNExact (or DiagGGNMC)
        "block_products": "native",  # backpack.hessianfree on one parameter
    }
    default_settings = {"ggn_trace": "exact", "kronecker": "kflr", "mc_samples": 1}
    CHOICES = {"ggn_trace": ("exact", "mc"), "kronecker": ("kflr", "kfac")}

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
        for key, allowed in self.CHOICES.items():
            if self.config[key] not in allowed:
                raise InvalidInputError(
                    f"setting {key!r} of backend 'backpack' must be one of {', '.join(allowed)}, "
                    f"got {self.config[key]!r}."
                )
        if self.config["mc_samples"] < 1:
            raise InvalidInputError("setting 'mc_samples' of backend 'backpack' must be ≥ 1.")
        self._plain, self._plain_params = self.model_copy()
        self._copy: nn.Module | None = None
        self._copy_params: list[Tensor] = []
        self._loss: nn.Module | None = None

    # -- the extended copy ----------------------------------------------------------------------
    def _extended(self) -> tuple[nn.Module, list[Tensor], nn.Module]:
        """A second deep copy, extended by BackPACK (hooks), with the selected parameters mapped."""
        if self._copy is None:
            from backpack import extend

            model, params = self.model_copy()
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
        """Name the module BackPACK rejected: a path in the user's model, a module the converter
        inserted (e.g. ``SumModule`` for a residual connection), or BackPACK's own reason."""
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        message = re.sub(r"<[^<>]* object at 0x[0-9a-f]+>:?\s*", "", message).strip(" .,")
        message = re.sub(r",? Extension:?$", "", message)
        culprits = [
            f"module {name or '<root>'} ({type(m).__name__})"
            for name, m in self.problem.model.named_modules()
            if str(type(m)) in message
        ]
        inserted = re.findall(r"<class '[\w.]*\.(\w+)'>", message)
        if culprits:
            what = f"does not support {', '.join(culprits)}"
        elif inserted:
            what = (
                f"does not support the {inserted[0]} that its converter inserted for the "
                f"{type(self.problem.model).__name__} model's branching"
            )
        else:
            what = f"cannot handle the {type(self.problem.model).__name__} model ({message})"
            if "inplace" in message:
                what += ", as in-place operations such as ReLU(inplace=True) break its hooks"
        return UnsupportedError(f"BackPACK's {extension} {what}; use one of {OTHER_BACKENDS}.")

    # -- primitives -----------------------------------------------------------------------------
    def _products(self, matrix: str, params: list[Tensor], vs: list[Tensor]) -> Tensor:
        """Σ over batches of BackPACK's Hessian- or G-vector product with respect to ``params``,
        divided by N (flat)."""
        from backpack.hessianfree.ggnvp import ggn_vector_product_from_plist
        from backpack.hessianfree.hvp import hessian_vector_product

        total = 0
        for x, y in self.problem.batches():  # every rank has at least one batch (Problem)
            output = self._plain(x)
            loss = self.problem.loss_sum(output, y)
            if matrix == "hessian":
                parts = hessian_vector_product(loss, params, vs)
            else:
                parts = ggn_vector_product_from_plist(loss, output, params, vs)
            total = total + torch.cat([part.flatten() for part in parts])
        return self.problem.all_reduce(total / self.problem.num_samples)

    def hvp(self, v: Tensor) -> Tensor:
        return self._products("hessian", self._plain_params, self.problem.unflatten(v))

    def ggnvp(self, v: Tensor) -> Tensor:
        return self._products("ggn", self._plain_params, self.problem.unflatten(v))

    def block_matvec(self, matrix: str, name: str):
        """``backpack.hessianfree`` products with respect to one parameter."""
        if matrix not in ("hessian", "ggn"):
            return super().block_matvec(matrix, name)
        param = self._plain_params[self.problem.names.index(name)]
        return lambda v: self._products(matrix, [param], [v.view_as(param)])

    def _extension_pass(self, extensions: dict[str, Any], batch_sums: Any) -> None:
        """One backward pass per batch with ``extensions`` ({name: instance}); ``batch_sums(x,
        params)`` reads what they stored before it is removed again."""
        from backpack import backpack

        model, params, loss_fn = self._extended()
        label = "/".join(extensions)
        for x, y in self.problem.batches_with_progress(label, self.options.progress):
            try:
                with backpack(*extensions.values()), warnings.catch_warnings():
                    # BackPACK's hooks fire on outputs when inputs need no gradient: harmless
                    warnings.filterwarnings("ignore", message="Full backward hook is firing")
                    loss_fn(model(x), y).backward()
            except (NotImplementedError, AssertionError, RuntimeError) as error:
                # AssertionError: BackPACK lost track of the graph, e.g. a functional call
                # (torch.tanh) where it expects a module (nn.Tanh); RuntimeError: e.g. an in-place
                # ReLU on a tensor that BackPACK's hooks return (torchvision's ResNets)
                raise self._unsupported(error, label) from error
            batch_sums(x, y, params)
            for q in params:
                for attribute in STORED:
                    if hasattr(q, attribute):
                        delattr(q, attribute)
                q.grad = None

    def kronecker_factors(self) -> dict[str, KroneckerFactors]:
        """KFLR (or KFAC) factors summed over batches: with a summed loss BackPACK gives per batch
        ``[Σ_i M_i, (1/B) Σ_i a_i a_iᵀ]``; for Conv2d its A sums the unfolded patches' outer
        products over the T output positions, and curvkit's A is their mean (divided by T)."""
        from backpack.extensions import KFAC, KFLR

        if self.config["kronecker"] == "kfac":
            extension, attribute = KFAC(mc_samples=self.config["mc_samples"]), "kfac"
        else:
            extension, attribute = KFLR(), "kflr"
        _, params, _ = self._extended()
        weights = {
            n: params[self.problem.names.index(f"{n}.weight")]
            for n in kronecker_layers(self.problem)
        }
        sums: dict[str, list[Tensor]] = {}

        def add(x: Tensor, _y: Tensor, _params: list[Tensor]) -> None:
            for n, w in weights.items():
                b, a = getattr(w, attribute)
                if n in sums:
                    sums[n][0] += b
                    sums[n][1] += a * x.shape[0]
                else:
                    sums[n] = [b.detach().clone(), a.detach() * x.shape[0]]

        self._extension_pass({extension.__class__.__name__: extension}, add)
        n = self.problem.num_samples
        x, _ = next(self.problem.batches())
        positions = output_positions(self._plain, list(weights), x)
        reduce = self.problem.all_reduce
        return {
            name: KroneckerFactors(reduce(b / n), reduce(a / (n * positions[name])))
            for name, (b, a) in sums.items()
        }

    def trace(self, matrix: str, seed: int) -> tuple[TraceEstimate, Provenance]:
        """The sum of BackPACK's diagonal: exact for the Hessian, G (DiagGGNExact) and their
        difference; with ``ggn_trace="mc"`` G's diagonal is DiagGGNMC's unbiased estimate and the
        standard error is estimated across batches. Where an extension does not support the
        model, curvkit's estimator on BackPACK's products (provenance says so)."""
        try:
            return self._diagonal_trace(matrix)
        except UnsupportedError as error:  # e.g. DiagHessian on a converted residual network
            result, provenance = super().trace(matrix, seed)
            provenance.derived = True
            provenance.note = f"from BackPACK's products: {error}"
            return result, provenance

    def _diagonal_trace(self, matrix: str) -> tuple[TraceEstimate, Provenance]:
        from backpack.extensions import DiagGGNExact, DiagGGNMC, DiagHessian

        start = time.perf_counter()
        mc = self.config["ggn_trace"] == "mc" and matrix != "hessian"
        extensions: dict[str, Any] = {}
        if matrix in ("hessian", "residual"):
            extensions["DiagHessian"] = DiagHessian()
        if matrix in ("ggn", "residual"):
            extensions["DiagGGN"] = (
                DiagGGNMC(mc_samples=self.config["mc_samples"]) if mc else DiagGGNExact()
            )
        attributes = {"DiagHessian": "diag_h", "DiagGGN": "diag_ggn_mc" if mc else "diag_ggn_exact"}
        per_batch: list[tuple[int, float]] = []

        def add(x: Tensor, _y: Tensor, params: list[Tensor]) -> None:
            parts = {
                key: math.fsum(float(getattr(q, attributes[key]).sum()) for q in params)
                for key in extensions
            }
            if matrix == "residual":
                per_batch.append((x.shape[0], parts["DiagHessian"] - parts["DiagGGN"]))
            else:
                per_batch.append((x.shape[0], sum(parts.values())))

        self._extension_pass(extensions, add)
        per_batch = [b for rank in all_gather_objects(per_batch, self.problem.group) for b in rank]
        n = self.problem.num_samples
        value = math.fsum(s for _, s in per_batch) / n
        stderr = batch_stderr(per_batch) if mc else 0.0
        routine = "backpack." + "+".join(type(e).__name__ for e in extensions.values())
        return TraceEstimate(value, stderr, 0, "mc" if mc else "exact"), self._provenance(
            routine, matrix, 0, start, note="one backward pass with the extension per batch"
        )

    def class_deltas(self) -> ClassDeltas:
        """Σ_{y_i=c} δ_{i,c'} from ``SqrtGGNExact``: with a summed CE loss its factor for
        example i and class c' is exactly ``sqrt(p_{i,c'}) J_iᵀ(e_{c'} − p_i)``."""
        from backpack.extensions import SqrtGGNExact

        start = time.perf_counter()
        c, p = self.problem.num_classes, self.problem.num_params
        self.check_batch_memory("BackPACK's SqrtGGNExact factors", 2 * c * p)
        sums = torch.zeros(c, c, p, dtype=self.problem.dtype, device=self.problem.device)
        counts = torch.zeros(c, dtype=torch.long)
        square_norms: list[float] = []

        def add(_x: Tensor, y: Tensor, params: list[Tensor]) -> None:
            # (C, B, *shape) per parameter -> (B, C, P); only one batch's factors are held
            factors = torch.cat([q.sqrt_ggn_exact.flatten(start_dim=2) for q in params], dim=2)
            deltas = factors.transpose(0, 1)
            sums.index_add_(0, y, deltas)
            counts.add_(torch.bincount(y.cpu(), minlength=c))
            square_norms.append(float((deltas**2).sum()))

        self._extension_pass({"SqrtGGNExact": SqrtGGNExact()}, add)
        provenance = Provenance(
            self.name, "backpack.SqrtGGNExact", seconds=time.perf_counter() - start
        )
        deltas = ClassDeltas(sums, counts, math.fsum(square_norms), provenance)
        return deltas.all_reduced(self.problem)


def batch_stderr(per_batch: list[tuple[int, float]]) -> float:
    """Standard error of ``Σ_b s_b / N`` from batch sums ``s_b`` over ``n_b`` examples, treating
    examples as independent: conservative, since it also counts the spread of the data between
    batches; NaN for a single batch."""
    if len(per_batch) < 2:
        return math.nan
    n = sum(size for size, _ in per_batch)
    mean = math.fsum(s for _, s in per_batch) / n
    variance = math.fsum(size * (s / size - mean) ** 2 for size, s in per_batch)
    return math.sqrt(variance / (len(per_batch) - 1) / n)
