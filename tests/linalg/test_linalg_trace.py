"""Trace estimators (Hutchinson, Hutch++, XTrace) and diagonal estimators."""

import math

import pytest
import torch

from nngeo_ops.errors import ShapeError
from nngeo_ops.linalg import as_matmat, diag_estimate, exact_diag, hutchinson, hutchpp, xtrace

DT = torch.float64


def gen(seed):
    return torch.Generator().manual_seed(seed)


def sym(n, seed=0, dtype=DT):
    X = torch.randn(n, n, generator=gen(seed), dtype=dtype)
    return (X + X.T) / 2


def decaying(n, seed=0):
    """Symmetric matrix whose spectrum decays fast (where Hutch++/XTrace shine)."""
    lam = 1.0 / torch.arange(1, n + 1, dtype=DT) ** 2
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen(seed), dtype=DT))
    A = Q @ torch.diag(lam) @ Q.T
    return (A + A.T) / 2


def low_rank(n, r, seed=0, symmetric=True):
    U = torch.randn(n, r, generator=gen(seed), dtype=DT)
    if symmetric:
        return U @ U.T
    return U @ torch.randn(r, n, generator=gen(seed + 1), dtype=DT)


def hutchinson_sd(A, m, distribution):
    fro2 = float((A * A).sum())
    diag2 = float((A.diagonal() ** 2).sum())
    var = 2 * (fro2 - diag2) if distribution == "rademacher" else 2 * fro2
    return math.sqrt(var / m)


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_hutchinson_within_its_variance(distribution, seed):
    A = sym(50, seed=seed)
    m = 300
    sd = hutchinson_sd(A, m, distribution)
    est, se = hutchinson(A, m, distribution=distribution, generator=gen(10 + seed))
    assert abs(float(est - A.trace())) <= 4 * sd
    assert 0.7 * sd < float(se) < 1.3 * sd


def test_hutchinson_batches_reproducible_and_callable():
    A = sym(30)
    a = hutchinson(A, 20, generator=gen(0))
    b = hutchinson(
        as_matmat(lambda X: A @ X, shape=(30, 30), dtype=DT), 20, generator=gen(0), batch_size=7
    )
    torch.testing.assert_close(a.value, b.value)
    torch.testing.assert_close(a.stderr, b.stderr)
    assert math.isnan(float(hutchinson(A, 1, generator=gen(0)).stderr))


@pytest.mark.parametrize("estimator", [hutchpp, xtrace])
def test_exact_on_low_rank(estimator):
    for symmetric in (True, False):
        A = low_rank(60, 4, symmetric=symmetric)  # rank 4 < num_matvecs / 3
        est, se = estimator(A, 15, generator=gen(0))
        torch.testing.assert_close(est, A.trace(), rtol=1e-10, atol=1e-10)
        assert float(se) < 1e-8 * abs(float(A.trace())) + 1e-10


@pytest.mark.parametrize("estimator", [hutchpp, xtrace])
def test_unbiased_over_repetitions(estimator):
    A = sym(40, seed=4) + 0.3 * decaying(40, seed=5) * 40
    reps = torch.stack([estimator(A, 12, generator=gen(s)).value for s in range(300)])
    mean, sd = float(reps.mean()), float(reps.std())
    assert abs(mean - float(A.trace())) <= 4 * sd / math.sqrt(300)


@pytest.mark.parametrize("estimator", [hutchpp, xtrace])
def test_stderr_covers_error_and_beats_hutchinson(estimator):
    A = decaying(60, seed=6) + 0.001 * sym(60, seed=7)
    tr = float(A.trace())
    m, reps = 30, 100
    err, err_h, covered = [], [], 0
    for s in range(reps):
        est, se = estimator(A, m, generator=gen(s))
        err.append(float(est) - tr)
        err_h.append(float(hutchinson(A, m, generator=gen(1000 + s)).value) - tr)
        covered += abs(float(est) - tr) <= 3 * float(se)
    mse = sum(e * e for e in err) / reps
    mse_h = sum(e * e for e in err_h) / reps
    assert mse < 0.25 * mse_h
    assert covered >= 0.85 * reps


def test_float32_stays_float32():
    A = sym(20, dtype=torch.float32)
    for est in (hutchinson(A, 5), hutchpp(A, 9), xtrace(A, 10), diag_estimate(A, 5)):
        assert est.value.dtype == torch.float32 and est.stderr.dtype == torch.float32
    assert (
        exact_diag(as_matmat(lambda X: A @ X, shape=(20, 20), dtype=torch.float32)).dtype
        == torch.float32
    )


@pytest.mark.parametrize("estimator", [hutchpp, xtrace])
def test_budget_of_n_products_gives_exact_trace(estimator):
    A = sym(8)
    calls = []

    def f(X):
        calls.append(X.shape[1])
        return A @ X

    op = as_matmat(f, shape=(8, 8), dtype=DT)
    est, se = estimator(op, 8, generator=gen(0))
    torch.testing.assert_close(est, A.trace())
    assert float(se) == 0.0 and sum(calls) == 8


def test_trace_bad_inputs():
    A = sym(10)
    with pytest.raises(ValueError, match="num_probes"):
        hutchinson(A, 0)
    with pytest.raises(ValueError, match="num_matvecs"):
        hutchpp(A, 2)
    with pytest.raises(ValueError, match="num_matvecs"):
        xtrace(A, 3)
    with pytest.raises(ValueError, match="distribution"):
        hutchinson(A, 3, distribution="uniform")
    with pytest.raises(ShapeError, match="without a shape"):
        xtrace(lambda X: X, 6)


@pytest.mark.parametrize("seed", [0, 1])
def test_diag_estimate_rademacher_within_variance(seed):
    A = sym(30, seed=seed) + torch.diag(torch.linspace(-5, 5, 30, dtype=DT))
    m = 400
    off2 = (A * A).sum(1) - A.diagonal() ** 2
    sd = (off2 / m).sqrt()  # Var[(z ⊙ Az)_j] = Σ_{l≠j} A_jl² for Rademacher z
    d, se = diag_estimate(A, m, generator=gen(20 + seed))
    assert d.shape == se.shape == (30,)
    assert bool(((d - A.diagonal()).abs() <= 5 * sd).all())
    assert bool(((se > 0.7 * sd) & (se < 1.3 * sd)).all())


def test_diag_estimate_gaussian_and_exact_on_diagonal_matrix():
    A = sym(25, seed=3)
    d, se = diag_estimate(A, 2000, distribution="gaussian", generator=gen(0))
    assert bool(((d - A.diagonal()).abs() <= 5 * se + 1e-12).all())
    D = torch.diag(torch.arange(1.0, 11.0, dtype=DT))
    d, se = diag_estimate(D, 3, generator=gen(0), batch_size=2)  # Rademacher: z ⊙ Dz = diag(D)
    torch.testing.assert_close(d, D.diagonal())
    torch.testing.assert_close(se, torch.zeros(10, dtype=DT))


@pytest.mark.parametrize("chunk", [1, 7, 64, 500])
def test_exact_diag_in_chunks(chunk):
    A = torch.randn(33, 33, generator=gen(0), dtype=DT)
    op = as_matmat(lambda X: A @ X, shape=(33, 33), dtype=DT)
    torch.testing.assert_close(exact_diag(op, chunk_size=chunk), A.diagonal(), rtol=0, atol=0)
    torch.testing.assert_close(exact_diag(A), A.diagonal())
