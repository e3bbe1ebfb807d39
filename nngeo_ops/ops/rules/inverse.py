"""Rewrites of ``Inverse(X)``: invert structure instead of matrices."""

from __future__ import annotations

from ..blockdiag import BlockDiag
from ..composites import Product, Scale, Transpose
from ..diagonal import Diagonal, ScaledIdentity
from ..eigen import Eigen
from ..kronecker import Kronecker
from ..permutation import Permutation
from ..registry import rule
from ..symbolic import Inverse, Power
from ._util import check_nonzero


@rule("rewrite", Inverse, name="structured inverse")
def structured_inverse(node: Inverse, ctx):
    X = node.child
    if isinstance(X, Inverse):
        return X.child
    if isinstance(X, ScaledIdentity):
        check_nonzero(X.c, X._str())
        out = ScaledIdentity(1.0 / X.c, X.n, X.dtype, X.device)
        out.flexible = X.flexible
        return out
    if isinstance(X, Diagonal):
        check_nonzero(X.d, X._str(), getattr(X, "excludes_zero", False))
        return Diagonal(1.0 / X.d, name=f"{X.name}⁻¹")
    if isinstance(X, Eigen) and X.full:
        check_nonzero(X.evals, X._str(), getattr(X, "excludes_zero", False))
        return Eigen(X.Q, 1.0 / X.evals)
    if isinstance(X, Permutation):
        return X.transpose()
    if isinstance(X, Kronecker) and X.square_factors:  # (A⊗B)⁻¹ = A⁻¹⊗B⁻¹
        return Kronecker(*[Inverse(f) for f in X.factors])
    if isinstance(X, BlockDiag) and X.row_sizes == X.col_sizes:
        return BlockDiag([Inverse(b) for b in X.blocks], X.names)
    if isinstance(X, Scale):
        check_nonzero(X.c, X._str())
        return Scale(1.0 / X.c, Inverse(X.child))
    if isinstance(X, Product) and all(f.shape[0] == f.shape[1] for f in X.factors):
        return Product(*[Inverse(f) for f in reversed(X.factors)])
    if isinstance(X, Power):
        return Power(X.child, -X.p)
    if X.orthogonal and X.shape[0] == X.shape[1]:  # Q⁻¹ = Qᵀ
        return Transpose(X)
    return None
