"""Laplace against dense float64 algebra: a torch.func GGN for the exact representations, each
approximate representation's own dense matrix for the others."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from torch import nn

from nngeo_ops.apps import Laplace, LaplaceSettings
from nngeo_ops.apps.laplace import EstimateWarning
from nngeo_ops.errors import DataError, MemoryLimitError, ShapeError, UnsupportedError
from nngeo_ops.nn import (
    PMatBlockDiag,
    PMatDense,
    PMatDiag,
    PMatEKFAC,
    PMatImplicit,
    PMatKFAC,
    PMatLowRank,
)
from nngeo_ops.ops import CompilePolicy
from tests.nn import groundtruth as gt

DT = torch.float64
EXACT = [PMatDense, PMatLowRank, PMatImplicit]
APPROX = [PMatDiag, PMatBlockDiag, PMatKFAC, PMatEKFAC]
ALL = EXACT + APPROX


def _data(n=24, d=4, c=3, seed=0, regression=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=DT)
    if regression:
        y = torch.randn(n, c, generator=g, dtype=DT)
    else:
        y = torch.randint(c, (n,), generator=g)
    return x, y


def _model(d=4, h=6, c=3, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, c)).to(DT)


def _loader(x, y, bs=8):
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=bs)


@functools.cache
def _case(rep, likelihood="classification"):
    reg = likelihood == "regression"
    x, y = _data(regression=reg)
    model = _model()
    la = Laplace(model, _loader(x, y), likelihood, representation=rep, prior_precision=0.7)
    if reg:
        la.sigma_noise = 0.8
    return model, x, y, la


def _curvature(la, model, x, y, rep):
    """s·F as a dense matrix: the torch.func GGN (exact kinds) or the representation's own."""
    if rep in EXACT:
        if la.likelihood == "classification":
            h = gt.ggn(model, x, y, nn.CrossEntropyLoss(reduction="sum"))
        else:
            j = gt.jacobian(model, x)
            j = j.reshape(-1, j.shape[-1])
            h = j.T @ j
        return h / (la.sigma_noise**2 * la.temperature)
    return la.N * la.F.to_torch() / (la.sigma_noise**2 * la.temperature)


def _dense_marglik(la, model, x, y, rep, prior, sigma=None):
    sigma = la.sigma_noise if sigma is None else sigma
    out = model(x).detach()
    if la.likelihood == "classification":
        ll = -nn.functional.cross_entropy(out, y, reduction="sum")
        h = gt.ggn(model, x, y, nn.CrossEntropyLoss(reduction="sum")) if rep in EXACT else None
    else:
        ll = -0.5 * (y - out).square().sum() / sigma**2 - out.numel() * torch.log(
            sigma * math.sqrt(2 * math.pi)
        )
        h = None
    if h is None:
        if rep in EXACT:
            j = gt.jacobian(model, x)
            j = j.reshape(-1, j.shape[-1])
            h = (j.T @ j) / sigma**2
        else:
            h = la.N * la.F.to_torch() / sigma**2
    p = h.shape[0]
    delta = prior.expand(p) if prior.dim() == 0 else prior
    P = h + torch.diag(delta)
    theta = la.theta
    return ll - 0.5 * (torch.logdet(P) - torch.log(delta).sum() + (delta * theta**2).sum())


def _dense_precision(la, model, x, y, rep):
    return _curvature(la, model, x, y, rep) + float(la.prior_precision) * torch.eye(
        la.n_params, dtype=DT
    )


# ---------------------------------------------------------------------- marginal likelihood
@pytest.mark.parametrize("rep", ALL, ids=lambda r: r.__name__)
def test_marglik_and_gradient(rep):
    model, x, y, la = _case(rep)
    d = torch.tensor(0.7, dtype=DT, requires_grad=True)
    ours = la.log_marginal_likelihood(d)
    (g,) = torch.autograd.grad(ours, d)
    d2 = torch.tensor(0.7, dtype=DT, requires_grad=True)
    ref = _dense_marglik(la, model, x, y, rep, d2)
    (g_ref,) = torch.autograd.grad(ref, d2)
    torch.testing.assert_close(ours.detach(), ref.detach(), rtol=1e-10, atol=1e-8)
    torch.testing.assert_close(g, g_ref, rtol=1e-8, atol=1e-8)
    h = 1e-5
    fd = (la.log_marginal_likelihood(0.7 + h) - la.log_marginal_likelihood(0.7 - h)) / (2 * h)
    torch.testing.assert_close(g, fd, rtol=1e-6, atol=1e-6)


