"""Rewrites of ``Scale(c, X)``: fold the scalar into the structure of ``X``.

Normal form of constants (one convention, so that a shift meets a scaled term in any spelling):
a scalar is folded *into* a leaf whose storage takes it for free (scaled identity, diagonal, dense,
low-rank core, eigenvalues) and distributed *into* the children of a block-diagonal or a sum; it is
kept at the *root* of a Kronecker product and of a product (``product structure`` and
``kronecker structure`` pull scalars out), so ``c·Pᵀ(G⊗A)P`` stays over the factors whose
eigendecompositions are cached. ``sums.absorb_shift`` then sees ``c·X + s·I`` as
``c·(X + (s/c)·I)``.
"""

from __future__ import annotations

import torch

from ..base import scalar_float
from ..blockdiag import BlockDiag
from ..composites import Scale, Sum
from ..dense import Dense
from ..diagonal import Diagonal, ScaledIdentity
from ..eigen import Eigen
from ..lowrank import LowRank
from ..registry import rule
from ..shifted_dense import ShiftedDense


@rule("rewrite", Scale, name="fold scalar")
def fold_scalar(node: Scale, ctx):
    c, X = node.c, node.child
    nonneg = scalar_float(c) >= 0
    if not isinstance(c, torch.Tensor) and c == 1:
        return X
    if isinstance(X, Scale):
        return Scale(c * X.c, X.child)
    if isinstance(X, ScaledIdentity):
        out = ScaledIdentity(c * X.c, X.n, X.dtype, X.device)
        out.flexible = X.flexible
        return out
    if isinstance(X, Diagonal):
        return Diagonal(c * X.d, name=X.name)
    if isinstance(X, ShiftedDense):  # c·(M + s) = c·M + c·s: one new matrix, as for a Dense
        A = X.source
        return ShiftedDense(
            Dense(c * X.base, symmetric=A.symmetric, psd=A.psd and nonneg, name=A.name),
            c * X.shift,
        )
    if isinstance(X, Dense):
        return Dense(c * X.M, symmetric=X.symmetric, psd=X.psd and nonneg, name=X.name)
    if isinstance(X, LowRank):
        return LowRank(X.U, c * X.core(), X.V, psd=X.psd and nonneg, name=X.name)
    if isinstance(X, Eigen):
        return Eigen(X.Q, c * X.evals)
    if isinstance(X, BlockDiag):
        return BlockDiag([Scale(c, b) for b in X.blocks], X.names)
    if isinstance(X, Sum):
        return Sum(*[Scale(c, t) for t in X.terms])
    return None
