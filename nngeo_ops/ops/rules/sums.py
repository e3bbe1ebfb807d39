"""Rewrites of ``Sum``: canonical form, then absorption of a shift ``c·I`` (or a diagonal).

Canonical form: nested sums flattened; diagonal terms, dense terms and low-rank terms each folded
into one; a truncated eigen form over a dense basis seen as the low-rank ``Q·Λ·Qᵀ``; terms sorted by
kind so that ``D + UUᵀ`` and ``UUᵀ + D`` are the same tree.

Shift absorption (the damping rules): ``Eigen(Q, λ) + c·I = Eigen(Q, λ + c)``;
``(A⊗B) + c·I`` (symmetric factors) is the eigen form over ``Q_A⊗Q_B`` with shifted eigenvalues
``λ_A⊗λ_B + c`` (factor eigendecompositions only, never a P×P matrix), or, when a factor is low
rank, the thin eigen form plus ``c·I`` of :mod:`.thin_shift` (no complete basis);
``BlockDiag + c·I`` shifts each block; ``Qᵀ·M·Q + c·I = Qᵀ·(M + c·I)·Q`` for orthogonal ``Q``
(a permutation congruence ``Pᵀ·X·P`` included); ``c·X + s·I = c·(X + (s/c)·I)`` for a scalar kept
at the root of ``X`` (see :mod:`.scale`); ``Dense + diag`` is a
:class:`~nngeo_ops.ops.shifted_dense.ShiftedDense` that shares the matrix (never copies it).

Block-wise sum: block-diagonals with the same partition add block by block, so a per-block shift
``BlockDiag[δ₁·I, δ₂·I, …]`` reaches each block as a scalar shift.

Together with the constant normal form of :mod:`.scale`, every spelling of a damped, scaled KFAC
(``N·F + δ·I``, ``N·(F + (δ/N)·I)``, ``N·F + BlockDiag[δ_l·I]``) reaches the same shifted
Kronecker eigenvalues.
"""

from __future__ import annotations

import torch

from ..base import LinearOperator, scalar_float
from ..blockdiag import BlockDiag
from ..composites import Product, Scale, Sum
from ..dense import Dense
from ..diagonal import Diagonal, ScaledIdentity
from ..eigen import Eigen
from ..kronecker import Kronecker
from ..leaf_checks import _checksum
from ..lowrank import LowRank
from ..matfree import MatFree
from ..registry import rule
from ..shifted_dense import ShiftedDense
from ._util import orthogonal_congruence
from .thin_shift import thin_kronecker_shift

_ORDER = (Eigen, Kronecker, BlockDiag, Product, Dense, MatFree, LowRank, Diagonal, ScaledIdentity)
_DIAGONAL_LEAVES = (Diagonal, ScaledIdentity)  # exact classes: a subclass takes the general path


def _rank(t: LinearOperator) -> int:
    for i, cls in enumerate(_ORDER):
        if isinstance(t, cls):
            return i
    return len(_ORDER) - 3  # other composites sit before the low-rank and diagonal terms


def _fold_diagonals(ts: list, ctx) -> LinearOperator:
    if all(isinstance(t, ScaledIdentity) for t in ts):
        c = ts[0].c
        for t in ts[1:]:
            c = c + t.c
        out = ScaledIdentity(c, ts[0].n, ts[0].dtype, ts[0].device)
        out.flexible = all(t.flexible for t in ts)
        return out
    # the scalar shifts are added as one scalar: no vector of ones, one pass per diagonal term
    acc, shift, diags = None, 0.0, []
    for t in ts:
        if isinstance(t, Diagonal):
            acc = t.d if acc is None else acc + t.d
            diags.append(t)
        else:
            shift = shift + t.c
    if len(diags) == 1:  # d + c (a damped diagonal): the range of d shifted, no pass over d + c
        return diags[0].shifted(shift, getattr(ctx, "checksum", _checksum))
    # a fresh tensor of ops' own, so its zero-freedom needs no checksum (Diagonal's derived)
    return Diagonal(acc + shift, derived=True)


def _fold_lowranks(ts: list[LowRank]) -> LowRank:
    """``Σ Uᵢ Cᵢ Vᵢᵀ = [U₁ U₂ …] blockdiag(C₁, C₂, …) [V₁ V₂ …]ᵀ``."""
    U = torch.cat([t.U for t in ts], dim=1)
    sym = all(t.V is None for t in ts)
    V = None if sym else torch.cat([t.Vm for t in ts], dim=1)
    C = None if all(t.C is None for t in ts) else torch.block_diag(*[t.core() for t in ts])
    return LowRank(U, C, V, psd=all(t.psd for t in ts))


