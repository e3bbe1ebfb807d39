"""Every node kind through the generic suite, each against a dense twin built with plain torch."""

from __future__ import annotations

import pytest
import torch

from nngeo_ops.ops import (
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

from .suite import OperatorSuite, rnd, spd

F64 = torch.float64


def orth(B):
    return torch.linalg.qr(B)[0]


class TestDenseGeneral(OperatorSuite):
    def params(self, dtype, gen):
        return [rnd(gen, 6, 6) + 4 * torch.eye(6, dtype=F64)]

    def build(self, p):
        return Dense(p[0]), p[0]


class TestDensePSD(OperatorSuite):
    symmetric = psd = True

    def params(self, dtype, gen):
        return [rnd(gen, 7, 7)]

    def build(self, p):
        M = spd(p[0])
        return Dense(M, psd=True, name="A"), M


class TestDensePSDAboveSymvSize(OperatorSuite):
    """A bitwise symmetric Dense above ``SYMV_MIN_SIZE``: its products read one triangle (BLAS symv)."""

    symmetric = psd = True

    def params(self, dtype, gen):
        return [rnd(gen, 520, 520)]

    def build(self, p):
        M = spd(p[0])
        M = (M + M.mT) / 2  # bitwise symmetric
        return Dense(M, psd=True, name="A"), M


class TestDenseRectangular(OperatorSuite):
    square = invertible = False

    def params(self, dtype, gen):
        return [rnd(gen, 5, 3)]

    def build(self, p):
        return Dense(p[0]), p[0]


class TestDiagonal(OperatorSuite):
    symmetric = psd = True

    def params(self, dtype, gen):
        return [rnd(gen, 6)]

    def build(self, p):
        d = p[0].square() + 0.5
        return Diagonal(d), torch.diag(d)


class TestDiagonalIndefinite(OperatorSuite):
    symmetric = True

    def params(self, dtype, gen):
        return [torch.tensor([1.0, -2.0, 3.0, -0.5, 2.0], dtype=F64)]

    def build(self, p):
        return Diagonal(p[0]), torch.diag(p[0])


class TestScaledIdentity(OperatorSuite):
    symmetric = psd = True

    def params(self, dtype, gen):
        return [torch.tensor(1.7, dtype=F64)]

    def build(self, p):
        return ScaledIdentity(p[0], 5), p[0] * torch.eye(5, dtype=p[0].dtype)


class TestLowRankSymmetric(OperatorSuite):
    symmetric = psd = True
    invertible = False

    def params(self, dtype, gen):
        return [rnd(gen, 8, 2)]

    def build(self, p):
        return LowRank(p[0]), p[0] @ p[0].mT


class TestLowRankGeneral(OperatorSuite):
    square = invertible = False

    def params(self, dtype, gen):
        return [rnd(gen, 6, 2), rnd(gen, 2, 2), rnd(gen, 4, 2)]

    def build(self, p):
        U, C, V = p
        return LowRank(U, C, V), U @ C @ V.mT


class TestKroneckerPSD(OperatorSuite):
    symmetric = psd = True

    def params(self, dtype, gen):
        return [rnd(gen, 3, 3), rnd(gen, 4, 4)]

    def build(self, p):
        A, G = spd(p[0]), spd(p[1])
        return Kronecker(Dense(A, psd=True, name="A"), Dense(G, psd=True, name="G")), torch.kron(
            A, G
        )


class TestKroneckerThreeGeneral(OperatorSuite):
    def params(self, dtype, gen):
        return [
            rnd(gen, 2, 2) + 3 * torch.eye(2, dtype=F64),
            rnd(gen, 3, 3) + 3 * torch.eye(3, dtype=F64),
            rnd(gen, 2, 2) + 3 * torch.eye(2, dtype=F64),
        ]

    def build(self, p):
        return Kronecker(*p), torch.kron(torch.kron(p[0], p[1]), p[2])


class TestKroneckerRectangular(OperatorSuite):
    square = invertible = False

    def params(self, dtype, gen):
        return [rnd(gen, 2, 3), rnd(gen, 4, 2)]

    def build(self, p):
        return Kronecker(p[0], p[1]), torch.kron(p[0], p[1])


class TestBlockDiag(OperatorSuite):
    symmetric = psd = True

    def params(self, dtype, gen):
        return [rnd(gen, 3, 3), rnd(gen, 4), rnd(gen, 2, 2), rnd(gen, 2, 2)]

    def build(self, p):
        A, d, B, C = spd(p[0]), p[1].square() + 0.1, spd(p[2]), spd(p[3])
        op = BlockDiag(
            [Dense(A, psd=True), Diagonal(d), Kronecker(Dense(B, psd=True), Dense(C, psd=True))]
        )
        return op, torch.block_diag(A, torch.diag(d), torch.kron(B, C))


class TestEigenDense(OperatorSuite):
    symmetric = psd = True

    def params(self, dtype, gen):
        return [rnd(gen, 6, 6), rnd(gen, 6)]

    def build(self, p):
        Q, lam = orth(p[0]), p[1].square() + 0.2
        return Eigen(Q, lam), Q @ torch.diag(lam) @ Q.mT


class TestEigenKroneckerBasis(OperatorSuite):
    symmetric = psd = True

    def params(self, dtype, gen):
        return [rnd(gen, 3, 3), rnd(gen, 4, 4), rnd(gen, 12)]

    def build(self, p):
        Q1, Q2, lam = orth(p[0]), orth(p[1]), p[2].square() + 0.3
        Q = torch.kron(Q1, Q2)
        basis = Kronecker(Dense(Q1, orthogonal=True), Dense(Q2, orthogonal=True))
        return Eigen(basis, lam), Q @ torch.diag(lam) @ Q.mT


class TestEigenTruncated(OperatorSuite):
    symmetric = psd = True
    invertible = False

    def params(self, dtype, gen):
        return [rnd(gen, 7, 3), rnd(gen, 3)]

    def build(self, p):
        Q, lam = orth(p[0]), p[1].square() + 0.5
        return Eigen(Q, lam), Q @ torch.diag(lam) @ Q.mT


class TestPermutation(OperatorSuite):
    def params(self, dtype, gen):
        return [torch.tensor([2, 0, 4, 1, 3]), torch.zeros((), dtype=F64)]

    def build(self, p):
        dtype = p[1].dtype  # carries the dtype the case is built in
        return Permutation(p[0], dtype=dtype), torch.eye(5, dtype=dtype)[p[0]]


class TestMatFree(OperatorSuite):
    symmetric = psd = True

    def params(self, dtype, gen):
        return [rnd(gen, 6, 6)]

    def build(self, p):
        M = spd(p[0])
        return MatFree(
            lambda x: M @ x, (6, 6), dtype=M.dtype, symmetric=True, psd=True, name="H"
        ), M


class TestMatFreeBatchedGeneral(OperatorSuite):
    def params(self, dtype, gen):
        return [rnd(gen, 5, 5) + 4 * torch.eye(5, dtype=F64)]

    def build(self, p):
        M = p[0]
        op = MatFree(
            lambda X: M @ X, (5, 5), dtype=M.dtype, rmatvec=lambda X: M.mT @ X, batched=True
        )
        return op, M


# ------------------------------------------------------------------ composites named by pattern
class TestDiagPlusLowRank(OperatorSuite):
    symmetric = psd = True

    def params(self, dtype, gen):
        return [rnd(gen, 9), rnd(gen, 9, 3)]

    def build(self, p):
        d, U = p[0].square() + 0.5, p[1]
        return Diagonal(d) + LowRank(U), torch.diag(d) + U @ U.mT


class TestLowRankPlusShift(OperatorSuite):
    symmetric = psd = True

    def params(self, dtype, gen):
        return [rnd(gen, 9, 2), rnd(gen, 2, 2)]

    def build(self, p):
        U, C = p[0], spd(p[1])
        return LowRank(U, C, psd=True) + 0.7 * Identity(9), U @ C @ U.mT + 0.7 * torch.eye(
            9, dtype=U.dtype
        )


class TestDampedKronecker(OperatorSuite):
    symmetric = psd = True

    def params(self, dtype, gen):
        return [rnd(gen, 3, 3), rnd(gen, 4, 4)]

    def build(self, p):
        A, G = spd(p[0]) - 0.9 * torch.eye(3, dtype=p[0].dtype), spd(p[1])
        op = Kronecker(Dense(A, psd=True), Dense(G, psd=True)) + 0.05 * Identity(12)
        return op, torch.kron(A, G) + 0.05 * torch.eye(12, dtype=A.dtype)


class TestPermutedKronecker(OperatorSuite):
    """A KFAC block with bias: ``Pᵀ (G⊗A) P`` reorders kron order into parameter order."""

    symmetric = psd = True

    def params(self, dtype, gen):
        return [rnd(gen, 3, 3), rnd(gen, 2, 2), torch.randperm(6, generator=gen)]

    def build(self, p):
        A, G, perm = spd(p[0]), spd(p[1]), p[2]
        P = Permutation(perm, dtype=A.dtype)
        Pd = torch.eye(6, dtype=A.dtype)[perm]
        op = P.T @ Kronecker(Dense(G, psd=True), Dense(A, psd=True)) @ P
        return op, Pd.mT @ torch.kron(G, A) @ Pd


class TestGaussNewtonPattern(OperatorSuite):
    """``Jᵀ H J`` with a tall-wide J: a PSD product that is never formed as P×P by rewrites."""

    symmetric = psd = True
    invertible = False

    def params(self, dtype, gen):
        return [rnd(gen, 3, 7), rnd(gen, 3, 3)]

    def build(self, p):
        J, H = p[0], spd(p[1])
        Jop = Dense(J, name="J")
        return Jop.T @ Dense(H, psd=True, name="H") @ Jop, J.mT @ H @ J


class TestInverseNode(OperatorSuite):
    symmetric = psd = True
    cond_scale = 10

    def params(self, dtype, gen):
        return [rnd(gen, 5, 5)]

    def build(self, p):
        M = spd(p[0])
        return Dense(M, psd=True).inv(), torch.linalg.inv(M)


class TestPowerNode(OperatorSuite):
    symmetric = psd = True
    cond_scale = 10

    def params(self, dtype, gen):
        return [rnd(gen, 5, 5)]

    def build(self, p):
        M = spd(p[0])
        ev, Q = torch.linalg.eigh(M)
        return Dense(M, psd=True).pow(1.5), (Q * ev**1.5) @ Q.mT


class TestScaledTransposeSum(OperatorSuite):
    def params(self, dtype, gen):
        return [rnd(gen, 5, 5), rnd(gen, 5), torch.tensor(-1.3, dtype=F64)]

    def build(self, p):
        M, d, c = p[0] + 5 * torch.eye(5, dtype=p[0].dtype), p[1], p[2]
        op = c * Dense(M).T + Diagonal(d)
        return op, c * M.mT + torch.diag(d)


class TestDampedKroneckerLowRankFactor(OperatorSuite):
    """A KFAC block whose input factor comes from fewer examples than inputs: ``G ⊗ (U Uᵀ) + c·I``,
    solved through a completed basis of the low-rank factor."""

    symmetric = psd = True

    def params(self, dtype, gen):
        return [rnd(gen, 5, 2), rnd(gen, 3, 3)]

    def build(self, p):
        U, G = p[0], spd(p[1])
        op = Kronecker(Dense(G, psd=True), LowRank(U, name="A")) + 0.05 * Identity(15)
        return op, torch.kron(G, U @ U.mT) + 0.05 * torch.eye(15, dtype=U.dtype)


class TestKroneckerLowRankFactor(OperatorSuite):
    symmetric = psd = True
    invertible = False

    def params(self, dtype, gen):
        return [rnd(gen, 3, 3), rnd(gen, 4, 2)]

    def build(self, p):
        G, U = spd(p[0]), p[1]
        return Kronecker(Dense(G, psd=True), LowRank(U)), torch.kron(G, U @ U.mT)


class TestKroneckerGeneralLowRankFactor(OperatorSuite):
    """``G ⊗ (U C Vᵀ)`` with a rectangular G and a rank-2 general factor: the product
    ``G ((X V) Cᵀ) Uᵀ`` that applies G to the rank's columns."""

    square = invertible = False

    def params(self, dtype, gen):
        return [rnd(gen, 3, 5), rnd(gen, 6, 2), rnd(gen, 2, 2), rnd(gen, 4, 2)]

    def build(self, p):
        G, U, C, V = p
        return Kronecker(Dense(G), LowRank(U, C, V)), torch.kron(G, U @ C @ V.mT)


class TestDampedGaussNewtonPattern(OperatorSuite):
    """``Jᵀ H J + c·I`` with a wide J (3 × 7): solved and log-determined in function space (a 3 × 3
    system); H is a PSD, here singular, output-space matrix."""

    symmetric = psd = True

    def params(self, dtype, gen):
        return [rnd(gen, 3, 7), rnd(gen, 3, 2)]

    def build(self, p):
        J, L = p
        H = L @ L.mT  # rank 2: no H⁻¹ may be needed
        Jop = MatFree(
            lambda X: J @ X, (3, 7), J.dtype, rmatvec=lambda X: J.mT @ X, batched=True, name="J"
        )
        op = Jop.T @ Dense(H, psd=True, name="H") @ Jop + 0.3 * Identity(7)
        return op, J.mT @ H @ J + 0.3 * torch.eye(7, dtype=J.dtype)


class TestAppendColumn(OperatorSuite):
    """A layer's (weights, bias) into Kronecker order, by concatenation instead of a gather."""

    def params(self, dtype, gen):
        return [torch.zeros((), dtype=F64)]

    def build(self, p):
        from nngeo_ops.ops import AppendColumn

        dtype = p[0].dtype  # carries the dtype the case is built in
        r = torch.arange(3)[:, None]
        j = torch.arange(5)[None, :]
        perm = torch.where(j < 4, r * 4 + j, 12 + r).reshape(-1)
        return AppendColumn(3, 4, dtype=dtype), torch.eye(15, dtype=dtype)[perm]


class TestAppendColumnCongruence(OperatorSuite):
    """``Pᵀ (G ⊗ A) P + c·I`` with the fast P and its fast transpose."""

    symmetric = psd = True

    def params(self, dtype, gen):
        return [rnd(gen, 2, 2), rnd(gen, 4, 4)]

    def build(self, p):
        from nngeo_ops.ops import AppendColumn

        G, A = spd(p[0]), spd(p[1])
        P = AppendColumn(2, 3, dtype=G.dtype)
        Pd = P.to_dense()
        op = P.T @ Kronecker(Dense(G, psd=True), Dense(A, psd=True)) @ P + 0.1 * Identity(8)
        return op, Pd.mT @ torch.kron(G, A) @ Pd + 0.1 * torch.eye(8, dtype=G.dtype)


@pytest.mark.parametrize("shift", ["scalar", "diagonal"])
def test_dense_absorbs_a_shift_into_a_copy_with_gradients(shift):
    # Dense(M) + c·I (or + diag(d)) is rewritten to one ShiftedDense node over M (factorised through
    # a shifted copy); M itself is left as it was, and gradients reach c (or d)
    g = torch.Generator().manual_seed(3)
    R = torch.randn(6, 6, dtype=torch.float64, generator=g)
    M = R @ R.T
    M0 = M.clone()
    if shift == "scalar":
        c = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
        op, dense = Dense(M, psd=True) + c * Identity(6), M + c * torch.eye(6, dtype=torch.float64)
        leaf = c
    else:
        d = torch.rand(6, dtype=torch.float64, generator=g).add_(0.1).requires_grad_(True)
        op, dense = Dense(M, psd=True) + Diagonal(d), M + torch.diag(d)
        leaf = d
    b = torch.randn(6, dtype=torch.float64, generator=g)
    torch.testing.assert_close(op.solve(b), torch.linalg.solve(dense, b))
    got = torch.autograd.grad(op.logdet(), leaf)[0]
    want = torch.autograd.grad(torch.logdet(dense), leaf)[0]
    torch.testing.assert_close(got, want)
    assert torch.equal(M, M0)
