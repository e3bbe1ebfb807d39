"""Closed-form solve routines. Each returns a closure ``X -> A⁻¹X`` for ``X`` of shape ``(n, k)``
over factorisations computed once (and cached on leaves where they are leaf factorisations)."""

from __future__ import annotations

import torch

from ...errors import SingularError
from ...linalg import cholesky_solve
from ..blockdiag import BlockDiag
from ..composites import Product, Scale, Sum, Transpose
from ..dense import Dense
from ..diagonal import Diagonal, ScaledIdentity
from ..eigen import Eigen
from ..kronecker import Kronecker, kron_apply
from ..permutation import Permutation
from ..registry import rule
from ..shifted_dense import ShiftedDense
from ..symbolic import Inverse
from ._util import check_nonzero
from .woodbury import (  # noqa: F401  (re-exported: other rule modules import them from here)
    WideCongruenceParts,
    WoodburyParts,
    wide_congruence_parts,
    woodbury_parts,
)


@rule("solve", Dense, name="Cholesky (PSD) or LU")
def dense_solve(node: Dense, ctx):
    if node.psd:
        L = node.cholesky_factor()
        if L.dtype != node.dtype:  # half precision, factorised in float32
            return lambda X: cholesky_solve(X.to(L.dtype), L).to(X.dtype)
        return lambda X: cholesky_solve(X, L)
    LU, piv = node.lu_factors()
    if LU.dtype != node.dtype:
        return lambda X: torch.linalg.lu_solve(LU, piv, X.to(LU.dtype)).to(X.dtype)
    return lambda X: torch.linalg.lu_solve(LU, piv, X)


# the same routine, named for explain(): M + shift shares M, and its factor is one shifted copy of
# M factorised in place (ShiftedDense.cholesky_factor / lu_factors)
SHIFTED_DENSE_FACTOR = "Cholesky (PSD) or LU of one shifted copy of M, in place"
rule("solve", ShiftedDense, name=SHIFTED_DENSE_FACTOR)(dense_solve)


class _Division:
    """``X ↦ X / d`` row-wise for ``X`` of shape ``(n, k)``; ``vector(b) = b / d`` for ``b`` of shape
    ``(n,)`` (the same quotients, without a column view of ``d`` and ``b``: the first damped
    solve of a diagonal runs cold, where each torch call costs ~10 µs)."""

    __slots__ = ("d", "col")

    def __init__(self, d: torch.Tensor) -> None:
        self.d = d
        self.col = None

    def __call__(self, X: torch.Tensor) -> torch.Tensor:
        if self.col is None:
            self.col = self.d.unsqueeze(1)
        return X / self.col

    def vector(self, b: torch.Tensor) -> torch.Tensor:
        return b / self.d


@rule("solve", Diagonal, name="elementwise division")
def diagonal_solve(node: Diagonal, ctx):
    check_nonzero(node.d, node._str(), getattr(node, "excludes_zero", False))
    return _Division(node.d)


@rule("solve", ScaledIdentity, name="division by scalar")
def identity_solve(node: ScaledIdentity, ctx):
    check_nonzero(node.c, node._str())
    return lambda X: X / node.c


@rule("solve", Eigen, name="eigen form: Q diag(1/λ) Qᵀ")
def eigen_solve(node: Eigen, ctx):
    if not node.full:
        raise SingularError(
            f"{node._str()} is a truncated spectrum (rank {node.Q.shape[1]} < {node.shape[0]}), "
            "hence singular; add damping (A + c·I) before solving"
        )
    check_nonzero(node.evals, node._str(), getattr(node, "excludes_zero", False))
    inv = 1.0 / node.evals
    return lambda X: node.apply_function(inv, X)


@rule("solve", Kronecker, name="per-factor solves")
def kronecker_solve(node: Kronecker, ctx):
    if not node.square_factors:
        return None
    solvers = [ctx.solver(f) for f in node.factors]
    sizes = [f.shape[0] for f in node.factors]
    return lambda X: kron_apply(solvers, sizes, sizes, X)


