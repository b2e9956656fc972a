"""The embedded default data: scikit-learn's bundled handwritten digits (no network)."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, TensorDataset

DIGITS_CLASSES = 10
DIGITS_FEATURES = 64


def digits_tensors(
    dtype: torch.dtype = torch.float64, samples_per_class: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The 1797 8×8 digits as (N, 64) inputs scaled to [0, 1] and (N,) integer labels.

    ``samples_per_class`` keeps the first n examples of every class (as in Papyan's subsets).
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.as_tensor(bunch.data, dtype=dtype) / 16.0
    y = torch.as_tensor(bunch.target, dtype=torch.long)
    if samples_per_class is not None:
        keep = torch.cat([torch.nonzero(y == c).flatten()[:samples_per_class] for c in range(10)])
        keep = keep.sort().values
        x, y = x[keep], y[keep]
    return x, y


def digits_loader(
    batch_size: int = 256,
    dtype: torch.dtype = torch.float64,
    samples_per_class: int | None = None,
    shuffle: bool = False,
    seed: int = 0,
) -> DataLoader:
    """A DataLoader over the digits (unshuffled by default, so passes are reproducible)."""
    x, y = digits_tensors(dtype, samples_per_class)
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle, generator=generator
    )
