"""Stochastic Lanczos quadrature: log-determinants and spectral densities."""

import math

import pytest
import torch

from nngeo_ops.errors import NotPSDError, NotSymmetricError
from nngeo_ops.linalg import SLQSettings, as_operator, hutchinson, slq, slq_logdet, spectral_density

DT = torch.float64


def gen(seed):
    return torch.Generator().manual_seed(seed)


def with_spectrum(evals, seed=0, dtype=DT):
    evals = torch.as_tensor(evals, dtype=dtype)
    n = evals.shape[0]
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen(seed), dtype=dtype))
    A = Q @ torch.diag(evals) @ Q.T
    return (A + A.T) / 2, Q


def test_quadrature_rules_are_valid():
    A, _ = with_spectrum(torch.linspace(0.5, 3.0, 50))
    res = slq(A, num_probes=4, num_iter=10, generator=gen(0))
    assert res.nodes.shape == res.weights.shape == (4, 10)
    torch.testing.assert_close(res.weights.sum(-1), torch.ones(4, dtype=DT))
    assert bool((res.weights >= 0).all())
    assert bool((res.nodes >= 0.5 - 1e-10).all() and (res.nodes <= 3.0 + 1e-10).all())
    torch.testing.assert_close(res.probe_norms_sq, torch.full((4,), 50.0, dtype=DT))


def test_low_degree_polynomials_are_exact_per_probe():
    # Gauss quadrature with m nodes is exact for degree <= 2m - 1, so tr(A) and tr(A²) from SLQ
    # equal Hutchinson on the very same probes (same generator seed, same draw order).
    A, _ = with_spectrum(torch.linspace(-1.0, 2.0, 40))
    res = slq(A, num_probes=6, num_iter=3, generator=gen(5))
    torch.testing.assert_close(
        res.estimate(lambda x: x).value, hutchinson(A, 6, generator=gen(5)).value
    )
    torch.testing.assert_close(
        res.estimate(lambda x: x**2).value, hutchinson(A @ A, 6, generator=gen(5)).value
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_logdet_within_standard_error(seed):
    lam = torch.logspace(-1, 1, 80, dtype=DT)
    A, Q = with_spectrum(lam, seed=seed)
    true = torch.log(lam).sum()
    est, se = slq_logdet(A, num_probes=30, num_iter=25, generator=gen(100 + seed))
    assert abs(float(est - true)) <= 4 * float(se) + 1e-8 * abs(float(true))
    # The Monte Carlo part is Hutchinson on log A: Rademacher variance 2(‖L‖_F² − Σ L_ii²)/p.
    L = Q @ torch.diag(torch.log(lam)) @ Q.T
    sd = math.sqrt(2 * (float((L * L).sum()) - float((L.diagonal() ** 2).sum())) / 30)
    assert 0.5 * sd < float(se) < 1.5 * sd


def test_logdet_exact_for_identity_multiple():
    A = 3.0 * torch.eye(20, dtype=DT)
    est, se = slq_logdet(A, num_probes=4, num_iter=5, generator=gen(0))
    torch.testing.assert_close(est, torch.tensor(20 * math.log(3.0), dtype=DT))
    assert float(se) < 1e-10


def test_logdet_gaussian_probes_and_operator_input():
    lam = torch.linspace(1.0, 4.0, 60)
    A, _ = with_spectrum(lam, seed=7)
    op = as_operator(lambda X: A @ X, shape=(60, 60), dtype=DT)
    est, se = slq_logdet(
        op,
        settings=SLQSettings(num_probes=40, num_iter=15, distribution="gaussian"),
        generator=gen(1),
    )
    assert abs(float(est) - float(torch.log(lam).sum())) <= 4 * float(se)


def test_logdet_of_indefinite_matrix_raises():
    A, _ = with_spectrum(torch.linspace(-1.0, 1.0, 30))
    with pytest.raises(NotPSDError, match="positive definite"):
        slq_logdet(A, num_probes=2, num_iter=10, generator=gen(0))


def test_slq_rejects_non_symmetric_tensor():
    with pytest.raises(NotSymmetricError):
        slq(torch.randn(6, 6, generator=gen(0), dtype=DT), num_probes=2, num_iter=3)


def test_spectral_density_integrates_to_one_and_peaks_at_eigenvalues():
    lam = torch.cat([torch.ones(50), 5 * torch.ones(50)])
    A, _ = with_spectrum(lam, seed=9)
    grid = torch.linspace(-2.0, 8.0, 2001, dtype=DT)
    dens = spectral_density(A, grid, sigma=0.1, num_probes=10, num_iter=20, generator=gen(0))
    assert dens.shape == grid.shape
    torch.testing.assert_close(torch.trapezoid(dens, grid), torch.tensor(1.0, dtype=DT))
    low = grid < 3
    mass_low = float(torch.trapezoid(dens[low], grid[low]))
    assert abs(mass_low - 0.5) < 0.1
    at = {float(t): float(dens[torch.argmin((grid - t).abs())]) for t in (1.0, 3.0, 5.0)}
    assert at[1.0] > 1.0 and at[5.0] > 1.0 and at[3.0] < 1e-6


def test_spectral_density_reproducible_and_float32():
    A, _ = with_spectrum(torch.linspace(0.0, 1.0, 30), dtype=torch.float32)
    grid = torch.linspace(-0.5, 1.5, 200)
    d1 = spectral_density(A, grid, sigma=0.05, num_probes=3, num_iter=8, generator=gen(3))
    d2 = spectral_density(A, grid, sigma=0.05, num_probes=3, num_iter=8, generator=gen(3))
    assert d1.dtype == torch.float32
    torch.testing.assert_close(d1, d2, rtol=0, atol=0)
    with pytest.raises(ValueError, match="sigma"):
        spectral_density(A, grid, sigma=0.0, num_probes=1, num_iter=2)
