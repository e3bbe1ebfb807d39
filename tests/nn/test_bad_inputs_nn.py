"""Bad input to the nn layer: each row asserts the exception type and that the message names the fix.

The library never returns a silent wrong answer nor fails deep inside torch: a row per class of
mistake (issue 8, nn half), every row checking ``pytest.raises(Type, match=fix)``.
"""

import warnings

import groundtruth as gt
import numpy as np
import pytest
import torch
from models import loader_of, make
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

from nngeo_ops.errors import (
    ArgumentTypeError,
    DataError,
    InvalidArgumentError,
    NonFiniteError,
    NotPSDError,
    NotSymmetricError,
    ShapeError,
    UnsupportedError,
)
from nngeo_ops.nn import (
    FIM,
    GGN,
    FIM_MonteCarlo,
    GramMatrix,
    Hessian,
    Jacobian,
    LayerCollection,
    PMatBlockDiag,
    PMatDense,
    PMatDiag,
    PMatEKFAC,
    PMatImplicit,
    PMatKFAC,
    PMatLowRank,
    PVector,
)


class SqrtAbs(nn.Module):
    """sqrt(|x|): finite at 0, with an infinite derivative there."""

    def forward(self, x):
        return x.abs().sqrt()


def sqrt_model():
    """Outputs finite, derivatives of layer '0' not: one hidden unit is exactly 0 on every input."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), SqrtAbs(), nn.Linear(4, 3)).double()
    with torch.no_grad():
        model[0].weight[0] = 0.0
        model[0].bias[0] = 0.0
    x = torch.randn(6, 4, dtype=torch.float64)
    assert torch.isfinite(model(x)).all()
    return model, loader_of(x)


NONFINITE_FIX = r"layers \['0'.*add a small epsilon"


def _implicit_mv():
    model, loader = sqrt_model()
    F = FIM(model, loader, PMatImplicit, progress=False)
    F.mv(torch.ones(F.size(0), dtype=torch.float64))


def _implicit_cached_mv():
    model, loader = sqrt_model()
    F = FIM(model, loader, lambda **kw: PMatImplicit(cache=True, **kw), progress=False)
    F.mv(torch.ones(F.size(0), dtype=torch.float64))


def _hessian(rep):
    def call():
        model, loader = sqrt_model()
        loader = [(x, torch.zeros(x.shape[0], dtype=torch.long)) for (x,) in loader]
        H = Hessian(model, loader, nn.CrossEntropyLoss(), rep, progress=False)
        H.mv(torch.ones(H.size(0), dtype=torch.float64))

    return call


def _built(rep):
    return lambda: FIM(sqrt_model()[0], sqrt_model()[1], rep, progress=False)


def _regression(cov):
    def call():
        model, x = make("mlp")
        FIM(model, loader_of(x), PMatDiag, variant="regression", covariance=cov, progress=False)

    return call


def _solve(regul, rep=PMatDiag, **kw):
    def call():
        model, x = make("mlp")
        F = FIM(model, loader_of(x), rep, progress=False)
        F.solve(torch.ones(F.size(0), dtype=torch.float64), regul=regul, **kw)

    return call


def _ntk_solve(regul):
    def call():
        model, x = make("mlp")
        K = GramMatrix(model, loader_of(x), progress=False)
        K.solve(torch.ones(K.size(0) * K.size(1), dtype=torch.float64), regul=regul)

    return call


def _all_ignored(rep):
    def call():
        model, x = make("mlp")
        y = torch.full((x.shape[0],), -100)
        F = GGN(model, loader_of(x, y), nn.CrossEntropyLoss(), rep, progress=False)
        F.mv(torch.ones(F.size(0), dtype=torch.float64))

    return call


def _hessian_all_ignored():
    model, x = make("mlp")
    y = torch.full((x.shape[0],), -100)
    Hessian(model, loader_of(x, y), nn.CrossEntropyLoss(), PMatDense, progress=False)


def _resampling_loader_implicit(cache):
    def call():
        model, x = make("mlp")
        y = torch.randint(0, 3, (x.shape[0],))
        ds = TensorDataset(x, y)
        sampler = RandomSampler(ds, replacement=True, generator=torch.Generator().manual_seed(0))
        F = FIM(
            model,
            DataLoader(ds, batch_size=3, sampler=sampler),
            lambda **kw: PMatImplicit(cache=cache, **kw),
            progress=False,
        )
        v = torch.ones(F.size(0), dtype=torch.float64)
        F.mv(v)
        F.mv(v)  # the second pass draws other examples
        F.op.J @ v  # the Jacobian factor checks its own passes

    return call


ROWS = [
    # non-finite statistics while the outputs are finite: caught where they are produced
    ("nonfinite-diag", _built(PMatDiag), NonFiniteError, NONFINITE_FIX),
    ("nonfinite-kfac", _built(PMatKFAC), NonFiniteError, NONFINITE_FIX),
    ("nonfinite-ekfac", _built(PMatEKFAC), NonFiniteError, NONFINITE_FIX),
    ("nonfinite-dense", _built(PMatDense), NonFiniteError, NONFINITE_FIX),
    ("nonfinite-blockdiag", _built(PMatBlockDiag), NonFiniteError, NONFINITE_FIX),
    ("nonfinite-lowrank", _built(PMatLowRank), NonFiniteError, NONFINITE_FIX),
    ("nonfinite-implicit", _implicit_mv, NonFiniteError, NONFINITE_FIX),
    ("nonfinite-implicit-cached", _implicit_cached_mv, NonFiniteError, NONFINITE_FIX),
    ("nonfinite-hessian-dense", _hessian(PMatDense), NonFiniteError, NONFINITE_FIX),
    ("nonfinite-hessian-implicit", _hessian(PMatImplicit), NonFiniteError, NONFINITE_FIX),
    # the regression covariance is a variance: positive, finite, symmetric positive definite
    ("covariance-negative", _regression(-1.0), NotPSDError, "variance.*not a precision"),
    ("covariance-negative-diag", _regression(torch.tensor([1.0, -2, 1])), NotPSDError, "> 0"),
    ("covariance-nan", _regression(float("nan")), NonFiniteError, "give a finite covariance"),
    (
        "covariance-not-psd",
        _regression(torch.tensor([[1.0, 2, 0], [2, 1, 0], [0, 0, 1]])),
        NotPSDError,
        r"SPD matrix \(e.g. S \+ eps \* I\)",
    ),
    (
        "covariance-not-symmetric",
        _regression(torch.tensor([[1.0, 0.5, 0], [0, 1, 0], [0, 0, 1]])),
        NotSymmetricError,
        r"\(S \+ S.T\) / 2",
    ),
    ("covariance-3d", _regression(torch.ones(2, 2, 2)), ShapeError, "square"),
    ("covariance-string", _regression("1.0"), ArgumentTypeError, "number, a vector or a matrix"),
    # the damping λ: one finite number
    ("regul-nan", _solve(float("nan")), NonFiniteError, "finite damping"),
    ("regul-inf-kfac-pi", _solve(float("inf"), PMatKFAC, damping="pi"), NonFiniteError, "finite"),
    ("regul-tensor", _solve(torch.ones(3)), ArgumentTypeError, "add a diagonal explicitly"),
    ("regul-string", _solve("1e-3"), ArgumentTypeError, "regul must be a number"),
    ("regul-ntk-nan", _ntk_solve(float("nan")), NonFiniteError, "finite damping"),
    # every label ignored: a mean over no target, said before any division
    ("ce-all-ignored-dense", _all_ignored(PMatDense), DataError, "reduction='sum'"),
    ("ce-all-ignored-kfac", _all_ignored(PMatKFAC), DataError, "reduction='sum'"),
    ("ce-all-ignored-implicit", _all_ignored(PMatImplicit), DataError, "reduction='sum'"),
    ("ce-all-ignored-hessian", _hessian_all_ignored, DataError, "not ignore_index"),
    # an implicit operator must be one matrix: every product reads the batches of the first
    ("resampling-loader-implicit", _resampling_loader_implicit(False), DataError, "replacement"),
    ("resampling-loader-cached", _resampling_loader_implicit(True), DataError, "replacement"),
]


@pytest.mark.parametrize("call, exc, fix", [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_bad_input(call, exc, fix):
    with pytest.raises(exc, match=fix):
        call()


def test_valid_damping_and_covariance_still_accepted():
    model, x = make("mlp")
    F = FIM(model, loader_of(x), PMatDiag, progress=False)
    v = torch.ones(F.size(0), dtype=torch.float64)
    lam = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    F.solve(v, regul=lam).sum().backward()  # a one-element tensor damping, differentiable
    assert lam.grad is not None and torch.isfinite(lam.grad)
    torch.testing.assert_close(F.solve(v, regul=0.5), v / (F.get_diag() + 0.5))
    cov = torch.tensor([[2.0, 0.5, 0], [0.5, 1, 0], [0, 0, 3]], dtype=torch.float64)
    for c in (2.0, torch.tensor([1.0, 2, 3]), cov):
        FIM(model, loader_of(x), PMatDiag, variant="regression", covariance=c, progress=False)


def dropout_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Dropout(0.5), nn.Tanh(), nn.Linear(5, 3)).double()
    return model, torch.randn(6, 4, dtype=torch.float64)


@pytest.mark.parametrize("rep", [PMatImplicit, PMatDiag])
def test_train_mode_dropout_warns(rep):
    model, x = dropout_model()
    with pytest.warns(UserWarning, match=r"Dropout modules \['1'\] are in training mode.*eval\(\)"):
        FIM(model, loader_of(x), rep, progress=False)
    with pytest.warns(UserWarning, match="Dropout.*model.eval"):
        Jacobian(model, loader_of(x), progress=False)
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        FIM(model, loader_of(x), rep, progress=False)


def test_reproducible_loader_products_pass_the_check():
    model, x = make("mlp")
    F = FIM(model, loader_of(x), PMatImplicit, progress=False)
    v = torch.ones(F.size(0), dtype=torch.float64)
    torch.testing.assert_close(F.mv(v), F.mv(v))  # the same batches: the check passes


# ---------------------------------------------------------------------- models torch.func cannot run
class RNNHead(nn.Module):
    def __init__(self, cell):
        super().__init__()
        self.rnn = cell(4, 5, batch_first=True)
        self.out = nn.Linear(5, 3)

    def forward(self, x):
        return self.out(self.rnn(x)[0][:, -1])


class Square(torch.autograd.Function):
    """x² with the old-style forward(ctx, x): no setup_context, so no torch.func transform."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2 * x * g


class SquareNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 3)

    def forward(self, x):
        return self.b(Square.apply(self.a(x)))


def autograd_jacobian(model, x):
    """(B·C, P) by one reverse pass per output entry (no torch.func), rows example-major."""
    params = [p for p in model.parameters() if p.requires_grad]
    out = model(x).reshape(-1)
    rows = [
        torch.cat([g.reshape(-1) for g in torch.autograd.grad(o, params, retain_graph=True)])
        for o in out
    ]
    return torch.stack(rows)


def _rnn(cell, rep):
    def call():
        FIM(
            RNNHead(cell).double(),
            [(torch.randn(4, 3, 4, dtype=torch.float64),)],
            rep,
            progress=False,
        )

    return call


def _square_hessian_dense():
    model = SquareNet().double()
    x = torch.randn(5, 4, dtype=torch.float64)
    Hessian(
        model,
        [(x, torch.zeros(5, dtype=torch.long))],
        nn.CrossEntropyLoss(),
        PMatDense,
        progress=False,
    )


FROZEN = r"requires_grad=False on every parameter.*requires_grad_\(True\)"


def _frozen(entry):
    def call():
        model, x = make("mlp")
        model.requires_grad_(False)
        entry(model, loader_of(x))

    return call


def _mc(**kw):
    return lambda: FIM_MonteCarlo(*make("mlp"), PMatDiag, progress=False, **kw)


