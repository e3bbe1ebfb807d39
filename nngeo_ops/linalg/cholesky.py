"""Solves with a Cholesky factor that read the factor in place."""

from __future__ import annotations

import torch


def cholesky_solve(B: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """``A⁻¹ B = L⁻ᵀ (L⁻¹ B)`` for ``A = L Lᵀ`` with ``L`` lower triangular ``(n, n)`` and ``B`` of
    shape ``(n, k)``: two triangular solves.

    The same values as ``torch.cholesky_solve(B, L)`` (bit for bit in float64 on the CPU, where both
    call LAPACK's triangular solves), but that function copies ``L`` into a fresh column-major
    buffer at every call: n² entries of memory (1.6 GB for a 20 490² block) and ~10× the time of
    the solve itself (24 ms against 2.5 ms at n = 3 000, one thread). ``solve_triangular`` reads
    the factor where it is, transposed or not.
    """
    return torch.linalg.solve_triangular(
        L.mT, torch.linalg.solve_triangular(L, B, upper=False), upper=True
    )
