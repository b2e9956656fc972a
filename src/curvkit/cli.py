"""The ``curvkit`` command line: ``curvkit analyze | bench | compare | backends``.

Exit codes: 0 success, 1 analysis failure (one-line reason on stderr) or, for ``compare``,
disagreement between backends, 2 usage error.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from curvkit import __version__
from curvkit.errors import (
    BackendNotFoundError,
    CurvkitError,
    InvalidInputError,
    MissingDependencyError,
)

ANALYZE_EXAMPLES = """examples:
  curvkit analyze                                 # train the digits MLP, analyse it, write curvkit-out/report.yaml
  curvkit analyze --backend torchfunc --quantities hessian ggn --top-k 5 --output out/
  curvkit analyze --quick                         # fewer eigenvalues and probes: seconds, not a minute
  curvkit analyze --backend auto                  # the choice saved by `curvkit bench --save-choice`
  curvkit analyze --config run.yaml --top-k 30    # a run config; flags override its keys
  curvkit analyze --config run.yaml --print-config
"""
BENCH_EXAMPLES = """examples:
  curvkit bench                                   # every installed backend on every quantity
  curvkit bench --backends torchfunc,backpack --quantities hessian ggn --repeats 5
  curvkit bench --save-choice --output bench-out/ # store the fastest correct backend per quantity
"""
COMPARE_EXAMPLES = """examples:
  curvkit compare --backends torchfunc,backpack,pyhessian,curvlinops   # a quick check
  curvkit compare --thorough                                # analyze's defaults, all digits
  curvkit compare --quantities ggn classmeans --rtol 1e-4   # exit 1 if any number disagrees
