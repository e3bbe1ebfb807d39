"""Small helpers shared by rules."""

from __future__ import annotations

import torch

from ...errors import NotPSDError, SingularError
from ..base import LinearOperator, Scalar, scalar_float
from ..composites import Product, is_transpose_of


def orthogonal_congruence(node: LinearOperator) -> tuple | None:
    """``(Qᵀ, M, Q)`` when ``node`` is ``Product(Qᵀ, M, Q)`` with ``Q`` square orthogonal."""
    if isinstance(node, Product) and len(node.factors) == 3:
        a, m, q = node.factors
        if is_transpose_of(a, q) and q.orthogonal and q.shape[0] == q.shape[1]:
            return a, m, q
    return None


def check_nonzero(values: torch.Tensor | Scalar, what: str) -> None:
    zero = (
        bool((values == 0).any())
        if isinstance(values, torch.Tensor) and values.dim() > 0
        else scalar_float(values) == 0
    )
    if zero:
        raise SingularError(f"{what} is singular (a zero on its diagonal / spectrum); add damping")


def spectral_power(values: torch.Tensor, p: float, what: str) -> torch.Tensor:
    """``values ** p`` with the checks that make ``A^p`` well defined for a symmetric ``A``."""
    if not float(p).is_integer():
        # eigenvalues of a singular PSD matrix come out as tiny negatives; round-off is not an error
        tol = values.numel() * torch.finfo(values.dtype).eps * float(values.detach().abs().max())
        values = torch.where((values < 0) & (values >= -tol), torch.zeros_like(values), values)
    if not float(p).is_integer() and bool((values < 0).any()):
        raise NotPSDError(
            f"{what}^{p}: a non-integer power needs a PSD matrix, but the spectrum has negative "
            f"values (min {float(values.min()):.3g}); add damping or use an integer power"
        )
    if p < 0:
        check_nonzero(values, what)
    return values**p


def sign_tensor(s: float, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(s, dtype=like.dtype, device=like.device)
