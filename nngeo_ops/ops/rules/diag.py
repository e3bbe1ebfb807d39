"""Closed-form diagonal, trace and Frobenius-norm routines.

The diagonal of an eigen form is ``diag(QΛQᵀ) = (Q∘Q) λ``; the elementwise square ``Q∘Q`` keeps the
structure of ``Q`` (for a Kronecker basis ``(A⊗B)∘(A⊗B) = (A∘A)⊗(B∘B)``), so EKFAC diagonals never
materialise the basis.
"""

from __future__ import annotations

import math

import torch

from ..base import LinearOperator, scalar_float
from ..blockdiag import BlockDiag
from ..composites import Product, Scale, Sum, Transpose
from ..dense import Dense
from ..diagonal import Diagonal, ScaledIdentity
from ..eigen import Eigen
from ..kronecker import Kronecker
from ..lowrank import LowRank
from ..permutation import Permutation
from ..registry import rule
from ..shifted_dense import ShiftedDense
from ._util import congruence_gram, orthogonal_congruence


def hadamard_square(Q: LinearOperator) -> LinearOperator | None:
    """``Q∘Q`` as a node of the same structure, or None when the structure does not allow it."""
    if isinstance(Q, Dense):
        return Dense(Q.M * Q.M)
    if isinstance(Q, Diagonal):
        return Diagonal(Q.d * Q.d)
    if isinstance(Q, ScaledIdentity):
        return ScaledIdentity(Q.c * Q.c, Q.n, Q.dtype, Q.device)
    if isinstance(Q, Permutation):
        return Q
    if isinstance(Q, (Kronecker, BlockDiag)):
        parts = [hadamard_square(f) for f in Q.children()]
        if any(p is None for p in parts):
            return None
        return Kronecker(*parts) if isinstance(Q, Kronecker) else BlockDiag(parts)
    if isinstance(Q, Transpose):
        inner = hadamard_square(Q.child)
        return None if inner is None else Transpose(inner)
    if isinstance(Q, Product):  # row / column permutations commute with squaring entries
        fs = Q.factors
        perms = [i for i, f in enumerate(fs) if isinstance(f, Permutation)]
        others = [f for f in fs if not isinstance(f, Permutation)]
        if len(others) == 1:
            inner = hadamard_square(others[0])
            if inner is None:
                return None
            return Product(*[inner if i not in perms else f for i, f in enumerate(fs)])
    return None


# ---------------------------------------------------------------------------------------- diag
@rule("diag", Dense, name="diagonal of the matrix")
def dense_diag(node: Dense, ctx):
    return node.M.diagonal()


@rule("diag", ShiftedDense, name="diagonal of M + shift")
def shifted_dense_diag(node: ShiftedDense, ctx):
    return node.diagonal()  # Dense's route would build M + shift (n × n) through .M


@rule("diag", Diagonal, name="the vector")
def diagonal_diag(node: Diagonal, ctx):
    return node.d


@rule("diag", ScaledIdentity, name="constant")
def identity_diag(node: ScaledIdentity, ctx):
    return node.diag_vector()


@rule("diag", LowRank, name="rowwise (U C)∘V")
def lowrank_diag(node: LowRank, ctx):
    UC = node.U if node.C is None else node.U @ node.C
    return (UC * node.Vm).sum(1)


@rule("diag", Kronecker, name="Kronecker of factor diagonals")
def kronecker_diag(node: Kronecker, ctx):
    if not node.square_factors:
        return None
    out = ctx.diag_of(node.factors[0])
    for f in node.factors[1:]:
        out = torch.kron(out, ctx.diag_of(f))
    return out


@rule("diag", BlockDiag, name="concatenated block diagonals")
def blockdiag_diag(node: BlockDiag, ctx):
    if node.row_sizes != node.col_sizes:
        return None
    return torch.cat([ctx.diag_of(b) for b in node.blocks])


@rule("diag", Eigen, name="(Q∘Q) λ")
def eigen_diag(node: Eigen, ctx):
    sq = hadamard_square(node.Q)
    if sq is None:
        return None
    return sq._matmat(node.evals.unsqueeze(1)).squeeze(1)


@rule("diag", Permutation, name="fixed points")
def permutation_diag(node: Permutation, ctx):
    idx = torch.arange(node.shape[0], device=node.device)
    return (node.perm == idx).to(node.dtype)


@rule("diag", Scale, name="scaled child diagonal")
def scale_diag(node: Scale, ctx):
    d = ctx.diag_of(node.child, structured_only=True)
    return None if d is None else node.c * d


@rule("diag", Transpose, name="child diagonal")
def transpose_diag(node: Transpose, ctx):
    return ctx.diag_of(node.child, structured_only=True)


@rule("diag", Sum, name="sum of term diagonals")
def sum_diag(node: Sum, ctx):
    ds = [ctx.diag_of(t, structured_only=True) for t in node.terms]
    return None if any(d is None for d in ds) else sum(ds)


@rule("diag", Product, name="permuted / diagonally scaled diagonal")
def product_diag(node: Product, ctx):
    fs = node.factors
    if len(fs) == 3 and isinstance(fs[0], Permutation) and isinstance(fs[2], Permutation):
        if torch.equal(fs[0].perm, fs[2].inverse_perm):  # (Pᵀ M P)ᵢᵢ = M[p⁻¹(i), p⁻¹(i)]
            d = ctx.diag_of(fs[1], structured_only=True)
            return None if d is None else d[fs[2].inverse_perm]
    if len(fs) == 2 and isinstance(fs[0], Diagonal):
        d = ctx.diag_of(fs[1], structured_only=True)
        return None if d is None else fs[0].d * d
    if len(fs) == 2 and isinstance(fs[1], Diagonal):
        d = ctx.diag_of(fs[0], structured_only=True)
        return None if d is None else fs[1].d * d
    return None


