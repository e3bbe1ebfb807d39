"""Every variant and GGN loss, against dense torch.func ground truth (output Hessians / Fishers)."""

import groundtruth as gt
import pytest
import torch
from models import Flat, loader_of, make
from torch import nn

from nngeo_ops.nn import (
    FIM,
    GGN,
    EmpiricalFisher,
    FIM_MonteCarlo,
    PMatBlockDiag,
    PMatDense,
    PMatDiag,
    PMatImplicit,
    PMatKFAC,
)

REPS = [PMatDense, PMatDiag, PMatBlockDiag, PMatImplicit]


def _as_dense(F):
    return F.op @ torch.eye(F.layer_collection.numel(), dtype=torch.float64)


def _check(F, truth, rep):
    if rep is PMatDiag:
        torch.testing.assert_close(F.get_diag(), truth.diagonal())
    elif rep is PMatBlockDiag:
        for sl in F.layer_collection.layer_slices().values():
            torch.testing.assert_close(F.to_torch()[sl, sl], truth[sl, sl])
    else:
        torch.testing.assert_close(_as_dense(F), truth)


def _seg_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 3, 1)).double()
    return model, torch.randn(4, 2, 3, 3, dtype=torch.float64)


@pytest.mark.parametrize("rep", REPS)
@pytest.mark.parametrize(
    "variant", ["classif_logits", "classif_logsoftmax", "classif_binary_logits", "regression"]
)
def test_fim_variants(variant, rep):
    model, x = make("mlp")
    if variant == "classif_logsoftmax":
        model = nn.Sequential(model, nn.LogSoftmax(dim=1))
    truth = gt.fim(model, x, variant)
    F = FIM(model, loader_of(x), rep, variant=variant, n_output=3, progress=False)
    _check(F, truth, rep)


@pytest.mark.parametrize("cov", [2.0, "diag", "full"])
def test_regression_covariance(cov):
    model, x = make("mlp")
    if cov == "diag":
        cov = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    elif cov == "full":
        m = torch.randn(3, 3, dtype=torch.float64)
        cov = m @ m.T + torch.eye(3, dtype=torch.float64)
    truth = gt.fim(model, x, "regression", covariance=cov)
    F = FIM(model, loader_of(x), PMatDense, variant="regression", covariance=cov, progress=False)
    torch.testing.assert_close(F.to_torch(), truth)


@pytest.mark.parametrize("rep", REPS)
def test_segmentation_logits(rep):
    model, x = _seg_model()
    truth = gt.fim(model, x, "segmentation_logits")
    F = FIM(
        model,
        loader_of(x, sizes=(2,)),
        rep,
        variant="segmentation_logits",
        n_output=3,
        progress=False,
    )
    _check(F, truth, rep)


LOSSES = [
    ("ce_mean", lambda: nn.CrossEntropyLoss()),
    ("ce_sum", lambda: nn.CrossEntropyLoss(reduction="sum")),
    ("ce_ignore", lambda: nn.CrossEntropyLoss(ignore_index=1)),
    ("nll", lambda: nn.NLLLoss()),
    ("mse_mean", lambda: nn.MSELoss()),
    ("mse_sum", lambda: nn.MSELoss(reduction="sum")),
    ("bce", lambda: nn.BCEWithLogitsLoss()),
    ("bce_sum", lambda: nn.BCEWithLogitsLoss(reduction="sum")),
]


def _targets(name, out):
    g = torch.Generator().manual_seed(5)
    if name.startswith(("ce", "nll")):
        return torch.randint(0, out.shape[1], out.shape[:1] + out.shape[2:], generator=g)
    if name.startswith("bce"):
        return torch.randint(0, 2, out.shape, generator=g).double()
    return torch.randn(out.shape, generator=g, dtype=out.dtype)


@pytest.mark.parametrize("rep", REPS)
@pytest.mark.parametrize("name,make_loss", LOSSES)
def test_ggn_losses(name, make_loss, rep):
    model, x = make("mlp")
    if name == "nll":
        model = nn.Sequential(model, nn.LogSoftmax(dim=1))
    loss_fn = make_loss()
    y = _targets(name, model(x))
    # one batch holding all the data: the dataset loss. NLL is linear in its input, so (documented
    # convention) its GGN keeps the log-softmax inside the loss: that of CE on the log-probabilities
    truth_loss = nn.CrossEntropyLoss() if name == "nll" else loss_fn
    truth = gt.ggn(model, x, y, truth_loss)
    F = GGN(model, loader_of(x, y, sizes=(2, 3)), loss_fn, rep, progress=False)
    _check(F, truth, rep)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_kfac_of_single_linear_layer_mse_is_exact(reduction):
    # H = (2 / #elements)·I is the same for every example, so A ⊗ G is the exact GGN
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()
    x = torch.randn(7, 4, dtype=torch.float64)
    y = torch.randn(7, 3, dtype=torch.float64)
    loss_fn = nn.MSELoss(reduction=reduction)
    F = GGN(model, loader_of(x, y), loss_fn, PMatKFAC, progress=False)
    torch.testing.assert_close(F.to_torch(), gt.ggn(model, x, y, loss_fn))


def test_ggn_cross_entropy_per_pixel():
    model, x = _seg_model()
    loss_fn = nn.CrossEntropyLoss(ignore_index=2)
    y = _targets("ce", model(x))
    truth = gt.ggn(model, x, y, loss_fn)
    F = GGN(model, loader_of(x, y, sizes=(2,)), loss_fn, PMatDense, progress=False)
    torch.testing.assert_close(F.to_torch(), truth)


