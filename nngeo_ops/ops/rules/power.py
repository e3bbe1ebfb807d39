"""Rewrites of ``Power(X, p)``: powers act on spectra, factor by factor where structure allows.

The ``"rewrite"`` rule of :class:`~nngeo_ops.ops.Power` handles the exponents that need no structure
(``p`` = 1, 0, −1), then dispatches the ``"power"`` rules on the class of the base ``X`` (its MRO,
most specific first, like every dispatch of :mod:`~nngeo_ops.ops.registry`). Each ``"power"`` rule
takes the ``Power`` node and returns its rewrite, ``None`` when its pattern does not match (the
next rule tries), or the node itself to leave it as it is. The rule on ``LinearOperator`` is the
generic route through the eigendecomposition, so a new node kind gets structured powers by
registering ``@rule("power", MyNode)``.
"""

from __future__ import annotations

from ..base import LinearOperator, scalar_float
from ..blockdiag import BlockDiag
from ..composites import Product, Scale
from ..dense import Dense
from ..diagonal import Diagonal, ScaledIdentity
from ..eigen import Eigen
from ..kronecker import Kronecker
from ..registry import rule, rules_for
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
    for r in rules_for("power", type(X)):
        out = r.fn(node, ctx)
        if out is not None:
            return out
    return None


@rule("power", Power, name="(A^a)^b = A^(ab) for PSD A")
def power_of_power(node: Power, ctx):
    X = node.child
    return Power(X.child, X.p * node.p) if X.child.psd else None


@rule("power", ScaledIdentity, name="c^p·I")
def identity_power(node: Power, ctx):
    X, p = node.child, node.p
    c = X.c
    if not float(p).is_integer() and scalar_float(c) < 0:
        spectral_power(X.diag_vector(), p, X._str())  # raises NotPSDError
    return ScaledIdentity(c**p, X.n, X.dtype, X.device)


@rule("power", Diagonal, name="elementwise power")
def diagonal_power(node: Power, ctx):
    X = node.child
    return Diagonal(spectral_power(X.d, node.p, X._str()))


@rule("power", Eigen, name="power of the eigenvalues")
def eigen_power(node: Power, ctx):
    X, p = node.child, node.p
    if X.full or p > 0:
        return Eigen(X.Q, spectral_power(X.evals, p, X._str()))
    return node  # a truncated spectrum to a negative power: singular, left for the solve to refuse


@rule("power", BlockDiag, name="per-block powers")
def blockdiag_power(node: Power, ctx):
    X = node.child
    return BlockDiag([Power(b, node.p) for b in X.blocks], X.names)


@rule("power", Kronecker, name="per-factor powers (PSD factors)")
def kronecker_power(node: Power, ctx):
    X = node.child
    if X.square_factors and all(f.psd for f in X.factors):
        return Kronecker(*[Power(f, node.p) for f in X.factors])
    return None


@rule("power", Scale, name="c^p·A^p (c > 0)")
def scale_power(node: Power, ctx):
    X = node.child
    return Scale(X.c**node.p, Power(X.child, node.p)) if scalar_float(X.c) > 0 else None


@rule("power", Product, name="Qᵀ·M^p·Q (orthogonal congruence)")
def congruence_power(node: Power, ctx):
    cong = orthogonal_congruence(node.child)
    if cong is None:
        return None
    qt, m, q = cong
    return Product(qt, Power(m, node.p), q)


@rule("power", Inverse, name="(A⁻¹)^p = A^(−p)")
def inverse_power(node: Power, ctx):
    return Power(node.child.child, -node.p)


@rule("power", LinearOperator, name="through the eigendecomposition")
def eigh_power(node: Power, ctx):
    X, p = node.child, node.p
    E = ctx.eigh_of(X, structured_only=True)
    if E is None and X.needs_grad() and X.shape[0] <= ctx.policy.dense_limit:
        # eigh's gradient is NaN for repeated eigenvalues; the dense spectral function is not
        return Dense(matrix_power(X.to_dense(), p, X._str()), psd=X.psd or node.psd)
    # No structure left to exploit: go through the (structured where possible) eigendecomposition.
    return Power(E if E is not None else ctx.eigh_of(X), p)
