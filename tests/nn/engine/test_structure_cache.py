"""The per-model cache of the module walk (engine/structure.py), the entry points' argument binding
and the diagonal's range taken by the finiteness check: a model changed after a first build gives
the answer of a model built afresh, and of torch.func per-example gradients (float64)."""

import copy
import gc
import inspect
import math
import weakref

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from nngeo_ops.errors import NonFiniteError
from nngeo_ops.nn import FIM, GGN, EmpiricalFisher, FIM_MonteCarlo, PMatDiag
from nngeo_ops.nn.engine import structure
from nngeo_ops.ops import Diagonal

pytestmark = pytest.mark.mutates_model


def _mlp(h=6, c=3):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, h), nn.Tanh(), nn.Linear(h, c)).double()


def _data(b=7, c=3):
    g = torch.Generator().manual_seed(1)
    return torch.randn(b, 5, dtype=torch.float64, generator=g), torch.randint(
        0, c, (b,), generator=g
    )


def _empirical_diag(model, x, y):
    """(1/N) Σ_n (∇θ ℓ_n)² over the trainable parameters in named_parameters() order."""
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}

    def loss(p, xi, yi):
        out = functional_call(model, {**p, **frozen}, (xi[None],))
        return nn.functional.cross_entropy(out, yi[None])

    g = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    return torch.cat([g[n].reshape(x.shape[0], -1) for n in params], 1).square().mean(0)


def _mc(model, x, y, seed=3):
    rng = torch.Generator().manual_seed(seed)
    return FIM_MonteCarlo(model, (x, y), PMatDiag, progress=False, generator=rng, trials=2)


def _check(model, x, y):
    """Our empirical diagonal against torch.func, and the Monte-Carlo one against a copy of the
    model that no cache has seen (the same draws)."""
    ef = EmpiricalFisher(model, (x, y), PMatDiag, progress=False)
    torch.testing.assert_close(ef.data, _empirical_diag(model, x, y), rtol=1e-10, atol=1e-12)
    fresh = copy.deepcopy(model)
    torch.testing.assert_close(_mc(model, x, y).data, _mc(fresh, x, y).data, rtol=0, atol=0)
    assert (
        ef.layer_collection == PMatDiag(_fresh_generator(fresh), examples=(x, y)).layer_collection
    )


def _fresh_generator(model):
    from nngeo_ops.nn import CurvatureGenerator
    from nngeo_ops.nn.losses import output_model_for_variant

    return CurvatureGenerator(
        model, output_model_for_variant("classif_logits", None), "empirical", progress=False
    )


def test_replaced_layer_is_seen():
    model, (x, y) = _mlp(), _data()
    _check(model, x, y)
    torch.manual_seed(5)
    model[2] = nn.Linear(6, 4).double()  # a new module, a new shape, one more class
    y = y % 4
    f = EmpiricalFisher(model, (x, y), PMatDiag, progress=False)
    assert f.data.shape == (5 * 6 + 6 + 6 * 4 + 4,)
    _check(model, x, y)


def test_frozen_and_unfrozen_parameters_are_seen():
    model, (x, y) = _mlp(), _data()
    _check(model, x, y)
    model[0].bias.requires_grad_(False)
    f = EmpiricalFisher(model, (x, y), PMatDiag, progress=False)
    assert f.data.shape == (5 * 6 + 6 * 3 + 3,)
    _check(model, x, y)
    model[0].bias.requires_grad_(True)
    assert EmpiricalFisher(model, (x, y), PMatDiag, progress=False).data.shape == (5 * 6 + 6 + 21,)
    _check(model, x, y)


def test_replaced_and_reshaped_parameters_are_seen():
    model, (x, y) = _mlp(), _data()
    _check(model, x, y)
    with torch.no_grad():
        model[0].weight = nn.Parameter(2 * model[0].weight)  # a new Parameter object
    _check(model, x, y)
    # the same Parameter objects, new shapes (``.data`` swapped): two more hidden units
    torch.manual_seed(7)
    model[0].weight.data = torch.randn(8, 5, dtype=torch.float64)
    model[0].bias.data = torch.randn(8, dtype=torch.float64)
    model[2].weight.data = torch.randn(3, 8, dtype=torch.float64)
    f = EmpiricalFisher(model, (x, y), PMatDiag, progress=False)
    assert f.data.shape == (5 * 8 + 8 + 8 * 3 + 3,)
    _check(model, x, y)


