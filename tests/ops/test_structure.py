"""Which routine ran: structured paths are proven through explain(), routine names and counters."""

from __future__ import annotations

import pytest
import torch

from nngeo_ops.ops import (
    FACTORIZATIONS,
    BlockDiag,
    CompilePolicy,
    Dense,
    Diagonal,
    Eigen,
    Identity,
    Kronecker,
    LinearOperator,
    LowRank,
    MatFree,
    Permutation,
    Product,
    Sum,
)

F64 = torch.float64


def spd(n, seed):
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(n, n, generator=g, dtype=F64)
    return B @ B.mT / n + 0.1 * torch.eye(n, dtype=F64)


@pytest.fixture
def no_dense(monkeypatch):
    """Fail the test if anything materialises a composite or Kronecker node densely."""

    def boom(self):
        raise AssertionError(f"{type(self).__name__}.to_dense() was called")

    for cls in (Kronecker, Sum, Product, LinearOperator):
        monkeypatch.setattr(cls, "to_dense", boom)


def test_damped_kronecker_never_builds_the_big_matrix(no_dense):
    A, G = spd(30, 0), spd(40, 1)  # P = 1200
    K = Kronecker(Dense(A, psd=True, name="A"), Dense(G, psd=True, name="G")) + 1e-3 * Identity(
        1200
    )
    b = torch.randn(1200, dtype=F64)
    c = K.compile()
    x = c.solve(b)
    ld = c.logdet()
    assert "absorb shift" in c.explain()
    assert c.routine("solve") == "eigen form: Q diag(1/λ) Qᵀ"
    assert str(c.simplified) == "Eig[(Q_A⊗Q_G)]"
    # check against the dense truth, computed outside the library
    D = torch.kron(A, G) + 1e-3 * torch.eye(1200, dtype=F64)
    torch.testing.assert_close(x, torch.linalg.solve(D, b))
    torch.testing.assert_close(ld, torch.logdet(D))


def test_new_damping_reuses_factor_eigendecompositions():
    A, G = Dense(spd(6, 2), psd=True), Dense(spd(5, 3), psd=True)
    K = Kronecker(A, G)
    b = torch.randn(30, dtype=F64)
    (K + 0.1 * Identity(30)).solve(b)
    before = FACTORIZATIONS["eigh"]
    for lam in (0.01, 1.0, 10.0):
        (K + lam * Identity(30)).solve(b)
    assert FACTORIZATIONS["eigh"] == before
    A.M.mul_(2.0)  # an in-place update of a factor invalidates its cached eigh
    x = (K + 0.1 * Identity(30)).solve(b)
    assert FACTORIZATIONS["eigh"] == before + 1
    D = torch.kron(A.M, G.M) + 0.1 * torch.eye(30, dtype=F64)
    torch.testing.assert_close(x, torch.linalg.solve(D, b))


def test_woodbury_for_diagonal_plus_low_rank_in_either_order(no_dense):
    n = 500
    d = torch.rand(n, dtype=F64) + 0.5
    U = torch.randn(n, 4, dtype=F64)
    b = torch.randn(n, dtype=F64)
    D = torch.diag(d) + U @ U.mT
    for op in (Diagonal(d) + LowRank(U), LowRank(U) + Diagonal(d)):
        c = op.compile()
        torch.testing.assert_close(c.solve(b), torch.linalg.solve(D, b))
        torch.testing.assert_close(c.logdet(), torch.logdet(D))
        assert c.routine("solve") == "Woodbury (structured + low rank)"
        assert c.routine("slogdet") == "determinant lemma (structured + low rank)"
        assert str(c.simplified) == "UUᵀ+diag"


def test_woodbury_over_a_damped_kronecker(no_dense):
    A, G = spd(5, 4), spd(6, 5)
    U = torch.randn(30, 2, dtype=F64)
    op = Kronecker(Dense(A, psd=True), Dense(G, psd=True)) + LowRank(U) + 0.2 * Identity(30)
    c = op.compile()
    b = torch.randn(30, dtype=F64)
    D = torch.kron(A, G) + U @ U.mT + 0.2 * torch.eye(30, dtype=F64)
    torch.testing.assert_close(c.solve(b), torch.linalg.solve(D, b))
    torch.testing.assert_close(c.logdet(), torch.logdet(D))
    assert c.routine("solve") == "Woodbury (structured + low rank)"


