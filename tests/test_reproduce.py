"""The papers' reproduction scripts (benchmarks/reproduce/) run end to end with --quick and write
their Markdown (claim, setup, table, verdict) and figure; the full runs are benchmarks, not tests."""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from curvkit.datasets import digits_table

SCRIPTS = Path(__file__).resolve().parents[1] / "benchmarks" / "reproduce"
pytestmark = pytest.mark.slow  # minutes of subprocesses


@pytest.mark.parametrize("name", ["sagun", "papyan", "wu", "sankar"])
def test_reproduction_script_writes_table_verdict_and_figure(name, tmp_path):
    run = script(name, "--quick", "--output", str(tmp_path))
    assert run.returncode == 0, run.stderr[-2000:]
    text = (tmp_path / f"reproduce_{name}_quick.md").read_text()
    for part in ("**Claim.**", "**Setup.**", "|---|", "**Verdict.**"):
        assert part in text
    assert "smoke-test sizes: not evidence" in text
    assert (tmp_path / f"reproduce_{name}_quick.png").read_bytes()[:4] == b"\x89PNG"


def script(name: str, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPTS / f"{name}.py"), *flags],
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_torchvision_flag_needs_local_files(tmp_path):
    run = script("wu", "--quick", "--data", "mnist", "--root", str(tmp_path))
    assert (
        run.returncode != 0 and "MNIST is not in" in run.stderr and "never downloads" in run.stderr
    )


def write_digits_as_mnist(root: Path) -> None:
    """The 1797 digits, upsampled to 28 × 28, in MNIST's raw files (train and test alike)."""
    table = digits_table()
    images = torch.tensor(table[:, :64], dtype=torch.float32).reshape(-1, 1, 8, 8) / 16
    images = torch.nn.functional.interpolate(images, size=(28, 28), mode="bilinear")
    pixels = (images[:, 0] * 255).round().clamp(0, 255).to(torch.uint8).numpy().tobytes()
    labels = table[:, 64].astype(np.uint8).tobytes()
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for split in ("train", "t10k"):
        header = struct.pack(">IIII", 2051, len(table), 28, 28)
        (raw / f"{split}-images-idx3-ubyte").write_bytes(header + pixels)
        (raw / f"{split}-labels-idx1-ubyte").write_bytes(
            struct.pack(">II", 2049, len(table)) + labels
        )


def test_image_data_from_a_local_torchvision_folder(tmp_path):
    """The --data route with 1 × 28 × 28 images: the MLPs and LeNet train and are analysed."""
    pytest.importorskip("torchvision")
    write_digits_as_mnist(tmp_path / "data")
    run = script("wu", "--quick", "--data", "mnist", "--root", str(tmp_path / "data"),
                 "--output", str(tmp_path))  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    text = (tmp_path / "reproduce_wu_mnist_quick.md").read_text()
    assert "Data: mnist" in text and "| LeNet (ReLU), Adam | 0 | 6×25 |" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_device_flag_without_a_gpu_is_refused_before_any_work():
    run = script("sagun", "--device", "cuda")
    assert run.returncode == 2 and "--device cuda needs a GPU" in run.stderr
