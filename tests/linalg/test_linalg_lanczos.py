"""Lanczos (eigenpairs and tridiagonalisation) and power iteration against torch.linalg.eigh."""

import warnings

import pytest
import torch

from nngeo_ops.errors import ConvergenceWarning, NotSymmetricError, ShapeError
from nngeo_ops.linalg import (
    LanczosSettings,
    as_matmat,
    block_lanczos,
    lanczos,
    lanczos_tridiag,
    power_iteration,
    tridiag_matrix,
)

DT = torch.float64


def gen(seed):
    return torch.Generator().manual_seed(seed)


def sym(n, seed=0, dtype=DT):
    X = torch.randn(n, n, generator=gen(seed), dtype=dtype)
    return (X + X.T) / 2


def with_spectrum(evals, seed=0, dtype=DT):
    evals = torch.as_tensor(evals, dtype=dtype)
    n = evals.shape[0]
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen(seed), dtype=dtype))
    A = Q @ torch.diag(evals) @ Q.T
    return (A + A.T) / 2


def assert_eigenpairs(A, evals, evecs, atol):
    torch.testing.assert_close(A @ evecs, evecs * evals, rtol=0, atol=atol)
    eye = torch.eye(evecs.shape[1], dtype=evecs.dtype)
    torch.testing.assert_close(evecs.T @ evecs, eye, rtol=0, atol=atol)


@pytest.mark.parametrize("which", ["LA", "SA", "BE"])
def test_full_krylov_space_matches_eigh(which):
    A = sym(60)
    ref = torch.linalg.eigvalsh(A)
    evals, evecs = lanczos(A, 5, which=which, num_iter=60, generator=gen(1))
    expected = {"LA": ref[-5:], "SA": ref[:5], "BE": torch.cat([ref[:2], ref[-3:]])}[which]
    torch.testing.assert_close(evals, expected, rtol=0, atol=1e-9)
    assert bool((evals[1:] >= evals[:-1]).all())
    assert_eigenpairs(A, evals, evecs, atol=1e-8)