def test_eigen_plus_shift_and_kronecker_of_eigen_forms():
    Q1 = torch.linalg.qr(torch.randn(3, 3, dtype=F64))[0]
    Q2 = torch.linalg.qr(torch.randn(4, 4, dtype=F64))[0]
    l1, l2 = torch.rand(3, dtype=F64) + 0.1, torch.rand(4, dtype=F64) + 0.1
    E = Kronecker(Eigen(Q1, l1), Eigen(Q2, l2))
    s = E.simplify()
    assert isinstance(s, Eigen) and isinstance(s.Q, Kronecker)
    shifted = (E + 0.5 * Identity(12)).simplify()
    assert isinstance(shifted, Eigen)
    D = torch.kron((Q1 * l1) @ Q1.T, (Q2 * l2) @ Q2.T) + 0.5 * torch.eye(12, dtype=F64)
    torch.testing.assert_close(shifted.to_dense(), D)


def test_mixed_product_rule():
    A, B, C, Dm = (torch.randn(3, 3, dtype=F64) for _ in range(4))
    op = (Kronecker(A, B) @ Kronecker(C, Dm)).simplify()
    assert isinstance(op, Kronecker)
    torch.testing.assert_close(op.to_dense(), torch.kron(A @ C, B @ Dm))


def test_aligned_blockdiag_product_and_inverse_rules():
    A, B = spd(3, 6), spd(4, 7)
    X = BlockDiag([Dense(A), Dense(B)])
    prod = (X @ X).simplify()
    assert isinstance(prod, BlockDiag)
    torch.testing.assert_close(prod.to_dense(), torch.block_diag(A @ A, B @ B))
    inv = X.inv().simplify()
    assert isinstance(inv, BlockDiag)
    assert isinstance(Kronecker(Dense(A), Dense(B)).inv().simplify(), Kronecker)
    assert isinstance(Diagonal(torch.rand(4, dtype=F64) + 1).inv().simplify(), Diagonal)
    assert str((3.0 * Identity(4)).inv().simplify()) == "0.3333·I"
    assert str(X.inv().inv().simplify()) == str(X)


def test_damped_permuted_kronecker_goes_through_the_factors(no_dense):
    A, G = spd(3, 8), spd(4, 9)
    perm = torch.randperm(12)
    P = Permutation(perm, dtype=F64)
    op = BlockDiag(
        [
            P.T @ Kronecker(Dense(G, psd=True), Dense(A, psd=True)) @ P,
            Diagonal(torch.ones(2, dtype=F64)),
        ]
    )
    damped = op + 0.01 * Identity(14)
    c = damped.compile()
    b = torch.randn(14, dtype=F64)
    Pd = torch.eye(12, dtype=F64)[perm]
    D = torch.block_diag(Pd.T @ torch.kron(G, A) @ Pd, torch.eye(2, dtype=F64)) + 0.01 * torch.eye(
        14, dtype=F64
    )
    torch.testing.assert_close(c.solve(b), torch.linalg.solve(D, b))
    torch.testing.assert_close(c.logdet(), torch.logdet(D))
    torch.testing.assert_close(damped.diag(), D.diagonal())
    assert "Eig[" in str(c.simplified)


def test_iterative_fallback_is_reported():
    M = spd(40, 10)
    op = MatFree(lambda x: M @ x, (40, 40), F64, symmetric=True, psd=True, name="H")
    c = op.compile(CompilePolicy(dense_limit=0, cg_tol=1e-12))
    b = torch.randn(40, dtype=F64)
    torch.testing.assert_close(c.solve(b), torch.linalg.solve(M, b), rtol=1e-7, atol=1e-8)
    assert c.routine("solve") == "conjugate gradients (iterative fallback)"
    assert "conjugate gradients" in c.explain()
    t = c.trace()
    assert c.routine("trace") == "sum of diagonal / Hutch++ (fallback)"
    assert abs(float(t) - float(M.trace())) < 0.2 * float(M.trace())
    dense = op.compile()
    dense.solve(b)
    assert dense.routine("solve") == "dense factorisation (fallback)"


def test_explain_lists_rewrites_routines_and_cache():
    A, G = Dense(spd(3, 11), psd=True, name="A"), Dense(spd(2, 12), psd=True, name="G")
    c = (Kronecker(A, G) + 0.1 * Identity(6)).compile()
    c.solve(torch.randn(6, dtype=F64))
    text = c.explain()
    for needle in (
        "expression: (A⊗G)+0.1·I",
        "absorb shift",
        "solve",
        "cached factorisations",
        "A (3×3): eigh",
    ):
        assert needle in text