def test_marglik_regression_gradient_in_sigma():
    model, x, y, la = _case(PMatKFAC, "regression")
    sig = torch.tensor(0.8, dtype=DT, requires_grad=True)
    d = torch.tensor(0.7, dtype=DT, requires_grad=True)
    ours = la.log_marginal_likelihood(d, sig)
    gd, gs = torch.autograd.grad(ours, (d, sig))
    sig2 = torch.tensor(0.8, dtype=DT, requires_grad=True)
    d2 = torch.tensor(0.7, dtype=DT, requires_grad=True)
    # the KFAC own dense matrix is of F = JᵀJ/N: rebuild s·F at σ for the reference
    f = la.F.to_torch()
    out = model(x).detach()
    ll = -0.5 * (y - out).square().sum() / sig2**2 - out.numel() * torch.log(
        sig2 * math.sqrt(2 * math.pi)
    )
    P = la.N * f / sig2**2 + d2 * torch.eye(la.n_params, dtype=DT)
    ref = ll - 0.5 * (torch.logdet(P) - la.n_params * torch.log(d2) + d2 * la.theta.square().sum())
    rd, rs = torch.autograd.grad(ref, (d2, sig2))
    torch.testing.assert_close(ours.detach(), ref.detach(), rtol=1e-10, atol=1e-8)
    torch.testing.assert_close((gd, gs), (rd, rs), rtol=1e-8, atol=1e-8)
    h = 1e-6
    fd = (la.log_marginal_likelihood(0.7, 0.8 + h) - la.log_marginal_likelihood(0.7, 0.8 - h)) / (
        2 * h
    )
    torch.testing.assert_close(gs, fd, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "rep,kind",
    [
        (PMatKFAC, "layerwise"),
        (PMatBlockDiag, "layerwise"),
        (PMatDiag, "diag"),
        (PMatDense, "diag"),
        (PMatBlockDiag, "diag"),
        (PMatDense, "layerwise"),
    ],
)
def test_structured_priors(rep, kind):
    model, x, y, la = _case(rep)
    n_layers = len(la.lc.layers)
    g = torch.Generator().manual_seed(3)
    size = n_layers if kind == "layerwise" else la.n_params
    prior = (0.3 + torch.rand(size, generator=g, dtype=DT)).requires_grad_(True)
    ours = la.log_marginal_likelihood(prior)
    (g1,) = torch.autograd.grad(ours, prior)
    vec = la._prior_vec(prior.detach()).clone().requires_grad_(True)
    ref = _dense_marglik(la, model, x, y, rep, vec)
    (gv,) = torch.autograd.grad(ref, vec)
    if kind == "layerwise":
        sizes = [e.numel() for e in la.lc.layers.values()]
        gv = torch.stack([part.sum() for part in gv.split(sizes)])
    torch.testing.assert_close(ours.detach(), ref.detach(), rtol=1e-10, atol=1e-8)
    torch.testing.assert_close(g1, gv, rtol=1e-8, atol=1e-8)
    # queries at this prior against the dense posterior
    old = la.prior_precision
    try:
        la.prior_precision = prior.detach()
        P = _curvature(la, model, x, y, rep) + torch.diag(la._prior_vec(prior.detach()))
        cov = torch.linalg.inv(P)
        torch.testing.assert_close(la.posterior_variance().to_torch(), cov.diagonal())
        j = gt.jacobian(model, x[:5]).permute(0, 1, 2)
        torch.testing.assert_close(la.functional_variance(x[:5]), j @ cov @ j.mT)
    finally:
        la.prior_precision = old


def test_unsupported_prior_structure_is_named():
    _, _, _, la = _case(PMatKFAC)
    with pytest.raises(UnsupportedError, match="per-parameter"):
        la.log_marginal_likelihood(torch.ones(la.n_params, dtype=DT))


