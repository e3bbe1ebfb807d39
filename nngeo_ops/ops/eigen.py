"""``Eigen(Q, λ)``: a symmetric matrix in eigen form."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ArgumentTypeError, ShapeError
from .base import LinearOperator, as_operator, harmonise
from .leaf_checks import KnownRange, finite_range


class Eigen(LinearOperator):
    """``Q·diag(λ)·Qᵀ`` with ``Q`` of shape ``(n, k)`` having orthonormal columns.

    ``Q`` may be a tensor or a node (a Kronecker of dense eigenbases for KFAC / EKFAC, a BlockDiag of
    eigenbases, ...); it is trusted to be orthonormal. With ``k = n`` the form is *full* and solves,
    powers and shifts act on ``λ`` alone; with ``k < n`` it is a truncated spectrum (zeros
    elsewhere). Eigenvalues are in the order of ``Q``'s columns, not sorted.
    """

    _node_fields = ("Q",)
    _tensor_fields = ("evals",)

    def __init__(self, Q: Any, evals: torch.Tensor) -> None:
        if isinstance(Q, torch.Tensor):
            from .dense import Dense

            Q = Dense(Q, symmetric=False, orthogonal=True, name="Q")
        Q = as_operator(Q)
        if evals.dim() != 1 or evals.shape[0] != Q.shape[1]:
            raise ShapeError(
                f"Eigen: {Q.shape[1]} eigenvectors but evals of shape {tuple(evals.shape)}"
            )
        (Q,) = harmonise((Q,))
        if evals.dtype != Q.dtype:
            raise ArgumentTypeError(f"Eigen: evals are {evals.dtype} but Q is {Q.dtype}")
        lo, hi = finite_range(evals, "Eigen: the eigenvalues")  # one pass: finite, PSD, zero-free
        n = Q.shape[0]
        super().__init__((n, n), Q.dtype, Q.device, symmetric=True, psd=lo >= 0)
        self.Q, self.evals = Q, evals
        # only whether 0 is excluded is ever asked: no key where the range holds 0
        self._range = KnownRange(evals, lo, hi, keyed=lo > 0 or hi < 0)

    @property
    def full(self) -> bool:
        """Whether ``Q`` is square (``k = n``), so that the form holds the whole spectrum."""
        return self.Q.shape[0] == self.Q.shape[1]

    @property
    def excludes_zero(self) -> bool:
        """No entry of ``evals`` is 0, known from the range computed when the node was built (and
        ``evals`` unchanged since); False means unknown, not singular."""
        r = self.__dict__.get("_range")
        return r is not None and r.excludes_zero(self.evals)

    def _rebuild(self, **fields: Any) -> Eigen:
        return Eigen(fields.get("Q", self.Q), fields.get("evals", self.evals))

    def _matmat(self, X: torch.Tensor) -> torch.Tensor:
        return self.Q._matmat(self.evals.unsqueeze(1) * self.Q._rmatmat(X))

    def apply_function(self, values: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
        """``Q·diag(values)·Qᵀ X``: a spectral function of the matrix applied to ``X``."""
        return self.Q._matmat(values.unsqueeze(1) * self.Q._rmatmat(X))

    def to_dense(self) -> torch.Tensor:
        Qd = self.Q.to_dense()
        return (Qd * self.evals) @ Qd.mT

    def _str(self) -> str:
        return f"Eig[{self.Q._str()}]"
