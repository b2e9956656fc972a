"""The ``curvkit`` command line: ``curvkit analyze`` and ``curvkit backends``.

Exit codes: 0 success, 1 analysis failure (one-line reason on stderr), 2 usage error.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from curvkit.errors import BackendNotFoundError, CurvkitError, InvalidInputError

ANALYZE_EXAMPLES = """examples:
  curvkit analyze                                 # train the digits MLP, analyse it, write curvkit-out/report.yaml
  curvkit analyze --backend torchfunc --quantities hessian ggn --top-k 5 --output out/
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="curvkit",
        description="Curvature of a trained classifier's loss through one interface over several libraries.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    analyze = commands.add_parser(
        "analyze",
        help="analyse the embedded default problem (the digits MLP) and write a report",
        description="Train the embedded digits MLP (deterministic), measure its curvature and write "
        "report.yaml into --output.",
        epilog=ANALYZE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    analyze.add_argument(
        "--backend", default="torchfunc", help="backend name (see `curvkit backends`)"
    )
    analyze.add_argument(
        "--quantities",
        nargs="+",
        default=None,
        help="hessian ggn residual classmeans (default: all)",
    )
    analyze.add_argument(
        "--top-k", type=int, default=None, help="eigenvalues per spectrum (default 2C)"
    )
    analyze.add_argument(
        "--seed", type=int, default=0, help="seed of training and of the estimators"
    )
    analyze.add_argument(
        "--epochs", type=int, default=30, help="training epochs of the default model"
    )
    analyze.add_argument("--output", type=Path, default=Path("curvkit-out"), help="output folder")
    analyze.add_argument("--quiet", action="store_true", help="no progress bars and no summary")

    commands.add_parser(
        "backends",
        help="list the registered backends, their versions and capabilities",
        description="List the registered backends: installed or not, version, capabilities.",
    )
    return parser


def _analyze(args: argparse.Namespace) -> int:
    import curvkit
    from curvkit.models import trained_digits_mlp

    if args.epochs < 0:
        raise InvalidInputError(f"--epochs must be ≥ 0, got {args.epochs}.")
    progress = not args.quiet
    model, loader = trained_digits_mlp(epochs=args.epochs, seed=args.seed, progress=progress)
    report = curvkit.analyze(
        model,
        loader,
        backend=args.backend,
        quantities=args.quantities,
        top_k=args.top_k,
        seed=args.seed,
        progress=progress,
    )
    path = report.save(args.output / "report.yaml")
    if not args.quiet:
        print(report)
        print(f"\nreport written to {path}")
    return 0


def _backends() -> int:
    import curvkit

    rows = [("backend", "installed", "version", "capabilities / install")]
    for name, info in curvkit.backends().items():
        if info["installed"]:
            caps = ", ".join(f"{k} ({v})" for k, v in info["capabilities"].items())
            rows.append((name, "yes", info["version"] or "", caps))
        else:
            rows.append((name, "no", "", info["reason"]))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row[:3], widths)) + "  " + row[3])
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "analyze":
            return _analyze(args)
        return _backends()
    except (InvalidInputError, BackendNotFoundError) as error:
        print(f"curvkit: error: {error}", file=sys.stderr)
        return 2
    except CurvkitError as error:
        print(f"curvkit: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("curvkit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
