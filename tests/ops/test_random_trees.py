"""Random composite trees through the generic suite.

Each seed draws a tree of depth ≤ 3 over every node kind (dense, diagonal, scaled identity, low
rank, Kronecker, block-diagonal, eigen, matrix-free, permutation congruence, and the spellings of a
damped scaled KFAC ``N·F + δ·I``) joined by sums,
positive scalings, congruences ``Xᵀ·T·X``, inverses, powers and shifts. Trees are symmetric
positive definite by construction, so every check of the suite applies; the dense twin is built
from the same leaves with plain torch.
"""

from __future__ import annotations

import torch

from nngeo_ops.ops import (
    AppendColumn,
    BlockDiag,
    Dense,
    Diagonal,
    Eigen,
    Identity,
    Kronecker,
    LowRank,
    MatFree,
    Permutation,
    ScaledIdentity,
)

from .suite import OperatorSuite

N = 12  # 12 = 3·4 = 2·6 = 5+7: every structured leaf fits


def _spd(B):
    return B @ B.mT / B.shape[0] + 0.5 * torch.eye(B.shape[0], dtype=B.dtype)


class _Spec:
    """Draws a tree shape with a generator, recording the leaf tensors it needs in order."""

    def __init__(self, gen):
        self.gen, self.tensors = gen, []

    def t(self, *shape):
        self.tensors.append(torch.randn(shape, generator=self.gen, dtype=torch.float64))
        return len(self.tensors) - 1

    def choice(self, k):
        return int(torch.randint(k, (1,), generator=self.gen))

    def leaf(self, n):
        kinds = ["dense", "diag", "shift", "eigen", "matfree"]
        if n == N:
            kinds += ["kron", "blockdiag", "laplace"]
        kind = kinds[self.choice(len(kinds))]
        if kind == "dense":
            return ("dense", self.t(n, n))
        if kind == "diag":
            return ("diag", self.t(n))
        if kind == "shift":
            return ("shift", self.t())
        if kind == "eigen":
            return ("eigen", self.t(n, n), self.t(n))
        if kind == "matfree":
            return ("matfree", self.t(n, n))
        if kind == "kron":
            return ("kron", self.t(3, 3), self.t(4, 4))
        if kind == "laplace":  # N·F + prior, F = BlockDiag[Pᵀ(G⊗A)P, G₂⊗A₂], in one of 4 spellings
            return (
                "laplace",
                self.choice(4),
                self.t(2, 2),
                self.t(3, 3),
                self.t(2, 2),
                self.t(3, 3),
            )
        return ("blockdiag", self.t(5, 5), self.t(7))

    def tree(self, depth, n=N):
        if depth == 0:
            return self.leaf(n)
        kinds = ["sum", "scale", "congruence", "perm", "inverse", "power", "damp", "lowrank"]
        kind = kinds[self.choice(len(kinds))]
        sub = self.tree(depth - 1, n)
        if kind == "sum":
            return ("sum", sub, self.tree(depth - 1, n))
        if kind == "scale":
            return ("scale", sub, self.t())
        if kind == "congruence":
            return ("congruence", sub, self.t(n, n))
        if kind == "perm":
            return ("perm", sub, self.choice(10_000))
        if kind == "inverse":
            return ("inverse", sub)
        if kind == "power":
            return ("power", sub, [0.5, 2.0, -0.5][self.choice(3)])
        if kind == "damp":
            return ("damp", sub, self.t())
        return ("lowrank", sub, self.t(n, 2))