def test_ggn_mean_equals_fim_for_cross_entropy():
    model, x = make("mlp")
    y = _targets("ce", model(x))
    G = GGN(model, loader_of(x, y), nn.CrossEntropyLoss(), PMatDense, progress=False)
    F = FIM(model, loader_of(x, y), PMatDense, progress=False)
    torch.testing.assert_close(G.to_torch(), F.to_torch())


@pytest.mark.parametrize(
    "variant,nll",
    [
        ("classif_logits", lambda o, y: nn.functional.cross_entropy(o[None], y[None])),
        ("regression", lambda o, y: 0.5 * ((o - y) ** 2).sum()),
        (
            "classif_binary_logits",
            lambda o, y: nn.functional.binary_cross_entropy_with_logits(o, y, reduction="sum"),
        ),
    ],
)
def test_empirical_fisher(variant, nll):
    model, x = make("mlp")
    out = model(x)
    if variant == "classif_logits":
        y = _targets("ce", out)
    elif variant == "regression":
        y = _targets("mse", out)
    else:
        y = _targets("bce", out)
    truth = gt.empirical_fisher(model, x, y, nll)
    for rep in (PMatDense, PMatImplicit):
        F = EmpiricalFisher(model, loader_of(x, y), rep, variant=variant, progress=False)
        torch.testing.assert_close(_as_dense(F), truth)


def test_empirical_fisher_segmentation():
    model, x = _seg_model()
    y = _targets("ce", model(x))

    def nll(o, yy):
        return nn.functional.cross_entropy(o[None], yy[None], reduction="sum")

    truth = gt.empirical_fisher(model, x, y, nll)
    F = EmpiricalFisher(
        model, loader_of(x, y), PMatDense, variant="segmentation_logits", progress=False
    )
    torch.testing.assert_close(F.to_torch(), truth)


@pytest.mark.parametrize(
    "variant", ["classif_logits", "classif_binary_logits", "regression", "segmentation_logits"]
)
def test_monte_carlo_converges_to_exact(variant):
    if variant == "segmentation_logits":
        model, x = _seg_model()
    else:
        model, x = make("mlp")
    truth = gt.fim(model, x, variant)
    g = torch.Generator().manual_seed(0)
    F = FIM_MonteCarlo(
        model, loader_of(x), PMatDense, variant=variant, trials=3000, generator=g, progress=False
    )
    err = (F.to_torch() - truth).norm() / truth.norm()
    assert err < 0.1


def test_monte_carlo_logsoftmax_and_reproducible():
    model, x = make("mlp")
    model = nn.Sequential(model, nn.LogSoftmax(dim=1))
    truth = gt.fim(model, x, "classif_logsoftmax")
    runs = [
        FIM_MonteCarlo(
            model,
            loader_of(x),
            PMatDense,
            variant="classif_logsoftmax",
            trials=2000,
            generator=torch.Generator().manual_seed(1),
            progress=False,
        ).to_torch()
        for _ in range(2)
    ]
    torch.testing.assert_close(runs[0], runs[1])
    assert (runs[0] - truth).norm() / truth.norm() < 0.1


def test_monte_carlo_implicit_is_a_fixed_operator():
    model, x = make("mlp")
    F = FIM_MonteCarlo(
        model,
        loader_of(x),
        PMatImplicit,
        trials=2,
        generator=torch.Generator().manual_seed(0),
        progress=False,
    )
    v = torch.randn(F.layer_collection.numel(), dtype=torch.float64)
    torch.testing.assert_close(F.op @ v, F.op @ v)
    D = FIM_MonteCarlo(
        model,
        loader_of(x),
        PMatDense,
        trials=2,
        generator=torch.Generator().manual_seed(0),
        progress=False,
    )
    assert D.to_torch().shape == (v.numel(), v.numel())


def test_flattened_conv_classifier_with_function_argument():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), Flat(), nn.Linear(8, 3)).double()
    x = torch.randn(4, 1, 4, 4, dtype=torch.float64)
    truth = gt.fim(model, x, "classif_logits")
    loader = [(None, x[:2]), (None, x[2:])]  # inputs in the second slot, read by `function`
    F = FIM(model, loader, PMatDense, function=lambda _, xx: model(xx), progress=False)
    torch.testing.assert_close(F.to_torch(), truth)


def test_entry_points_share_one_signature():
    """FIM, FIM_MonteCarlo, EmpiricalFisher, GGN and Hessian take the same options, in the same
    order, after the arguments that tell them apart (NNGeometry's names and positions)."""
    import inspect

    from nngeo_ops.nn import FIM, GGN, EmpiricalFisher, FIM_MonteCarlo, Hessian

    shared = [
        "n_output",
        "function",
        "layer_collection",
        "device",
        "progress",
        "covariance",
        "kfac_mode",
        "max_batches",
        "process_group",
    ]
    heads = {
        FIM: ["model", "loader", "representation", "variant"],
        EmpiricalFisher: ["model", "loader", "representation", "variant"],
        FIM_MonteCarlo: ["model", "loader", "representation", "variant", "trials", "generator"],
        GGN: ["model", "loader", "loss_fn", "representation"],
        Hessian: ["model", "loader", "loss_fn", "representation"],
    }
    omitted = {GGN: {"covariance"}, Hessian: {"covariance", "kfac_mode"}}
    for fn, head in heads.items():
        names = list(inspect.signature(fn).parameters)
        assert names == head + [s for s in shared if s not in omitted.get(fn, ())], fn.__name__
        assert "max_batches" in fn.__doc__ and fn.__doc__.strip()
    with pytest.raises(TypeError, match="kfac_mode"):
        Hessian(None, None, None, None, kfac_mode="reduce")
