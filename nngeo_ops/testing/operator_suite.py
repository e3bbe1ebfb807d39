"""The generic operator test suite: one set of checks that every node kind and every random
composite tree inherits.

A subclass supplies ``params(dtype, gen)`` (leaf tensors, which the gradient checks differentiate)
and ``build(params) -> (op, dense)``, where ``dense`` is the matrix built independently from the
same leaves with plain torch (``torch.kron``, ``torch.block_diag``, ``@``, ...). Flags say which checks
apply: ``square``, ``invertible``, ``symmetric``, ``psd``.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse.linalg as spla
import torch

from nngeo_ops.ops import FACTORIZATIONS, Identity

TOL = {torch.float64: 1e-8, torch.float32: 2e-3}


def close(a: torch.Tensor, b: torch.Tensor, dtype=torch.float64, scale: float = 1.0) -> None:
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    err = float((a.double() - b.double()).norm())
    ref = max(float(b.double().norm()), 1.0)
    assert err <= TOL[dtype] * scale * ref, f"relative error {err / ref:.3g}"


class OperatorSuite:
    square = True
    invertible = True
    symmetric = False
    psd = False
    seeds = (0,)
    cond_scale = 1.0  # widen tolerances for ill-conditioned cases

    def pytest_generate_tests(self, metafunc):
        # Every check runs once per seed of ``seeds`` (random composite trees use many).
        if "seed" in metafunc.fixturenames:
            metafunc.parametrize("seed", getattr(metafunc.cls, "seeds", (0,)))

    def params(self, dtype, gen) -> list[torch.Tensor]:
        raise NotImplementedError

    def build(self, p: list[torch.Tensor]):
        raise NotImplementedError

    # -------------------------------------------------------------------- helpers
    def case(self, seed, dtype=torch.float64, grad=False):
        gen = torch.Generator().manual_seed(seed)
        p = [t.to(dtype) if t.is_floating_point() else t for t in self.params(torch.float64, gen)]
        if grad:
            p = [t.detach().requires_grad_(True) if t.is_floating_point() else t for t in p]
        op, dense = self.build(p)
        return op, dense, p

    def vec(self, n, k=None, dtype=torch.float64, seed=99):
        g = torch.Generator().manual_seed(seed)
        shape = (n,) if k is None else (n, k)
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    # -------------------------------------------------------------------- every node
    def test_shape_dtype_tags(self, seed):
        op, dense, _ = self.case(seed)
        assert op.shape == tuple(dense.shape)
        assert op.dtype == dense.dtype and op.device == dense.device
        if op.symmetric:
            close(dense, dense.mT)
        if self.symmetric:
            assert op.symmetric
        if self.psd:
            assert op.psd

    def test_matvec(self, seed):
        op, dense, _ = self.case(seed)
        x = self.vec(op.shape[1])
        X = self.vec(op.shape[1], 3)
        close(op @ x, dense @ x)
        close(op @ X, dense @ X)

    def test_matvec_out(self, seed):
        # A.matvec(x, out=...) writes A @ x into out and returns it: a fresh buffer, a slice of a
        # larger one (a block's rows of a block-diagonal's result), and a non-contiguous one
        op, dense, _ = self.case(seed)
        m, n = op.shape
        x, X = self.vec(n), self.vec(n, 3)
        out = torch.full((m,), torch.nan, dtype=op.dtype)
        assert op.matvec(x, out=out) is out
        close(out, dense @ x)
        big = torch.full((m + 3, 3), torch.nan, dtype=op.dtype)
        assert op.matvec(X, out=big[2 : 2 + m]) is not None
        close(big[2 : 2 + m], dense @ X)
        assert big[:2].isnan().all() and big[2 + m :].isnan().all()  # nothing written outside
        strided = torch.full((3, m), torch.nan, dtype=op.dtype).mT
        close(op.matvec(X, out=strided), dense @ X)
        close(op.matvec(x, out=strided[:, 1]), dense @ x)

    def test_matvec_out_errors(self, seed):
        op, _, _ = self.case(seed)
        m, n = op.shape
        x = self.vec(n)
        with pytest.raises(ValueError, match=f"out has shape \\({m + 1},\\)"):
            op.matvec(x, out=torch.empty(m + 1, dtype=op.dtype))
        with pytest.raises(ValueError, match="out has shape"):
            op.matvec(self.vec(n, 2), out=torch.empty(m, 3, dtype=op.dtype))
        with pytest.raises(TypeError, match="out is torch.float32"):
            op.matvec(x, out=torch.empty(m, dtype=torch.float32))
        with pytest.raises(TypeError, match="expected a torch.Tensor for out"):
            op.matvec(x, out=[0.0] * m)
        # out sharing memory with x: refused (the product would read entries already overwritten)
        buf = self.vec(m + n)
        with pytest.raises(ValueError, match="overlaps the operand"):
            op.matvec(buf[:n], out=buf[n - 1 : n - 1 + m])  # one shared entry
        if m == n:
            y = x.clone()
            with pytest.raises(ValueError, match="overlaps the operand"):
                op.matvec(y, out=y)
        # disjoint parts of one buffer are fine
        torch.testing.assert_close(op.matvec(buf[m:], out=buf[:m]), op @ buf[m:].clone())

    def test_rmatvec(self, seed):
        op, dense, _ = self.case(seed)
        y = self.vec(op.shape[0])
        Y = self.vec(op.shape[0], 2)
        close(op.T @ y, dense.mT @ y)
        close(Y.mT @ op, Y.mT @ dense)

    def test_to_dense_and_transpose(self, seed):
        op, dense, _ = self.case(seed)
        close(op.to_dense(), dense)
        close(op.T.to_dense(), dense.mT)
        close(op.T.simplify().to_dense(), dense.mT)

    def test_simplify_keeps_the_matrix(self, seed):
        op, dense, _ = self.case(seed)
        close(op.simplify().to_dense(), dense, scale=self.cond_scale)

    def test_algebra(self, seed):
        op, dense, _ = self.case(seed)
        close((op + op).to_dense(), 2 * dense)
        close((2.5 * op - op).to_dense(), 1.5 * dense)
        close((-op).to_dense(), -dense)
        close((op / 4).to_dense(), dense / 4)
        close((op @ op.T).to_dense(), dense @ dense.mT)
        close((op.T @ op).simplify().to_dense(), dense.mT @ dense)
        x = self.vec(op.shape[0])
        close((op.T @ op.T.T) @ self.vec(op.shape[1]), dense.mT @ dense @ self.vec(op.shape[1]))
        close((op @ op.T + op @ op.T) @ x, 2 * dense @ dense.mT @ x)

    def test_frobenius(self, seed):
        op, dense, _ = self.case(seed)
        close(op.frobenius_norm(), torch.linalg.matrix_norm(dense))

    def test_str_and_repr(self, seed):
        op, _, _ = self.case(seed)
        s, r = str(op), repr(op)
        assert "tensor(" not in s and len(s) < 400
        assert f"{op.shape[0]}×{op.shape[1]}" in r and "float64" in r

    def test_to_float32(self, seed):
        op, dense, _ = self.case(seed)
        op32 = op.to(torch.float32)
        assert op32.dtype == torch.float32
        x = self.vec(op.shape[1], dtype=torch.float32)
        close(op32 @ x, dense.float() @ x, torch.float32)

    def test_float32_build(self, seed):
        op, dense, _ = self.case(seed, dtype=torch.float32)
        assert op.dtype == torch.float32
        close(
            op @ self.vec(op.shape[1], dtype=torch.float32),
            dense @ self.vec(op.shape[1], dtype=torch.float32),
            torch.float32,
        )
        if self.square:
            close(op.diag(), dense.diagonal(), torch.float32)
        if self.square and self.invertible and self.psd:
            b = self.vec(op.shape[0], dtype=torch.float32)
            close(
                op.solve(b), torch.linalg.solve(dense, b), torch.float32, scale=10 * self.cond_scale
            )

    def test_scipy_adapter(self, seed):
        op, dense, _ = self.case(seed)
        L = op.to_scipy()
        x = np.random.default_rng(0).standard_normal(op.shape[1])
        y = np.random.default_rng(1).standard_normal(op.shape[0])
        assert L.dtype == np.float64
        np.testing.assert_allclose(L.matvec(x), dense.numpy() @ x, rtol=1e-8, atol=1e-8)
        np.testing.assert_allclose(L.rmatvec(y), dense.numpy().T @ y, rtol=1e-8, atol=1e-8)

    def test_wrong_operand_shape(self, seed):
        op, _, _ = self.case(seed)
        with pytest.raises(ValueError, match="shape"):
            op @ torch.zeros(op.shape[1] + 1, dtype=torch.float64)

    def test_wrong_operand_dtype(self, seed):
        op, _, _ = self.case(seed)
        with pytest.raises(TypeError, match="float32"):
            op @ torch.zeros(op.shape[1], dtype=torch.float32)

    # -------------------------------------------------------------------- square nodes
    def test_diag_and_trace(self, seed):
        if not self.square:
            pytest.skip("not square")
        op, dense, _ = self.case(seed)
        close(op.diag(), dense.diagonal())
        close(op.trace(), dense.trace())

    def test_solve(self, seed):
        if not (self.square and self.invertible):
            pytest.skip("not invertible")
        op, dense, _ = self.case(seed)
        b, B = self.vec(op.shape[0]), self.vec(op.shape[0], 3)
        close(op.solve(b), torch.linalg.solve(dense, b), scale=self.cond_scale)
        close(op.solve(B), torch.linalg.solve(dense, B), scale=self.cond_scale)
        close(op.inv() @ b, torch.linalg.solve(dense, b), scale=self.cond_scale)
        close(op.inv().simplify() @ B, torch.linalg.solve(dense, B), scale=self.cond_scale)
        close(op.inv().T @ b, torch.linalg.solve(dense.mT, b), scale=self.cond_scale)

    def test_solve_reuses_factorisations(self, seed):
        if not (self.square and self.invertible):
            pytest.skip("not invertible")
        op, _, _ = self.case(seed)
        b = self.vec(op.shape[0])
        op.solve(b)
        op.slogdet()
        before = dict(FACTORIZATIONS)
        op.solve(2 * b)
        op.slogdet()
        assert dict(FACTORIZATIONS) == before

    def test_logdet(self, seed):
        if not (self.square and self.invertible):
            pytest.skip("not invertible")
        op, dense, _ = self.case(seed)
        sign, logabs = torch.linalg.slogdet(dense)
        s, la = op.slogdet()
        assert float(s) == float(sign)
        close(la, logabs)
        if float(sign) > 0:
            close(op.logdet(), logabs)

    def test_eigh(self, seed):
        if not self.symmetric:
            pytest.skip("not symmetric")
        op, dense, _ = self.case(seed)
        E = op.eigh()
        close(E.to_dense(), dense, scale=self.cond_scale)
        ev = torch.sort(E.evals).values
        ref = torch.linalg.eigvalsh(dense)
        if ev.numel() < ref.numel():  # truncated spectrum: the rest are zeros
            ev = torch.sort(torch.cat([ev, ev.new_zeros(ref.numel() - ev.numel())])).values
        close(ev, ref, scale=self.cond_scale)

    def test_powers(self, seed):
        if not self.psd:
            pytest.skip("not PSD")
        op, dense, _ = self.case(seed)
        evals, Q = torch.linalg.eigh(dense)
        sq = (Q * evals.clamp_min(0).sqrt()) @ Q.mT
        close(op.sqrt().to_dense(), sq, scale=10 * self.cond_scale)
        close(op.pow(2).to_dense(), dense @ dense)
        if self.invertible:
            close(op.pow(-0.5).to_dense(), (Q * evals.rsqrt()) @ Q.mT, scale=100 * self.cond_scale)

    def test_damped(self, seed):
        if not (self.square and self.psd):
            pytest.skip("not PSD")
        op, dense, _ = self.case(seed)
        n = op.shape[0]
        D = dense + 0.3 * torch.eye(n, dtype=dense.dtype)
        damped = op + 0.3 * Identity(n)
        b = self.vec(n)
        close(damped.solve(b), torch.linalg.solve(D, b))
        close(damped.logdet(), torch.logdet(D))
        close((op + 0.3 * Identity(n)).inv().simplify() @ b, torch.linalg.solve(D, b))
        close(damped.pow(-1).to_dense(), torch.linalg.inv(D))

    def test_scipy_eigsh(self, seed):
        if not self.symmetric or op_too_small(self.case(seed)[0]):
            pytest.skip("needs a symmetric operator with n > 3")
        op, dense, _ = self.case(seed)
        vals = spla.eigsh(op.to_scipy(), k=2, which="LA", return_eigenvectors=False)
        ref = torch.linalg.eigvalsh(dense)[-2:].numpy()
        np.testing.assert_allclose(np.sort(vals), ref, rtol=1e-6, atol=1e-8)

    # -------------------------------------------------------------------- gradients
    def _grad_check(self, seed, f_op, f_dense, scale=1.0):
        op, dense, p = self.case(seed, grad=True)
        leaves = [t for t in p if t.requires_grad]
        out = f_op(op)
        if not out.requires_grad:
            pytest.skip("no differentiable leaf")
        g1 = torch.autograd.grad(out, leaves, allow_unused=True)
        op2, dense2, p2 = self.case(seed, grad=True)
        leaves2 = [t for t in p2 if t.requires_grad]
        g2 = torch.autograd.grad(f_dense(dense2), leaves2, allow_unused=True)
        for a, b in zip(g1, g2):
            if b is None:
                continue
            close(a if a is not None else torch.zeros_like(b), b, scale=scale)

    def test_grad_matvec(self, seed):
        x = self.vec(self.case(seed)[0].shape[1])
        self._grad_check(seed, lambda A: (A @ x).square().sum(), lambda D: (D @ x).square().sum())

    def test_grad_matvec_out(self, seed):
        # under autograd the product reaches out by a differentiable copy
        op = self.case(seed)[0]
        x = self.vec(op.shape[1])

        def f(A):
            return A.matvec(x, out=torch.empty(A.shape[0], dtype=A.dtype)).square().sum()

        self._grad_check(seed, f, lambda D: (D @ x).square().sum())

    def test_grad_solve(self, seed):
        if not (self.square and self.invertible):
            pytest.skip("not invertible")
        b = self.vec(self.case(seed)[0].shape[0])
        self._grad_check(
            seed,
            lambda A: A.solve(b).sum(),
            lambda D: torch.linalg.solve(D, b).sum(),
            scale=100 * self.cond_scale,
        )

    def test_grad_logdet(self, seed):
        if not (self.square and self.invertible and self.psd):
            pytest.skip("not PD")
        self._grad_check(seed, lambda A: A.logdet(), lambda D: torch.logdet(D), scale=100)

    def test_grad_damping(self, seed):
        if not (self.square and self.psd):
            pytest.skip("not PSD")
        op, dense, _ = self.case(seed)
        n = op.shape[0]
        b = self.vec(n)
        c1 = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
        c2 = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
        (g1,) = torch.autograd.grad(
            (op + c1 * Identity(n)).solve(b).sum() + (op + c1 * Identity(n)).logdet(), c1
        )
        D = dense + c2 * torch.eye(n, dtype=torch.float64)
        (g2,) = torch.autograd.grad(torch.linalg.solve(D, b).sum() + torch.logdet(D), c2)
        close(g1, g2, scale=10)


def op_too_small(op) -> bool:
    return op.shape[0] <= 3
