"""Rewrites of ``Power(X, p)``: powers act on spectra, factor by factor where structure allows."""

from __future__ import annotations

from ..base import scalar_float
from ..blockdiag import BlockDiag
from ..composites import Product, Scale
from ..dense import Dense
from ..diagonal import Diagonal, ScaledIdentity
from ..eigen import Eigen
from ..kronecker import Kronecker
from ..registry import rule
from ..spectral import matrix_power
from ..symbolic import Inverse, Power
from ._util import orthogonal_congruence, spectral_power


@rule("rewrite", Power, name="structured power")
def structured_power(node: Power, ctx):
    X, p = node.child, node.p
    if p == 1:
        return X
    if p == 0:
        return ScaledIdentity(1.0, X.shape[0], X.dtype, X.device)
    if p == -1:
        return Inverse(X)
    if isinstance(X, Power) and X.child.psd:  # (A^a)^b = A^(ab) only for PSD A
        return Power(X.child, X.p * p)
    if isinstance(X, ScaledIdentity):
        c = X.c
        if not float(p).is_integer() and scalar_float(c) < 0:
            spectral_power(X.diag_vector(), p, X._str())  # raises NotPSDError
        return ScaledIdentity(c**p, X.n, X.dtype, X.device)
    if isinstance(X, Diagonal):
        return Diagonal(spectral_power(X.d, p, X._str()))
    if isinstance(X, Eigen) and (X.full or p > 0):
        return Eigen(X.Q, spectral_power(X.evals, p, X._str()))
    if isinstance(X, BlockDiag):
        return BlockDiag([Power(b, p) for b in X.blocks], X.names)
    if isinstance(X, Kronecker) and X.square_factors and all(f.psd for f in X.factors):
        return Kronecker(*[Power(f, p) for f in X.factors])
    if isinstance(X, Scale) and scalar_float(X.c) > 0:
        return Scale(X.c**p, Power(X.child, p))
    cong = orthogonal_congruence(X)
    if cong is not None:
        qt, m, q = cong
        return Product(qt, Power(m, p), q)
    if isinstance(X, Inverse):  # (A⁻¹)^p = A^(−p)
        return Power(X.child, -p)
    if isinstance(X, Eigen):
        return None
    E = ctx.eigh_of(X, structured_only=True)
    if E is None and X.needs_grad() and X.shape[0] <= ctx.policy.dense_limit:
        # eigh's gradient is NaN for repeated eigenvalues; the dense spectral function is not
        return Dense(matrix_power(X.to_dense(), p, X._str()), psd=X.psd or node.psd)
    # No structure left to exploit: go through the (structured where possible) eigendecomposition.
    return Power(E if E is not None else ctx.eigh_of(X), p)
