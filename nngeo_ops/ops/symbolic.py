"""Symbolic nodes resolved by rewrite rules: ``Inverse(A)`` and ``Power(A, p)``."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ShapeError
from .base import LinearOperator, as_operator
from .composites import paren


class Inverse(LinearOperator):
    """``A⁻¹`` of a square operator.

    ``simplify()`` resolves it where a rule exists (Kronecker, BlockDiag, Diagonal, Eigen, scaled
    identity, products, ...); otherwise products with it run the compiled solve of ``A``.
    """

    _node_fields = ("child",)

    def __init__(self, child: Any) -> None:
        child = as_operator(child)
        if child.shape[0] != child.shape[1]:
            raise ShapeError(f"cannot invert {child._str()} of non-square shape {child.shape}")
        super().__init__(
            child.shape,
            child.dtype,
            child.device,
            symmetric=child.symmetric,
            psd=child.psd,
            orthogonal=child.orthogonal,
        )
        self.child = child

    def _rebuild(self, **fields: Any) -> Inverse:
        return Inverse(fields.get("child", self.child))

    def _matmat(self, X: torch.Tensor) -> torch.Tensor:
        return self.child.compiled().solve(X)

    def _rmatmat(self, X: torch.Tensor) -> torch.Tensor:
        if self.symmetric:
            return self._matmat(X)
        return self.child.T.compiled().solve(X)

    def _str(self) -> str:
        return f"{paren(self.child)}⁻¹"


class Power(LinearOperator):
    """``A^p`` of a symmetric ``A`` through its spectrum: ``Q·diag(λ^p)·Qᵀ``.

    Non-integer ``p`` needs ``λ ≥ 0`` (PSD); negative ``p`` needs ``λ ≠ 0``. Violations are detected
    when the spectrum is computed and raise :class:`~nngeo_ops.errors.NotPSDError` /
    :class:`~nngeo_ops.errors.SingularError`.
    """

    _node_fields = ("child",)

    def __init__(self, child: Any, p: float) -> None:
        child = as_operator(child)
        child.require_symmetric(f"pow({p})")
        even = float(p).is_integer() and int(p) % 2 == 0
        super().__init__(
            child.shape, child.dtype, child.device, symmetric=True, psd=child.psd or even
        )
        self.child, self.p = child, float(p)

    def _rebuild(self, **fields: Any) -> Power:
        return Power(fields.get("child", self.child), self.p)

    def _matmat(self, X: torch.Tensor) -> torch.Tensor:
        return self.compiled().simplified._matmat(X)

    def _str(self) -> str:
        p = int(self.p) if self.p.is_integer() else self.p
        return f"{paren(self.child)}^{p}"
