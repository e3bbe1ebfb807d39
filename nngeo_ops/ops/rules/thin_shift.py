"""Shifted thin eigen forms: ``Q·diag(λ)·Qᵀ + c·I`` with ``Q`` of orthonormal columns, ``k < n``.

A Kronecker product with a low-rank factor (``A = U C Uᵀ``, rank ``r`` < its size ``m``: a KFAC input
factor gathered from fewer rows than inputs) has a *thin* eigen form: with ``A = Q₁ Λ_A Q₁ᵀ`` (thin
QR of ``U`` and an ``r × r`` eigendecomposition, ``O(m r²)``) and the other factors' eigen forms
``G = Q_G Λ_G Q_Gᵀ``,

    G ⊗ A = (Q_G ⊗ Q₁) (Λ_G ⊗ Λ_A) (Q_G ⊗ Q₁)ᵀ,

and the shift ``c·I`` acts as ``c`` on the complement of ``range(Q_G ⊗ Q₁)`` without a basis of it.
With ``P = Q Qᵀ`` the projector on ``range(Q)``, ``QΛQᵀ + c·I = Q(Λ + c)Qᵀ + c(I − P)``, hence, exactly:

    solve:    (QΛQᵀ + c·I)⁻¹ X = X / c + Q·diag((λ + c)⁻¹ − c⁻¹)·Qᵀ X
                               = X / c − Q·diag(λ / (c (λ + c)))·Qᵀ X
    logdet:   log|det| = Σᵢ log|λᵢ + c| + (n − k)·log|c|
    eigh:     Q completed with an orthonormal basis of its complement (eigenvalue c there),
              factor by factor for a Kronecker basis: only when a full spectrum is asked for.

The complete basis the shift of the full Kronecker eigen form needs (a complete QR of ``U``,
``O(m² r)``, and products with an ``m × m`` basis) is never formed for a solve or a log-determinant.
The diagonal and the trace are those of the sum's terms (:mod:`.diag`).

:func:`thin_kronecker_shift` is called by the shift absorption of :mod:`.sums` (every spelling of
a damped, scaled Kronecker reaches it); the routines below are registered on ``Sum`` and recognise
the two-term pattern ``Eigen(Q, λ) + c·I`` with a non-full ``Eigen``, whatever built it.
"""

from __future__ import annotations

import torch

from ..base import LinearOperator
from ..composites import Sum
from ..dense import Dense
from ..diagonal import ScaledIdentity
from ..eigen import Eigen
from ..kronecker import Kronecker
from ..lowrank import LowRank
from ..registry import rule
from ._util import check_nonzero
from .structure import _kron_vectors


def _thin_factor(f: LinearOperator, ctx) -> Eigen | None:
    """The eigen form of one Kronecker factor: thin for a symmetric low rank (``k`` < size) or a
    truncated ``Eigen`` over a dense basis, the factor's structured eigen form otherwise."""
    if isinstance(f, LowRank) and f.symmetric and f.rank < f.shape[0]:
        evals, Q = f.eigh_factors()  # thin QR of U + k × k eigh, cached on the leaf
        name = f"Q₁_{f._str()}"
        return Eigen(Dense(Q, symmetric=False, orthogonal=False, name=name), evals)
    if isinstance(f, Eigen) and not f.full and isinstance(f.Q, Dense):
        return f
    return ctx.eigh_of(f, structured_only=True)


def thin_kronecker_shift(node: Kronecker, c, ctx) -> LinearOperator | None:
    """``node + c·I`` as ``Eigen(Q_1 ⊗ … ⊗ Q_d, λ_1 ⊗ … ⊗ λ_d) + c·I`` when a factor of the
    symmetric Kronecker ``node`` has a thin eigen form (see the module docstring), else None."""
    if not (node.symmetric and node.square_factors):
        return None
    if not any(
        (isinstance(f, LowRank) and f.symmetric and f.rank < f.shape[0])
        or (isinstance(f, Eigen) and not f.full)
        for f in node.factors
    ):
        return None
    Es = [_thin_factor(f, ctx) for f in node.factors]
    if any(E is None for E in Es):
        return None
    E = Eigen(Kronecker(*[E.Q for E in Es]), _kron_vectors([E.evals for E in Es]))
    return Sum(E, ScaledIdentity(c, node.shape[0], node.dtype, node.device))