"""


def folder(text: str) -> Path:
    """An --output folder; an empty one (an unset shell variable) would write into the working
    directory."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path; name a folder (e.g. curvkit-out)")
    return Path(text)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="curvkit",
        description="Curvature of a trained classifier's loss through one interface over several libraries.",
    )
    parser.add_argument("--version", action="version", version=f"curvkit {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    analyze = commands.add_parser(
        "analyze",
        help="analyse the embedded default problem (the digits MLP) and write a report",
        description="Measure the curvature of the model a run config describes (default: train "
        "the embedded digits MLP) and write report.yaml into the output folder.",
        epilog=ANALYZE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    analyze.add_argument(
        "--backend", help="backend name (see `curvkit backends`), or auto (the saved choice)"
    )
    _problem_arguments(analyze)
    analyze.add_argument("--output", type=folder, help="output folder (curvkit-out)")
    analyze.add_argument("--choice-file", type=Path, help="choice file for --backend auto")
    analyze.add_argument(
        "--no-plots", action="store_true", help="write no PNG figures (needs matplotlib anyway)"
    )
    analyze.add_argument(
        "--quick",
        action="store_true",
        help="compare's quick settings: top-k 5, 30 trace products, SLQ 2 × 20 (unless set); "
        "eigenvalues as accurate as ever, traces and densities with larger error bars",
    )

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
    bench.add_argument("--output", type=folder, help="folder for bench.yaml and bench.md")
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
    compare.add_argument("--rtol", type=float, default=1e-3, help="eigenvalues: relative (1e-3)")
    compare.add_argument("--atol", type=float, default=1e-4, help="eigenvalues: times λ1 (1e-4)")
    compare.add_argument("--sigmas", type=float, default=4.0, help="traces: standard errors (4)")
    compare.add_argument(
        "--thorough",
        action="store_true",
        help="analyze's defaults on all the data (default: a quick check, top-k 5, fewer "
        "probes, 30 digits per class)",
    )

    plot = commands.add_parser(
        "plot",
        help="draw the figures of a saved report",
        description="Write PNG figures (spectral densities, Papyan's terms, class Gram, "
        "hierarchy, layers) of a report.yaml or report.json.",
        epilog="examples:\n  curvkit plot curvkit-out/report.yaml --output figures/\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    plot.add_argument("report", type=Path, help="a report written by curvkit analyze")
    plot.add_argument("--output", type=folder, help="folder for the PNG files (the report's)")

    commands.add_parser(
        "backends",
        help="list the registered backends, their versions and capabilities",
        description="List the registered backends: installed or not, version, capabilities.",
        epilog="examples:\n  curvkit backends   # a missing one shows the pip extra to install\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return parser


def _problem_arguments(parser: argparse.ArgumentParser) -> None:
    """The run-config flags; each overrides its key of --config (see curvkit.config)."""
    parser.add_argument("--config", type=Path, help="a YAML run config (flags override its keys)")
    parser.add_argument(
        "--print-config", action="store_true", help="print the effective config and exit"
    )
    parser.add_argument(
        "--quantities",
        nargs="+",
        default=None,
        help="hessian ggn residual classmeans layerwise (default: all)",
    )
    parser.add_argument(
        "--top-k", type=int, default=None, help="eigenvalues per spectrum (default 2C)"
    )
    parser.add_argument("--seed", type=int, help="seed of training and of the estimators (0)")
    parser.add_argument("--epochs", type=int, help="training epochs of a zoo model (30)")
    parser.add_argument(
        "--samples-per-class", type=int, help="the first N examples of each class (default: all)"
    )
    parser.add_argument("--device", help="cpu, cuda or cuda:<index> (cpu)")
    parser.add_argument("--dtype", help="float64 or float32 (float64)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars and no summary")


def _backends_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--backends",
        type=lambda text: [name.strip() for name in text.split(",") if name.strip()],
        default=None,
        help="comma-separated backend names (default: all installed)",
    )


def _config(args: argparse.Namespace) -> dict:
    from curvkit.config import load_config

    overrides = {
        "backend": getattr(args, "backend", None),
        "quantities": args.quantities,
        "top_k": args.top_k,
        "seed": args.seed,
        "device": args.device,
        "dtype": args.dtype,
        "output": str(args.output) if getattr(args, "output", None) is not None else None,
        "model": {"epochs": args.epochs} if args.epochs is not None else None,
        "data": (
            {"samples_per_class": args.samples_per_class}
            if args.samples_per_class is not None
            else None
        ),
    }
    return load_config(args.config, overrides)


def _problem(args: argparse.Namespace, config: dict):
    from curvkit.config import build

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise InvalidInputError(
            f"curvkit {args.command} runs in one process; start it without torchrun (only "
            "curvkit analyze is data-parallel)."
        )
    return build(config, progress=not args.quiet)


def _analyze(args: argparse.Namespace, config: dict) -> int:
    """``curvkit analyze``; under torchrun (WORLD_SIZE > 1) every rank analyses its shard of the
    data and rank 0 prints and writes."""
    import curvkit
    from curvkit.comparison import QUICK_OPTIONS, QUICK_TOP_K
    from curvkit.config import build
    from curvkit.distributed import rank, start_from_environment
    from curvkit.report import check_writable

    with start_from_environment(config["device"]) as group:
        main_rank = rank(group) == 0
        if main_rank:
            check_writable(Path(config["output"]), "--output")  # before the work, not after
        progress = not args.quiet and main_rank
        model, data = build(config, progress=progress, group=group)
        if args.quick:  # the report's run config records the settings used
            config["top_k"] = QUICK_TOP_K if config["top_k"] is None else config["top_k"]
            config["options"] = {**QUICK_OPTIONS, **config["options"]}
        report = curvkit.analyze(
            model,
            data,
            backend=config["backend"],
            quantities=config["quantities"],
            top_k=config["top_k"],
            seed=config["seed"],
            progress=progress,
            options=config["options"],
            choice_file=args.choice_file,
            process_group=group,
            cache_mb=config["data"]["cache_mb"],
        )
    if not main_rank:
        return 0
    report.config["run"] = config
    output = Path(config["output"])
    path = report.save(output / "report.yaml")
    figures = [] if args.no_plots else _figures(lambda: _plot_report(report, output))
    if not args.quiet:
        print(report)
        print(f"\nreport written to {path}")
        for figure in figures:
            print(f"figure written to {figure}")
    return 0


def _plot_report(report, folder: Path) -> list[Path]:
    from curvkit.plot import plot_report

    return plot_report(report, folder)


def _figures(make) -> list[Path]:
    """``make()``'s figures, or none (with a note on stderr) when matplotlib is missing."""
    try:
        return make()
    except MissingDependencyError as error:
        print(f"curvkit: no figures: {error}", file=sys.stderr)
        return []


def _plot(args: argparse.Namespace) -> int:
    from curvkit.plot import plot_report
    from curvkit.report import Report, check_writable

    if not args.report.exists():
        raise InvalidInputError(f"report {args.report} does not exist.")
    check_writable(args.output or args.report.parent, "--output")
    for path in plot_report(Report.load(args.report), args.output or args.report.parent):
        print(f"figure written to {path}")
    return 0


def _bench(args: argparse.Namespace, config: dict) -> int:
    from curvkit.benchmark import bench
    from curvkit.choice import choice_path
    from curvkit.report import check_writable

    if args.repeats < 1:
        raise InvalidInputError(f"--repeats must be ≥ 1, got {args.repeats}.")
    if args.output is not None:
        check_writable(args.output, "--output")
    if args.save_choice:
        check_writable(choice_path(args.choice_file).parent, "--choice-file")
    model, data = _problem(args, config)
    result = bench(
        model,
        data,
        backends=args.backends,
        quantities=config["quantities"],
        repeats=args.repeats,
        top_k=config["top_k"],
        seed=config["seed"],
        options=config["options"],
        progress=not args.quiet,
    )
    print(result)
    if args.output is not None:
        for path in result.save(args.output):
            print(f"written {path}")
        from curvkit.plot import plot_bench

        for path in _figures(lambda: [plot_bench(result, args.output)]):
            print(f"written {path}")
    if args.save_choice:
        print(f"choice {result.choices} saved in {result.save_choice(args.choice_file)}")
    return 0


def _compare(args: argparse.Namespace, config: dict) -> int:
    from curvkit.comparison import QUICK_SETTINGS, checked_tolerances, compare, compared_backends

    compared_backends(args.backends)  # before training the model
    checked_tolerances(rtol=args.rtol, atol=args.atol, sigmas=args.sigmas)
    data_config = config["data"]
    if not args.thorough and data_config["name"] == "digits" and not data_config["factory"]:
        data_config["samples_per_class"] = data_config["samples_per_class"] or 30
    model, data = _problem(args, config)
    comparison = compare(
        model,
        data,
        backends=args.backends,
        quantities=config["quantities"],
        rtol=args.rtol,
        atol=args.atol,
        sigmas=args.sigmas,
        top_k=config["top_k"],
        seed=config["seed"],
        options=config["options"],
        progress=not args.quiet,
        thorough=args.thorough,
    )
    if not args.thorough:
        print(
            f"quick check on {comparison.reports[comparison.reference].model.num_samples} "
            f"examples ({QUICK_SETTINGS} unless set); --thorough for analyze's defaults on "
            "all the data"
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


def _print_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
    """A warning on the command line as one line, ``curvkit: warning: …``: Python's format
    adds the entry script's path and its line ``sys.exit(main())``, which say nothing here."""
    text = str(message).removeprefix("curvkit: ")
    kind = "" if category is UserWarning else f"{category.__name__}: "
    print(f"curvkit: warning: {kind}{text}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    with warnings.catch_warnings():  # the caller's warning settings come back after
        # BackPACK and PyHessian import torch.jit.script, which torch now deprecates
        warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
        warnings.showwarning = _print_warning
        return _main(argv)


def _main(argv: Sequence[str] | None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "backends":
            return _backends()
        if args.command == "plot":
            return _plot(args)
        config = _config(args)
        if args.print_config:
            from curvkit.config import dump

            print(dump(config), end="")
            return 0
        from curvkit.analysis import check_arguments  # before training, not after
        from curvkit.registry import backend_list

        backend = config["backend"] if args.command == "analyze" else None
        check_arguments(
            backend, config["quantities"], config["top_k"], config["seed"], config["options"]
        )
        if args.command != "analyze":
            backend_list(args.backends)
        commands = {"analyze": _analyze, "bench": _bench, "compare": _compare}
        return commands[args.command](args, config)
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
