"""The public hooks that natural-gradient training builds on: StepStatistics (curvature statistics
from the training step's own forward/backward), PMatKFAC/PMatEKFAC.from_factors and
PVector.copy_to_model_grad, each against an independent computation."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nngeo_ops import FIM, EmpiricalFisher, FIM_MonteCarlo
from nngeo_ops.errors import DataError, NonFiniteError, ShapeError, UnsupportedError
from nngeo_ops.nn import (
    CurvatureGenerator,
    PMatDiag,
    PMatEKFAC,
    PMatKFAC,
    PVector,
    StepStatistics,
)
from nngeo_ops.nn.losses import output_model_for_variant

from .. import groundtruth as gt


def mlp(inplace=False):
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(inplace=inplace), nn.Linear(12, 4)).double()


def cnn():
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 5 * 5, 4)
    ).double()


def data(model_name, n=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (n, 6) if model_name == "mlp" else (n, 2, 5, 5)
    return torch.randn(*shape, generator=g, dtype=torch.float64), torch.randint(
        0, 4, (n,), generator=g
    )


def gen_of(model, kind, rng=None):
    om = output_model_for_variant("classif_logits")
    return CurvatureGenerator(model, om, kind, generator=rng, progress=False)


def training_step(model, x, y):
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    return loss


@pytest.mark.parametrize("name", ["mlp", "cnn"])
@pytest.mark.parametrize("kind", ["exact", "empirical", "sample"])
def test_step_statistics_equal_a_pass_over_the_batch(name, kind):
    torch.manual_seed(0)
    model = mlp() if name == "mlp" else cnn()
    x, y = data(name)
    gen = gen_of(model, kind, torch.Generator().manual_seed(3))
    st = StepStatistics(gen)
    st.arm()
    training_step(model, x, y)
    assert st.ready and st.batch_size == x.shape[0]
    kacc, dacc = PMatKFAC.accumulators(gen), PMatDiag.accumulators(gen)
    st.feed(kacc + dacc)
    kfac = PMatKFAC(gen, data=PMatKFAC.data_from(gen, kacc))
    diag = PMatDiag.data_from(gen, dacc)
    st.release()
    loader = [(x, y)]
    if kind == "exact":
        ref_k, ref_d = FIM(model, loader, PMatKFAC), FIM(model, loader, PMatDiag)
        # the exact Fisher's diagonal also from torch.func
        torch.testing.assert_close(diag, gt.fim(model, x, "classif_logits").diagonal())
    elif kind == "empirical":
        ref_k, ref_d = (
            EmpiricalFisher(model, loader, PMatKFAC),
            EmpiricalFisher(model, loader, PMatDiag),
        )
        nll = lambda o, t: F.cross_entropy(o[None], t[None])  # noqa: E731
        torch.testing.assert_close(diag, gt.empirical_fisher(model, x, y, nll).diagonal())
    else:  # the same seed draws the same labels in a separate pass
        ref_k = FIM_MonteCarlo(model, loader, PMatKFAC, generator=torch.Generator().manual_seed(3))
        ref_d = FIM_MonteCarlo(model, loader, PMatDiag, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(kfac.to_torch(), ref_k.to_torch())
    torch.testing.assert_close(diag, ref_d.get_diag())


def test_step_statistics_leave_the_training_gradient_unchanged():
    torch.manual_seed(0)
    model = mlp()
    x, y = data("mlp")
    training_step(model, x, y)
    ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    st = StepStatistics(gen_of(model, "sample", torch.Generator().manual_seed(0)))
    st.arm()
    training_step(model, x, y)  # the graph survives the extra backward of sampled labels
    for p, r in zip(model.parameters(), ref):
        torch.testing.assert_close(p.grad, r)
    st.release()
    assert not st.armed and not st.ready


def test_step_statistics_record_the_last_forward_with_gradients():
    torch.manual_seed(0)
    model = mlp()
    x, y = data("mlp")
    x2, y2 = data("mlp", n=7, seed=1)
    gen = gen_of(model, "exact")
    st = StepStatistics(gen)
    st.arm()
    model(x2)  # replaced by the next forward
    with torch.no_grad():
        model(x2)  # ignored: no gradients
    training_step(model, x, y)
    assert st.batch_size == x.shape[0]
    accs = PMatKFAC.accumulators(gen)
    st.feed(accs)
    ref = FIM(model, [(x, y)], PMatKFAC)
    torch.testing.assert_close(PMatKFAC(gen, data=accs[0].value).to_torch(), ref.to_torch())
    with pytest.raises(ShapeError, match="training step's own batch"):
        st.check_batch((x2, y2))


def test_step_statistics_say_why_they_are_not_ready():
    model = mlp(inplace=True)
    x, y = data("mlp")
    st = StepStatistics(gen_of(model, "sample"))
    assert not st.ready
    with pytest.raises(DataError, match="no forward pass"):
        st.feed([])
    st.arm()
    training_step(model, x, y)
    assert not st.ready and "in-place" in st.why_not
    st2 = StepStatistics(gen_of(mlp(), "empirical"))
    st2.arm()
    st2.generator.model(x)  # forward without backward: the cotangents never arrive
    with pytest.raises(DataError, match="backward"):
        st2.feed([])
    with pytest.raises(UnsupportedError, match="empirical"):
        om = output_model_for_variant("regression")
        StepStatistics(CurvatureGenerator(mlp(), om, "empirical"))


def test_step_statistics_defer_errors_to_feed():
    model = mlp()
    x, y = data("mlp")
    st = StepStatistics(gen_of(model, "sample"))
    st.arm()
    x = x.clone()
    x[0, 0] = float("nan")
    model(x)  # the forward itself does not raise
    assert st.error is not None and not st.ready
    with pytest.raises(NonFiniteError):
        st.feed([])


def _kfac_factors(model, x, y):
    F_ = FIM(model, [(x, y)], PMatKFAC)
    return F_, {lid: dict(f) for lid, f in F_.data.items()}


def test_from_factors_builds_the_same_operator():
    torch.manual_seed(0)
    model = cnn()
    x, y = data("cnn")
    ref, factors = _kfac_factors(model, x, y)
    built = PMatKFAC.from_factors(ref.generator, factors)
    torch.testing.assert_close(built.to_torch(), ref.to_torch())
    # a dense A given instead of its rows describes the same matrix
    dense = {
        lid: ({**f, "A": f["A_rows"].T @ f["A_rows"]} if "A_rows" in f else f)
        for lid, f in factors.items()
    }
    dense = {lid: {k: v for k, v in f.items() if k != "A_rows"} for lid, f in dense.items()}
    torch.testing.assert_close(
        PMatKFAC.from_factors(ref.generator, dense).to_torch(), ref.to_torch()
    )
    e_ref = FIM(model, [(x, y)], PMatEKFAC, variant="classif_logits")
    e_built = PMatEKFAC.from_factors(e_ref.generator, {k: dict(v) for k, v in e_ref.data.items()})
    torch.testing.assert_close(e_built.to_torch(), e_ref.to_torch())


def test_from_factors_rejects_bad_factors():
    model = mlp()
    x, y = data("mlp")
    ref, factors = _kfac_factors(model, x, y)
    gen = ref.generator
    lid = next(iter(factors))
    with pytest.raises(ShapeError, match="no factors"):
        PMatKFAC.from_factors(gen, {lid: factors[lid]})
    bad = dict(factors)
    bad[lid] = {**factors[lid], "G": torch.eye(5, dtype=torch.float64)}
    with pytest.raises(ShapeError, match="describe"):
        PMatKFAC.from_factors(gen, bad)
    nan = dict(factors)
    g = factors[lid]["G"].clone()
    g[0, 0] = float("nan")
    nan[lid] = {**factors[lid], "G": g}
    with pytest.raises(NonFiniteError, match="NaN"):
        PMatKFAC.from_factors(gen, nan)


def test_copy_to_model_grad_round_trip():
    model = mlp()
    lc_model = PVector.from_model(model)
    v = PVector(
        lc_model.layer_collection, vector_repr=torch.randn(lc_model.size()[0], dtype=torch.float64)
    )
    model[0].weight.grad = torch.zeros_like(model[0].weight)
    held = model[0].weight.grad
    v.copy_to_model_grad(model)
    assert model[0].weight.grad is held  # written in place
    back = PVector.from_model_grad(model)
    torch.testing.assert_close(back.to_torch(), v.to_torch())
