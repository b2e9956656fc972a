"""The embedded default data, scikit-learn's bundled handwritten digits, and local torchvision
data sets; nothing is ever downloaded."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Subset, TensorDataset

from curvkit.errors import InvalidInputError, MissingDependencyError

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
