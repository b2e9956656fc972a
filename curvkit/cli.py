"""The ``curvkit`` command line: ``curvkit analyze | bench | compare | backends``.

Exit codes: 0 success, 1 analysis failure (one-line reason on stderr) or, for ``compare``,
disagreement between backends, 2 usage error.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from curvkit.errors import BackendNotFoundError, CurvkitError, InvalidInputError

ANALYZE_EXAMPLES = """examples:
  curvkit analyze                                 # train the digits MLP, analyse it, write curvkit-out/report.yaml
  curvkit analyze --backend torchfunc --quantities hessian ggn --top-k 5 --output out/
  curvkit analyze --backend auto                  # the choice saved by `curvkit bench --save-choice`
"""
BENCH_EXAMPLES = """examples:
  curvkit bench                                   # every installed backend on every quantity
  curvkit bench --backends torchfunc,backpack --quantities hessian ggn --repeats 5
  curvkit bench --save-choice --output bench-out/ # store the fastest correct backend per quantity
"""
COMPARE_EXAMPLES = """examples:
  curvkit compare --backends torchfunc,backpack,pyhessian,curvlinops
  curvkit compare --quantities ggn classmeans --rtol 1e-4   # exit 1 if any number disagrees
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
        "--backend",
        default="torchfunc",
        help="backend name (see `curvkit backends`), or auto (the saved choice)",
    )
    _problem_arguments(analyze)
    analyze.add_argument("--output", type=Path, default=Path("curvkit-out"), help="output folder")
    analyze.add_argument("--choice-file", type=Path, help="choice file for --backend auto")

    bench = commands.add_parser(
        "bench",
        help="time every backend on every quantity and check it against a reference",
        description="Benchmark the installed backends on the embedded default problem: median "
        "seconds, peak memory, matvecs and error against a dense torch.func reference.",
        epilog=BENCH_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _backends_argument(bench)
    _problem_arguments(bench)
    bench.add_argument("--repeats", type=int, default=3, help="timed runs after a warm-up")
    bench.add_argument("--output", type=Path, help="folder for bench.yaml and bench.md")
    bench.add_argument(
        "--save-choice",
        action="store_true",
        help="store the fastest agreeing backend per quantity for --backend auto",
    )
    bench.add_argument("--choice-file", type=Path, help="where to store the choice")

    compare = commands.add_parser(
        "compare",
        help="check that backends agree on every number (for CI)",
        description="Run several backends on the embedded default problem and compare every "
        "number with torchfunc's (or the first backend's); exit 1 on disagreement.",
        epilog=COMPARE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _backends_argument(compare)
    _problem_arguments(compare)
    compare.add_argument("--rtol", type=float, default=1e-3, help="eigenvalues: relative")
    compare.add_argument("--atol", type=float, default=1e-4, help="eigenvalues: times λ1")
    compare.add_argument("--sigmas", type=float, default=4.0, help="traces: standard errors")

    commands.add_parser(
        "backends",
        help="list the registered backends, their versions and capabilities",
        description="List the registered backends: installed or not, version, capabilities.",
    )
    return parser


def _problem_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--quantities",
        nargs="+",
        default=None,
        help="hessian ggn residual classmeans layerwise (default: all)",
    )
    parser.add_argument(
        "--top-k", type=int, default=None, help="eigenvalues per spectrum (default 2C)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of training and of the estimators"
    )
    parser.add_argument(
        "--epochs", type=int, default=30, help="training epochs of the default model"
    )
    parser.add_argument(
        "--samples-per-class",
        type=int,
        default=None,
        help="use the first N digits of each class (default: all 1797)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars and no summary")


def _backends_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--backends",
        type=lambda text: [name.strip() for name in text.split(",") if name.strip()],
        default=None,
        help="comma-separated backend names (default: all installed)",
    )


def _default_problem(args: argparse.Namespace):
    from curvkit.models import trained_digits_mlp

    if args.epochs < 0:
        raise InvalidInputError(f"--epochs must be ≥ 0, got {args.epochs}.")
    if args.samples_per_class is not None and args.samples_per_class < 1:
        raise InvalidInputError(f"--samples-per-class must be ≥ 1, got {args.samples_per_class}.")
    return trained_digits_mlp(
        epochs=args.epochs,
        seed=args.seed,
        progress=not args.quiet,
        samples_per_class=args.samples_per_class,
    )


def _analyze(args: argparse.Namespace) -> int:
    import curvkit

    progress = not args.quiet
    model, loader = _default_problem(args)
    report = curvkit.analyze(
        model,
        loader,
        backend=args.backend,
        quantities=args.quantities,
        top_k=args.top_k,
        seed=args.seed,
        progress=progress,
        choice_file=args.choice_file,
    )
    path = report.save(args.output / "report.yaml")
    if not args.quiet:
        print(report)
        print(f"\nreport written to {path}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from curvkit.bench import bench

    if args.repeats < 1:
        raise InvalidInputError(f"--repeats must be ≥ 1, got {args.repeats}.")
    model, loader = _default_problem(args)
    result = bench(
        model,
        loader,
        backends=args.backends,
        quantities=args.quantities,
        repeats=args.repeats,
        top_k=args.top_k,
        seed=args.seed,
        progress=not args.quiet,
    )
    print(result)
    if args.output is not None:
        for path in result.save(args.output):
            print(f"written {path}")
    if args.save_choice:
        print(f"choice {result.choices} saved in {result.save_choice(args.choice_file)}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from curvkit.compare import compare

    model, loader = _default_problem(args)
    comparison = compare(
        model,
        loader,
        backends=args.backends,
        quantities=args.quantities,
        rtol=args.rtol,
        atol=args.atol,
        sigmas=args.sigmas,
        top_k=args.top_k,
        seed=args.seed,
        progress=not args.quiet,
    )
    print(comparison)
    return 0 if comparison.agree else 1


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
    # BackPACK and PyHessian import torch.jit.script, which torch now deprecates: not the user's concern
    warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        commands = {"analyze": _analyze, "bench": _bench, "compare": _compare}
        if args.command in commands:
            return commands[args.command](args)
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
