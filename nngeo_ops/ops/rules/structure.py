"""Rewrites of ``Kronecker`` and ``BlockDiag`` nodes: flatten, and merge eigen / diagonal factors."""

from __future__ import annotations

import torch

from ..base import scalar_float
from ..blockdiag import BlockDiag
from ..composites import Scale
from ..diagonal import Diagonal, ScaledIdentity
from ..eigen import Eigen
from ..kronecker import Kronecker
from ..registry import rule


def _kron_vectors(vs: list[torch.Tensor]) -> torch.Tensor:
    out = vs[0]
    for v in vs[1:]:
        out = torch.kron(out, v)
    return out


def _diag_vector(x) -> torch.Tensor:
    return x.d if isinstance(x, Diagonal) else x.diag_vector()


@rule("rewrite", Kronecker, name="kronecker structure")
def kronecker_structure(node: Kronecker, ctx):
    fs = node.factors
    if len(fs) == 1:
        return fs[0]
    if any(isinstance(f, Kronecker) for f in fs):
        flat = []
        for f in fs:
            flat.extend(f.factors if isinstance(f, Kronecker) else (f,))
        return Kronecker(*flat)
    scaled = [f for f in fs if isinstance(f, Scale)]
    if scaled:  # constants to the root: (c·A)⊗B = c·(A⊗B), so shifts meet the bare factors
        c = 1.0
        for f in scaled:
            c = c * f.c
        return Scale(c, Kronecker(*[f.child if isinstance(f, Scale) else f for f in fs]))
    if all(isinstance(f, Eigen) and f.full for f in fs):  # ⊗(Qᵢ Λᵢ Qᵢᵀ) = (⊗Qᵢ)(⊗Λᵢ)(⊗Qᵢ)ᵀ
        return Eigen(Kronecker(*[f.Q for f in fs]), _kron_vectors([f.evals for f in fs]))
    if all(isinstance(f, ScaledIdentity) for f in fs):
        c = 1.0
        for f in fs:
            c = c * f.c
        return ScaledIdentity(c, node.shape[0], node.dtype, node.device)
    if all(isinstance(f, (Diagonal, ScaledIdentity)) for f in fs):
        return Diagonal(_kron_vectors([_diag_vector(f) for f in fs]))
    return None


@rule("rewrite", BlockDiag, name="blockdiag structure")
def blockdiag_structure(node: BlockDiag, ctx):
    bs = node.blocks
    if len(bs) == 1:
        return bs[0]
    if any(isinstance(b, BlockDiag) for b in bs):
        flat = []
        for b in bs:
            flat.extend(b.blocks if isinstance(b, BlockDiag) else (b,))
        return BlockDiag(flat)
    if all(isinstance(b, ScaledIdentity) for b in bs):
        if len({scalar_float(b.c) for b in bs}) == 1 and not any(
            isinstance(b.c, torch.Tensor) for b in bs
        ):
            return ScaledIdentity(bs[0].c, node.shape[0], node.dtype, node.device)
        # one constant per block stays a BlockDiag: a per-layer prior δ_l·I meets the layer's block
        # in a sum (sums.blockwise_sum) and is absorbed into its eigenvalues there
        return None
    if all(isinstance(b, (Diagonal, ScaledIdentity)) for b in bs):
        return Diagonal(torch.cat([_diag_vector(b) for b in bs]))
    return None
