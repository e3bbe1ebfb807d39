"""``A.matvec(x, out=...)`` on the nodes of a KFAC product, against dense twins built with plain torch.

A KFAC block with a bias is ``Pᵀ (G ⊗ A) P`` with ``P = AppendColumn(rows, cols)``, an EKFAC block
``Pᵀ Eig[Q_G ⊗ Q_A] P``; their products run in one routine (``Kronecker.bordered_into``) that never forms ``P x``, and a block-diagonal writes
every block's product into its rows of one result. Checked in float64 against ``torch.kron`` and a
permutation matrix built here from its definition, at sizes below and above
``CompilePolicy.dense_limit``, and for the allocations the routes make (torch.profiler).
"""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from nngeo_ops.ops import (
    AppendColumn,
    BlockDiag,
    CompilePolicy,
    Dense,
    Diagonal,
    Eigen,
    Kronecker,
    LowRank,
)

F64 = torch.float64


def rnd(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=F64)


def spd(B):
    return B @ B.mT / B.shape[0] + torch.eye(B.shape[0], dtype=B.dtype)


def append_column_matrix(rows, cols):
    """P with P [vec(W); c] = vec([W | c]) (W rows × cols, row-major), from its definition."""
    n = rows * (cols + 1)
    P = torch.zeros(n, n, dtype=F64)
    for o in range(rows):
        for i in range(cols):
            P[o * (cols + 1) + i, o * cols + i] = 1.0
        P[o * (cols + 1) + cols, rows * cols + o] = 1.0
    return P


