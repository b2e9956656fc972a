"""What the reproduction scripts share: the command line, the data, training, and the result file.

Each script writes ``<name>.md`` (the paper's claim, the setup, the measured table and whether it
reproduces) and ``<name>.png`` to benchmarks/results/ (``--output`` elsewhere). The default data
are the embedded digits or the synthetic Gaussian mixture, so that every script runs on a CPU in
minutes; ``--data mnist|fashion-mnist|cifar10 --root DIR`` uses a local torchvision data set
instead (never downloaded); ``--quick`` shrinks everything to a smoke test and ``--full`` runs
the paper-scale version (more settings, seeds and examples) that does not fit the default ten
minutes on two CPU cores. ``--device cuda`` trains and analyses on the GPU: the (float64) data
tensors are moved there once and every model follows its data.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from matplotlib.figure import Figure
from torch.utils.data import DataLoader

import curvkit
from curvkit.datasets import (
    digits_tensors,
    gaussian_mixture_tensors,
    tensor_loader,
    torchvision_loader,
)
from curvkit.models import train

RESULTS = Path(__file__).resolve().parents[1] / "results"
TORCHVISION = ("mnist", "fashion-mnist", "cifar10")


def run(main: Callable[[], None]) -> None:
    """Run a script's ``main``; a curvkit error (e.g. a data set missing from --root) is printed
    as one line and exits with status 2."""
    try:
        main()
    except curvkit.CurvkitError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


def arguments(doc: str, default_data: str, full: str) -> argparse.Namespace:
    """The shared flags: --data, --root, --quick, --full (described by ``full``), --device,
    --output and --seed."""
    parser = argparse.ArgumentParser(
        description=doc.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data",
        default=default_data,
        choices=(default_data, *TORCHVISION),
        help=f"data set (default {default_data}); torchvision sets are read from --root",
    )
    parser.add_argument("--root", help="the local folder of a torchvision data set")
    parser.add_argument("--quick", action="store_true", help="tiny settings: a smoke test")
    parser.add_argument("--full", action="store_true", help=f"the paper-scale version: {full}")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:index]")
    parser.add_argument("--output", type=Path, default=RESULTS, help="folder for .md and .png")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.quick and args.full:
        parser.error("--quick and --full exclude each other")
    if args.device.split(":")[0] not in ("cpu", "cuda"):
        parser.error(f"--device must be cpu or cuda[:index], got {args.device!r}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda needs a GPU that torch can see; none is (use --device cpu)")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    args.started = time.perf_counter()
    return args


def load(
    args: argparse.Namespace,
    samples_per_class: int,
    num_classes: int = 10,
    separation: float = 3.0,
    features: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) in float64 on ``args.device`` from ``args.data``: the digits' first
    ``samples_per_class`` of each class (all that a class has if it has fewer), the Gaussian
    mixture with ``num_classes`` classes, or the first ``num_classes`` classes of a local
    torchvision set."""
    if args.data == "digits":
        x, y = digits_tensors(torch.float64, samples_per_class)
    elif args.data == "gaussian-mixture":
        x, y = gaussian_mixture_tensors(
            num_classes, separation, samples_per_class, features, args.seed
        )
    else:  # Papyan's subsets: the first n of each class, of all classes, then the first C classes
        xs, ys = zip(*torchvision_loader(args.data, args.root, 1024, samples_per_class))
        x, y = torch.cat(xs).double(), torch.cat(ys)
        keep = y < num_classes
        x, y = x[keep], y[keep]
    return x.to(args.device), y.to(args.device)


def trained(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int,
    seed: int = 0,
    lr: float = 1e-2,
    optimizer: str = "adam",
    weight_decay: float = 0.0,
) -> tuple[torch.nn.Module, DataLoader]:
    """``model``, moved to the data's device, trained (batches of 64, shuffled; Adam or SGD with
    momentum) and a loader for its analysis."""
    model.to(x.device)
    loader = tensor_loader(x, y, 64, shuffle=True, seed=seed)
    train(model, loader, epochs, lr, seed, False, optimizer, weight_decay)
    return model, tensor_loader(x, y, 1000)


def accuracy(model: torch.nn.Module, data: DataLoader) -> float:
    with torch.no_grad():
        right = sum(int((model(x).argmax(1) == y).sum()) for x, y in data)
    return right / sum(len(y) for _, y in data)


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    """A Markdown table; floats to 3 significant digits."""

    def cell(value: object) -> str:
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]


def output_stem(args: argparse.Namespace, name: str) -> str:
    """``<name>[_<data>][_quick|_full]``: the default data and size keep the plain name; makes
    the folder."""
    args.output.mkdir(parents=True, exist_ok=True)
    default = args.data in ("digits", "gaussian-mixture")
    size = "_quick" if args.quick else "_full" if args.full else ""
    return name + ("" if default else f"_{args.data}") + size


def write(
    args: argparse.Namespace,
    name: str,
    title: str,
    claim: str,
    setup: str,
    body: list[str],
    verdict: list[str],
    figure: Figure,
) -> Path:
    """Write ``<stem>.md`` and ``<stem>.png`` to ``args.output``; returns the .md path."""
    stem = output_stem(args, name)
    figure.savefig(args.output / f"{stem}.png", dpi=110, bbox_inches="tight")
    minutes = (time.perf_counter() - args.started) / 60
    lines = [
        f"# {title}",
        "",
        f"**Claim.** {claim}",
        "",
        f"**Setup.** {setup} Data: {args.data}, seed {args.seed}"
        + (", --quick (smoke-test sizes: not evidence)" if args.quick else "")
        + (", --full" if args.full else "")
        + (
            f", on {args.device} ({torch.cuda.get_device_name(args.device)})"
            if args.device != "cpu"
            else ""
        )
        + f". {minutes:.1f} minutes (wall clock) on {torch.get_num_threads()} threads "
        f"({platform.machine()}), curvkit {curvkit.__version__}, torch {torch.__version__}.",
        "",
        *body,
        "",
        "**Verdict.**",
        "",
        *[f"- {line}" for line in verdict],
        "",
        f"![{title}]({stem}.png)",
    ]
    path = args.output / f"{stem}.md"
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {path}")
    return path
