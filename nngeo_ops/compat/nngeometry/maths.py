"""NNGeometry's ``nngeometry.maths``."""

from __future__ import annotations

import torch


def kronecker(A: torch.Tensor, B: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """The Kronecker product A ⊗ B of two matrices ((mA·mB) × (nA·nB); B ⊗ A with ``transpose``),
    entry [i·mB + k, j·nB + l] = A[i, j]·B[k, l] (``torch.kron`` for 2-d inputs)."""
    if transpose:
        A, B = B, A
    if A.dim() != 2 or B.dim() != 2:
        raise ValueError(
            f"kronecker takes two matrices, got shapes {tuple(A.shape)}, {tuple(B.shape)}"
        )
    return torch.kron(A, B)