@rule("rewrite", Sum, name="canonical sum", priority=30)
def canonical_sum(node: Sum, ctx):
    terms = node.terms
    if len(terms) > 1:
        for t in terms:
            if type(t) not in _DIAGONAL_LEAVES:
                break
        else:  # diagonal leaves only (a damped diagonal): what the general path returns, at once
            return _fold_diagonals(list(terms), ctx)
    flat: list[LinearOperator] = []
    for t in node.terms:
        flat.extend(t.terms if isinstance(t, Sum) else (t,))
    for i, t in enumerate(flat):
        if isinstance(t, Eigen) and not t.full and isinstance(t.Q, Dense):
            flat[i] = LowRank(t.Q.M, torch.diag(t.evals), psd=t.psd)
    if sum(isinstance(t, BlockDiag) for t in flat) < 2:
        # a BlockDiag of scaled identities with nothing to add to block-wise is a diagonal
        flat = [_shift_vector(t) if _is_blockwise_shift(t) else t for t in flat]
    groups: dict[str, list] = {"diag": [], "dense": [], "lowrank": []}
    rest = []
    for t in flat:
        if isinstance(t, (Diagonal, ScaledIdentity)):
            groups["diag"].append(t)
        elif isinstance(t, Dense):
            groups["dense"].append(t)
        elif isinstance(t, LowRank):
            groups["lowrank"].append(t)
        else:
            rest.append(t)
    if len(groups["dense"]) > 1:
        ds = groups["dense"]
        rest.append(
            Dense(
                sum(d.M for d in ds),
                symmetric=all(d.symmetric for d in ds) or None,
                psd=all(d.psd for d in ds),
            )
        )
    else:
        rest += groups["dense"]
    rest += [_fold_lowranks(groups["lowrank"])] if len(groups["lowrank"]) > 1 else groups["lowrank"]
    rest += [_fold_diagonals(groups["diag"], ctx)] if len(groups["diag"]) > 1 else groups["diag"]
    rest.sort(key=_rank)
    if len(rest) == 1:
        return rest[0]
    if len(rest) == len(node.terms) and all(a is b for a, b in zip(rest, node.terms)):
        return None
    return Sum(*rest)


def _is_blockwise_shift(t: LinearOperator) -> bool:
    return isinstance(t, BlockDiag) and all(isinstance(b, ScaledIdentity) for b in t.blocks)


def _shift_vector(t: BlockDiag) -> Diagonal:
    return Diagonal(torch.cat([b.diag_vector() for b in t.blocks]))


@rule("rewrite", Sum, name="block-wise sum", priority=20)
def blockwise_sum(node: Sum, ctx):
    """``BlockDiag[A₁, A₂, …] + BlockDiag[B₁, B₂, …] = BlockDiag[A₁ + B₁, A₂ + B₂, …]`` for the
    same partition (square blocks)."""
    bds = [t for t in node.terms if isinstance(t, BlockDiag) and t.row_sizes == t.col_sizes]
    if len(bds) < 2:
        return None
    first = bds[0]
    same = [t for t in bds if t.aligned_with(first)]
    if len(same) < 2:
        return None
    merged = BlockDiag([Sum(*parts) for parts in zip(*[t.blocks for t in same])], first.names)
    rest = [t for t in node.terms if not any(t is u for u in same)]
    return merged if not rest else Sum(merged, *rest)


def _scaled_shift(s: LinearOperator, c) -> LinearOperator:
    """The shift ``s / c``."""
    if isinstance(s, ScaledIdentity):
        out = ScaledIdentity(s.c / c, s.n, s.dtype, s.device)
        out.flexible = s.flexible
        return out
    return Diagonal(s.d / c)


def _absorb(t: LinearOperator, s: LinearOperator, ctx) -> LinearOperator | None:
    """``t + s`` as one node, for a shift ``s`` (scaled identity or diagonal), or None."""
    scalar = isinstance(s, ScaledIdentity)
    if isinstance(t, Scale) and t.shape[0] == t.shape[1] and scalar_float(t.c) != 0:
        # c·X + s = c·(X + s/c): the scalar stays at the root and the shift meets X's structure
        inner = _absorb(t.child, _scaled_shift(s, t.c), ctx)
        return None if inner is None else Scale(t.c, inner)
    if isinstance(t, Eigen) and t.full and scalar:
        return Eigen(t.Q, t.evals + s.c)
    if isinstance(t, Kronecker) and scalar and t.symmetric and t.square_factors:
        thin = thin_kronecker_shift(t, s.c, ctx)  # a low-rank factor: no complete basis
        if thin is not None:
            return thin
        E = ctx.eigh_of(t, structured_only=True)
        return None if E is None else Eigen(E.Q, E.evals + s.c)
    if isinstance(t, BlockDiag) and t.row_sizes == t.col_sizes:
        if scalar:
            parts = [ScaledIdentity(s.c, n, s.dtype, s.device) for n in t.row_sizes]
        else:
            parts = [Diagonal(d) for d in s.d.split(t.row_sizes)]
        return BlockDiag([Sum(b, p) for b, p in zip(t.blocks, parts)], t.names)
    cong = orthogonal_congruence(t)
    if cong is not None and scalar:
        qt, m, q = cong
        return Product(qt, Sum(m, s), q)
    if isinstance(t, Dense) and t.shape[0] == t.shape[1]:
        # M + s as a node that shares M and keeps s: a copy M + s (1.6 GB beside a 20 490²
        # block-diagonal Fisher block) would sit next to M and its Cholesky factor
        return ShiftedDense(t, s.d if isinstance(s, Diagonal) else s.c)
    return None


@rule("rewrite", Sum, name="absorb shift", priority=10)
def absorb_shift(node: Sum, ctx):
    shifts = [t for t in node.terms if isinstance(t, (ScaledIdentity, Diagonal))]
    if len(shifts) != 1:
        return None
    s = shifts[0]
    others = [t for t in node.terms if t is not s]
    for i, t in enumerate(others):
        new = _absorb(t, s, ctx)
        if new is not None:
            rest = others[:i] + [new] + others[i + 1 :]
            return rest[0] if len(rest) == 1 else Sum(*rest)
    return None
