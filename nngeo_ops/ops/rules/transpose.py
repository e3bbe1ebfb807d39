"""Rewrites of ``Transpose(X)``: push the transpose down to the leaves.

``Transpose(Dense)`` and ``Transpose(MatFree)`` stay as they are: their products need no copy, and
keeping the node lets ``Qᵀ·M·Q`` be recognised as a congruence by identity of ``Q``.
"""

from __future__ import annotations

from ..blockdiag import BlockDiag
from ..composites import Product, Scale, Sum, Transpose
from ..kronecker import Kronecker
from ..lowrank import LowRank
from ..permutation import Permutation
from ..registry import rule
from ..symbolic import Inverse


@rule("rewrite", Transpose, name="push transpose")
def push_transpose(node: Transpose, ctx):
    X = node.child
    if X.symmetric:
        return X
    if isinstance(X, Transpose):
        return X.child
    if isinstance(X, Permutation):
        return X.transpose()
    if isinstance(X, Kronecker):
        return Kronecker(*[Transpose(f) for f in X.factors])
    if isinstance(X, BlockDiag):
        return BlockDiag([Transpose(b) for b in X.blocks], X.names)
    if isinstance(X, Product):
        return Product(*[Transpose(f) for f in reversed(X.factors)])
    if isinstance(X, Sum):
        return Sum(*[Transpose(t) for t in X.terms])
    if isinstance(X, Scale):
        return Scale(X.c, Transpose(X.child))
    if isinstance(X, LowRank):  # (U C Vᵀ)ᵀ = V Cᵀ Uᵀ
        return LowRank(X.Vm, None if X.C is None else X.C.mT, X.U)
    if isinstance(X, Inverse):
        return Inverse(Transpose(X.child))
    return None
