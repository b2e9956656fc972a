"""Subspaces and small Gram matrices: overlaps of eigenspaces, orthonormal bases, the nonzero
eigenvalues of ``L Lᵀ`` from ``Lᵀ L``."""

from __future__ import annotations

import torch
from torch import Tensor


def gram_eigenvalues(gram: Tensor, rtol: float = 1e-12) -> list[float]:
    """Nonzero eigenvalues (descending) of a PSD Gram matrix: those above rtol · the largest."""
    values = torch.linalg.eigvalsh(gram.double()).flip(0)
    if values.numel() == 0:
        return []
    return [float(v) for v in values if v > rtol * max(float(values[0]), 0.0)]


def subspace_overlap(u: Tensor, v: Tensor) -> float:
    """``‖Uᵀ V‖_F² / k`` for orthonormal bases U, V of two k-dimensional subspaces (∈ [0, 1])."""
    k = min(u.shape[1], v.shape[1])
    return float((u.T @ v).pow(2).sum()) / k


def orthonormal_basis(vectors: Tensor, rtol: float = 1e-10) -> Tensor:
    """Orthonormal basis (columns) of the span of the columns of ``vectors``, by SVD."""
    left, sing, _ = torch.linalg.svd(vectors, full_matrices=False)
    return left[:, sing > rtol * sing.max()]