def test_printing():
    A, G = Dense(spd(3, 0), name="A"), Dense(spd(2, 0), name="G")
    K = Kronecker(A, G) + 0.1 * Identity(6)
    assert str(K) == "(A⊗G)+0.1·I"
    assert repr(K).startswith("<Sum 6×6 float64 cpu [symmetric")
    J = Dense(torch.randn(2, 6, dtype=F64), name="J")
    assert str(J.T @ Dense(torch.eye(2, dtype=F64), name="H") @ J) == "Jᵀ·H·J"
    assert str(K.inv()) == "((A⊗G)+0.1·I)⁻¹"


def test_gauss_newton_product_is_tagged_psd():
    J = Dense(torch.randn(3, 8, dtype=F64), name="J")
    H = Dense(spd(3, 1), psd=True, name="H")
    GN = J.T @ H @ J
    assert GN.symmetric and GN.psd
    assert not (J.T @ J @ Dense(spd(8, 2))).symmetric


def test_float32_eigh_in_float32_with_float64_fallback(monkeypatch):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 30, generator=g)
    m = x.T @ x
    basis = Dense(m, psd=True).eigh_factors()[1]
    assert basis.dtype == torch.float32 and basis.is_contiguous()  # row-major, own precision
    calls = []
    real_eigh = torch.linalg.eigh

    def flaky(a, *args, **kw):  # the float32 solver fails to converge
        calls.append(a.dtype)
        if a.dtype == torch.float32:
            raise RuntimeError("linalg.eigh: the algorithm failed to converge")
        return real_eigh(a, *args, **kw)

    monkeypatch.setattr(torch.linalg, "eigh", flaky)
    D = Dense(m.clone(), psd=True)
    evals, Q = D.eigh_factors()
    assert calls == [torch.float32, torch.float64]
    assert evals.dtype == Q.dtype == torch.float32
    truth = torch.linalg.eigvalsh(m.double())
    torch.testing.assert_close(evals.double(), truth, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(Q @ torch.diag(evals) @ Q.T, m, rtol=1e-4, atol=1e-3)


def test_function_space_solve_reports_a_singular_system():
    # Xᵀ M X + c·I with an indefinite M that cancels the shift exactly on range(Xᵀ): singular
    import pytest

    from nngeo_ops.errors import SingularError
    from nngeo_ops.ops import Dense, Identity, MatFree

    X = torch.zeros(2, 5, dtype=torch.float64)
    X[0, 0] = X[1, 1] = 1.0  # X Xᵀ = I
    Xop = MatFree(
        lambda V: X @ V, (2, 5), X.dtype, rmatvec=lambda V: X.mT @ V, batched=True, name="X"
    )
    M = Dense(-torch.eye(2, dtype=torch.float64), symmetric=True, name="M")
    op = Xop.T @ M @ Xop + 1.0 * Identity(5)
    with pytest.raises(SingularError, match="function-space system"):
        op.solve(torch.ones(5, dtype=torch.float64))


def test_gram_rules_need_a_symmetric_core():
    # tr and ‖·‖ of Xᵀ M X from X Xᵀ: the norm formula tr((MK)²) holds for a symmetric M only; a
    # general M takes the generic routes, and both agree with the dense matrix
    from nngeo_ops.ops import Dense, MatFree

    g = torch.Generator().manual_seed(3)
    X = torch.randn(3, 6, dtype=torch.float64, generator=g)
    for M in (torch.randn(3, 3, dtype=torch.float64, generator=g), None):
        M = M if M is not None else torch.eye(3, dtype=torch.float64) * 2.0
        Xop = MatFree(lambda V: X @ V, (3, 6), X.dtype, rmatvec=lambda V: X.mT @ V, batched=True)
        Xop.gram = lambda: X @ X.mT
        op = Xop.T @ Dense(M, symmetric=None) @ Xop
        dense = X.mT @ M @ X
        c = op.compile()
        torch.testing.assert_close(c.frobenius_norm(), torch.linalg.matrix_norm(dense))
        torch.testing.assert_close(c.trace(), dense.trace())
        assert ("from the Gram matrix" in c.explain()) == bool(torch.equal(M, M.mT))
