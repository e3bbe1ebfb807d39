"""``LowRank(U, C, V)``: the rank-``k`` matrix ``U·C·Vᵀ``."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ArgumentTypeError, ShapeError
from .base import LinearOperator
from .cache import cached_factor
from .leaf_checks import check_finite


class LowRank(LinearOperator):
    """``U·C·Vᵀ`` with ``U`` of shape ``(m, k)``, ``C`` ``(k, k)`` and ``V`` ``(n, k)``.

    ``C`` omitted means the identity; ``V`` omitted means ``V = U`` (symmetric). With both omitted the
    node is ``U·Uᵀ`` and tagged PSD; pass ``psd=True`` to assert it for a symmetric ``U·C·Uᵀ`` with a
    PSD ``C``. Products cost ``O((m + n) k)`` per column.
    """

    _tensor_fields = ("U", "C", "V")

    def __init__(
        self,
        U: torch.Tensor,
        C: torch.Tensor | None = None,
        V: torch.Tensor | None = None,
        *,
        psd: bool | None = None,
        name: str | None = None,
    ) -> None:
        for nm, t in (("U", U), ("C", C), ("V", V)):
            if t is not None and not isinstance(t, torch.Tensor):
                raise ArgumentTypeError(
                    f"LowRank: {nm} must be a torch.Tensor, got {type(t).__name__}; convert it "
                    f"with torch.as_tensor({nm})"
                )
        if U.dim() != 2:
            raise ShapeError(f"LowRank: U must be 2-D, got shape {tuple(U.shape)}")
        k = U.shape[1]
        if C is not None and tuple(C.shape) != (k, k):
            raise ShapeError(
                f"LowRank: C must be {k}×{k} to match U {tuple(U.shape)}, got {tuple(C.shape)}"
            )
        if V is not None and (V.dim() != 2 or V.shape[1] != k):
            raise ShapeError(f"LowRank: V must have {k} columns like U, got shape {tuple(V.shape)}")
        for t in (C, V):
            if t is not None and (t.dtype != U.dtype or t.device != U.device):
                raise ArgumentTypeError("LowRank: U, C and V must share dtype and device")
        for nm, t in (("U", U), ("C", C), ("V", V)):
            if t is not None:
                check_finite(t, f"LowRank {nm}")
        symmetric = V is None and (C is None or bool(torch.equal(C, C.mT)))
        if psd is None:
            psd = V is None and C is None
        n = U.shape[0] if V is None else V.shape[0]
        super().__init__((U.shape[0], n), U.dtype, U.device, symmetric=symmetric, psd=psd)
        self.U, self.C, self.V = U, C, V
        self._psd_arg = psd
        self.name = name

    @property
    def rank(self) -> int:
        """``k``, the number of columns of ``U`` (an upper bound on the rank)."""
        return self.U.shape[1]

    @property
    def Vm(self) -> torch.Tensor:
        """The right factor ``V`` of shape ``(n, k)`` (``U`` when ``V`` was omitted)."""
        return self.U if self.V is None else self.V

    def core(self) -> torch.Tensor:
        """``C`` as a tensor (the identity when omitted)."""
        if self.C is None:
            return torch.eye(self.rank, dtype=self.dtype, device=self.device)
        return self.C

    def _rebuild(self, **fields: Any) -> LowRank:
        return LowRank(
            fields.get("U", self.U),
            fields.get("C", self.C),
            fields.get("V", self.V),
            psd=self._psd_arg,
            name=self.name,
        )

    # Vᵀ X as (Xᵀ V)ᵀ: the tall V is then read in its own (row-major) layout, 3-9× faster on CPU
    # for a few columns (see Dense)
    def _matmat(self, X: torch.Tensor) -> torch.Tensor:
        Y = (X.mT @ self.Vm).mT
        if self.C is not None:
            Y = self.C @ Y
        return self.U @ Y

    def _rmatmat(self, X: torch.Tensor) -> torch.Tensor:
        Y = (X.mT @ self.U).mT
        if self.C is not None:
            Y = self.C.mT @ Y
        return self.Vm @ Y

    def to_dense(self) -> torch.Tensor:
        UC = self.U if self.C is None else self.U @ self.C
        return UC @ self.Vm.mT

    def eigh_factors(self, complete: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``(λ, Q)`` of a symmetric ``U·C·Uᵀ`` (m × m, rank ≤ k), cached on the node.

        Thin (``complete=False``): ``U = Q₀R`` (QR), ``R·C·Rᵀ = W·diag(λ)·Wᵀ``, ``Q = Q₀W`` of shape
        (m, min(m, k)); O(m k²). Complete: ``Q`` (m × m) adds an orthonormal basis of the complement
        of ``range(U)``, with eigenvalue 0, from the complete QR of ``U``; O(m² k), against O(m³)
        for the eigendecomposition of the dense matrix. ``Q`` is row-major.
        """
        self.require_symmetric("eigh")

        def compute() -> tuple[torch.Tensor, torch.Tensor]:
            m, k = self.U.shape
            Q0, R = torch.linalg.qr(self.U)
            small = R @ self.core() @ R.mT
            try:
                evals, W = torch.linalg.eigh(small)
            except RuntimeError:  # no convergence (ill-conditioned float32): retry in float64
                if small.dtype not in (torch.float32, torch.float16, torch.bfloat16):
                    raise
                evals, W = torch.linalg.eigh(small.to(torch.float64))
                evals, W = evals.to(small.dtype), W.to(small.dtype)
            basis = Q0 @ W
            r = Q0.shape[1]
            if complete and r < m:
                with torch.no_grad():  # the complete QR has no backward
                    B = torch.linalg.qr(self.U.detach(), mode="complete").Q[:, r:]
                if torch.is_grad_enabled() and self.U.requires_grad:
                    # the same value (B ⟂ range(U)), now varying with range(U) to first order as the
                    # complement does; its projector then has the right derivative
                    B = B - Q0 @ (Q0.mT @ B)
                basis = torch.cat([basis, B], dim=1)
                evals = torch.cat([evals, evals.new_zeros(m - r)])
            return evals, basis.contiguous()

        return cached_factor(self, "eigh (complete)" if complete else "eigh", compute)

    def _str(self) -> str:
        if self.name:
            return self.name
        mid = "" if self.C is None else "C"
        return f"U{mid}Uᵀ" if self.V is None else f"U{mid}Vᵀ"
