"""Rewrites of ``Product``: flatten, pull scalars out, and merge adjacent factors.

Merges: the mixed product ``(A⊗B)(C⊗D) = AC⊗BD``, aligned block-diagonals block by block,
diagonal·diagonal, dense·dense (only when the result is no bigger than its operands, so that
``Jᵀ·J`` of a tall ``J`` is never materialised), eigen forms over the same basis, permutations,
and cancellations ``QᵀQ = I`` (orthogonal ``Q``) and ``A⁻¹A = I``.
"""

from __future__ import annotations

from ..base import LinearOperator
from ..blockdiag import BlockDiag
from ..composites import Product, Scale, is_transpose_of
from ..dense import Dense
from ..diagonal import Diagonal, ScaledIdentity
from ..eigen import Eigen
from ..kronecker import Kronecker
from ..permutation import Permutation
from ..registry import rule
from ..symbolic import Inverse


def _merge(a: LinearOperator, b: LinearOperator) -> LinearOperator | None:
    square = a.shape[0] == a.shape[1] and b.shape[0] == b.shape[1]
    if square and is_transpose_of(a, b) and (a.orthogonal or b.orthogonal):
        return ScaledIdentity(1.0, a.shape[0], a.dtype, a.device)
    if (isinstance(a, Inverse) and a.child is b) or (isinstance(b, Inverse) and b.child is a):
        return ScaledIdentity(1.0, a.shape[0], a.dtype, a.device)
    if isinstance(a, Dense) and isinstance(b, Dense):
        # sizes from the shapes: .M of a ShiftedDense builds its n × n matrix
        if a.shape[0] * b.shape[1] <= a.shape[0] * a.shape[1] + b.shape[0] * b.shape[1]:
            return Dense(a.M @ b.M)
        return None
    if isinstance(a, Diagonal) and isinstance(b, Diagonal):
        return Diagonal(a.d * b.d)
    if isinstance(a, Diagonal) and isinstance(b, Dense):
        return Dense(a.d.unsqueeze(1) * b.M)
    if isinstance(a, Dense) and isinstance(b, Diagonal):
        return Dense(a.M * b.d)
    if isinstance(a, Kronecker) and isinstance(b, Kronecker):
        if len(a.factors) == len(b.factors) and all(
            x.shape[1] == y.shape[0] for x, y in zip(a.factors, b.factors)
        ):
            return Kronecker(*[Product(x, y) for x, y in zip(a.factors, b.factors)])
        return None
    if isinstance(a, BlockDiag) and isinstance(b, BlockDiag) and a.col_sizes == b.row_sizes:
        return BlockDiag([Product(x, y) for x, y in zip(a.blocks, b.blocks)], a.names)
    if isinstance(a, Eigen) and isinstance(b, Eigen) and a.Q is b.Q:
        return Eigen(a.Q, a.evals * b.evals)
    if isinstance(a, Permutation) and isinstance(b, Permutation):
        return Permutation(b.perm[a.perm], a.dtype, a.device)
    return None


@rule("rewrite", Product, name="product structure")
def product_structure(node: Product, ctx):
    changed, c, out = False, 1.0, []
    for f in node.factors:
        if isinstance(f, Product):
            out.extend(f.factors)
            changed = True
        elif isinstance(f, Scale):
            c = c * f.c
            out.append(f.child)
            changed = True
        elif isinstance(f, ScaledIdentity):
            c = c * f.c if not f.is_identity else c
            changed = True
        else:
            out.append(f)
    i = 0
    while i < len(out) - 1:
        merged = _merge(out[i], out[i + 1])
        if merged is None:
            i += 1
            continue
        changed = True
        if isinstance(merged, ScaledIdentity) and merged.is_identity:
            del out[i : i + 2]
        else:
            out[i : i + 2] = [merged]
        i = max(i - 1, 0)
    if not changed:
        return None
    if not out:
        return ScaledIdentity(c, node.shape[0], node.dtype, node.device)
    result = out[0] if len(out) == 1 else Product(*out)
    return result if (not hasattr(c, "dim") and c == 1) else Scale(c, result)
