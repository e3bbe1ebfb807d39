"""Stochastic Lanczos quadrature: log-determinants and spectral densities."""

import math

import pytest
import torch

from nngeo_ops.errors import NotPSDError, NotSymmetricError
from nngeo_ops.linalg import (
    DensitySettings,
    SLQSettings,
    as_matmat,
    broadening_kernel,
    estimate_density,
    hutchinson,
    slq,
    slq_logdet,
    spectral_density,
)

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
    op = as_matmat(lambda X: A @ X, shape=(60, 60), dtype=DT)
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


# ---------------------------------------------------------------- issue 8 / issue 11 additions


def test_logdet_gradient_in_the_damping():
    # num_iter = n: the quadrature is exact per probe, so the SLQ estimate is Hutchinson on
    # log(A + δI) and its derivative in δ is Hutchinson on (A + δI)⁻¹ with the same probes.
    A, _ = with_spectrum(torch.linspace(0.5, 3.0, 25), seed=3)
    d = torch.tensor(0.2, dtype=DT, requires_grad=True)
    op = as_matmat(lambda X: A @ X + d * X, shape=(25, 25), dtype=DT, symmetric=True)
    est = slq_logdet(op, num_probes=5, num_iter=25, generator=gen(4))
    est.value.backward()
    inv = torch.linalg.inv(A + 0.2 * torch.eye(25, dtype=DT))
    expected = hutchinson(inv, 5, generator=gen(4)).value
    torch.testing.assert_close(d.grad, expected, rtol=1e-8, atol=0)


def test_slq_refuses_a_node_tagged_non_symmetric_and_upcasts_half():
    from nngeo_ops.ops import Dense

    M = torch.randn(20, 20, generator=gen(0), dtype=DT)
    with pytest.raises(NotSymmetricError, match="symmetric=True"):
        slq(Dense(M), num_probes=2, num_iter=3)
    A, _ = with_spectrum(torch.linspace(1.0, 2.0, 40))
    res = slq(A.to(torch.bfloat16), num_probes=3, num_iter=10, generator=gen(0))
    assert res.nodes.dtype == torch.bfloat16
    assert bool((res.nodes.float() > 0.95).all() and (res.nodes.float() < 2.05).all())


def dense_kde(lam, grid, sigma, kernel="gaussian"):
    return broadening_kernel(grid[:, None] - lam[None, :], sigma, kernel).mean(-1)


@pytest.mark.parametrize("kernel", ["gaussian", "lorentzian"])
def test_density_close_to_dense_kde_of_true_eigenvalues(kernel):
    lam = torch.cat(
        [
            torch.rand(150, generator=gen(1), dtype=DT),
            3 + torch.rand(50, generator=gen(2), dtype=DT),
        ]
    )
    A, _ = with_spectrum(lam, seed=5)
    grid = torch.linspace(-1.0, 5.0, 1201, dtype=DT)
    d = estimate_density(
        A, grid=grid, kernel=kernel, sigma=0.1, num_probes=20, num_iter=30, generator=gen(6)
    )
    ref = dense_kde(lam, grid, 0.1, kernel)
    l1 = float(torch.trapezoid((d.values - ref).abs(), grid))
    assert l1 < 0.08
    # the error bar covers the actual error on most of the grid
    covered = ((d.values - ref).abs() <= 4 * d.stderr + 1e-6).double().mean()
    assert float(covered) > 0.95
    if kernel == "gaussian":
        assert abs(d.integral() - 1.0) < 1e-10


def test_density_mean_is_trace_over_n_and_seeded_is_bit_identical():
    lam = torch.logspace(-2, 1, 120, dtype=DT)
    A, _ = with_spectrum(lam, seed=7)
    d1 = estimate_density(A, num_probes=12, num_iter=20, generator=gen(8))
    d2 = estimate_density(A, num_probes=12, num_iter=20, generator=gen(8))
    assert torch.equal(d1.values, d2.values) and torch.equal(d1.grid, d2.grid)
    assert torch.equal(d1.stderr, d2.stderr)
    # Σ τ θ per probe is zᵀAz/‖z‖² exactly: the mean is Hutchinson's tr(A)/n on the same probes
    hutch = hutchinson(A, 12, generator=gen(8))
    assert abs(d1.mean() - float(hutch.value) / 120) < 1e-12
    assert abs(d1.mean() - float(lam.mean())) < 4 * float(hutch.stderr) / 120
    # and numerically, the first moment of the broadened density on its grid
    first = float(torch.trapezoid(d1.grid * d1.values, d1.grid))
    assert abs(first - d1.mean()) < 1e-8
    assert abs(d1.integral() - 1.0) < 1e-6  # the default grid stops 5σ past the extremes


def test_log_grid_density():
    lam = torch.cat([torch.zeros(20, dtype=DT), torch.logspace(-1, 2, 80, dtype=DT)])
    A, _ = with_spectrum(lam, seed=9)
    # 40 Lanczos steps place the zero cluster at a Ritz value ~1e-4 (1e-6 of the top): a floor of
    # 1e-5·max|θ| counts it as zero
    settings = DensitySettings(scale="log", sigma=0.2, floor=1e-5)
    d = estimate_density(A, settings=settings, num_probes=30, num_iter=40, generator=gen(10))
    assert bool((d.grid > 0).all()) and d.scale == "log"
    assert 0.1 < d.mass_below < 0.3  # the 20 % zero eigenvalues
    assert abs(d.integral() + d.mass_below - 1.0) < 1e-6
    u = d.grid.log10()
    pos = lam[lam > 0]
    ref = broadening_kernel(u[:, None] - pos.log10()[None, :], 0.2).sum(-1) / 100
    assert float(torch.trapezoid((d.values - ref).abs(), u)) < 0.15


def test_density_bad_arguments():
    A, _ = with_spectrum(torch.linspace(-1.0, 1.0, 10))
    with pytest.raises(ValueError, match="kernel"):
        estimate_density(A, kernel="box", num_probes=2, num_iter=3)
    with pytest.raises(ValueError, match="scale"):
        estimate_density(A, scale="loglog", num_probes=2, num_iter=3)
    with pytest.raises(ValueError, match="positive"):
        estimate_density(-A @ A, scale="log", num_probes=2, num_iter=3)