def a_factor(kind, cols, gen):
    """The input factor A ((cols + 1) square) as a node, and its dense twin."""
    d = cols + 1
    if kind == "dense":
        A = spd(rnd(gen, d, d))
        return Dense(A, psd=True, name="A"), A
    if kind == "dense-general":  # not symmetric: Aᵀ is used, not A
        A = rnd(gen, d, d)
        return Dense(A, name="A"), A
    if kind == "low-rank":  # rank below d / 2: G acts on the k columns of X V
        U = rnd(gen, d, max(1, d // 4))
        return LowRank(U, psd=True, name="A"), U @ U.mT
    if kind == "low-rank-wide":  # rank near d: the plain order (A, then G) is cheaper
        U = rnd(gen, d, d - 1)
        return LowRank(U, psd=True, name="A"), U @ U.mT
    if kind == "low-rank-general":  # U C Vᵀ with V ≠ U
        k = max(1, d // 3)
        U, C, V = rnd(gen, d, k), rnd(gen, k, k), rnd(gen, d, k)
        return LowRank(U, C, V, name="A"), U @ C @ V.mT
    raise ValueError(kind)


def kfac_block(rows, cols, kind, seed, transposed_node=True):
    gen = torch.Generator().manual_seed(seed)
    G = spd(rnd(gen, rows, rows))
    a_node, A = a_factor(kind, cols, gen)
    p = AppendColumn(rows, cols, dtype=F64)
    # nn builds p.T @ K @ p (a Transpose node); p.transpose() is the inverse AppendColumn itself
    pt = p.T if transposed_node else p.transpose()
    op = pt @ Kronecker(Dense(G, psd=True, name="G"), a_node) @ p
    Pd = append_column_matrix(rows, cols)
    return op, Pd.mT @ torch.kron(G, A) @ Pd


KINDS = ["dense", "dense-general", "low-rank", "low-rank-wide", "low-rank-general"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("transposed_node", [True, False])
def test_bordered_kronecker_block_is_exact(kind, transposed_node):
    op, dense = kfac_block(4, 6, kind, 0, transposed_node)
    x = torch.randn(op.shape[1], dtype=F64, generator=torch.Generator().manual_seed(1))
    ref = dense @ x
    torch.testing.assert_close(op @ x, ref)
    out = torch.full((op.shape[0],), torch.nan, dtype=F64)
    torch.testing.assert_close(op.matvec(x, out=out), ref)
    X = torch.randn(op.shape[1], 3, dtype=F64)  # several columns: the factors in turn
    torch.testing.assert_close(op @ X, dense @ X)
    torch.testing.assert_close(op.matvec(X, out=torch.empty(op.shape[0], 3, dtype=F64)), dense @ X)


@pytest.mark.parametrize("kind", ["dense", "low-rank"])
def test_bordered_block_above_the_dense_limit(kind):
    rows, cols = 40, 80  # 3240 parameters
    assert rows * (cols + 1) > CompilePolicy().dense_limit
    op, dense = kfac_block(rows, cols, kind, 3)
    x = torch.randn(op.shape[1], dtype=F64, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(op @ x, dense @ x)
    bd = BlockDiag([op, Diagonal(torch.rand(5, dtype=F64) + 0.5)])
    y = torch.randn(bd.shape[1], dtype=F64)
    torch.testing.assert_close(bd @ y, torch.block_diag(dense, torch.diag(bd.blocks[1].d)) @ y)


def _allocations(f) -> list[int]:
    """The sizes (bytes) of the allocations that ``f()`` makes, in order."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        f()
    sizes = [e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    return [s for s in sizes if s > 0]


def _largest_allocation(f) -> int:
    return max(_allocations(f), default=0)


@pytest.mark.parametrize("kind", ["dense", "low-rank"])
def test_bordered_block_allocates_no_vector_of_its_size(kind):
    # P x, the block's product in Kronecker order and its reordering are never formed: the only
    # temporaries are X Aᵀ (rows × (cols + 1), dense A) or X V and G X V (rows × k, low rank)
    rows, cols = 8, 60
    op, dense = kfac_block(rows, cols, kind, 5)
    x = torch.randn(op.shape[1], dtype=F64)
    out = torch.empty(op.shape[0], dtype=F64)
    op.matvec(x, out=out)
    largest = _largest_allocation(lambda: op.matvec(x, out=out))
    k = cols + 1 if kind == "dense" else op.factors[1].factors[1].rank
    assert largest <= rows * k * 8
    total = sum(_allocations(lambda: op.matvec(x, out=out)))
    # one X Aᵀ (dense A), X V and G X V (low rank): less than the block's result
    assert total <= (rows * k if kind == "dense" else 2 * rows * k) * 8
    if kind == "low-rank":
        assert total < out.numel() * 8
    torch.testing.assert_close(out, dense @ x)


def test_block_diagonal_writes_each_block_into_its_rows():
    op1, d1 = kfac_block(6, 50, "low-rank", 6)
    op2, d2 = kfac_block(5, 7, "dense", 7)
    bd = BlockDiag([op1, op2, Dense(spd(torch.randn(4, 4, dtype=F64)))])
    dense = torch.block_diag(d1, d2, bd.blocks[2].M)
    x = torch.randn(bd.shape[1], dtype=F64)
    y = bd @ x
    torch.testing.assert_close(y, dense @ x)
    # the result (one allocation of its size) is the largest thing made: no per-block result
    # beside it, no concatenation
    largest = _largest_allocation(lambda: bd @ x)
    assert largest == bd.shape[0] * 8
    assert _largest_allocation(lambda: bd.matvec(x, out=y)) < op1.shape[0] * 8
    torch.testing.assert_close(y, dense @ x)
    torch.testing.assert_close(bd.T @ x, dense.mT @ x)  # the transposed product, block by block


@pytest.mark.parametrize("second", ["dense", "low-rank"])
def test_kronecker_writes_its_last_product_into_out(second):
    gen = torch.Generator().manual_seed(8)
    G = spd(rnd(gen, 6, 6))
    a_node, A = a_factor("dense" if second == "dense" else "low-rank", 39, gen)
    K = Kronecker(Dense(G), a_node)
    x = torch.randn(K.shape[1], dtype=F64)
    out = torch.empty(K.shape[0], dtype=F64)
    torch.testing.assert_close(K.matvec(x, out=out), torch.kron(G, A) @ x)
    # the product of two square factors needs one intermediate of the result's size (G X, or
    # X V and G X V of the low-rank factor's k columns), and nothing besides
    assert sum(_allocations(lambda: K.matvec(x, out=out))) <= out.numel() * 8


@pytest.mark.parametrize("kind", ["dense", "low-rank", "low-rank-general"])
def test_bordered_block_gradients(kind):
    # with leaves that require grad the fused routine steps aside (torch's out= products refuse
    # them): the product and its gradients are those of the dense twin
    def loss(leaf_grad: bool, use_out: bool):
        gen = torch.Generator().manual_seed(9)
        G = rnd(gen, 5, 5).requires_grad_(leaf_grad)
        a_node, A = a_factor(kind, 6, gen)
        p = AppendColumn(5, 6, dtype=F64)
        op = p.T @ Kronecker(Dense(G @ G.mT), a_node) @ p
        x = torch.randn(op.shape[1], dtype=F64, generator=gen).requires_grad_(True)
        y = op.matvec(x, out=torch.empty(op.shape[0], dtype=F64)) if use_out else op @ x
        Pd = append_column_matrix(5, 6)
        ref = Pd.mT @ torch.kron(G @ G.mT, A) @ Pd @ x
        return y, ref, [x] + ([G] if leaf_grad else [])

    for leaf_grad in (False, True):
        for use_out in (False, True):
            y, ref, leaves = loss(leaf_grad, use_out)
            torch.testing.assert_close(y, ref)
            g1 = torch.autograd.grad(y.square().sum(), leaves)
            y2, ref2, leaves2 = loss(leaf_grad, use_out)
            g2 = torch.autograd.grad(ref2.square().sum(), leaves2)
            for a, b in zip(g1, g2):
                torch.testing.assert_close(a, b)


def ekfac_block(rows, cols, thin, seed, evals_grad=False):
    gen = torch.Generator().manual_seed(seed)
    QG = torch.linalg.qr(rnd(gen, rows, rows))[0]
    QA = torch.linalg.qr(rnd(gen, cols + 1, cols + 1))[0]
    if thin:  # a thin input basis (cols + 1) × k, as EKFAC keeps for a low-rank A
        QA = QA[:, : max(1, (cols + 1) // 3)].contiguous()
    evals = (torch.rand(rows * QA.shape[1], dtype=F64, generator=gen) + 0.1).requires_grad_(
        evals_grad
    )
    p = AppendColumn(rows, cols, dtype=F64)
    Q = Kronecker(Dense(QG, orthogonal=True, name="Q_G"), Dense(QA, name="Q_A"))
    op = p.T @ Eigen(Q, evals) @ p
    Qd, Pd = torch.kron(QG.contiguous(), QA.contiguous()), append_column_matrix(rows, cols)
    return op, Pd.mT @ (Qd * evals) @ Qd.mT @ Pd, evals


@pytest.mark.parametrize("thin", [False, True])
@pytest.mark.parametrize("size", [(4, 6), (40, 80)])  # the second above the dense limit
def test_bordered_eigen_block_is_exact(thin, size):
    op, dense, _ = ekfac_block(*size, thin, 11)
    x = torch.randn(op.shape[1], dtype=F64, generator=torch.Generator().manual_seed(12))
    torch.testing.assert_close(op @ x, dense @ x)
    out = torch.full((op.shape[0],), torch.nan, dtype=F64)
    torch.testing.assert_close(op.matvec(x, out=out), dense @ x)
    X = torch.randn(op.shape[1], 2, dtype=F64)
    torch.testing.assert_close(op @ X, dense @ X)
    rows, cols = size
    k = rows * op.factors[1].Q.factors[1].shape[1]
    # X Q_A, Q_Gᵀ X Q_A and Q_G S: three temporaries of rows × k_A entries, no vector of the block
    assert sum(_allocations(lambda: op.matvec(x, out=out))) <= 3 * k * 8


def test_bordered_eigen_block_gradient_through_the_eigenvalues():
    op, dense, evals = ekfac_block(4, 5, True, 13, evals_grad=True)
    x = torch.randn(op.shape[1], dtype=F64)
    (g1,) = torch.autograd.grad((op @ x).square().sum(), evals)
    (g2,) = torch.autograd.grad((dense @ x).square().sum(), evals)
    torch.testing.assert_close(g1, g2)


def test_other_products_of_permutations_and_kroneckers_are_not_fused():
    # a Pᵀ·K·P whose two permutations differ in shape, or whose middle is not a Kronecker node,
    # takes the factors in turn (and stays exact)
    gen = torch.Generator().manual_seed(10)
    p, q = AppendColumn(3, 4, dtype=F64), AppendColumn(5, 2, dtype=F64)  # both of size 15
    M = rnd(gen, 15, 15)
    op = p.T @ Dense(M) @ q
    dense = append_column_matrix(3, 4).mT @ M @ append_column_matrix(5, 2)
    x = torch.randn(15, dtype=F64)
    torch.testing.assert_close(op @ x, dense @ x)
    torch.testing.assert_close(op.matvec(x, out=torch.empty(15, dtype=F64)), dense @ x)
    K = Kronecker(Dense(spd(rnd(gen, 3, 3))), Dense(spd(rnd(gen, 5, 5))))
    op2 = p.T @ K @ q
    dense2 = append_column_matrix(3, 4).mT @ K.to_dense() @ append_column_matrix(5, 2)
    torch.testing.assert_close(op2 @ x, dense2 @ x)
