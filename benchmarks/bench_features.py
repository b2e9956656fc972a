"""The cost of the model-features check (``curvkit.features.model_features``), run once per
analysis before anything is computed, on one example against two (the data's first and the
one with the largest logits, as ``Problem.features`` takes them).

    python benchmarks/bench_features.py [--repeats 3]

Models: the digits MLP and CNN (float64) and a ResNet-18 on 32 × 32 images (float32, checked
in float64 on a copy; needs torchvision). Median wall time of ``repeats`` runs, side by side in
one process. Writes benchmarks/results/features_cpu.md.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from curvkit.features import model_features
from curvkit.models import digits_cnn, digits_mlp, resnet18
from curvkit.problem import model_guard

RESULTS = Path(__file__).parent / "results"


def models() -> dict[str, tuple[torch.nn.Module, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    found = {
        "digits MLP (float64)": (digits_mlp(), torch.rand(2, 64, generator=generator).double()),
        "digits CNN (float64)": (digits_cnn(), torch.rand(2, 64, generator=generator).double()),
    }
    try:
        found["ResNet-18, 32 × 32 (float32)"] = (
            resnet18((3, 32, 32), 10),
            torch.rand(2, 3, 32, 32, generator=generator),
        )
    except Exception:  # noqa: BLE001 (no torchvision: the small models only)
        pass
    return found


def seconds(model: torch.nn.Module, examples: torch.Tensor, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        with model_guard(model):
            model_features(model, examples)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows = [
        "| model | P | one example (s) | two examples (s) | ratio |",
        "|---|---|---|---|---|",
    ]
    for name, (model, examples) in models().items():
        model.eval()
        one = seconds(model, examples[:1], args.repeats)
        two = seconds(model, examples, args.repeats)
        count = sum(p.numel() for p in model.parameters())
        rows.append(f"| {name} | {count} | {one:.3f} | {two:.3f} | {two / one:.2f} |")
        print(rows[-1], flush=True)
    text = "\n".join(
        [
            "# The model-features check, one example against two",
            "",
            f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU; median of "
            f"{args.repeats} runs, side by side in one process "
            "(`python benchmarks/bench_features.py`).",
            "",
            *rows,
            "",
        ]
    )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "features_cpu.md").write_text(text)


if __name__ == "__main__":
    main()