def test_a_rule_lost_by_reconfiguration_is_seen():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Flatten(), nn.Linear(48, 3)).double()
    x = torch.randn(4, 2, 4, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 1])
    _check(model, x, y)
    model[0].padding_mode = "circular"  # no closed form any more: the generic path
    _check(model, x, y)


def test_train_mode_is_read_at_every_build():
    model, (x, y) = _mlp(), _data()
    model.insert(1, nn.Dropout(0.5))
    model.eval()
    FIM(model, (x, y), PMatDiag, progress=False)
    model.train()
    with pytest.warns(UserWarning, match="Dropout"):
        FIM(model, (x, y), PMatDiag, progress=False)


def test_the_cache_keeps_no_model_alive():
    # through Capture: the generators are watched (and their models kept) by conftest's fixture
    from nngeo_ops.nn import LayerCollection
    from nngeo_ops.nn.engine.accumulators import DiagAcc
    from nngeo_ops.nn.engine.capture import Capture
    from nngeo_ops.nn.losses import output_model_for_variant

    class Scaled(nn.Module):  # the root owns a parameter: a capture user
        def __init__(self):
            super().__init__()
            self.body = _mlp()
            self.scale = nn.Parameter(torch.ones((), dtype=torch.float64))

        def forward(self, t):
            return self.body(t) * self.scale

    model, (x, y) = Scaled(), _data()
    lc = LayerCollection.from_model(model)
    cap = Capture(model, lc, output_model_for_variant("classif_logits", None), kind="sample")
    cap.run([(x, y)], [DiagAcc(lc.layers)])
    assert any(u.module is model for u in cap.users)
    ref = weakref.ref(model)
    slots = [s for s in structure._CACHE if s[0] == id(model)]
    assert slots
    del model, cap
    gc.collect()
    assert ref() is None
    assert not any(s in structure._CACHE for s in slots)


def test_the_layer_collection_given_is_used():
    from nngeo_ops.nn import LayerCollection

    model, (x, y) = _mlp(), _data()
    full = FIM(model, (x, y), PMatDiag, progress=False).data
    lc = LayerCollection.from_modules(model, [model[2]])
    part = FIM(model, (x, y), PMatDiag, progress=False, layer_collection=lc)
    assert part.layer_collection == lc
    torch.testing.assert_close(part.data, full[5 * 6 + 6 :])


# ---------------------------------------------------------------------- argument binding
def test_every_call_form_binds_as_the_signature_does():
    model, (x, y) = _mlp(), _data()
    a = FIM_MonteCarlo(model, [(x, y)], PMatDiag, "classif_logits", 1, None, progress=False)
    b = FIM_MonteCarlo(
        model=model,
        loader=[(x, y)],
        representation=PMatDiag,
        progress=False,
        generator=torch.Generator().manual_seed(0),
    )
    c = GGN(model, (x, y), nn.CrossEntropyLoss(), PMatDiag, None, None, None, None, False)
    assert a.data.shape == b.data.shape == c.data.shape


@pytest.mark.parametrize(
    "args, kwargs",
    [
        ((), {}),  # model, loader, representation missing
        (("m", "l"), {}),  # representation missing
        (("m", "l", "r"), {"loader": "l"}),  # given twice
        (("m", "l", "r"), {"no_such_option": 1}),
        (tuple(range(20)), {}),  # too many
    ],
)
def test_bad_calls_raise_the_signatures_type_error(args, kwargs):
    sig = inspect.signature(FIM_MonteCarlo)
    with pytest.raises(TypeError) as expected:
        sig.bind(*args, **kwargs)
    with pytest.raises(TypeError) as got:
        FIM_MonteCarlo(*args, **kwargs)
    assert str(got.value) == str(expected.value)


# ---------------------------------------------------------------------- the diagonal's range
def test_the_checked_range_is_the_nodes_own():
    model, (x, y) = _mlp(), _data()
    for f in (
        FIM_MonteCarlo(model, (x, y), PMatDiag, progress=False),
        FIM(model, (x, y), PMatDiag, progress=False),
    ):
        own = Diagonal(f.data.clone())
        assert f.op.psd == own.psd
        assert f.op.excludes_zero == own.excludes_zero
        assert f.op.excludes_zero  # a tanh network: no zero in its Fisher diagonal
    f.data[0] = 0.0  # changed in place: the range known at build no longer says it
    assert not f.op.excludes_zero