def shifted_thin_parts(node: Sum) -> tuple[Eigen, object] | None:
    """``(Eigen(Q, λ), c)`` when ``node`` is ``Eigen(Q, λ) + c·I`` with a non-full eigen form."""
    if len(node.terms) != 2:
        return None
    E = next((t for t in node.terms if isinstance(t, Eigen)), None)
    s = next((t for t in node.terms if isinstance(t, ScaledIdentity)), None)
    if E is None or s is None or E.full:
        return None
    return E, s.c


@rule("solve", Sum, name="shifted thin eigen form: X/c − Q·diag(λ/(c(λ+c)))·QᵀX (exact)")
def shifted_thin_solve(node: Sum, ctx):
    parts = shifted_thin_parts(node)
    if parts is None:
        return None
    E, c = parts
    what = node._str()
    check_nonzero(c, what)
    check_nonzero(E.evals + c, what)
    # (λ + c)⁻¹ − c⁻¹ written without the cancellation of two nearly equal terms (λ ≪ c)
    w = E.evals / (c * (E.evals + c))

    in_place = isinstance(c, (int, float))

    def solve(X: torch.Tensor) -> torch.Tensor:
        Y = E.apply_function(w, X)  # a new tensor (Q is not square: Q Qᵀ X is never X itself)
        if in_place and not (torch.is_grad_enabled() and (X.requires_grad or Y.requires_grad)):
            return Y.neg_().add_(X, alpha=1.0 / c)  # one vector fewer than X/c − Y
        return X / c - Y

    return solve


@rule("slogdet", Sum, name="shifted thin eigen form: Σ log|λ+c| + (n−k)·log|c|")
def shifted_thin_slogdet(node: Sum, ctx):
    parts = shifted_thin_parts(node)
    if parts is None:
        return None
    E, c = parts
    reps = node.shape[0] - E.evals.shape[0]  # the complement, where the matrix is c·I
    v = E.evals + c
    c_t = torch.as_tensor(c, dtype=v.dtype, device=v.device)
    sign = torch.where(v < 0, -1.0, 1.0).to(v.dtype).prod() * (v != 0).all().to(v.dtype)
    sign = sign * torch.sign(c_t.detach()) ** reps
    return sign, torch.log(v.abs()).sum() + reps * torch.log(c_t.abs())


def _complement(Q: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis (n × (n − k)) of the complement of ``range(Q)``, Q with orthonormal
    columns; from the complete QR of Q (its gradient, where recorded, is that of the projector)."""
    n, k = Q.shape
    with torch.no_grad():
        B = torch.linalg.qr(Q.detach(), mode="complete").Q[:, k:]
    if torch.is_grad_enabled() and Q.requires_grad:
        B = B - Q @ (Q.mT @ B)
    return B


@rule("eigh", Sum, name="shifted thin eigen form, basis completed (eigenvalue c off its range)")
def shifted_thin_eigh(node: Sum, ctx):
    parts = shifted_thin_parts(node)
    if parts is None:
        return None
    E, c = parts
    Q = E.Q
    if isinstance(Q, Dense):
        full = torch.cat([Q.M, _complement(Q.M)], dim=1)
        evals = torch.cat([E.evals, E.evals.new_zeros(Q.shape[0] - Q.shape[1])])
        return Eigen(
            Dense(full.contiguous(), symmetric=False, orthogonal=True, name="Q"), evals + c
        )
    if isinstance(Q, Kronecker) and all(isinstance(f, Dense) for f in Q.factors):
        bases, pad = [], []
        for f in Q.factors:
            m, k = f.shape
            bases.append(f.M if m == k else torch.cat([f.M, _complement(f.M)], dim=1).contiguous())
            pad = [0, m - k, *pad]  # F.pad lists the last dimension first
        ks = [f.shape[1] for f in Q.factors]
        # λ over the thin index grid (k₁, …, k_d) placed in the complete grid (m₁, …, m_d), 0 off it
        grid = E.evals.reshape(ks)
        grid = torch.nn.functional.pad(grid, pad)
        Qs = [Dense(b, symmetric=False, orthogonal=True, name=f"Q{i}") for i, b in enumerate(bases)]
        return Eigen(Kronecker(*Qs), grid.reshape(-1) + c)
    return None
