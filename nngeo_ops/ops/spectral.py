"""Spectral functions ``f(A) = Q f(Λ) Qᵀ`` of a dense symmetric matrix with a stable gradient.

``torch.linalg.eigh``'s backward divides by eigenvalue gaps and returns NaN when eigenvalues repeat
(``c·I + U Uᵀ``, for one), although ``f(A)`` is smooth there. The Daleckii–Krein formula avoids the
division: ``∂L/∂A = Q (F ∘ (Qᵀ Ḡ Q)) Qᵀ`` with ``F_ij = (f(λᵢ) − f(λⱼ)) / (λᵢ − λⱼ)`` and
``F_ii = f'(λᵢ)`` (the limit) wherever the gap is below round-off.
"""

from __future__ import annotations

import torch

from .rules._util import spectral_power


class _MatrixPower(torch.autograd.Function):
    @staticmethod
    def forward(ctx, A: torch.Tensor, p: float, what: str) -> torch.Tensor:
        evals, Q = torch.linalg.eigh(A)
        f = spectral_power(evals, p, what)
        ctx.save_for_backward(evals, Q, f)
        ctx.p = p
        return (Q * f) @ Q.mT

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        evals, Q, f = ctx.saved_tensors
        p = ctx.p
        gap = evals.unsqueeze(1) - evals.unsqueeze(0)
        scale = evals.abs().max().clamp_min(torch.finfo(evals.dtype).tiny)
        close = gap.abs() <= 1e3 * torch.finfo(evals.dtype).eps * scale
        mean = (evals.unsqueeze(1) + evals.unsqueeze(0)) / 2
        deriv = (
            p * mean.clamp_min(torch.finfo(evals.dtype).tiny) ** (p - 1)
            if p != 1
            else torch.ones_like(mean)
        )
        F = torch.where(
            close, deriv, (f.unsqueeze(1) - f.unsqueeze(0)) / torch.where(close, 1.0, gap)
        )
        G = Q.mT @ ((grad + grad.mT) / 2) @ Q
        return Q @ (F * G) @ Q.mT, None, None


def matrix_power(A: torch.Tensor, p: float, what: str = "A") -> torch.Tensor:
    """``A^p`` of a dense symmetric ``A`` (PSD for non-integer ``p``), differentiable everywhere."""
    return _MatrixPower.apply(A, p, what)