def test_a_nonfinite_diagonal_is_still_caught_and_named():
    model, (x, y) = _mlp(), _data()

    class Sqrt(nn.Module):
        def forward(self, t):
            return t.abs().sqrt()

    model.insert(1, Sqrt())
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.zero_()
    with pytest.raises(NonFiniteError, match=r"layers \['0'\].*derivatives are not"):
        FIM_MonteCarlo(model, (x, y), PMatDiag, progress=False)


# ---------------------------------------------------------------------- the Monte-Carlo draw
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("b, trials", [(1, 1), (7, 3)])
def test_the_draw_is_the_one_hot_of_the_labels_minus_p(dtype, b, trials):
    from nngeo_ops.nn.losses import _sample_classes, class_softmax, output_model_for_variant

    out = torch.randn(b, 5, generator=torch.Generator().manual_seed(b)).to(dtype)
    om = output_model_for_variant("classif_logits", None)
    cols, count = om.sample(out, None, trials, torch.Generator().manual_seed(4))
    p = class_softmax(out)
    # the labels of the (B, C, D) form of the draw, with the same generator state
    lab = _sample_classes(p[:, :, None], trials, torch.Generator().manual_seed(4))[..., 0]
    want = nn.functional.one_hot(lab, 5).to(dtype) - p
    want = want if trials == 1 else want / math.sqrt(trials)
    assert count == b and cols.dtype == dtype
    torch.testing.assert_close(cols, want, rtol=0, atol=0)


# ---------------------------------------------------------------------- the scale folded in
def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(48, 3)
    ).double()


@pytest.mark.parametrize("make, shape", [(_mlp, (9, 5)), (_cnn, (9, 2, 4, 4))])
@pytest.mark.parametrize("kind", ["mc", "exact", "empirical"])
def test_a_one_batch_pass_folds_its_scale_in_exactly(make, shape, kind):
    """One batch in a list (the scale folded into Σ g² before the contraction) against the same
    examples as two batches (scaled at the end) and as a one-shot iterator, and for the
    empirical Fisher against torch.func."""
    model = make()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(*shape, dtype=torch.float64, generator=g)
    y = torch.randint(0, 3, (shape[0],), generator=g)

    def build(loader):
        if kind == "mc":  # 3 draws: the streamed columns of the CNN
            rng = torch.Generator().manual_seed(0)
            return FIM_MonteCarlo(model, loader, PMatDiag, progress=False, generator=rng, trials=3)
        if kind == "exact":
            return FIM(model, loader, PMatDiag, progress=False)
        return EmpiricalFisher(model, loader, PMatDiag, progress=False)

    one = build([(x, y)]).data
    torch.testing.assert_close(one, build(iter([(x, y)])).data, rtol=1e-12, atol=0)
    if kind != "mc":  # the draws of two batches are not those of one
        halves = [(x[:4], y[:4]), (x[4:], y[4:])]
        torch.testing.assert_close(one, build(halves).data, rtol=1e-12, atol=1e-300)
    if kind == "empirical":
        torch.testing.assert_close(one, _empirical_diag(model, x, y), rtol=1e-10, atol=1e-300)


def test_a_sum_reduction_is_not_scaled():
    model, (x, y) = _mlp(), _data()
    loss = nn.CrossEntropyLoss(reduction="sum")
    one = GGN(model, [(x, y)], loss, PMatDiag, progress=False).data
    mean = GGN(model, [(x, y)], nn.CrossEntropyLoss(), PMatDiag, progress=False).data
    torch.testing.assert_close(one, mean * x.shape[0], rtol=1e-12, atol=0)


@pytest.mark.parametrize("batches", [1, 2])
def test_the_range_taken_as_layers_are_written_is_the_whole_ones(batches):
    from nngeo_ops.nn.engine.accumulators import DiagAcc
    from nngeo_ops.ops import value_range

    model, (x, y) = _mlp(), _data()
    gen = _fresh_generator(model)
    loader = [(x, y)] if batches == 1 else [(x[:3], y[:3]), (x[3:], y[3:])]
    acc = DiagAcc(gen.layer_collection.layers)
    gen.run(loader, [acc])
    assert (acc.known_range() is not None) == (batches == 1)
    lo, hi, ok = value_range(acc.concatenated())
    assert acc.value_range == (lo, hi, acc.flat()._version) and ok
    acc.flat()[0] = -1.0  # changed since: the ranges taken at the writes no longer hold
    assert acc.known_range() is None
