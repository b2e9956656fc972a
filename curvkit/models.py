"""Small models for the embedded default problem, and a deterministic trainer."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from curvkit.datasets import DIGITS_CLASSES, DIGITS_FEATURES, digits_loader
from curvkit.progress import progress_bar


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
) -> nn.Module:
    """Adam on the mean cross-entropy, deterministic for a given seed; returns the model in eval mode."""
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    dtype = next(model.parameters()).dtype
    model.train()
    with progress_bar(total=epochs, desc="training", enabled=progress) as bar:
        for _ in range(epochs):
            for x, y in loader:
                optimizer.zero_grad()
                x = x.to(dtype) if x.is_floating_point() else x
                nn.functional.cross_entropy(model(x), y).backward()
                optimizer.step()
            bar.update(1)
    optimizer.zero_grad(set_to_none=True)
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