def _from_flat_swapped():
    model, _ = make("mlp")
    PVector.from_flat(torch.zeros(38), LayerCollection.from_model(model))


def _from_flat_model():
    model, _ = make("mlp")
    PVector.from_flat(model, torch.zeros(38, dtype=torch.float64))


def _from_flat_numpy():
    model, _ = make("mlp")
    PVector.from_flat(LayerCollection.from_model(model), np.zeros(38))


ONE_SHOT = r"one-shot iterator.*re-iterable loader.*list\(iterator\)"


def _loader(rep, wrap, **kw):
    def call():
        model, x = make("mlp")
        F = FIM(model, wrap(loader_of(x)), rep, progress=False, **kw)
        F.mv(torch.ones(F.size(0), dtype=torch.float64))

    return call


def _jac_one_shot():
    model, x = make("mlp")
    Jacobian(model, (b for b in loader_of(x)), progress=False)


def _ambiguous():
    model, x = make("mlp")
    FIM(model, (x, torch.zeros(2, dtype=torch.long)), PMatDiag, progress=False)


MORE_ROWS = [
    ("frozen-fim", _frozen(lambda m, d: FIM(m, d, PMatDiag)), InvalidArgumentError, FROZEN),
    (
        "frozen-implicit",
        _frozen(lambda m, d: FIM(m, d, PMatImplicit)),
        InvalidArgumentError,
        FROZEN,
    ),
    ("frozen-jacobian", _frozen(lambda m, d: Jacobian(m, d)), InvalidArgumentError, FROZEN),
    ("frozen-gram", _frozen(lambda m, d: GramMatrix(m, d)), InvalidArgumentError, FROZEN),
    ("generator-seed", _mc(generator=3), ArgumentTypeError, r"torch.Generator\(\).manual_seed"),
    ("generator-numpy", _mc(generator=np.random.default_rng(0)), ArgumentTypeError, "manual_seed"),
    ("trials-zero", _mc(trials=0), InvalidArgumentError, "positive integer"),
    ("trials-float", _mc(trials=2.5), InvalidArgumentError, "positive integer"),
    ("trials-bool", _mc(trials=True), InvalidArgumentError, "positive integer"),
    ("from-flat-swapped", _from_flat_swapped, ArgumentTypeError, "arguments are swapped"),
    (
        "from-flat-model",
        _from_flat_model,
        ArgumentTypeError,
        r"LayerCollection.from_model\(model\)",
    ),
    ("from-flat-numpy", _from_flat_numpy, ArgumentTypeError, "torch.as_tensor"),
    # loaders: one rule for one batch vs a loader, re-iterable where products re-read it
    ("one-shot-iterator-implicit", _loader(PMatImplicit, iter), ArgumentTypeError, ONE_SHOT),
    ("one-shot-generator-jacobian", _jac_one_shot, ArgumentTypeError, ONE_SHOT),
    ("ambiguous-batch", _ambiguous, ArgumentTypeError, r"Pass one batch as \[batch\]"),
    ("max-batches-zero", _loader(PMatDiag, list, max_batches=0), InvalidArgumentError, "positive"),
    ("lstm-dense", _rnn(nn.LSTM, PMatDense), UnsupportedError, "recurrent.*PMatImplicit works"),
    ("lstm-kfac", _rnn(nn.LSTM, PMatKFAC), UnsupportedError, "recurrent.*PMatImplicit works"),
    ("gru-diag", _rnn(nn.GRU, PMatDiag), UnsupportedError, "recurrent.*PMatImplicit works"),
    (
        "autograd-function-hessian",
        _square_hessian_dense,
        UnsupportedError,
        "setup_context.*PMatImplicit",
    ),
]


