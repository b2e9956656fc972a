"""The embedded default data, scikit-learn's bundled handwritten digits, a synthetic Gaussian
mixture, and local torchvision data sets; nothing is ever downloaded."""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset, TensorDataset

from curvkit.errors import InvalidInputError, MissingDependencyError
from curvkit.linalg.operator import integer

DIGITS_CLASSES = 10
DIGITS_FEATURES = 64


def digits_table() -> np.ndarray:
    """scikit-learn's ``digits.csv.gz`` as a (1797, 65) array: 64 pixels (0–16), then the label.

    Read straight from the installed package, as ``sklearn.datasets.load_digits`` reads it:
    importing scikit-learn took 2–3 s of every run. Its loader is the fallback should the file
    move."""
    spec = importlib.util.find_spec("sklearn")
    folder = spec.submodule_search_locations if spec is not None else None
    path = Path(folder[0], "datasets", "data", "digits.csv.gz") if folder else None
    if path is not None and path.is_file():
        with gzip.open(path, "rt", encoding="utf-8") as handle:
            return np.loadtxt(handle, delimiter=",")
    from sklearn.datasets import load_digits

    data, target = load_digits(return_X_y=True)
    return np.column_stack([data, target])


def digits_tensors(
    dtype: torch.dtype = torch.float64, samples_per_class: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The 1797 8×8 digits as (N, 64) inputs scaled to [0, 1] and (N,) integer labels.

    ``samples_per_class`` keeps the first n examples of every class (as in Papyan's subsets).
    """
    if samples_per_class is not None:
        samples_per_class = integer("samples_per_class", samples_per_class, 1)
    table = torch.as_tensor(digits_table())
    x = table[:, :-1].to(dtype) / 16.0
    y = table[:, -1].long()
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
    return tensor_loader(*digits_tensors(dtype, samples_per_class), batch_size, shuffle, seed)


def tensor_loader(
    x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool = False, seed: int = 0
) -> DataLoader:
    """A DataLoader over (x, y); shuffled reproducibly from ``seed`` if ``shuffle``."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle, generator=generator
    )


def gaussian_mixture_tensors(
    num_classes: int = 10,
    separation: float = 3.0,
    samples_per_class: int = 100,
    features: int = 64,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """C Gaussian classes ``x ~ N(μ_c, I)`` in ``features`` dimensions, every pair of means
    ``separation`` apart: ``μ_c = (separation/√2) q_c`` with orthonormal, randomly rotated ``q_c``.

    Returns (C·n, features) inputs and (C·n,) labels, the classes interleaved (0, 1, …, C−1, 0, …).
    """
    if num_classes < 2 or features < num_classes or samples_per_class < 1 or separation < 0:
        raise InvalidInputError(
            f"a Gaussian mixture needs 2 ≤ classes ≤ features, samples_per_class ≥ 1 and "
            f"separation ≥ 0; got classes={num_classes}, features={features}, "
            f"samples_per_class={samples_per_class}, separation={separation}."
        )
    generator = torch.Generator().manual_seed(seed)
    rotation, _ = torch.linalg.qr(
        torch.randn(features, features, generator=generator, dtype=torch.float64)
    )
    means = separation / 2**0.5 * rotation[:, :num_classes].T
    y = torch.arange(num_classes).repeat(samples_per_class)
    x = means[y] + torch.randn(len(y), features, generator=generator, dtype=torch.float64)
    return x.to(dtype), y


def gaussian_mixture_loader(
    batch_size: int = 256,
    dtype: torch.dtype = torch.float64,
    num_classes: int = 10,
    separation: float = 3.0,
    samples_per_class: int = 100,
    features: int = 64,
    seed: int = 0,
    shuffle: bool = False,
) -> DataLoader:
    """A DataLoader over :func:`gaussian_mixture_tensors` (unshuffled by default)."""
    x, y = gaussian_mixture_tensors(
        num_classes, separation, samples_per_class, features, seed, dtype
    )
    return tensor_loader(x, y, batch_size, shuffle, seed)


TORCHVISION = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "cifar10": "CIFAR10"}


def torchvision_loader(
    name: str,
    root: str | None,
    batch_size: int = 512,
    samples_per_class: int | None = None,
    train: bool = True,
) -> DataLoader:
    """A local torchvision data set (never downloaded), or ``fake``: 200 random 8×8 images in 10
    classes, flattened to the digits' 64 features (torchvision's FakeData, for tests).

    ``samples_per_class`` keeps the first n examples of every class (Papyan's subsets).
    """
    try:
        import torchvision
        from torchvision.transforms.functional import to_tensor
    except ImportError as error:
        raise MissingDependencyError(
            f"data set {name!r} needs torchvision; install it with pip install 'curvkit[vision]'."
        ) from error
    if name == "fake":
        dataset = torchvision.datasets.FakeData(
            size=200,
            image_size=(1, 8, 8),
            num_classes=DIGITS_CLASSES,
            transform=lambda image: to_tensor(image).flatten(),
        )
        targets = [int(dataset[i][1]) for i in range(len(dataset))]
    else:
        if root is None:
            raise InvalidInputError(
                f"data set {name!r} needs a local folder: set data.root in the config."
            )
        cls = getattr(torchvision.datasets, TORCHVISION[name])
        try:
            dataset = cls(root, train=train, download=False, transform=to_tensor)
        except RuntimeError as error:
            raise InvalidInputError(
                f"{TORCHVISION[name]} is not in {root} and curvkit never downloads; fetch it once "
                f"with torchvision.datasets.{TORCHVISION[name]}({root!r}, download=True)."
            ) from error
        targets = [int(t) for t in dataset.targets]
    if samples_per_class is not None:
        seen: dict[int, int] = {}
        keep = []
        for index, label in enumerate(targets):
            if seen.get(label, 0) < samples_per_class:
                seen[label] = seen.get(label, 0) + 1
                keep.append(index)
        dataset = Subset(dataset, keep)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False)
