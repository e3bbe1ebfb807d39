"""Natural-gradient training (apps/optim.py) against independent computations: the dense Fisher from
torch.func with exact damping, the representations' own dense matrices, hand-written updates."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nngeo_ops import FIM, FIM_MonteCarlo
from nngeo_ops.apps import AdaptiveDamping, NaturalGradient, Preconditioner
from nngeo_ops.apps.damping import as_damping
from nngeo_ops.errors import (
    DataError,
    InvalidArgumentError,
    NonFiniteError,
    ShapeError,
    UnsupportedError,
)
from nngeo_ops.nn import (
    PMatBlockDiag,
    PMatDense,
    PMatDiag,
    PMatEKFAC,
    PMatImplicit,
    PMatKFAC,
    PMatLowRank,
    PMatQuasiDiag,
)
from tests.nn import groundtruth as gt

D = torch.float64
LAM, LR = 1e-2, 0.3


def mlp(d_in=6, hidden=10, bias=True):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(d_in, hidden, bias=bias), nn.Tanh(), nn.Linear(hidden, 3, bias=bias)
    ).to(D)


def cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4 * 4, 3)
    ).to(D)


def batch(n=8, seed=0, shape=(6,)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g, dtype=D), torch.randint(0, 3, (n,), generator=g)


def flat_params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def flat_grad(model, x, y):
    f, w = gt.flat_fn(model)
    return torch.func.grad(lambda v: F.cross_entropy(f(v, x), y))(w)


def one_ng_step(model, x, y, **kw):
    kw.setdefault("damping", LAM)
    opt = NaturalGradient(model, lr=LR, **kw)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step(batch=(x, y))
    return opt


def solve(M, g, lam=LAM):
    return torch.linalg.solve(M + lam * torch.eye(M.shape[0], dtype=D), g)


# ---------------------------------------------------------------------- one step
@pytest.mark.parametrize("rep", [PMatDense, PMatDiag, PMatBlockDiag])
@pytest.mark.parametrize("fisher", ["exact", "empirical"])
def test_one_step_equals_the_dense_fisher(rep, fisher):
    model = mlp()
    x, y = batch()
    w0, g = flat_params(model), flat_grad(model, x, y)
    if fisher == "exact":
        M = gt.fim(model, x, "classif_logits")
    else:
        M = gt.empirical_fisher(model, x, y, lambda o, t: F.cross_entropy(o[None], t[None]))
    if rep is PMatDiag:
        M = torch.diag(M.diagonal())
    elif rep is PMatBlockDiag:
        n1 = sum(p.numel() for p in model[0].parameters())
        M = torch.block_diag(M[:n1, :n1], M[n1:, n1:])
    opt = one_ng_step(model, x, y, representation=rep, fisher=fisher)
    torch.testing.assert_close(flat_params(model), w0 - LR * solve(M, g))
    assert opt.preconditioner.last_source == "the training step's forward/backward"


@pytest.mark.parametrize("rep", [PMatKFAC, PMatEKFAC])
@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_one_step_kfac_ekfac_equals_their_dense_matrix(rep, arch):
    if arch == "cnn":
        model, (x, y) = cnn(), batch(shape=(1, 4, 4))
    else:
        model, (x, y) = mlp(), batch()
    w0, g = flat_params(model), flat_grad(model, x, y)
    M = FIM(model, [(x, y)], rep).to_torch()  # EKFAC with its diagonal refit on the batch
    one_ng_step(model, x, y, representation=rep, fisher="exact")
    torch.testing.assert_close(flat_params(model), w0 - LR * solve(M, g))


def test_one_step_kfac_above_the_dense_limit():
    # 3 459 parameters (> CompilePolicy.dense_limit); reference: per layer, the eigenbases of the
    # factors, (G ⊗ A + λI)⁻¹ = (Q_G ⊗ Q_A) diag(1 / (λ_G ⊗ λ_A + λ)) (Q_G ⊗ Q_A)ᵀ, in Kronecker
    # order (each bias after its row of weights) mapped to parameter order by hand
    model, (x, y) = mlp(d_in=50, hidden=64), batch(n=16, shape=(50,))
    w0, g = flat_params(model), flat_grad(model, x, y)
    ref = FIM(model, [(x, y)], PMatKFAC)
    parts, i = [], 0
    for lid in ("0", "2"):
        lin = model[int(lid)]
        n_out, n_in = lin.weight.shape
        a, gg = ref.get_factors(lid)
        ea, qa = torch.linalg.eigh(a)
        eg, qg = torch.linalg.eigh(gg)
        n_w = n_out * n_in
        gw = g[i : i + n_w].reshape(n_out, n_in)
        gb = g[i + n_w : i + n_w + n_out]
        v = torch.cat([gw, gb[:, None]], 1)  # (n_out, n_in + 1): Kronecker order
        t = qg.T @ v @ qa / (torch.outer(eg, ea) + LAM)
        sol = qg @ t @ qa.T
        parts += [sol[:, :n_in].reshape(-1), sol[:, n_in]]
        i += n_w + n_out
    assert i == g.numel() > 3000
    opt = one_ng_step(model, x, y, representation=PMatKFAC, fisher="exact")
    torch.testing.assert_close(flat_params(model), w0 - LR * torch.cat(parts))
    # 16 examples < 51 inputs: A is low rank, solved over its thin basis (no complete basis)
    assert "A_rows" in opt.preconditioner.stats["0"]
    assert "shifted thin eigen form" in opt.preconditioner.explain()


def _kfac_direction(model, factors, g, lam=LAM):
    """(G ⊗ A + λI)⁻¹ g per Linear layer of ``model`` (factors {lid: (A, G)}), from torch.linalg.eigh
    of the dense factors, in Kronecker order (each bias after its row) mapped to parameter order."""
    parts, i = [], 0
    for lid, (a, gg) in factors.items():
        n_out, n_in = model[int(lid)].weight.shape
        ea, qa = torch.linalg.eigh(a)
        eg, qg = torch.linalg.eigh(gg)
        n_w = n_out * n_in
        v = torch.cat([g[i : i + n_w].reshape(n_out, n_in), g[i + n_w : i + n_w + n_out, None]], 1)
        sol = qg @ (qg.T @ v @ qa / (torch.outer(eg, ea) + lam)) @ qa.T
        parts += [sol[:, :n_in].reshape(-1), sol[:, n_in]]
        i += n_w + n_out
    return torch.cat(parts)


def test_averaged_low_rank_factors_above_the_dense_limit_equal_the_dense_formula():
    # two refreshes with β: each A of 16 rows, averaged as 32 stacked rows (≤ 2/3 of 51 and of 65
    # inputs: kept thin); the second step equals the eigh formula on β·A₁ + (1 − β)·A₂ (and G)
    beta = 0.7
    model = mlp(d_in=50, hidden=64)
    (x1, y1), (x2, y2) = batch(n=16, shape=(50,)), batch(n=16, seed=1, shape=(50,))
    opt = NaturalGradient(model, lr=LR, fisher="exact", ema_decay=beta, damping=LAM)
    refs = []
    for x, y in ((x1, y1), (x2, y2)):
        refs.append(FIM(model, [(x, y)], PMatKFAC))
        w, g = flat_params(model), flat_grad(model, x, y)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step(batch=(x, y))
    assert g.numel() > 3000
    factors = {}
    for lid in ("0", "2"):
        (a1, g1), (a2, g2) = (r.get_factors(lid) for r in refs)
        factors[lid] = (beta * a1 + (1 - beta) * a2, beta * g1 + (1 - beta) * g2)
        assert opt.preconditioner.stats[lid]["A_rows"].shape[0] == 32
    torch.testing.assert_close(flat_params(model), w - LR * _kfac_direction(model, factors, g))
    assert "shifted thin eigen form" in opt.preconditioner.explain()


def test_one_step_monte_carlo_draws_the_labels_of_its_generator():
    model = mlp()
    x, y = batch()
    w0, g = flat_params(model), flat_grad(model, x, y)
    ref = FIM_MonteCarlo(model, [(x, y)], PMatKFAC, generator=torch.Generator().manual_seed(5))
    one_ng_step(model, x, y, fisher="mc", generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(flat_params(model), w0 - LR * solve(ref.to_torch(), g))


def test_one_step_implicit_cg():
    model = mlp()
    x, y = batch()
    w0, g = flat_params(model), flat_grad(model, x, y)
    M = gt.fim(model, x, "classif_logits")
    opt = one_ng_step(
        model, x, y, representation=PMatImplicit, fisher="exact", cg_iters=300, cg_tol=1e-13
    )
    torch.testing.assert_close(flat_params(model), w0 - LR * solve(M, g))
    assert "truncated CG" in opt.preconditioner.explain()
    # preconditioned by KFAC: the same solution
    model2 = mlp()
    one_ng_step(
        model2,
        x,
        y,
        representation=PMatImplicit,
        fisher="exact",
        cg_iters=300,
        cg_tol=1e-13,
        cg_precond="kfac",
    )
    torch.testing.assert_close(flat_params(model2), w0 - LR * solve(M, g))


def test_truncated_cg_warm_starts_from_the_previous_solution():
    model = mlp()
    x, y = batch()
    opt = NaturalGradient(
        model, lr=0.0, representation=PMatImplicit, fisher="exact", damping=LAM, cg_iters=2
    )
    M = gt.fim(model, x, "classif_logits")
    g = flat_grad(model, x, y)
    errs = []
    for _ in range(4):  # lr=0: the same system each step, solved further from the last solution
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step(batch=(x, y))
        errs.append(float((opt.preconditioner.route.x0 - solve(M, g)).norm()))
    assert errs[-1] < 0.5 * errs[0]


def test_momentum_weight_decay_and_kl_clip_against_a_hand_written_update():
    model = mlp()
    ref = copy.deepcopy(model)
    mu, wd, kl = 0.9, 1e-2, 1e-3
    opt = NaturalGradient(
        model,
        lr=LR,
        representation=PMatDense,
        fisher="exact",
        damping=LAM,
        momentum=mu,
        weight_decay=wd,
        kl_clip=kl,
    )
    w, buf = flat_params(ref), None
    for k in range(3):
        x, y = batch(seed=k)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step(batch=(x, y))
        # by hand, at the reference model's parameters
        torch.nn.utils.vector_to_parameters(w, ref.parameters())
        g = flat_grad(ref, x, y) + wd * w
        d = solve(gt.fim(ref, x, "classif_logits"), g)
        nu = min(1.0, math.sqrt(kl / (LR**2 * float(g @ d))))
        d = nu * d
        buf = d if buf is None else mu * buf + d
        w = w - LR * buf
        torch.testing.assert_close(flat_params(model), w)


# ---------------------------------------------------------------------- schedules, EMA
def test_ema_of_kfac_factors_and_of_the_diagonal():
    beta = 0.7
    model = mlp(d_in=30)  # first layer's A kept as rows (8 rows < 31 / 2 is false: 16 ≤ 31)
    (x1, y1), (x2, y2) = batch(shape=(30,)), batch(seed=1, shape=(30,))
    opt = NaturalGradient(model, lr=LR, fisher="exact", ema_decay=beta, damping=LAM)
    dmodel = mlp(d_in=30)
    dopt = NaturalGradient(
        dmodel, lr=LR, representation=PMatDiag, fisher="exact", ema_decay=beta, damping=LAM
    )
    refs, drefs = [], []
    for x, y in ((x1, y1), (x2, y2)):
        refs.append(FIM(model, [(x, y)], PMatKFAC))
        drefs.append(gt.fim(dmodel, x, "classif_logits").diagonal())
        for m, o in ((model, opt), (dmodel, dopt)):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            o.step(batch=(x, y))
    for lid in ("0", "2"):
        a, g = opt.preconditioner.factors(lid)
        (a1, g1), (a2, g2) = (r.get_factors(lid) for r in refs)
        torch.testing.assert_close(a, beta * a1 + (1 - beta) * a2)
        torch.testing.assert_close(g, beta * g1 + (1 - beta) * g2)
    torch.testing.assert_close(
        dopt.preconditioner.stats["diag"], beta * drefs[0] + (1 - beta) * drefs[1]
    )


def test_ekfac_keeps_its_basis_between_refactorisations_and_averages_its_diagonal():
    beta = 0.5
    model = mlp()
    (x1, y1), (x2, y2) = batch(), batch(seed=1)
    opt = NaturalGradient(
        model,
        lr=LR,
        representation=PMatEKFAC,
        fisher="exact",
        ema_decay=beta,
        damping=LAM,
        inverse_every=2,
    )
    first = FIM(model, [(x1, y1)], PMatEKFAC)  # basis and diagonal of refresh 1
    opt.zero_grad()
    F.cross_entropy(model(x1), y1).backward()
    opt.step(batch=(x1, y1))
    w1 = flat_params(model)
    on_model = FIM(model, [(x2, y2)], PMatEKFAC, variant="classif_logits").generator
    second = PMatEKFAC.from_factors(on_model, {k: dict(v) for k, v in first.data.items()})
    second.update_diag([(x2, y2)])  # the refit at θ₁ in basis 1
    opt.zero_grad()
    F.cross_entropy(model(x2), y2).backward()
    g = flat_grad(model, x2, y2)
    opt.step(batch=(x2, y2))
    for lid in ("0", "2"):
        s = opt.preconditioner.stats[lid]
        torch.testing.assert_close(s["QA"], first.data[lid]["QA"])
        torch.testing.assert_close(
            s["diag"], beta * first.data[lid]["diag"] + (1 - beta) * second.data[lid]["diag"]
        )
    # the step used that operator: Eigen(Q₁, averaged diagonal) in parameter order
    M = opt.preconditioner.curvature.to_torch()
    torch.testing.assert_close(flat_params(model), w1 - LR * solve(M, g))


def test_inverse_every_reuses_the_operator_between_refactorisations():
    model = mlp()
    (x1, y1), (x2, y2) = batch(), batch(seed=1)
    opt = NaturalGradient(
        model, lr=LR, fisher="exact", damping=LAM, update_every=1, inverse_every=2
    )
    M1 = FIM(model, [(x1, y1)], PMatKFAC).to_torch()
    opt.zero_grad()
    F.cross_entropy(model(x1), y1).backward()
    opt.step(batch=(x1, y1))
    w1, g = flat_params(model), flat_grad(model, x2, y2)
    opt.zero_grad()
    F.cross_entropy(model(x2), y2).backward()
    opt.step(batch=(x2, y2))
    torch.testing.assert_close(flat_params(model), w1 - LR * solve(M1, g))
    assert opt.preconditioner.stats is not opt.preconditioner.frozen  # refreshed, not rebuilt


def test_damping_schedule_and_pi_damping():
    model = mlp(bias=False)
    x, y = batch()
    lams = [0.1, 0.01]
    opt = NaturalGradient(
        model,
        lr=LR,
        fisher="exact",
        damping=lambda k: lams[k],
        pi_damping=True,
        update_every=1,
    )
    for k in range(2):
        w0, g = flat_params(model), flat_grad(model, x, y)
        ref = FIM(model, [(x, y)], PMatKFAC)
        blocks = []
        for lid in ("0", "2"):  # (G + √λ/π I) ⊗ (A + π√λ I), Martens & Grosse's π
            a, gg = ref.get_factors(lid)
            pi = math.sqrt((a.trace() / a.shape[0]) / (gg.trace() / gg.shape[0]))
            sq = math.sqrt(lams[k])
            blocks.append(
                torch.kron(
                    gg + sq / pi * torch.eye(gg.shape[0], dtype=D),
                    a + pi * sq * torch.eye(a.shape[0], dtype=D),
                )
            )
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step(batch=(x, y))
        d = torch.linalg.solve(torch.block_diag(*blocks), g)
        torch.testing.assert_close(flat_params(model), w0 - LR * d)


def test_adaptive_damping_follows_the_reduction_ratio():
    ad = AdaptiveDamping(initial=1.0, every=2)
    om = (19 / 20) ** 2
    assert math.isclose(ad.update(0.9), om)
    assert math.isclose(ad.update(0.5), om)
    assert math.isclose(ad.update(0.1), 1.0)
    assert math.isclose(ad.update(float("nan")), 1 / om)
    model = mlp()
    x, y = batch(n=32)
    opt = NaturalGradient(model, lr=0.05, fisher="exact", damping=AdaptiveDamping(1.0, every=1))

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    w0, g = flat_params(model), flat_grad(model, x, y)
    loss0 = float(closure().detach())
    M = FIM(model, [(x, y)], PMatKFAC).to_torch()
    opt.step(closure, batch=(x, y))
    delta = flat_params(model) - w0
    pred = float(g @ delta + 0.5 * delta @ (M + torch.eye(M.shape[0], dtype=D)) @ delta)
    with torch.no_grad():
        rho = (float(F.cross_entropy(model(x), y)) - loss0) / pred
    dmp = opt.preconditioner.damping
    assert math.isclose(dmp.last_rho, rho, rel_tol=1e-9)
    assert dmp.value == pytest.approx((19 / 20) if rho > 0.75 else (20 / 19 if rho < 0.25 else 1))
    with pytest.raises(InvalidArgumentError, match="closure"):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step(batch=(x, y))


# ---------------------------------------------------------------------- composition, checkpoints
@pytest.mark.parametrize("make_opt", ["sgd", "adam"])
def test_preconditioner_composes_with_torch_optimisers(make_opt):
    model = mlp()
    x, y = batch()
    pre = Preconditioner(model, representation=PMatDense, fisher="exact", damping=LAM)
    opt = (
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        if make_opt == "sgd"
        else torch.optim.Adam(model.parameters(), lr=1e-2)
    )
    for k in range(2):
        x, y = batch(seed=k)
        d_ref = solve(gt.fim(model, x, "classif_logits"), flat_grad(model, x, y))
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        d = pre.step(batch=(x, y))
        torch.testing.assert_close(d.to_torch(), d_ref)
        torch.testing.assert_close(
            torch.cat([p.grad.reshape(-1) for p in model.parameters()]), d_ref
        )
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    assert pre.steps == 2


@pytest.mark.parametrize("rep", [PMatKFAC, PMatEKFAC])
def test_state_dict_round_trip_continues_the_same_trajectory(rep):
    kw = dict(
        lr=0.1,
        representation=rep,
        fisher="mc",
        update_every=2,
        inverse_every=4,
        ema_decay=0.8,
        momentum=0.9,
        damping=LAM,
    )
    batches = [batch(seed=k) for k in range(7)]

    def train(model, opt, bs):
        for x, y in bs:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step(batch=(x, y))

    model = mlp()
    opt = NaturalGradient(model, generator=torch.Generator().manual_seed(1), **kw)
    train(model, opt, batches[:3])
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    train(model, opt, batches[3:])
    model2 = mlp()
    nn.init.zeros_(model2[0].weight)  # a different model, then the checkpoint
    opt2 = NaturalGradient(model2, generator=torch.Generator().manual_seed(99), **kw)
    model2.load_state_dict(saved_model)
    opt2.load_state_dict(saved_opt)
    train(model2, opt2, batches[3:])
    torch.testing.assert_close(flat_params(model2), flat_params(model), rtol=1e-12, atol=1e-12)


def test_uncovered_parameters_get_plain_sgd_steps():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = mlp()
            self.scale = nn.Parameter(torch.tensor(1.5, dtype=D))

        def forward(self, x):
            return self.net(x) * self.scale

    model = Scaled()
    x, y = batch()
    with pytest.warns(UserWarning, match="scale"):
        opt = NaturalGradient(model, lr=LR, fisher="exact", damping=LAM, momentum=0.5)
    s0 = model.scale.detach().clone()
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    gs = model.scale.grad.clone()
    opt.step(batch=(x, y))
    torch.testing.assert_close(model.scale.detach(), s0 - LR * gs)


# ---------------------------------------------------------------------- bad input
def _fails_unchanged(opt, model, x, y, err, match, batch_=None):
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    w0 = flat_params(model)
    grads = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(err, match=match):
        opt.step(batch=(x, y) if batch_ is None else batch_)
    torch.testing.assert_close(flat_params(model), w0)
    for p, g in zip(model.parameters(), grads):
        torch.testing.assert_close(p.grad, g, equal_nan=True)
    assert opt.preconditioner.steps == 0 and opt.state_dict()["state"] == {}


def test_bad_inputs_raise_and_leave_the_parameters_unchanged():
    x, y = batch()
    with pytest.raises(InvalidArgumentError, match="damping"):
        NaturalGradient(mlp(), damping=-1.0)
    for rep in (PMatLowRank, PMatQuasiDiag):
        with pytest.raises(UnsupportedError, match="cannot be refreshed"):
            NaturalGradient(mlp(), representation=rep)
    with pytest.raises(InvalidArgumentError, match="inverse_every"):
        NaturalGradient(mlp(), update_every=2, inverse_every=3)
    # a batch of the wrong size for the recorded forward
    model = mlp()
    opt = NaturalGradient(model, lr=LR, momentum=0.9)
    _fails_unchanged(opt, model, x, y, ShapeError, "training step", batch_=batch(n=5))
    # a batch of the wrong shape for a separate pass
    model = mlp()
    opt = NaturalGradient(model, lr=LR, refresh="batch")
    _fails_unchanged(opt, model, x, y, ShapeError, "inputs, labels", batch_=batch(shape=(4,)))
    # a schedule that returns a negative damping
    model = mlp()
    opt = NaturalGradient(model, lr=LR, damping=lambda k: -1.0)
    _fails_unchanged(opt, model, x, y, InvalidArgumentError, "damping")
    # NaN in the curvature (and the loss)
    model = mlp()
    opt = NaturalGradient(model, lr=LR, momentum=0.9)
    xn = x.clone()
    xn[0, 0] = float("inf")
    _fails_unchanged(opt, model, xn, y, NonFiniteError, "NaN or inf")
    # NaN in the gradient only
    model = mlp()
    opt = NaturalGradient(model, lr=LR, representation=PMatDiag, fisher="exact")
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    model[0].weight.grad[0, 0] = float("nan")
    w0 = flat_params(model)
    with pytest.raises(NonFiniteError):
        opt.step(batch=(x, y))
    torch.testing.assert_close(flat_params(model), w0)
    # no backward before step
    model = mlp()
    opt = NaturalGradient(model, lr=LR, refresh="batch")
    with pytest.raises(DataError, match="backward"):
        opt.step(batch=(x, y))
    # no batch and no recorded step (the forward ran without gradients)
    model = mlp()
    opt = NaturalGradient(model, lr=LR)
    with torch.no_grad():
        model(x)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    with pytest.raises(DataError, match="batch"):
        opt.step()


def test_damping_specs():
    assert as_damping(0.5)(3) == 0.5
    assert as_damping(lambda k: 0.1 * k)(2) == pytest.approx(0.2)
    assert isinstance(as_damping("adaptive"), AdaptiveDamping)
    with pytest.raises(InvalidArgumentError):
        as_damping("big")
    with pytest.raises(InvalidArgumentError):
        as_damping(float("nan"))


def test_fallback_to_a_pass_over_the_batch_is_announced_and_exact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.ReLU(inplace=True), nn.Linear(10, 3)).to(D)
    x, y = batch()
    w0, g = flat_params(model), flat_grad(model, x, y)
    M = FIM(model, [(x, y)], PMatKFAC).to_torch()
    with pytest.warns(UserWarning, match="separate pass.*in-place"):
        opt = one_ng_step(model, x, y, fisher="exact")
    assert opt.preconditioner.last_source == "a separate pass over the batch"
    torch.testing.assert_close(flat_params(model), w0 - LR * solve(M, g))


def test_update_curvature_precondition_and_explain():
    model = mlp()
    x, y = batch()
    pre = Preconditioner(model, representation=PMatKFAC, fisher="exact", damping=LAM)
    with pytest.raises(DataError, match="no curvature"):
        pre.precondition(torch.zeros(103, dtype=D))
    pre.update_curvature((x, y))  # nothing recorded: a pass over the batch
    g = flat_grad(model, x, y)
    M = FIM(model, [(x, y)], PMatKFAC).to_torch()
    torch.testing.assert_close(pre.precondition(g), solve(M, g))
    assert pre.steps == 0
    text = pre.explain()
    assert "exact: (F + λI)⁻¹" in text and "eigen" in text.lower()