def _build(spec, p):
    """(node, dense twin) of a spec over the leaf tensors ``p``."""
    kind, *a = spec
    if kind == "dense":
        M = _spd(p[a[0]])
        return Dense(M, psd=True), M
    if kind == "diag":
        d = p[a[0]].square() + 0.5
        return Diagonal(d), torch.diag(d)
    if kind == "shift":
        c = p[a[0]].square() + 0.5
        return ScaledIdentity(c, N), c * torch.eye(N, dtype=c.dtype)
    if kind == "eigen":
        Q, lam = torch.linalg.qr(p[a[0]])[0], p[a[1]].square() + 0.5
        return Eigen(Q, lam), (Q * lam) @ Q.mT
    if kind == "matfree":
        M = _spd(p[a[0]])
        return MatFree(lambda X: M @ X, M.shape, M.dtype, symmetric=True, psd=True, batched=True), M
    if kind == "kron":
        A, G = _spd(p[a[0]]), _spd(p[a[1]])
        return Kronecker(Dense(A, psd=True), Dense(G, psd=True)), torch.kron(A, G)
    if kind == "laplace":
        return laplace_spelling(a[0], *[_spd(p[i]) for i in a[1:]], N=3.0, deltas=(0.2, 0.7))
    if kind == "blockdiag":
        A, d = _spd(p[a[0]]), p[a[1]].square() + 0.5
        return BlockDiag([Dense(A, psd=True), Diagonal(d)]), torch.block_diag(A, torch.diag(d))
    op, D = _build(a[0], p)
    n = D.shape[0]
    if kind == "sum":
        op2, D2 = _build(a[1], p)
        return op + op2, D + D2
    if kind == "scale":
        c = p[a[1]].square() + 0.5
        return c * op, c * D
    if kind == "congruence":
        X = p[a[1]] + 3 * torch.eye(n, dtype=D.dtype)
        Xn = Dense(X)
        return Xn.T @ op @ Xn, X.mT @ D @ X
    if kind == "perm":
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(a[1]))
        P = Permutation(perm, dtype=D.dtype)
        Pd = torch.eye(n, dtype=D.dtype)[perm]
        return P.T @ op @ P, Pd.mT @ D @ Pd
    if kind == "inverse":
        return op.inv(), torch.linalg.inv(D)
    if kind == "power":
        return op.pow(a[1]), _dense_power(D, a[1])
    if kind == "damp":
        c = p[a[1]].square() + 0.1
        return op + c * Identity(n), D + c * torch.eye(n, dtype=D.dtype)
    U = p[a[1]]
    return op + LowRank(U), D + U @ U.mT


def _kfac_like(G, A, G2, A2):
    """(F, dense F): a KFAC-shaped BlockDiag[Pᵀ(G⊗A)P, G₂⊗A₂] (the first block with a bias column,
    permuted to parameter order as nn.PMatKFAC does)."""
    P = AppendColumn(G.shape[0], A.shape[0] - 1, dtype=G.dtype)
    K1 = Kronecker(Dense(G, psd=True, name="G"), Dense(A, psd=True, name="A"))
    K2 = Kronecker(Dense(G2, psd=True, name="G"), Dense(A2, psd=True, name="A"))
    F = BlockDiag([P.T @ K1 @ P, K2])
    Pd = torch.eye(P.shape[0], dtype=G.dtype)[P.perm]
    Fd = torch.block_diag(Pd.mT @ torch.kron(G, A) @ Pd, torch.kron(G2, A2))
    return F, Fd


def laplace_spelling(which, G, A, G2, A2, N, deltas):
    """(op, dense) of a damped, scaled KFAC ``N·F + prior`` written one of four ways."""
    F, Fd = _kfac_like(G, A, G2, A2)
    n1, n = F.blocks[0].shape[0], F.shape[0]
    d1, d2 = deltas
    eye = torch.eye(n, dtype=Fd.dtype)
    if which == 0:
        return N * F + d1 * Identity(n), N * Fd + d1 * eye
    if which == 1:
        return N * (F + (d1 / N) * Identity(n)), N * Fd + d1 * eye
    if which == 2:
        prior = BlockDiag([d1 * Identity(n1), d2 * Identity(n - n1)])
        ones = torch.ones(n, dtype=Fd.dtype)
        D = torch.diag(torch.cat([d1 * ones[:n1], d2 * ones[n1:]]))
        return N * F + prior, N * Fd + D
    return d1 * Identity(n) + F * N, N * Fd + d1 * eye


def _dense_power(D, p):
    """``D^p`` for SPD ``D`` without eigh, whose gradient is NaN for repeated eigenvalues (a
    shifted identity): Denman–Beavers iteration for the square root and its inverse."""
    if p == 2.0:
        return D @ D
    Y, Z = D, torch.eye(D.shape[0], dtype=D.dtype)
    for _ in range(60):
        Y, Z = (Y + torch.linalg.inv(Z)) / 2, (Z + torch.linalg.inv(Y)) / 2
    return Y if p == 0.5 else Z


class TestRandomTrees(OperatorSuite):
    symmetric = psd = True
    seeds = tuple(range(24))
    cond_scale = 1e3  # products and powers of random SPD matrices are moderately ill-conditioned

    def params(self, dtype, gen):
        s = _Spec(gen)
        self._spec = s.tree(depth=1 + s.choice(3))
        return s.tensors

    def build(self, p):
        return _build(self._spec, p)
