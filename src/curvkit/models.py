"""Small models for the embedded default problem, a zoo for other data, and a deterministic
trainer."""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from curvkit.datasets import DIGITS_CLASSES, DIGITS_FEATURES, digits_loader
from curvkit.errors import InvalidInputError, MissingDependencyError, shown
from curvkit.linalg.operator import integer
from curvkit.progress import log, progress_bar


def mlp(
    in_features: int, hidden: Sequence[int], num_classes: int, activation: type[nn.Module] = nn.ReLU
) -> nn.Sequential:
    """``Linear → activation`` per hidden width, then a Linear classifier head (a Sequential)."""
    layers: list[nn.Module] = []
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), activation()]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def digits_mlp(
    hidden: Sequence[int] = (32,),
    seed: int = 0,
    dtype=torch.float64,
    activation: type[nn.Module] = nn.ReLU,
) -> nn.Sequential:
    """The default MLP on the digits: 64 → 32 → 10, P = 2410 (small enough for dense references).

    With ReLU, each layer's own block of the residual Hess − G vanishes (its trace is exactly 0)
    and only the blocks between layers remain; a smooth ``activation`` such as ``nn.Tanh`` gives
    nonzero diagonal blocks too.
    """
    torch.manual_seed(seed)
    return mlp(DIGITS_FEATURES, hidden, DIGITS_CLASSES, activation).to(dtype)


def digits_cnn(seed: int = 0, dtype=torch.float64) -> nn.Sequential:
    """A small CNN on the 8×8 digits: Conv2d + ReLU + MaxPool + Linear (P = 1 k)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 6, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(6 * 4 * 4, DIGITS_CLASSES),
    ).to(dtype)


def train(
    model: nn.Module,
    loader: Iterable,
    epochs: int = 30,
    lr: float = 1e-2,
    seed: int = 0,
    progress: bool = True,
    optimizer: str = "adam",
    weight_decay: float = 0.0,
) -> nn.Module:
    """Adam (or ``optimizer="sgd"``: SGD with momentum 0.9) on the mean cross-entropy, with L2
    ``weight_decay``, deterministic for a given seed; returns the model in eval mode."""
    start = time.perf_counter()
    epochs = integer("epochs", epochs, 0)
    real = all(
        isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
        for v in (lr, weight_decay)
    )
    if not real or lr <= 0 or weight_decay < 0:
        raise InvalidInputError(
            f"lr must be a finite number > 0 and weight_decay one ≥ 0, got lr={shown(lr)}, "
            f"weight_decay={shown(weight_decay)}."
        )
    torch.manual_seed(seed)
    if optimizer not in ("adam", "sgd"):
        raise InvalidInputError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}.")
    optim = (
        torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
        if optimizer == "adam"
        else torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    )
    dtype = next(model.parameters()).dtype
    model.train()
    with progress_bar(total=epochs, desc="training", enabled=progress) as bar:
        for _ in range(epochs):
            for x, y in loader:
                optim.zero_grad()
                x = x.to(dtype) if x.is_floating_point() else x
                nn.functional.cross_entropy(model(x), y).backward()
                optim.step()
            bar.update(1)
    optim.zero_grad(set_to_none=True)
    log(f"trained {epochs} epochs in {time.perf_counter() - start:.1f} s", progress)
    return model.eval()


def trained_digits_mlp(
    epochs: int = 30, seed: int = 0, progress: bool = True, samples_per_class: int | None = None
) -> tuple[nn.Module, torch.utils.data.DataLoader]:
    """The embedded default problem: the digits MLP trained on the digits (float64), all 1797
    of them or the first ``samples_per_class`` of each class."""
    model = digits_mlp(seed=seed)
    train(
        model,
        digits_loader(batch_size=64, shuffle=True, seed=seed, samples_per_class=samples_per_class),
        epochs,
        seed=seed,
        progress=progress,
    )
    return model, digits_loader(batch_size=512, samples_per_class=samples_per_class)


def _as_images(input_shape: Sequence[int]) -> tuple[list[nn.Module], tuple[int, int, int]]:
    """Layers that turn inputs of ``input_shape`` into (C, H, W) images: flat square inputs
    (the digits' 64 features) become one-channel images."""
    if len(input_shape) == 3:
        return [], (input_shape[0], input_shape[1], input_shape[2])
    side = int(math.isqrt(int(input_shape[0]))) if len(input_shape) == 1 else 0
    if len(input_shape) != 1 or side * side != input_shape[0]:
        raise InvalidInputError(
            f"a convolutional zoo model needs (C, H, W) images or flat square inputs, got "
            f"examples of shape {tuple(input_shape)}; use the mlp or a model factory."
        )
    return [nn.Unflatten(1, (1, side, side))], (1, side, side)


def lenet(input_shape: Sequence[int], num_classes: int) -> nn.Sequential:
    """A LeNet-style CNN: two 5×5 convolutions (padding 2) with ReLU and 2×2 max-pooling, then
    Linear 120 → 84 → classes."""
    prefix, (channels, height, width) = _as_images(input_shape)
    flat = 16 * (height // 4) * (width // 4)
    return nn.Sequential(
        *prefix,
        nn.Conv2d(channels, 6, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(flat, 120),
        nn.ReLU(),
        nn.Linear(120, 84),
        nn.ReLU(),
        nn.Linear(84, num_classes),
    )


def resnet18(input_shape: Sequence[int], num_classes: int) -> nn.Module:
    """torchvision's ResNet18 for small images: a 3×3 stride-1 first convolution and no max-pool
    (as for CIFAR); needs the ``vision`` extra."""
    try:
        import torchvision
    except ImportError as error:
        raise MissingDependencyError(
            "model 'resnet18' needs torchvision; install it with pip install 'curvkit[vision]'."
        ) from error
    prefix, (channels, _, _) = _as_images(input_shape)
    model = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return nn.Sequential(*prefix, model) if prefix else model


def zoo_model(
    name: str,
    input_shape: Sequence[int],
    num_classes: int,
    width: int = 64,
    depth: int = 2,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    activation: type[nn.Module] = nn.Tanh,
) -> nn.Module:
    """A zoo model for inputs of ``input_shape`` (one example): ``mlp`` (``depth`` hidden
    layers of ``width``, ``activation`` after each), ``lenet`` or ``resnet18``."""
    torch.manual_seed(seed)
    if name == "mlp":
        features = math.prod(input_shape)
        model = nn.Sequential(
            nn.Flatten(), *mlp(features, [width] * depth, num_classes, activation)
        )
    elif name == "lenet":
        model = lenet(input_shape, num_classes)
    elif name == "resnet18":
        model = resnet18(input_shape, num_classes)
    else:
        raise InvalidInputError(f"unknown zoo model {name!r}; use mlp, lenet or resnet18.")
    return model.to(dtype)
