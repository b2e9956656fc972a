"""curvkit on a real network: ResNet-18 (small-image stem, C = 10) on torchvision's FakeData.

    python benchmarks/bench_scale.py [--image 32] [--sizes 512 2048] [--batch 128]
        [--backends torchfunc backpack curvlinops pyhessian] [--quantities hessian classmeans
        layerwise] [--device cpu] [--only-first-size BACKEND ...]

Each (backend, quantity, N) runs in a fresh process: it first takes one training step (forward
and backward of the mean loss on one batch, in training mode) and then ``curvkit.analyze`` on
the quantity, each under curvkit.benchmark.peak_memory (CPU: resident-set growth; CUDA:
``max_memory_allocated``). Reported: wall time, matvecs, data passes, the class-sums route, and
the analysis's peak memory as a ratio to the training step's. The goal (issue #18): peak ≤ 3×
a training step for every quantity, and flat in N. The numerics are set for a measurement of
scale, not of accuracy: top-2 eigenvalues (top-C vectors for Papyan's overlaps), Lanczos to
1e-2, 6 trace products, one SLQ probe of 5 steps. Writes
benchmarks/results/scale_<device>.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
OPTIONS = {
    "lanczos_tol": 1e-2,
    "trace_matvecs": 6,
    "density_probes": 1,
    "density_steps": 5,
}


def loader(image: int, size: int, batch: int) -> torch.utils.data.DataLoader:
    import torchvision

    data = torchvision.datasets.FakeData(
        size=size,
        image_size=(3, image, image),
        num_classes=10,
        transform=torchvision.transforms.ToTensor(),
        random_offset=0,
    )
    return torch.utils.data.DataLoader(data, batch_size=batch)


def child(args: argparse.Namespace) -> dict:
    """One measurement in this process: a training step, then the analysis."""
    import curvkit
    from curvkit.benchmark import _provenance_matvecs, peak_memory
    from curvkit.models import zoo_model

    warnings.filterwarnings("ignore")
    device = torch.device(args.device)
    model = zoo_model("resnet18", (3, args.image, args.image), 10, dtype=torch.float32)
    model = model.to(device)
    data = loader(args.image, args.size, args.batch)
    x, y = next(iter(data))
    with peak_memory(device) as step:
        start = time.perf_counter()
        model.train()
        torch.nn.functional.cross_entropy(model(x.to(device)), y.to(device)).backward()
        step_seconds = time.perf_counter() - start
    for p in model.parameters():
        p.grad = None
    row = {"step_mib": step["mib"], "step_s": step_seconds}
    with peak_memory(device) as peak:
        start = time.perf_counter()
        try:
            report = curvkit.analyze(
                model, data, args.backend, [args.quantity], top_k=2, options=OPTIONS,
                progress=False, skip_unsupported=True,
            )  # fmt: skip
        except curvkit.CurvkitError as error:
            return {**row, "error": str(error)}
    row.update(seconds=time.perf_counter() - start, peak_mib=peak["mib"])
    if args.quantity in report.skipped:
        return {**row, "error": report.skipped[args.quantity]}
    row.update(
        matvecs=_provenance_matvecs(report, args.quantity),
        passes=report.data_passes.get(args.quantity, 0),
    )
    if args.quantity == "classmeans":
        row["route"] = report.classmeans.provenance["deltas"].routine
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", type=int, default=32)
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--backends", nargs="+", default=["torchfunc", "backpack", "curvlinops"])
    parser.add_argument("--quantities", nargs="+", default=["hessian", "classmeans", "layerwise"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--only-first-size", nargs="*", default=[], metavar="BACKEND_OR_QUANTITY",
        help="run these backends or quantities at the first size only (time)",
    )  # fmt: skip
    parser.add_argument(
        "--merge", action="store_true",
        help="keep the rows of the last run (results/scale_<device>.json) that this one does not redo",
    )  # fmt: skip
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--backend", help=argparse.SUPPRESS)
    parser.add_argument("--quantity", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    rows = []
    for quantity in args.quantities:
        for backend in args.backends:
            for size in args.sizes:
                if size != args.sizes[0] and {backend, quantity} & set(args.only_first_size):
                    continue
                command = [
                    sys.executable, __file__, "--child", "--backend", backend, "--quantity",
                    quantity, "--size", str(size), "--image", str(args.image), "--batch",
                    str(args.batch), "--device", args.device,
                ]  # fmt: skip
                done = subprocess.run(command, capture_output=True, text=True, check=False)
                lines = done.stdout.strip().splitlines()
                if done.returncode or not lines:
                    result = {"error": (done.stderr.strip().splitlines() or ["no output"])[-1]}
                else:
                    result = json.loads(lines[-1])
                rows.append({"backend": backend, "quantity": quantity, "N": size, **result})
                print(rows[-1], flush=True)
    write(args, rows)


def write(args: argparse.Namespace, rows: list[dict]) -> None:
    device = torch.device(args.device)
    name = "cpu" if device.type == "cpu" else "gpu"
    raw = RESULTS / f"scale_{name}.json"
    if args.merge and raw.exists():
        redone = {(r["quantity"], r["backend"], r["N"]) for r in rows}
        kept = [
            r
            for r in json.loads(raw.read_text())
            if (r["quantity"], r["backend"], r["N"]) not in redone
        ]
        rows = sorted(kept + rows, key=lambda r: (r["quantity"], r["backend"], r["N"]))
    RESULTS.mkdir(exist_ok=True)
    raw.write_text(json.dumps(rows, indent=1) + "\n")
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = f"CPU, {torch.get_num_threads()} threads"
    lines = [
        "# ResNet-18 at scale (`benchmarks/bench_scale.py`)",
        "",
        f"{where}; torch {torch.__version__}; ResNet-18 with the small-image stem (P = 11.17 M, "
        f"C = 10, float32) on FakeData of 3×{args.image}×{args.image} images, batches of "
        f"{args.batch}; options {OPTIONS}, top_k 2. Peak memory: the analysis's over one "
        "training step's on the same batch (CPU: resident-set growth).",
        "",
        "| quantity | backend | N | seconds | matvecs | data passes | route | peak MiB | "
        "step MiB | peak / step |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(
                f"| {r['quantity']} | {r['backend']} | {r['N']} | refused or failed: "
                f"{r['error']} | | | | | | |"
            )
            continue
        ratio = r["peak_mib"] / r["step_mib"] if r["step_mib"] > 0 else float("nan")
        lines.append(
            f"| {r['quantity']} | {r['backend']} | {r['N']} | {r['seconds']:.1f} | "
            f"{r['matvecs']} | {r['passes']} | {r.get('route', '')} | {r['peak_mib']:.0f} | "
            f"{r['step_mib']:.0f} | {ratio:.1f} |"
        )
    path = RESULTS / f"scale_{name}.md"
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
