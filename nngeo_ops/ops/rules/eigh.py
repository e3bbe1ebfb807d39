"""Eigendecompositions as :class:`Eigen` nodes, structured wherever the node is.

Kronecker: ``⊗(QᵢΛᵢQᵢᵀ) = (⊗Qᵢ)(⊗Λᵢ)(⊗Qᵢ)ᵀ``; block-diagonal: block bases side by side; a
congruence ``Qᵀ M Q`` with orthogonal ``Q`` has basis ``Qᵀ Q_M``; a symmetric low rank ``U C Uᵀ``
goes through a thin QR of ``U``. Eigenvalues follow the basis order (not sorted).
"""

from __future__ import annotations

import torch

from ..blockdiag import BlockDiag
from ..composites import Product, Scale
from ..dense import Dense
from ..diagonal import Diagonal, Identity, ScaledIdentity
from ..eigen import Eigen
from ..kronecker import Kronecker
from ..lowrank import LowRank
from ..registry import rule
from ._util import congruence_gram, orthogonal_congruence
from .structure import _kron_vectors


@rule("eigh", Eigen, name="already an eigen form")
def eigen_eigh(node: Eigen, ctx):
    return node


@rule("eigh", Dense, name="torch.linalg.eigh (cached on the leaf)")
def dense_eigh(node: Dense, ctx):
    evals, Q = node.eigh_factors()
    return Eigen(Dense(Q, symmetric=False, orthogonal=True, name=f"Q_{node.name}"), evals)


@rule("eigh", Diagonal, ScaledIdentity, name="identity basis")
def diagonal_eigh(node, ctx):
    return Eigen(Identity(node.shape[0], node.dtype, node.device), ctx.diag_of(node))


@rule("eigh", Kronecker, name="Kronecker of factor bases")
def kronecker_eigh(node: Kronecker, ctx):
    if not node.square_factors:
        return None
    Es = [_full_factor_eigh(f, ctx) for f in node.factors]
    if any(E is None or not E.full for E in Es):
        return None
    return Eigen(Kronecker(*[E.Q for E in Es]), _kron_vectors([E.evals for E in Es]))


def _full_factor_eigh(f, ctx):
    # A low-rank factor (a KFAC input factor from fewer examples than inputs) gets a complete basis:
    # the Kronecker eigen form, and its shift by c·I, need one, and it costs O(m² k), not O(m³)
    if isinstance(f, LowRank) and f.symmetric and f.rank < f.shape[0]:
        evals, Q = f.eigh_factors(complete=True)
        return Eigen(Dense(Q, symmetric=False, orthogonal=True, name=f"Q_{f._str()}"), evals)
    return ctx.eigh_of(f, structured_only=True)


@rule("eigh", BlockDiag, name="block bases")
def blockdiag_eigh(node: BlockDiag, ctx):
    Es = [ctx.eigh_of(b, structured_only=True) for b in node.blocks]
    if any(E is None for E in Es):
        return None
    return Eigen(BlockDiag([E.Q for E in Es]), torch.cat([E.evals for E in Es]))


@rule("eigh", Scale, name="scaled spectrum")
def scale_eigh(node: Scale, ctx):
    E = ctx.eigh_of(node.child, structured_only=True)
    return None if E is None else Eigen(E.Q, node.c * E.evals)


@rule("eigh", Product, name="congruence basis Qᵀ·Q_M", priority=10)
def product_eigh(node: Product, ctx):
    cong = orthogonal_congruence(node)
    if cong is None:
        return None
    qt, m, _ = cong
    E = ctx.eigh_of(m, structured_only=True)
    return None if E is None else Eigen(Product(qt, E.Q), E.evals)


@rule("eigh", LowRank, name="thin QR + small eigh")
def lowrank_eigh(node: LowRank, ctx):
    if not node.symmetric:
        return None
    evals, Q = node.eigh_factors()
    return Eigen(Dense(Q, symmetric=False, orthogonal=True, name="Q"), evals)


@rule("eigh", Product, name="nonzero spectrum of a congruence, from the Gram matrix")
def gram_congruence_eigh(node: Product, ctx):
    """``Xᵀ M X = BᵀB`` with ``B = LᵀX`` (``M = L Lᵀ``, PSD): its nonzero eigenvalues are those of
    ``B Bᵀ = Lᵀ K L`` (m × m, ``K = X Xᵀ`` from ``X.gram()``), with eigenvectors ``Xᵀ L w / √σ``.

    The result is a truncated :class:`Eigen` whose basis is the lazy product ``Xᵀ·C`` (n × r, never
    formed): the exact spectrum of an implicit Gauss-Newton matrix ``Jᵀ·H·J`` from an m × m problem.
    """
    if not node.psd:
        return None
    parts = congruence_gram(node, ctx)
    if parts is None:
        return None
    _, M, K = parts
    lm, V = torch.linalg.eigh(M)
    L = V * lm.clamp_min(0).sqrt()
    sig, W = torch.linalg.eigh(L.mT @ K @ L)
    tol = sig.max().clamp_min(0) * sig.shape[0] * torch.finfo(node.dtype).eps
    keep = sig > tol
    C = (L @ W[:, keep]) / sig[keep].sqrt()
    basis = Product(node.factors[0], Dense(C.to(node.dtype), symmetric=False, name="C"))
    return Eigen(basis, sig[keep].to(node.dtype))