def test_separated_top_eigenvalues_converge_early_without_warning():
    lam = torch.cat([torch.tensor([100.0, 90.0, 80.0]), torch.linspace(0, 1, 147)])
    A = with_spectrum(lam, seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        evals, evecs = lanczos(A, 3, num_iter=30, generator=gen(0))
    torch.testing.assert_close(evals, torch.tensor([80.0, 90.0, 100.0], dtype=DT))
    assert_eigenpairs(A, evals, evecs, atol=1e-6)


def test_unconverged_ritz_pairs_warn():
    A = with_spectrum(torch.linspace(1, 2, 150), seed=3)
    # max_restarts=0: one Krylov space of dimension num_iter (the behaviour before restarts)
    with pytest.warns(ConvergenceWarning, match="raise num_iter"):
        lanczos(A, 4, which="SA", num_iter=8, max_restarts=0, generator=gen(0))


def test_repeated_eigenvalues_found_through_breakdown_restart():
    lam = torch.cat([torch.ones(40), 5 * torch.ones(40)])
    A = with_spectrum(lam, seed=4)
    evals, evecs = lanczos(A, 3, num_iter=12, generator=gen(0))
    torch.testing.assert_close(evals, torch.full((3,), 5.0, dtype=DT))
    assert_eigenpairs(A, evals, evecs, atol=1e-8)


def test_callable_operator_takes_shape_from_v0_and_is_reproducible():
    A = sym(40, seed=5)
    v0 = torch.randn(40, generator=gen(6), dtype=DT)
    e1, _ = lanczos(lambda X: A @ X, 2, num_iter=40, v0=v0)
    e2, _ = lanczos(A, 2, num_iter=40, v0=v0)
    torch.testing.assert_close(e1, e2)
    torch.testing.assert_close(e1, torch.linalg.eigvalsh(A)[-2:])
    r1 = lanczos(A, 2, num_iter=10, generator=gen(7), settings=LanczosSettings(tol=1.0))
    r2 = lanczos(A, 2, num_iter=10, generator=gen(7), tol=1.0)  # keyword override
    torch.testing.assert_close(r1[0], r2[0], rtol=0, atol=0)


def test_float32_stays_float32():
    A = sym(30, dtype=torch.float32)
    evals, evecs = lanczos(A, 2, num_iter=30, generator=gen(0))
    assert evals.dtype == evecs.dtype == torch.float32
    torch.testing.assert_close(evals, torch.linalg.eigvalsh(A)[-2:], rtol=1e-4, atol=1e-4)


def test_tridiag_is_orthogonal_projection():
    A = sym(50, seed=8)
    v0 = torch.randn(50, generator=gen(9), dtype=DT)
    alpha, beta, Q = lanczos_tridiag(A, v0, 20)
    assert alpha.shape == (20,) and beta.shape == (19,) and Q.shape == (50, 20)
    torch.testing.assert_close(Q.T @ Q, torch.eye(20, dtype=DT), rtol=0, atol=1e-12)
    torch.testing.assert_close(Q.T @ A @ Q, tridiag_matrix(alpha, beta), rtol=0, atol=1e-10)
    torch.testing.assert_close(Q[:, 0], v0 / v0.norm())


def test_tridiag_batched_equals_separate_runs():
    A = sym(30, seed=10)
    V0 = torch.randn(30, 3, generator=gen(11), dtype=DT)
    alpha, beta, Q = lanczos_tridiag(A, V0, 12)
    assert alpha.shape == (3, 12) and beta.shape == (3, 11) and Q.shape == (3, 30, 12)
    for i in range(3):
        a, b, q = lanczos_tridiag(A, V0[:, i], 12)
        torch.testing.assert_close(alpha[i], a)
        torch.testing.assert_close(beta[i], b)
        torch.testing.assert_close(Q[i], q)


def test_tridiag_steps_capped_at_n():
    alpha, beta, Q = lanczos_tridiag(sym(6), torch.ones(6, dtype=DT), 50)
    assert alpha.shape == (6,) and Q.shape == (6, 6)


def test_lanczos_bad_inputs():
    with pytest.raises(NotSymmetricError, match="symmetric"):
        lanczos(torch.randn(5, 5, generator=gen(0), dtype=DT), 1)
    with pytest.raises(ShapeError, match="k=7"):
        lanczos(sym(5), 7)
    with pytest.raises(ValueError, match="which"):
        lanczos(sym(5), 1, which="LM")
    with pytest.raises(ShapeError, match="without a shape"):
        lanczos(lambda X: X, 1)
    with pytest.raises(ShapeError, match="v0"):
        lanczos(sym(5), 1, v0=torch.ones(4, dtype=DT))
    with pytest.raises(ValueError, match="zero"):
        lanczos_tridiag(sym(5), torch.zeros(5, dtype=DT), 3)


def test_power_iteration_positive_and_negative_dominant():
    A = with_spectrum(torch.cat([torch.tensor([10.0, 5.0]), torch.linspace(-1, 1, 38)]), seed=12)
    lam, v = power_iteration(A, tol=1e-10, generator=gen(0))
    torch.testing.assert_close(lam, torch.tensor(10.0, dtype=DT))
    torch.testing.assert_close(A @ v, lam * v, rtol=0, atol=1e-8)
    lam, v = power_iteration(-A, tol=1e-10, generator=gen(0))
    torch.testing.assert_close(lam, torch.tensor(-10.0, dtype=DT))
    assert abs(float(v.norm()) - 1) < 1e-12


def test_power_iteration_callable_and_float32():
    A = with_spectrum(torch.cat([torch.tensor([4.0]), torch.linspace(0, 1, 19)]), seed=13)
    v0 = torch.ones(20, dtype=DT)
    lam, _ = power_iteration(lambda X: A @ X, v0=v0, tol=1e-10)
    torch.testing.assert_close(lam, torch.tensor(4.0, dtype=DT))
    lam32, v32 = power_iteration(A.float(), tol=1e-5, generator=gen(0))
    assert lam32.dtype == v32.dtype == torch.float32
    assert abs(float(lam32) - 4.0) < 1e-4
    op = as_matmat(lambda X: A @ X, shape=(20, 20), dtype=DT)
    torch.testing.assert_close(power_iteration(op, tol=1e-10, v0=v0)[0], lam)


def test_power_iteration_warns_when_magnitudes_tie():
    A = with_spectrum(torch.cat([torch.tensor([3.0, -3.0]), torch.linspace(0, 1, 18)]), seed=14)
    with pytest.warns(ConvergenceWarning, match="power_iteration did not converge"):
        power_iteration(A, num_iter=50, generator=gen(0))


# ---------------------------------------------------------------- restarted / block Lanczos


def issue_case(seed=0):
    """400 × 400 with 60 large eigenvalues above 340 small ones (issue 11)."""
    g = gen(seed)
    lam = torch.cat([torch.linspace(10, 100, 60, dtype=DT), torch.rand(340, generator=g, dtype=DT)])
    return with_spectrum(lam, seed=seed + 1)


def test_default_lanczos_converges_to_1e_10_on_the_issue_case():
    A = issue_case()
    ref = torch.linalg.eigvalsh(A)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        evals, evecs = lanczos(A, 5, generator=gen(1))
    rel = float(((evals - ref[-5:]).abs() / ref[-5:].abs()).max())
    assert rel < 1e-10
    assert_eigenpairs(A, evals, evecs, atol=1e-9)
    res = block_lanczos(A, 5, generator=gen(1))
    assert bool(res.converged.all()) and res.restarts >= 1  # m = 30 < 60 large ones: it restarts
    # the reported residuals are the true ones
    true_res = torch.linalg.vector_norm(
        A @ res.eigenvectors - res.eigenvectors * res.eigenvalues, dim=0
    )
    torch.testing.assert_close(res.residuals, true_res, rtol=0, atol=1e-10)


@pytest.mark.parametrize("which", ["LA", "SA", "BE"])
def test_indefinite_operator_every_end_converges(which):
    lam = torch.cat(
        [
            torch.linspace(-50, -10, 8, dtype=DT),
            torch.linspace(-1, 1, 284, dtype=DT),
            torch.linspace(5, 60, 8, dtype=DT),
        ]
    )
    A = with_spectrum(lam, seed=21)
    ref = torch.linalg.eigvalsh(A)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        evals, evecs = lanczos(A, 6, which=which, num_iter=16, generator=gen(2))
    expected = {"LA": ref[-6:], "SA": ref[:6], "BE": torch.cat([ref[:3], ref[-3:]])}[which]
    torch.testing.assert_close(evals, expected, rtol=0, atol=1e-10)
    assert_eigenpairs(A, evals, evecs, atol=1e-8)


def test_seeded_runs_are_bit_identical():
    A = issue_case(3)
    a = lanczos(A, 4, generator=gen(5))
    b = lanczos(A, 4, generator=gen(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("block", [1, 10])
def test_block_lanczos_top_50(block):
    lam = torch.cat(
        [torch.logspace(0, 2, 80, dtype=DT), torch.rand(220, generator=gen(7), dtype=DT) * 0.5]
    )
    A = with_spectrum(lam, seed=8)
    ref = torch.linalg.eigvalsh(A)
    res = block_lanczos(A, 50, block_size=block, generator=gen(9))
    assert bool(res.converged.all())
    torch.testing.assert_close(res.eigenvalues, ref[-50:], rtol=1e-10, atol=0)
    assert_eigenpairs(A, res.eigenvalues, res.eigenvectors, atol=1e-8)
    assert res.num_matvecs % block == 0


def test_block_products_are_batched():
    calls = []
    A = issue_case(4)

    def f(X):
        calls.append(X.shape[1])
        return A @ X

    op = as_matmat(f, shape=A.shape, dtype=DT, symmetric=True)
    res = block_lanczos(op, 20, block_size=10, generator=gen(0))
    assert set(calls) <= {10, 20} and len(calls) * 10 <= res.num_matvecs + 20
    torch.testing.assert_close(res.eigenvalues, torch.linalg.eigvalsh(A)[-20:], rtol=1e-10, atol=0)


def test_warm_start_from_previous_eigenvectors_converges_at_once():
    A = issue_case(5)
    evals, evecs = lanczos(A, 4, generator=gen(0))
    B = A + 1e-6 * sym(400, seed=6)  # one step later in training
    res = block_lanczos(B, 4, v0=evecs, generator=gen(0))
    cold = block_lanczos(B, 4, block_size=4, generator=gen(0))
    torch.testing.assert_close(res.eigenvalues, torch.linalg.eigvalsh(B)[-4:], rtol=1e-10, atol=0)
    assert res.num_matvecs < cold.num_matvecs


def test_gradient_is_hellmann_feynman():
    A = with_spectrum(torch.cat([torch.tensor([9.0, 7.0]), torch.linspace(0, 1, 58)]), seed=10)
    B = sym(60, seed=11)
    t = torch.tensor(0.1, dtype=DT, requires_grad=True)
    op = as_matmat(lambda X: A @ X + t * (B @ X), shape=A.shape, dtype=DT, symmetric=True)
    evals, evecs = lanczos(op, 2, generator=gen(0))
    evals.sum().backward()
    dense = A + 0.1 * B
    _, Q = torch.linalg.eigh(dense)
    expected = sum(float(Q[:, i] @ B @ Q[:, i]) for i in (-1, -2))
    assert abs(float(t.grad) - expected) < 1e-8


def test_non_symmetric_node_and_low_precision():
    from nngeo_ops.ops import Dense

    M = torch.randn(30, 30, generator=gen(0), dtype=DT)
    with pytest.raises(NotSymmetricError, match="symmetric=True"):
        lanczos(Dense(M), 2)
    with pytest.raises(NotSymmetricError, match="symmetric=True"):
        lanczos_tridiag(Dense(M), torch.ones(30, dtype=DT), 3)
    A = with_spectrum(torch.cat([torch.tensor([4.0, 3.0]), torch.linspace(0, 1, 38)]), seed=12)
    for low in (torch.float16, torch.bfloat16):
        with warnings.catch_warnings():
            warnings.simplefilter("error", ConvergenceWarning)
            evals, evecs = lanczos(A.to(low), 2, generator=gen(0))
        assert evals.dtype == evecs.dtype == low
        torch.testing.assert_close(
            evals.double(), torch.tensor([3.0, 4.0], dtype=DT), rtol=0.02, atol=0
        )


def test_no_restart_budget_warns_and_bad_settings():
    A = issue_case(6)
    with pytest.warns(ConvergenceWarning, match="max_restarts"):
        lanczos(A, 5, which="SA", num_iter=12, max_restarts=0, generator=gen(0))
    with pytest.raises(ValueError, match="num_iter >= k"):
        lanczos(A, 10, num_iter=10)
    with pytest.raises(ValueError, match="block_size"):
        LanczosSettings(block_size=0)
    with pytest.raises(ShapeError, match="v0"):
        block_lanczos(A, 2, block_size=3, v0=torch.ones(400, 2, dtype=DT))


@pytest.mark.parametrize("block", [2, 3, 5])
def test_block_sizes_that_do_not_divide_the_basis(block):
    lam = torch.cat(
        [
            torch.linspace(-9, -5, 4, dtype=DT),
            torch.linspace(-1, 1, 150, dtype=DT),
            torch.linspace(4, 8, 4, dtype=DT),
        ]
    )
    A = with_spectrum(lam, seed=30)
    ref = torch.linalg.eigvalsh(A)
    res = block_lanczos(A, 3, which="BE", block_size=block, num_iter=26, generator=gen(1))
    assert bool(res.converged.all())
    torch.testing.assert_close(res.eigenvalues, torch.cat([ref[:1], ref[-2:]]), rtol=0, atol=1e-10)
    true_res = torch.linalg.vector_norm(
        A @ res.eigenvectors - res.eigenvectors * res.eigenvalues, dim=0
    )
    torch.testing.assert_close(res.residuals, true_res, rtol=0, atol=1e-10)