# ---------------------------------------------------------------------- predictive and samples
@pytest.mark.parametrize("rep", ALL, ids=lambda r: r.__name__)
def test_predictive_variance_and_samples(rep):
    model, x, y, la = _case(rep)
    P = _dense_precision(la, model, x, y, rep)
    cov = torch.linalg.inv(P)
    xt = torch.randn(7, 4, dtype=DT, generator=torch.Generator().manual_seed(5))
    j = gt.jacobian(model, xt)  # (B, C, P)
    var = j @ cov @ j.mT
    torch.testing.assert_close(la.functional_variance(xt), var, rtol=1e-9, atol=1e-11)
    f = model(xt).detach()
    kappa = 1 / torch.sqrt(1 + math.pi / 8 * var.diagonal(dim1=1, dim2=2))
    torch.testing.assert_close(la.predictive(xt), torch.softmax(kappa * f, -1))
    gen = torch.Generator().manual_seed(11)
    mc = la.predictive(xt, link="mc", n_samples=50, generator=gen)
    z = torch.randn(50, 7, 3, generator=torch.Generator().manual_seed(11), dtype=DT)
    ref = torch.softmax(f + (torch.linalg.cholesky(var) @ z[..., None])[..., 0], -1).mean(0)
    torch.testing.assert_close(mc, ref)
    torch.testing.assert_close(la.posterior_variance().to_torch(), cov.diagonal())
    # samples: θ* + P^{-1/2} z with the symmetric root, exactly, and their moments
    s = la.sample(4000, generator=torch.Generator().manual_seed(2))
    zz = torch.randn(la.n_params, 4000, generator=torch.Generator().manual_seed(2), dtype=DT)
    e, q = torch.linalg.eigh(P)
    root = (q * e.rsqrt()) @ q.T
    torch.testing.assert_close(s, (la.theta[:, None] + root @ zz).T)
    emp = torch.cov(s.T)
    scale = cov.diagonal().sqrt()
    # correlation-scaled errors have a standard deviation ≤ √(2/4000) ≈ 0.022 per entry
    assert float(((emp - cov) / torch.outer(scale, scale)).abs().max()) < 0.12
    assert float(((s.mean(0) - la.theta) / scale).abs().max()) < 0.08
    pv = la.sample(2, generator=torch.Generator().manual_seed(2), as_pvectors=True)
    z2 = torch.randn(la.n_params, 2, generator=torch.Generator().manual_seed(2), dtype=DT)
    torch.testing.assert_close(pv[1].to_torch(), la.theta + root @ z2[:, 1])


def test_regression_predictive():
    model, x, y, la = _case(PMatDense, "regression")
    P = _dense_precision(la, model, x, y, PMatDense)
    j = gt.jacobian(model, x[:4])
    f, var = la.predictive(x[:4])
    torch.testing.assert_close(var, j @ torch.linalg.inv(P) @ j.mT)
    torch.testing.assert_close(f, model(x[:4]).detach())


@pytest.mark.parametrize("rep", [PMatKFAC, PMatEKFAC, PMatDense], ids=lambda r: r.__name__)
def test_last_layer(rep):
    x, y = _data()
    model = _model(seed=1)
    la = Laplace(model, _loader(x, y), representation=rep, prior_precision=0.4, subset="last_layer")
    assert la.n_params == 6 * 3 + 3
    names = [n for n, _ in model.named_parameters()][2:]
    if rep is PMatDense:
        h = gt.ggn(model, x, y, nn.CrossEntropyLoss(reduction="sum"), names=names)
    else:
        h = la.N * la.F.to_torch()
    cov = torch.linalg.inv(h + 0.4 * torch.eye(la.n_params, dtype=DT))
    xt = x[:9]
    j = gt.jacobian(model, xt, names=names)
    torch.testing.assert_close(la.functional_variance(xt), j @ cov @ j.mT)
    if rep is not PMatDense:
        assert "Kronecker identity" in la.explain()


# ---------------------------------------------------------------------- prior optimisation, grid
def test_optimize_prior_precision_scalar():
    from scipy.optimize import minimize_scalar

    model, x, y, la = _case(PMatKFAC)
    p = la.N * la.F.to_torch()
    ev = torch.linalg.eigvalsh(p)
    ll = -nn.functional.cross_entropy(model(x).detach(), y, reduction="sum")
    t2 = float(la.theta.square().sum())
    n = la.n_params

    def neg(logd):
        d = math.exp(logd)
        return -float(ll - 0.5 * (torch.log(ev.clamp_min(0) + d).sum() - n * logd + d * t2))

    best = math.exp(
        minimize_scalar(neg, bounds=(-10, 10), method="bounded", options={"xatol": 1e-12}).x
    )
    old = la.prior_precision
    try:
        found = la.optimize_prior_precision()
        assert abs(float(found) - best) / best < 1e-4
    finally:
        la.prior_precision = old


def test_optimize_prior_precision_layerwise_is_stationary():
    _, _, _, la = _case(PMatEKFAC)
    old = la.prior_precision
    try:
        found = la.optimize_prior_precision("layerwise")
        assert found.shape == (2,)
        d = found.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(la.log_marginal_likelihood(d), d)
        assert float((g * found).abs().max()) < 1e-6
        assert float(la.log_marginal_likelihood(found)) >= float(la.log_marginal_likelihood(old))
    finally:
        la.prior_precision = old


