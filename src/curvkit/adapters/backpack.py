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

import contextlib
import io
import math
import os
import re
import sys
import traceback
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from curvkit.backend import Backend, KroneckerFactors
from curvkit.distributed import all_gather_objects
from curvkit.errors import (
    CurvkitError,
    InvalidInputError,
    UnsupportedError,
    first_line,
    listed,
)
from curvkit.layers import output_positions
from curvkit.linalg import Operator, Options, TraceEstimate
from curvkit.linalg.operator import instead, trace
from curvkit.linalg.trace import SPREAD_SAMPLES, batch_stderr
from curvkit.problem import rounding_gap
from curvkit.report import Provenance

STORED = ("sqrt_ggn_exact", "kflr", "kfac", "diag_h", "diag_ggn_exact", "diag_ggn_mc")


class BackPACKBackend(Backend):
    """BackPACK (Dangel et al. 2020): one backward pass gives every δ_{i,c'} of a batch."""

    name = "backpack"
    library = "backpack-for-pytorch"
    module = "backpack"
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
    choices = {"ggn_trace": ("exact", "mc"), "kronecker": ("kflr", "kfac")}
    # BackPACK's extensions read each module's input and output through their own hooks and
    # assume each parameter belongs to one module called once: these features make them wrong
    # without an error (its products are plain autograd and stay right)
    limits = dict.fromkeys(
        (
            "shared_parameters",
            "forward_hooks",
            "backward_hooks",
            "parametrizations",
            "asymmetric_padding",
            "padding_modes",  # its unfolds pad with zeros
            "overridden_call",  # its hooks and converter see forward alone
        ),
        ("class_deltas", "kronecker_factors", "trace"),
    ) | {
        "uncopied_forward": ("hvp", "ggnvp", "trace", "block_products"),  # all on its copy
        "rop_hessian": ("hvp", "block_products"),  # its Hessian products are R-ops
    }

    _extended_copy: tuple[nn.Module, list[Tensor], nn.Module] | None = None

    def configure(self, options: Options) -> None:
        """Also: Monte-Carlo extensions draw ``mc_samples`` classes per example, each a
        backward pass's worth of memory; more than the C classes cost more than the exact
        extensions (C columns, no sampling error), and 10¹² samples tried to allocate 16 TB
        before BackPACK failed."""
        super().configure(options)
        sampled = self.config["kronecker"] == "kfac" or self.config["ggn_trace"] == "mc"
        c = self.problem.num_classes
        if sampled and self.config["mc_samples"] > c:
            raise InvalidInputError(
                f"setting 'mc_samples' of backend 'backpack' is {self.config['mc_samples']}, more "
                f"than the {c} classes: the exact extensions (kronecker: kflr, ggn_trace: exact) "
                f"cost {c} samples' worth with no sampling error; use them, or at most {c} samples."
            )

    def refusal(self, quantity: str) -> str | None:
        """Also BackPACK's module coverage: the extension that ``quantity`` needs, tried on two
        examples (e.g. no BatchNorm, GELU or LayerNorm for second-order extensions); Papyan's
        class sums need it only on the per-example route."""
        reason = super().refusal(quantity)
        if reason or quantity not in ("classmeans", "layerwise"):
            return reason
        if quantity == "classmeans" and self.class_sums_route()[0] != "per-example":
            return None  # the gradient routes run plain autograd on a copy
        x, y = self.problem.sample
        try:
            with mc_seeded(self.problem.device, 0):
                if quantity == "classmeans":
                    self.batch_class_deltas(x, y)
                else:
                    self.batch_kronecker(x, y)
        except UnsupportedError as error:
            return str(error).rstrip(".")
        return None

    # -- products on the plain copy -------------------------------------------------------------
    def _plist(self, param: str | None) -> list[Tensor]:
        _, params = self.working_copy()
        return [params[self.problem.names.index(n)] for n in self.problem.selected(param)]

    def batch_hvp(self, x: Tensor, y: Tensor, V: Tensor, param: str | None) -> Tensor:
        from backpack.hessianfree.hvp import hessian_vector_product

        model, _ = self.working_copy()
        plist = self._plist(param)
        loss = self.problem.loss.curvature_criterion(model(x), y)  # the loss's Hessian, stably
        grads = torch.autograd.grad(loss, plist, create_graph=True)
        columns = self.problem.split_columns(V, param)
        return torch.stack(
            [
                self.problem.flatten(hessian_vector_product(loss, plist, list(v), grads))
                for v in zip(*columns.values())
            ],
            dim=1,
        )

    def batch_ggnvp(self, x: Tensor, y: Tensor, V: Tensor, param: str | None) -> Tensor:
        from backpack.hessianfree.ggnvp import ggn_vector_product_from_plist

        model, _ = self.working_copy()
        plist = self._plist(param)
        output = model(x)
        loss = self.problem.loss.gauss_newton_surrogate(output)  # the loss's output Hessian
        columns = self.problem.split_columns(V, param)
        return torch.stack(
            [
                self.problem.flatten(ggn_vector_product_from_plist(loss, output, plist, list(v)))
                for v in zip(*columns.values())
            ],
            dim=1,
        )

    # -- extension passes on the extended copy --------------------------------------------------
    def _extended(self) -> tuple[nn.Module, list[Tensor], nn.Module]:
        """A second deep copy, extended by BackPACK (hooks), with the selected parameters mapped."""
        if self._extended_copy is None:
            from backpack import extend

            model, params = self.model_copy()
            self._as_backpack_modules(model)
            if not isinstance(model, nn.Sequential):
                try:
                    with warnings.catch_warnings():  # what breaks is found and said: _backward
                        warnings.filterwarnings("ignore", message="Encountered node that may break")
                        model = extend(model, use_converter=True)
                except Exception as error:
                    raise UnsupportedError(
                        f"BackPACK cannot convert the {type(self.problem.model).__name__} model to "
                        f"a Sequential-like graph ({type(error).__name__}: {first_line(error)})."
                    ) from error
            else:
                extend(model)
            # the converter keeps the parameter tensors, possibly under new names: map by identity
            remaining = {id(p) for p in model.parameters()}
            if not all(id(p) in remaining for p in params):
                raise UnsupportedError("BackPACK's converter replaced the model's parameters.")
            self._extended_copy = (model, params, extend(self.problem.loss.module("sum")))
        return self._extended_copy

    def _as_backpack_modules(self, model: nn.Module) -> None:
        """Rewrite the copy into modules BackPACK's extensions support, with the same function:
        in-place activations (``ReLU(inplace=True)``) computed out of place (BackPACK's hooks
        hand out tensors that an in-place operation may not change), a convolution's
        ``padding="valid"`` or ``"same"`` as the numbers it stands for (BackPACK unfolds with the
        string: a raw TypeError; an unequal "same" is the feature ``asymmetric_padding``), and
        an adaptive average pool over an input whose size its output divides as the fixed
        ``AvgPool2d`` it is for this data (BackPACK has no AdaptiveAvgPool2d rule)."""
        for module in model.modules():
            if getattr(module, "inplace", False) is True:
                module.inplace = False
            if isinstance(module, nn.Conv2d) and isinstance(module.padding, str):
                module.padding = tuple(
                    d * (k - 1) // 2 if module.padding == "same" else 0
                    for d, k in zip(module.dilation, module.kernel_size)
                )
        sizes: dict[nn.Module, tuple[int, int]] = {}

        def record(module: nn.Module, args: tuple[Tensor, ...]) -> None:
            sizes[module] = tuple(args[0].shape[-2:])

        pools = [m for m in model.modules() if isinstance(m, nn.AdaptiveAvgPool2d)]
        if not pools:
            return
        handles = [m.register_forward_pre_hook(record) for m in pools]
        try:
            with torch.no_grad():
                model(self.problem.sample[0])
        finally:
            for handle in handles:
                handle.remove()
        parents = {child: (parent, name) for parent in model.modules()
                   for name, child in parent.named_children()}  # fmt: skip
        for pool in pools:
            size = sizes.get(pool)
            out = pool.output_size
            out = (out, out) if isinstance(out, int) else tuple(out)
            if size is None or pool not in parents or None in out:
                continue
            if all(s % o == 0 for s, o in zip(size, out)):
                kernel = tuple(s // o for s, o in zip(size, out))
                parent, name = parents[pool]
                setattr(parent, name, nn.AvgPool2d(kernel, stride=kernel))

    @contextlib.contextmanager
    def _backward(
        self, x: Tensor, y: Tensor, *extensions: Any, every_parameter: bool = True
    ) -> Iterator[list[Tensor]]:
        """One backward pass on a batch with BackPACK's ``extensions``; yields the parameters
        holding what they stored (``every_parameter``: each of them, or an UnsupportedError),
        which is removed again afterwards."""
        from backpack import backpack, memory_cleanup

        model, params, loss_fn = self._extended()
        label = "/".join(type(e).__name__ for e in extensions)
        try:
            with backpack(*extensions), warnings.catch_warnings(), _stderr_unless_failing():
                # BackPACK's hooks fire on outputs when inputs need no gradient: harmless
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                # KFLR's note on transposed convolutions, whose factors layerwise leaves out
                warnings.filterwarnings("ignore", message="The Kronecker factors stored in")
                for module in model.modules():  # what an earlier forward pass stored
                    memory_cleanup(module)
                output = model(x)
                loss = loss_fn(output, y)
                fault = _stored_io_fault(model, loss_fn) or self._unlike_model(x, output)
                if fault:
                    raise UnsupportedError(f"BackPACK's {label} {fault}.")
                loss.backward()
        except CurvkitError:
            self.clean(params, STORED)
            raise
        except (NotImplementedError, AssertionError, RuntimeError, ValueError, TypeError) as error:
            # AssertionError: BackPACK lost track of the graph, e.g. a functional call
            # (torch.tanh) where it expects a module (nn.Tanh); RuntimeError: e.g. an in-place
            # ReLU on a tensor that BackPACK's hooks return (torchvision's ResNets); ValueError:
            # e.g. its AvgPool2d rule on a pool with ceil_mode, whose output it cannot size
            self.clean(params, STORED)
            raise self._unsupported(error, label) from error
        missed = [
            name
            for name, q in zip(self.problem.names, params)
            if not all(hasattr(q, e.savefield) for e in extensions)
        ]
        # a Parameter no module BackPACK knows holds (used via torch.nn.functional)
        if missed and every_parameter:
            self.clean(params, STORED)
            raise UnsupportedError(
                f"BackPACK's {label} computes nothing for parameter(s) {', '.join(missed[:3])}, "
                "which no module it supports holds (a custom module using them through "
                "torch.nn.functional)."
            )
        try:
            yield params
        finally:
            self.clean(params, STORED)

    def _unlike_model(self, x: Tensor, output: Tensor) -> str:
        """Why the extended copy's logits on ``x`` are not the model's ("" when they agree up to
        rounding, ``rounding_gap``): BackPACK's converter and curvkit's rewrites
        (``_as_backpack_modules``) must compute the model's function on every batch, and an
        adaptive pool runs as the fixed pool it equals at the sample's size (with inputs of two
        sizes its exact traces and class means were 3 % off, with no error bar)."""
        plain, _ = self.working_copy()
        with torch.no_grad():
            expected = plain(x)
        gap = float((output.detach() - expected).abs().max())
        if gap <= rounding_gap(expected):
            return ""
        return (
            f"runs on a copy converted into modules it supports whose logits on a batch of "
            f"inputs of shape {tuple(x.shape)} are {gap:.1e} off the model's (an "
            "AdaptiveAvgPool2d runs there as the AvgPool2d it equals at the first example's "
            "size: give inputs of one size)"
        )

    def _unsupported(self, error: Exception, extension: str) -> UnsupportedError:
        """Name the module BackPACK rejected: a path in the user's model, a module the converter
        inserted (e.g. ``SumModule`` for a residual connection), or BackPACK's own reason."""
        message = first_line(error) or type(error).__name__
        message = re.sub(r"<[^<>]* object at 0x[0-9a-f]+>:?\s*", "", message).strip(" .,")
        message = re.sub(r",? Extension:?$", "", message)
        named: dict[str, list[str]] = {}  # module type → names of the modules of that type
        for name, m in self.problem.model.named_modules():
            if str(type(m)) in message:
                named.setdefault(type(m).__name__, []).append(name or "<root>")
        culprits = [
            f"module {names[0]} ({kind})"
            if len(names) == 1
            else f"the {len(names)} {kind} modules ({', '.join(names[:2])}, ...)"
            for kind, names in named.items()
        ]
        inserted = re.findall(r"<class '[\w.]*\.(\w+)'>", message)
        if culprits:
            what = f"does not support {', '.join(culprits)}"
        elif inserted:
            what = (
                f"does not support the {inserted[0]} that its converter inserted for the "
                f"{type(self.problem.model).__name__} model's branching"
            )
        elif "expected scalar type Double but found Float" in message:
            what = (
                f"fails in float64 on this model ({_rule(error)} computes in float32): analyse "
                "a float32 copy"
            )
        else:
            what = f"cannot handle the {type(self.problem.model).__name__} model ({message})"
            if "inplace" in message:
                what += ", as in-place operations such as ReLU(inplace=True) break its hooks"
        return UnsupportedError(f"BackPACK's {extension} {what}.")

    def batch_class_deltas(self, x: Tensor, y: Tensor) -> Tensor:
        """``SqrtGGNExact``: with a summed loss its factor for example i and class c' is exactly
        ``sqrt(p_{i,c'}) J_iᵀ(e_{c'} − p_i)``, stored as (C, B, *shape) per parameter."""
        from backpack.extensions import SqrtGGNExact

        with self._backward(x, y, SqrtGGNExact()) as params:
            factors = torch.cat(
                [q.sqrt_ggn_exact.reshape(*q.sqrt_ggn_exact.shape[:2], -1) for q in params], dim=2
            )
        return factors.transpose(0, 1)

    def batch_kronecker(self, x: Tensor, y: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
        """KFLR (or KFAC) on a batch: with a summed loss BackPACK gives ``[Σ_i M_i, (1/B) Σ_i
        a_i a_iᵀ]``; for Conv2d its A sums the patches' outer products over the T output
        positions, and curvkit's A is their mean (divided by T)."""
        extension = kronecker_extension(self.config["kronecker"], self.config["mc_samples"])
        attribute = extension.savefield
        layers, _ = self.kronecker_plan()
        positions = output_positions(self.working_copy()[0], layers, x)  # per batch: inputs
        # of other sizes have other numbers of positions
        with self._backward(x, y, extension, every_parameter=False) as params:  # layers' only
            factors = {
                n: getattr(params[self.problem.names.index(f"{n}.weight")], attribute)
                for n in layers
            }
            return {
                n: (b.detach().clone(), a.detach() * (len(y) / positions[n]))
                for n, (b, a) in factors.items()
            }

    # -- exact traces ---------------------------------------------------------------------------
    def native_routines(self, matrix: str, param: str | None, op: Operator) -> dict[str, Any]:
        if param is not None:
            return {}
        return {"trace": lambda options, seed: self._trace(matrix, op, options, seed)}

    def _trace(
        self, matrix: str, op: Operator, options: Options, seed: int
    ) -> tuple[TraceEstimate, Provenance]:
        """The sum of BackPACK's diagonal: exact for the Hessian, G (DiagGGNExact) and their
        difference; with ``ggn_trace="mc"`` G's diagonal is DiagGGNMC's unbiased estimate and the
        standard error is estimated across batches. Where an extension does not support the
        model, curvkit's estimator on BackPACK's products (provenance says so)."""
        from backpack.extensions import DiagGGNExact, DiagGGNMC, DiagHessian

        start = op.clock()
        mc = self.config["ggn_trace"] == "mc" and matrix != "hessian"
        extensions = {}
        if matrix in ("hessian", "residual"):
            extensions["diag_h"] = DiagHessian()
        if matrix in ("ggn", "residual"):
            ggn = DiagGGNMC(mc_samples=self.config["mc_samples"]) if mc else DiagGGNExact()
            extensions["diag_ggn_mc" if mc else "diag_ggn_exact"] = ggn
        # the Monte-Carlo standard error comes from the spread of the groups' sums: at least
        # SPREAD_SAMPLES of them (batches split), as two batches' spread put errors at up to 54 of
        # its standard errors (z spread 9.5 over 60 seeds; 1.7 with four batches)
        split = math.ceil(SPREAD_SAMPLES / self.problem.summary.num_batches) if mc else 1
        per_batch: list[tuple[int, float]] = []
        failure = None
        try:
            with mc_seeded(self.problem.device, seed):
                for batch in self.data_pass(f"backpack {matrix} diagonal"):
                    for x, y in zip(*(t.tensor_split(split) for t in batch)):
                        if len(y):
                            per_batch.append((len(y), self._diagonal_sum(x, y, matrix, extensions)))
        except UnsupportedError as error:  # e.g. DiagHessian on a converted residual network
            failure = str(error)
        # a batch of one rank's may stop it (inputs of another size): every rank then takes
        # the products' route, whose collectives match (raw TypeErrors from mismatched ones)
        gathered = all_gather_objects((per_batch, failure), self.problem.group)
        failure = next((f for _, f in gathered if f), None)
        if failure:
            why = f"from BackPACK's products: {failure}"
            return instead(trace, op, options, seed, why=why, derived=True)
        per_batch = [b for batches, _ in gathered for b in batches]
        value = math.fsum(s for _, s in per_batch) / self.problem.num_samples
        routine = "backpack." + "+".join(type(e).__name__ for e in extensions.values())
        stderr = batch_stderr(per_batch) if mc else 0.0
        estimate = TraceEstimate(value, stderr, 0, "mc" if mc else "exact")
        return estimate, op.provenance(
            routine, 0, start, "one backward pass with the extension per batch"
        )

    def _diagonal_sum(self, x: Tensor, y: Tensor, matrix: str, extensions: dict[str, Any]) -> float:
        """The sum of ``matrix``'s diagonal on one batch from BackPACK's ``extensions``."""
        with self._backward(x, y, *extensions.values()) as params:
            sums = {key: [float(getattr(q, key).sum()) for q in params] for key in extensions}
        if not all(math.isfinite(v) for column in sums.values() for v in column):
            raise UnsupportedError(  # inputs of 1e300: NaN reported, 7.56 right
                f"BackPACK's diagonal is not finite on this data (its terms overflow in "
                f"{self.problem.dtype} where its products do not)"
            )
        parts = {key: math.fsum(column) for key, column in sums.items()}
        if matrix == "residual":
            return parts.pop("diag_h") - sum(parts.values())
        return sum(parts.values())

    def kronecker_factors(self) -> dict[str, KroneckerFactors]:
        with mc_seeded(self.problem.device, 0):  # KFAC samples classes
            return super().kronecker_factors()


def kronecker_extension(kind: str, mc_samples: int) -> Any:
    """BackPACK's KFLR (``kind="kflr"``) or KFAC, completed for residual networks in eval mode.

    Neither has a BatchNorm rule; in eval mode BatchNorm is a per-channel affine map, and the
    backpropagated square root passes through it by BackPACK's own BatchNorm Jacobian (the rule
    its DiagGGNExact uses), registered as a module extension. KFLR also lacks the accumulation
    rule for a tensor used twice (a residual branch): the square roots from both uses add, as
    KFAC's and SqrtGGN's do.
    """
    from backpack.core.derivatives.batchnorm_nd import BatchNormNdDerivatives
    from backpack.extensions import KFAC, KFLR
    from backpack.extensions.secondorder.hbp.hbpbase import HBPBaseModule

    class ResidualKFLR(KFLR):
        def accumulate_backpropagated_quantities(self, existing: Tensor, other: Tensor) -> Tensor:
            return existing + other

    extension = KFAC(mc_samples=mc_samples) if kind == "kfac" else ResidualKFLR()
    for batch_norm in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
        extension.set_module_extension(batch_norm, HBPBaseModule(BatchNormNdDerivatives()))
    return extension


def _stored_io_fault(model: nn.Module, loss_fn: nn.Module) -> str:
    """Why BackPACK's backward pass would fail or be wrong after the forward pass just run ("" if
    it would not), read from the inputs and outputs its hooks stored on every module.

    - A module given its input as a keyword argument (``layer(input=x)``) gets no ``input0``:
      a raw AttributeError from BackPACK's rules.
    - BackPACK keys what it backpropagates by ``data_ptr()``: an input (or the loss's) that
      shares its address with a module's output but neither has that output's shape and
      strides nor is a reshape of it (both contiguous) is a view with other values at the same
      address (``h.mT``, ``h[:, :1].expand``), which gets the output's quantity. Its exact
      traces and class means were 0.5 % off on a digits CNN with ``swapdims`` between its
      convolutions, with no error bar.
    """
    leaves = [(n, m) for n, m in model.named_modules() if next(m.children(), None) is None]
    unread = [n for n, m in leaves if hasattr(m, "output") and not hasattr(m, "input0")]
    if unread:
        return (
            f"cannot read the input of module(s) {listed(unread)}, which the model calls with "
            "its input as a keyword argument (layer(input=x)) that BackPACK's hooks do not "
            "record: pass it positionally"
        )
    outputs: dict[int, list[Tensor]] = {}
    for _, module in leaves:
        if isinstance(getattr(module, "output", None), Tensor):
            outputs.setdefault(module.output.data_ptr(), []).append(module.output)
    misread = []
    for name, module in [*leaves, ("the loss", loss_fn)]:
        for key, tensor in vars(module).items():
            if not (re.fullmatch(r"input\d+", key) and isinstance(tensor, Tensor)):
                continue
            viewed = outputs.get(tensor.data_ptr(), []) if tensor.requires_grad else []
            if viewed and not any(_same_values(tensor, output) for output in viewed):
                misread.append(name if name == "the loss" else f"module {name}")
    if misread:
        return (
            f"would misread the input of {listed(misread)}: it finds what it backpropagates to "
            "a tensor by the tensor's address, and that input is a view of another module's "
            "output with another layout, taken outside modules (a slice such as out[:, 0], "
            "h.mT, swapdims, movedim, expand), so it would get the quantity of the output it "
            "views"
        )
    return ""


def _same_values(view: Tensor, output: Tensor) -> bool:
    """Whether ``view`` at ``output``'s address holds its values in their order."""
    if view.dtype != output.dtype or view.numel() != output.numel():
        return False
    same_layout = view.shape == output.shape and view.stride() == output.stride()
    return same_layout or (view.is_contiguous() and output.is_contiguous())


def _rule(error: Exception) -> str:
    """The BackPACK rule where ``error`` arose ("its embedding rule", read from the traceback's
    last frame among BackPACK's derivatives)."""
    rules = [
        frame.filename
        for frame in traceback.extract_tb(error.__traceback__)
        if "backpack" in frame.filename and "derivatives" in frame.filename
    ]
    if not rules:
        return "one of its rules"
    return f"its {os.path.splitext(os.path.basename(rules[-1]))[0]} rule"


@contextlib.contextmanager
def mc_seeded(device: torch.device, seed: int) -> Iterator[None]:
    """BackPACK's Monte-Carlo extensions draw from torch's global generator: fork and seed it,
    so that the same seed gives the same numbers and the caller's generator does not move."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def _stderr_unless_failing() -> Iterator[None]:
    """What the block writes to stderr, held back and written out unless the block raises: a
    model BackPACK's converter made (a torch.fx graph module) prints a traceback of its
    failing line before it raises, and curvkit turns that error into its refusal (four raw
    tracebacks on the terminal beside a clean report before)."""
    held = io.StringIO()
    with contextlib.redirect_stderr(held):
        yield
    sys.stderr.write(held.getvalue())