# ---------------------------------------------------------------------------------------- trace
@rule("trace", Dense, name="sum of diagonal")
def dense_trace(node: Dense, ctx):
    return node.M.diagonal().sum()


@rule("trace", ShiftedDense, name="tr M + trace of the shift")
def shifted_dense_trace(node: ShiftedDense, ctx):
    return node.trace_value()


@rule("trace", Diagonal, ScaledIdentity, Permutation, name="sum of diagonal")
def diag_trace(node, ctx):
    return ctx.diag_of(node).sum()


@rule("trace", LowRank, name="tr(C Vᵀ U)")
def lowrank_trace(node: LowRank, ctx):
    return (node.core() * (node.Vm.mT @ node.U).mT).sum()


@rule("trace", Kronecker, name="product of factor traces")
def kronecker_trace(node: Kronecker, ctx):
    if not node.square_factors:
        return None
    return math.prod([ctx.trace_of(f) for f in node.factors])


@rule("trace", BlockDiag, name="sum of block traces")
def blockdiag_trace(node: BlockDiag, ctx):
    if node.row_sizes != node.col_sizes:
        return None
    return sum(ctx.trace_of(b) for b in node.blocks)


@rule("trace", Eigen, name="sum of eigenvalues")
def eigen_trace(node: Eigen, ctx):
    return node.evals.sum()


@rule("trace", Scale, name="scaled trace")
def scale_trace(node: Scale, ctx):
    return node.c * ctx.trace_of(node.child)


@rule("trace", Transpose, name="child trace")
def transpose_trace(node: Transpose, ctx):
    return ctx.trace_of(node.child)


@rule("trace", Sum, name="sum of traces")
def sum_trace(node: Sum, ctx):
    return sum(ctx.trace_of(t) for t in node.terms)


@rule("trace", Product, name="trace of congruence / of structured diagonal", priority=10)
def product_trace(node: Product, ctx):
    cong = orthogonal_congruence(node)
    if cong is not None:  # tr(Qᵀ M Q) = tr(M) for orthogonal Q
        return ctx.trace_of(cong[1])
    d = ctx.diag_of(node, structured_only=True)
    return None if d is None else d.sum()


@rule("trace", Product, name="tr(M·X Xᵀ) of a congruence, from the Gram matrix")
def gram_congruence_trace(node: Product, ctx):
    parts = congruence_gram(node, ctx)
    if parts is None:
        return None
    _, M, K = parts
    return (M * K).sum().to(node.dtype)  # tr(XᵀMX) = tr(M K), both symmetric


# ---------------------------------------------------------------------------------------- Frobenius
@rule("frobenius", Dense, name="entrywise norm")
def dense_fro(node: Dense, ctx):
    return torch.linalg.matrix_norm(node.M)


@rule("frobenius", ShiftedDense, name="entrywise norm, by blocks of rows")
def shifted_dense_fro(node: ShiftedDense, ctx):
    return node.frobenius()


@rule("frobenius", Diagonal, name="‖d‖")
def diagonal_fro(node: Diagonal, ctx):
    return torch.linalg.vector_norm(node.d)


@rule("frobenius", ScaledIdentity, name="|c|·√n")
def identity_fro(node: ScaledIdentity, ctx):
    c = node.c.abs() if isinstance(node.c, torch.Tensor) else abs(node.c)
    return torch.as_tensor(c * math.sqrt(node.n), dtype=node.dtype, device=node.device)


@rule("frobenius", Permutation, name="√n")
def permutation_fro(node: Permutation, ctx):
    return torch.tensor(math.sqrt(node.shape[0]), dtype=node.dtype, device=node.device)


@rule("frobenius", LowRank, name="√tr(UᵀU C VᵀV Cᵀ)")
def lowrank_fro(node: LowRank, ctx):
    C = node.core()
    G = (node.U.mT @ node.U) @ C @ (node.Vm.mT @ node.Vm) @ C.mT
    return torch.sqrt(G.diagonal().sum().clamp_min(0))


@rule("frobenius", Kronecker, name="product of factor norms")
def kronecker_fro(node: Kronecker, ctx):
    return math.prod([ctx.frobenius_of(f) for f in node.factors])


@rule("frobenius", BlockDiag, name="root of summed squares")
def blockdiag_fro(node: BlockDiag, ctx):
    return torch.sqrt(sum(ctx.frobenius_of(b) ** 2 for b in node.blocks))


@rule("frobenius", Eigen, name="‖λ‖ (orthonormal Q)")
def eigen_fro(node: Eigen, ctx):
    return torch.linalg.vector_norm(node.evals)


@rule("frobenius", Scale, name="|c|·‖A‖")
def scale_fro(node: Scale, ctx):
    c = node.c.abs() if isinstance(node.c, torch.Tensor) else abs(scalar_float(node.c))
    return c * ctx.frobenius_of(node.child)


@rule("frobenius", Transpose, name="child norm")
def transpose_fro(node: Transpose, ctx):
    return ctx.frobenius_of(node.child)


@rule("frobenius", Product, name="norm of congruence core", priority=10)
def product_fro(node: Product, ctx):
    cong = orthogonal_congruence(node)
    return None if cong is None else ctx.frobenius_of(cong[1])


@rule("frobenius", Product, name="√tr((M·X Xᵀ)²) of a congruence, from the Gram matrix")
def gram_congruence_fro(node: Product, ctx):
    parts = congruence_gram(node, ctx)
    if parts is None:
        return None
    _, M, K = parts
    MK = M @ K
    return torch.sqrt((MK * MK.mT).sum().clamp_min(0)).to(node.dtype)  # ‖XᵀMX‖² = tr(MKMK)