def test_grid_reuses_one_factorisation(monkeypatch):
    _, _, _, la = _case(PMatKFAC)
    la.log_marginal_likelihood()  # builds the eigen form
    calls = []
    real = torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda *a, **k: calls.append(1) or real(*a, **k))
    vals = [la.log_marginal_likelihood(d) for d in torch.logspace(-2, 2, 100, dtype=DT)]
    assert not calls and all(math.isfinite(float(v)) for v in vals)


# ---------------------------------------------------------------------- above dense_limit
def test_kfac_above_dense_limit():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(40, 60, generator=g, dtype=DT)
    y = torch.randint(3, (40,), generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(60, 50), nn.Tanh(), nn.Linear(50, 3)).to(DT)
    la = Laplace(model, _loader(x, y, 20), representation=PMatKFAC, prior_precision=2.0)
    assert la.n_params > CompilePolicy().dense_limit
    p = la.N * la.F.to_torch() + 2.0 * torch.eye(la.n_params, dtype=DT)
    chol = torch.linalg.cholesky(p)
    logdet = 2 * torch.log(chol.diagonal()).sum()
    torch.testing.assert_close(la.log_det_posterior_precision(), logdet)
    comp = la.posterior_precision.compile(CompilePolicy())
    torch.testing.assert_close(comp.logdet(), logdet)
    text = comp.explain()
    assert "stochastic" not in text and "conjugate" not in text and "dense" not in text
    j = gt.jacobian(model, x[:3])
    cov_j = torch.cholesky_solve(j.reshape(-1, la.n_params).T, chol)
    ref = (j.reshape(-1, la.n_params) @ cov_j).reshape(3, 3, 3, 3).diagonal(dim1=0, dim2=2)
    torch.testing.assert_close(la.functional_variance(x[:3]), ref.permute(2, 0, 1))


def test_implicit_iterative_reports_errors():
    model, x, y, la_exact = _case(PMatImplicit)
    la = Laplace(
        model,
        _loader(x, y),
        representation=PMatImplicit,
        prior_precision=0.7,
        settings=LaplaceSettings(dense_limit=10, slq_probes=20, slq_steps=30, cg_tol=1e-10),
    )
    assert la.route() == "iterative"
    with pytest.warns(EstimateWarning):
        est = la.log_det_posterior_precision()
    exact = la_exact.log_det_posterior_precision()
    err = la.last_error["logdet"]
    assert float(err) > 0 and abs(float(est - exact)) < 5 * float(err)
    with pytest.warns(EstimateWarning):
        var = la.functional_variance(x[:4])
    ref = la_exact.functional_variance(x[:4])
    bound = la.last_error["functional_variance"]
    assert bool(((var - ref).abs() <= bound + 1e-12).all())
    with pytest.raises(UnsupportedError, match="dense_limit"):
        la.sample(3)


def test_posterior_precision_expression_is_exact():
    model, x, y, la = _case(PMatEKFAC)
    p = _dense_precision(la, model, x, y, PMatEKFAC)
    comp = la.posterior_precision.compile(CompilePolicy(dense_limit=4))
    torch.testing.assert_close(comp.logdet(), torch.logdet(p))
    assert "stochastic" not in comp.explain()


# ---------------------------------------------------------------------- bad input
def test_bad_inputs():
    x, y = _data()
    model = _model()
    with pytest.raises(DataError, match="likelihood='regression'"):
        Laplace(model, _loader(x, torch.randn(24, 3, dtype=DT)), "classification")
    with pytest.raises(DataError, match="likelihood='classification'"):
        Laplace(model, _loader(x, y), "regression")
    with pytest.raises(ValueError, match="prior_precision must be > 0"):
        Laplace(model, _loader(x, y), prior_precision=0.0)
    la = Laplace(model, _loader(x, y), representation=PMatDiag)
    with pytest.raises(ValueError, match="prior_precision must be > 0"):
        la.log_marginal_likelihood(-1.0)
    with pytest.raises(ShapeError, match="cannot take inputs"):
        Laplace(model, _loader(torch.randn(24, 5, dtype=DT), y))
    with pytest.raises(ShapeError, match="fitted on inputs"):
        la.predictive(torch.randn(3, 5, dtype=DT))
    with torch.no_grad():
        model[0].weight.add_(0.1)
    with pytest.raises(DataError, match="changed since the Laplace fit"):
        la.predictive(x[:2])
    with pytest.raises(MemoryLimitError, match="PMatKFAC"):
        Laplace(
            model,
            _loader(x, y),
            representation=PMatDense,
            settings=LaplaceSettings(memory_limit=1000),
        )