@rule("solve", BlockDiag, name="per-block solves")
def blockdiag_solve(node: BlockDiag, ctx):
    if node.row_sizes != node.col_sizes:
        return None
    solvers = [ctx.solver(b) for b in node.blocks]
    return lambda X: torch.cat([s(x) for s, x in zip(solvers, X.split(node.row_sizes))])


@rule("solve", Permutation, name="inverse permutation")
def permutation_solve(node: Permutation, ctx):
    # P⁻¹ = Pᵀ: the node's own transposed product (AppendColumn's is a concatenation of views,
    # ~10× faster than the gather X[inverse_perm] for a layer of 2·10⁵ parameters)
    return node._rmatmat


@rule("solve", Product, name="chain of factor solves")
def product_solve(node: Product, ctx):
    if not all(f.shape[0] == f.shape[1] for f in node.factors):
        return None
    solvers = [ctx.solver(f) for f in node.factors]

    def solve(X: torch.Tensor) -> torch.Tensor:
        for s in solvers:  # (A B C)⁻¹ = C⁻¹ B⁻¹ A⁻¹: A⁻¹ acts first
            X = s(X)
        return X

    return solve


@rule("solve", Scale, name="scaled solve")
def scale_solve(node: Scale, ctx):
    check_nonzero(node.c, node._str())
    s = ctx.solver(node.child)
    return lambda X: s(X) / node.c


@rule("solve", Transpose, name="transposed solve")
def transpose_solve(node: Transpose, ctx):
    A = node.child
    if A.symmetric:
        return ctx.solver(A)
    if A.orthogonal and A.shape[0] == A.shape[1]:  # A⁻ᵀ = A
        return A._matmat
    if isinstance(A, Dense):
        LU, piv = A.lu_factors()
        return lambda X: torch.linalg.lu_solve(LU, piv, X.to(LU.dtype), adjoint=True).to(X.dtype)
    return None


@rule("solve", Inverse, name="product with the inverted node")
def inverse_solve(node: Inverse, ctx):
    return node.child._matmat


@rule("solve", Sum, name="Woodbury (structured + low rank)", priority=30)
def woodbury_solve(node: Sum, ctx):
    """``(B + UCVᵀ)⁻¹ = B⁻¹ − B⁻¹U (I + C Vᵀ B⁻¹ U)⁻¹ C Vᵀ B⁻¹`` (no inverse of ``C`` needed)."""
    parts = woodbury_parts(node, ctx)
    if parts is None:
        return None
    b_solve, BU, C, V, (LU, piv) = parts.solve_B, parts.BinvU, parts.C, parts.V, parts.lu

    def solve(X: torch.Tensor) -> torch.Tensor:
        Y = b_solve(X)
        return Y - BU @ torch.linalg.lu_solve(LU, piv, C @ (V.mT @ Y))

    return solve


@rule("solve", Sum, name="Woodbury in function space (Xᵀ·M·X + c·I, X wide)", priority=20)
def wide_congruence_solve(node: Sum, ctx):
    """``(c·I + XᵀMX)⁻¹ B = (B − Xᵀ M (c·I + K M)⁻¹ X B) / c`` with ``K = X Xᵀ``: an m × m system
    (m = outputs × examples) instead of n × n, and no inverse of ``M`` (singular for a Fisher)."""
    parts = wide_congruence_parts(node, ctx)
    if parts is None:
        return None
    X, Md, c, (LU, piv) = parts.X, parts.M, parts.c, parts.lu

    def solve(B: torch.Tensor) -> torch.Tensor:
        Z = torch.linalg.lu_solve(LU, piv, X._matmat(B).to(LU.dtype))
        return (B - X._rmatmat((Md @ Z).to(B.dtype))) / c

    return solve