@pytest.mark.parametrize(
    "call, exc, fix", [r[1:] for r in MORE_ROWS], ids=[r[0] for r in MORE_ROWS]
)
def test_unsupported_models(call, exc, fix):
    with pytest.raises(exc, match=fix):
        call()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU])
def test_recurrent_models_work_under_implicit_and_jacobian(cell, dtype):
    # float32 LSTM on CPU has no forward-mode formula: products take the double-backward route
    torch.manual_seed(0)
    model = RNNHead(cell).to(dtype)
    x = torch.randn(4, 3, 4, dtype=dtype)
    jac = autograd_jacobian(model, x).double()  # (B·C, P) example-major
    truth = gt.fisher_output_matrix(model(x).double(), "classif_logits")
    truth = jac.T @ truth @ jac / x.shape[0]
    v = torch.randn(jac.shape[1], 2, dtype=dtype)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else {}
    for cache in (False, True):
        F = FIM(
            model, [(x,)], lambda cache=cache, **kw: PMatImplicit(cache=cache, **kw), progress=False
        )
        torch.testing.assert_close(F.op @ v, (truth @ v.double()).to(dtype), **tol)
    J = Jacobian(model, [(x,)], progress=False)
    jt = jac.view(x.shape[0], 3, -1).permute(1, 0, 2).to(dtype)
    torch.testing.assert_close(J.to_torch(), jt, **tol)
    torch.testing.assert_close(J @ v, jt.reshape(-1, jt.shape[-1]) @ v, **tol)


def test_custom_autograd_function_without_setup_context():
    torch.manual_seed(0)
    model = SquareNet().double()
    x = torch.randn(5, 4, dtype=torch.float64)
    jac = autograd_jacobian(model, x)
    truth = jac.T @ gt.fisher_output_matrix(model(x), "classif_logits") @ jac / x.shape[0]
    v = torch.randn(jac.shape[1], 2, dtype=torch.float64)
    F = FIM(model, [(x,)], PMatImplicit, progress=False)
    torch.testing.assert_close(F.op @ v, truth @ v)
    torch.testing.assert_close(F.mv(v[:, 0]), truth @ v[:, 0])
    torch.testing.assert_close(FIM(model, [(x,)], PMatDense, progress=False).to_torch(), truth)
    J = Jacobian(model, [(x,)], progress=False)
    jt = jac.view(5, 3, -1).permute(1, 0, 2)
    torch.testing.assert_close(J.to_torch(), jt)
    torch.testing.assert_close(J @ v, jt.reshape(-1, jt.shape[-1]) @ v)
    u = torch.randn(15, dtype=torch.float64)
    torch.testing.assert_close(J.T @ u, jt.reshape(15, -1).T @ u)
    K = GramMatrix(model, [(x,)], backend="func", progress=False).to_torch()
    torch.testing.assert_close(K, torch.einsum("cnp,dmp->cndm", jt, jt))
