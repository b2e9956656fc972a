"""Papyan (2019, 2020), mapped over regimes: where G's top C outliers are the class-mean term's
eigenvalues (the eigenvalue claim), where the class means span G's top-C eigenspace (the
subspace claim), and what predicts which.

    python benchmarks/reproduce/papyan.py [--quick | --full] [--data mnist --root DIR] [--device cuda]

A tanh MLP is trained on the first n examples of every class; curvkit (torch.func) measures G's
top C² eigenvalues (Lanczos) and Papyan's decomposition G = G_own + G_class + G_cross +
G_within (curvkit.classmeans), with its two claim gaps, the spread of log10 √p within classes,
the share of G_within's trace inside span{δ_{c,c'}} (C² products with G: where G_within lives in
the group means' span it mixes with the class and cross terms), and the neural collapse of the
penultimate features. Each setting changes one thing of the base
(digits, 100 per class, MLP 64-64, SGD with momentum 0.9, lr 0.05, weight decay 5e-4, 200
epochs): the optimizer (Adam, the first release's setting), the weight decay, the training
length, width and depth, the examples per class, and, on a Gaussian mixture, the class
separation (20 apart: the positive control, where the claim should hold). ``--full`` adds the
paper's scale: 13, 500 and 1000 examples per class (Papyan: 13–5000; a class with fewer gives all
it has, and the table shows the n used), a LeNet-style CNN, 350 epochs (Papyan's training
length), and the base from two more seeds; it is meant for ``--data mnist|fashion-mnist|cifar10``
on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from common import (
    TORCHVISION,
    accuracy,
    arguments,
    load,
    output_stem,
    run,
    table,
    trained,
    write,
)
from matplotlib import colormaps
from matplotlib.figure import Figure

import curvkit
from curvkit.datasets import gaussian_mixture_tensors
from curvkit.linalg import orthonormal_basis
from curvkit.models import zoo_model
from curvkit.plot import hierarchy
from curvkit.quantities.classmeans import group_means, relative_gap, within_operator

CLASSES = 10
CLOSE = 0.25  # a relative gap below this counts as "the claim holds"
ALIGNED = 0.8  # an overlap above this counts as "the subspace claim holds"
TAB20 = colormaps["tab20"]


@dataclass
class Setting:
    """One regime: the base with the named changes."""

    axis: str
    label: str
    data: str = "digits"  # or "mixture"
    model: str = "mlp"  # or "lenet"
    seed: int = 0  # added to --seed
    samples: int = 100
    separation: float = 3.0
    width: int = 64
    depth: int = 2
    optimizer: str = "sgd"
    lr: float = 0.05
    weight_decay: float = 5e-4
    epochs: int = 200
    full: bool = False  # only in --full
    result: dict = field(default_factory=dict)


def settings(quick: bool, full: bool) -> list[Setting]:
    """The regimes: a smoke test with ``quick``; with ``full`` also the paper-scale ones."""
    if quick:
        return [
            Setting("base", "base", samples=10, epochs=3),
            Setting("architecture", "LeNet", model="lenet", samples=10, epochs=3),
            Setting("separation", "mixture, 20 apart", "mixture", samples=10, separation=20.0,
                    epochs=3),
        ]  # fmt: skip
    return [
        s
        for s in [
            Setting("base", "base (SGD, wd 5e-4, 200 ep)"),
            Setting("seed", "base, seed +1", seed=1, full=True),
            Setting("seed", "base, seed +2", seed=2, full=True),
            Setting("optimizer", "Adam lr 1e-2, 60 ep", optimizer="adam", lr=1e-2, epochs=60,
                    weight_decay=0.0),
            Setting("weight decay", "wd 0", weight_decay=0.0),
            Setting("weight decay", "wd 5e-3", weight_decay=5e-3),
            Setting("training length", "10 epochs", epochs=10),
            Setting("training length", "50 epochs", epochs=50),
            Setting("training length", "350 epochs", epochs=350, full=True),
            Setting("width/depth", "width 32", width=32),
            Setting("width/depth", "width 128", width=128),
            Setting("width/depth", "depth 4", depth=4),
            Setting("architecture", "LeNet", model="lenet", full=True),
            Setting("examples per class", "n = 13", samples=13, full=True),
            Setting("examples per class", "n = 20", samples=20),
            Setting("examples per class", "n = 170", samples=170),
            Setting("examples per class", "n = 500", samples=500, full=True),
            Setting("examples per class", "n = 1000", samples=1000, full=True),
            Setting("separation", "mixture, 3 apart", "mixture", separation=3.0),
            Setting("separation", "mixture, 8 apart", "mixture", separation=8.0),
            Setting("separation", "mixture, 20 apart", "mixture", separation=20.0),
        ]
        if full or not s.full
    ]  # fmt: skip


def neural_collapse(model: torch.nn.Sequential, x: torch.Tensor, y: torch.Tensor) -> float:
    """Papyan, Han & Donoho's NC1 = tr(Σ_W Σ_B⁺)/C of the penultimate features (0: each class
    collapsed to its mean)."""
    with torch.no_grad():
        h = model[:-1](x)
    mean = h.mean(0)
    means = torch.stack([h[y == c].mean(0) for c in range(CLASSES)])
    within = h - means[y]
    sigma_w = within.T @ within / len(y)
    sigma_b = (means - mean).T @ (means - mean) / CLASSES
    return float(torch.trace(sigma_w @ torch.linalg.pinv(sigma_b, hermitian=True)) / CLASSES)


def within_in_groups(model: torch.nn.Module, data, within_trace: float) -> float:
    """tr(Qᵀ G_within Q) / tr G_within for an orthonormal basis Q of the C² group means δ_{c,c'}:
    the part of G_within inside their span (C² products with G)."""
    with curvkit.model_guard(model):
        backend = curvkit.get_backend("torchfunc")(curvkit.Problem(model, data))
        deltas = backend.class_deltas()
        group = group_means(deltas.sums, deltas.counts, backend.problem.num_samples, deltas.route)
        basis = orthonormal_basis(group.rows.T)
        inside = within_operator(backend.operator("ggn"), group).matmat(basis)
    return float((basis * inside).sum()) / within_trace


def measure(args, setting: Setting) -> dict:
    if setting.data == "mixture":
        x, y = gaussian_mixture_tensors(CLASSES, setting.separation, setting.samples, 64, args.seed)
        x, y = x.to(args.device), y.to(args.device)
    else:
        x, y = load(args, setting.samples)
    seed = args.seed + setting.seed
    model = zoo_model(
        setting.model, tuple(x.shape[1:]), CLASSES, setting.width, setting.depth, seed
    )
    model, data = trained(
        model, x, y, setting.epochs, seed, setting.lr, setting.optimizer, setting.weight_decay
    )
    top_k = CLASSES * CLASSES if not args.quick else 2 * CLASSES
    ggn = curvkit.analyze(model, data, quantities=["ggn"], top_k=top_k, progress=False).ggn
    report = curvkit.analyze(model, data, quantities=["classmeans"], top_k=CLASSES, progress=False)
    means = report.classmeans
    return {
        "accuracy": accuracy(model, data),
        "per_class": int(torch.bincount(y).min()),
        "top": ggn.top_eigenvalues,
        "class_gap": means.gap["class"],
        "cross_gap": relative_gap(ggn.top_eigenvalues[CLASSES:], means.eigenvalues["cross"]),
        "ritz_gap": means.gap["ritz"],
        "overlap": means.overlap["ggn"],
        "hessian_overlap": means.overlap["hessian"],
        "spread": means.confidence_spread,
        "shares": {t: means.trace[t] / means.trace["total"] for t in means.trace},
        "collapse": neural_collapse(model, x, y),
        "within_in_groups": within_in_groups(model, data, means.trace["within"]),
        "terms": means.eigenvalues,
        "report": report,
    }


def rank_correlation(a: list[float], b: list[float]) -> float:
    """Spearman's ρ (no ties expected among measured floats)."""
    ranks = [torch.tensor(v).argsort().argsort().double() for v in (a, b)]
    return float(torch.corrcoef(torch.stack(ranks))[0, 1])


def main() -> None:
    args = arguments(
        __doc__, "digits", full="n = 13, 500, 1000, LeNet, 350 epochs, 3 seeds of the base"
    )
    regimes = settings(args.quick, args.full)
    for setting in regimes:
        setting.result = measure(args, setting)
        print(f"{setting.label}: {setting.result['class_gap']:.2f}", flush=True)
    rows = [
        [
            s.axis,
            s.label,
            s.result["per_class"],
            f"{100 * s.result['accuracy']:.1f} %",
            s.result["class_gap"],
            s.result["cross_gap"],
            s.result["ritz_gap"],
            s.result["overlap"],
            s.result["hessian_overlap"],
            s.result["spread"],
            s.result["collapse"],
            s.result["within_in_groups"],
            *(s.result["shares"][t] for t in ("own", "class", "cross", "within")),
        ]
        for s in regimes
    ]
    spreads = [s.result["spread"] for s in regimes]
    inside = [s.result["within_in_groups"] for s in regimes]
    gaps = [s.result["class_gap"] for s in regimes]
    holds = [s.label for s in regimes if s.result["class_gap"] < CLOSE]
    fails = [s.label for s in regimes if s.result["class_gap"] >= CLOSE]
    aligned = [s.label for s in regimes if s.result["overlap"] >= ALIGNED]
    rho = rank_correlation(spreads, gaps) if len(regimes) > 2 else float("nan")
    fitted = [s.result["class_gap"] for s in regimes if s.result["accuracy"] == 1.0]
    digits = [s for s in regimes if s.data == "digits"]
    rho_digits = (
        rank_correlation(
            [s.result["spread"] for s in digits], [s.result["class_gap"] for s in digits]
        )
        if len(digits) > 2
        else float("nan")
    )
    control = regimes[-1]  # the mixture 20 apart
    body = [
        "Gaps are ‖λ − μ‖/‖λ‖ (0 = the claim exactly): G's top C eigenvalues against G_class's "
        "(class), G's next C(C−1) against G_cross's (cross), G's top C against the Rayleigh–Ritz "
        "values of G on span{δ_c} (Ritz). Overlap = ‖UᵀV‖²_F / C between the top-C eigenvectors "
        "of G (or the Hessian) and the class means. Spread: the mean over groups (c, c') of the "
        "standard deviation of log10 √p_{i,c'} over the examples of class c. NC1 = tr(Σ_W Σ_B⁺)/C "
        "of the penultimate features. Within in span: the share of tr G_within inside "
        "span{δ_{c,c'}} (C² directions of P). Shares: each term's part of tr G.",
        "",
        *table(
            (
                "axis",
                "setting",
                "n per class",
                "train acc",
                "class gap",
                "cross gap",
                "Ritz gap",
                "G overlap",
                "Hess overlap",
                "spread",
                "NC1",
                "within in span",
                "own",
                "class",
                "cross",
                "within",
            ),
            rows,
        ),  # fmt: skip
        "",
        *(
            []
            if args.data in TORCHVISION
            else [
                "Not measured in this run: image data at Papyan's scale (`--full --data "
                "mnist|fashion-mnist|cifar10 --root DIR`, best with `--device cuda`).",
                "",
            ]
        ),
        f"![hierarchy]({output_stem(args, 'reproduce_papyan')}_hierarchy.png) "
        f"(Papyan's hierarchy plot for {control.label})",
    ]
    verdict = [
        f"Eigenvalue claim (class gap < {CLOSE}): holds for {', '.join(holds) or 'none'}; "
        f"fails for {', '.join(fails) or 'none'}.",
        f"The spread of log10 √p within classes against the class gap: Spearman ρ = {rho:.2f} "
        f"over the {len(regimes)} settings, {rho_digits:.2f} over the {len(digits)} digits "
        f"settings alone (the spread ranges {min(spreads):.2f}–{max(spreads):.2f}). Fitting the "
        "training data: "
        + (
            f"the {len(fitted)} settings at 100 % training accuracy have class gaps "
            f"{min(fitted):.2f}–{max(fitted):.2f}."
            if fitted
            else "no setting reached 100 % training accuracy."
        ),
        f"Subspace claim (overlap ≥ {ALIGNED}): holds for {', '.join(aligned) or 'none'}; the "
        "Ritz gap (G restricted to span{δ_c} against G's top C) is "
        f"{min(s.result['ritz_gap'] for s in regimes):.3f}–"
        f"{max(s.result['ritz_gap'] for s in regimes):.3f}, below {CLOSE} in "
        f"{sum(s.result['ritz_gap'] < CLOSE for s in regimes)} of {len(regimes)} settings, "
        f"where the class gap is below it in {len(holds)}.",
        "The share of tr G_within inside span{δ_{c,c'}} (C² of P directions): "
        + ", ".join(
            f"{kind} {min(v):.2f}–{max(v):.2f}"
            for kind, v in (
                ("digits", [s.result["within_in_groups"] for s in digits]),
                ("mixtures", [s.result["within_in_groups"] for s in regimes if s.data != "digits"]),
            )
            if v
        )
        + f"; Spearman ρ with the class gap {rank_correlation(inside, gaps):.2f}"
        + (
            f", {'stronger' if rank_correlation(inside, gaps) > rho else 'weaker'} than the "
            f"spread's {rho:.2f}."
            if len(regimes) > 2
            else "."
        ),
        f"Positive control ({control.label}): class gap {control.result['class_gap']:.2f}, "
        f"overlap {control.result['overlap']:.3f}, spread {control.result['spread']:.2f}.",
    ]
    figure = Figure(figsize=(11, 4.2), layout="constrained")
    left, right = figure.subplots(1, 2)
    markers = dict(zip(dict.fromkeys(s.axis for s in regimes), "osv^DP*Xh<>p"))
    for i, s in enumerate(regimes):
        r, style = s.result, {"marker": markers[s.axis], "color": TAB20(i % 20), "ls": "none"}
        left.plot(r["spread"], r["class_gap"], label=s.label, **style)
        right.plot(r["spread"], r["overlap"], **style)
        right.plot(r["spread"], r["ritz_gap"], **{**style, "mfc": "none"})
    left.axhline(CLOSE, color="grey", linestyle=":")
    left.set(xlabel="spread of log10 √p within classes", ylabel="class gap (0 = Papyan's claim)",
             title="Eigenvalue claim: G's top C vs G_class")  # fmt: skip
    right.axhline(ALIGNED, color="grey", linestyle=":")
    right.set(xlabel="spread of log10 √p within classes", ylabel="overlap (filled), Ritz gap (open)",
              title="Subspace claim: span{δ_c} vs G's top-C eigenspace")  # fmt: skip
    left.legend(fontsize="x-small", ncol=2)
    hierarchy_file = args.output / f"{output_stem(args, 'reproduce_papyan')}_hierarchy.png"
    hierarchy(control.result["report"]).savefig(hierarchy_file, dpi=110, bbox_inches="tight")
    write(
        args,
        "reproduce_papyan",
        "Papyan 2019/2020: class-mean structure of G, mapped over regimes",
        "The top C outliers of G are the eigenvalues of the class-mean term G_class, the next "
        "C(C−1) those of the cross-class term, and the span of the C class-mean gradients nearly "
        "equals the top-C eigenspace, so C gradients replace a P-dimensional eigensolver.",
        "Tanh MLP (width × depth hidden layers; LeNet: the ReLU CNN), the base setting changed one axis at a time "
        "(see the table); G of the mean cross-entropy on the training examples; G's top C² "
        "eigenvalues by Lanczos; Papyan's terms, gaps and spread from curvkit.classmeans.",
        body,
        verdict,
        figure,
    )


if __name__ == "__main__":
    run(main)
