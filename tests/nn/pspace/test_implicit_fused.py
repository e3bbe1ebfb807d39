"""The implicit GGN's fused passes: the dual forward that skips the data's zero tangent, and the first
product of a cached operator that builds its linearisation, against the torch.func ground truth."""

import functools

import groundtruth as gt
import pytest
import torch
from models import CASES, Cube, loader_of, make, seeded_monte_carlo
from torch import nn
from torch.profiler import ProfilerActivity, profile

from nngeo_ops.nn import FIM, PMatImplicit
from nngeo_ops.nn.engine import functional as fx
from nngeo_ops.nn.engine.dual import DataTangentMode, dual_forward
from nngeo_ops.ops import CompilePolicy

CACHED = functools.partial(PMatImplicit, cache=True)


def _first_products(F):
    return [lin.first is not None for lin in F._products._lin]


@pytest.mark.parametrize("case", CASES)
def test_first_cached_product_builds_the_cache(case):
    # one column: the first product is the dual forward plus the backward that builds Jᵀu's graph;
    # the later products (one column or several) run on that graph
    model, x = make(case)
    truth = gt.fim(model, x, "classif_logits")
    F = FIM(model, loader_of(x, sizes=(2, 2)), CACHED, progress=False)
    g = torch.Generator().manual_seed(0)
    v = torch.randn(truth.shape[0], 3, dtype=torch.float64, generator=g)
    torch.testing.assert_close(F.op @ v[:, 0], truth @ v[:, 0])
    assert all(_first_products(F))
    torch.testing.assert_close(F.op @ v[:, 1], truth @ v[:, 1])
    torch.testing.assert_close(F.op @ v, truth @ v)


def test_first_product_of_one_batch_is_the_callers():
    # one batch: the first product is the kept graph's value of Jᵀu, scaled in place and handed
    # out; the later products differentiate through that graph and never read the value
    model, x = make("mlp")
    truth = gt.fim(model, x, "classif_logits")
    F = FIM(model, loader_of(x, sizes=(x.shape[0],)), CACHED, progress=False)
    g = torch.Generator().manual_seed(0)
    v = torch.randn(truth.shape[0], 2, dtype=torch.float64, generator=g)
    first = F.op @ v[:, 0]
    torch.testing.assert_close(first, truth @ v[:, 0])
    assert len(F._products._lin) == 1 and all(_first_products(F))
    first.fill_(float("nan"))  # the caller's to change
    torch.testing.assert_close(F.op @ v[:, 0], truth @ v[:, 0])
    torch.testing.assert_close(F.op @ v, truth @ v)


def _wide(first):
    """Models with more parameters than CompilePolicy.dense_limit, the data entering a layer that
    the dual forward intercepts (``first``: the kind of that layer)."""
    torch.manual_seed(0)
    if first == "linear":
        model = nn.Sequential(nn.Linear(50, 60), nn.ReLU(), nn.Linear(60, 4))
        x = torch.randn(7, 50)
    elif first == "conv2d":
        model = nn.Sequential(
            nn.Conv2d(2, 6, 3, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(150, 20),
            nn.Tanh(),
            nn.Linear(20, 4),
        )
        x = torch.randn(7, 2, 5, 5)
    elif first == "conv1d":  # stride, groups and no bias on the data's layer
        model = nn.Sequential(
            nn.Conv1d(4, 8, 3, stride=2, groups=2, bias=False),
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(8 * 14, 30),
            nn.ReLU(),
            nn.Linear(30, 4),
        )
        x = torch.randn(7, 4, 30)
    else:  # conv3d with reflect padding (F.pad, then a convolution of the padded data)
        model = nn.Sequential(
            nn.Conv3d(1, 3, 2, padding=1, padding_mode="reflect"),
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(3 * 5 * 5 * 5, 9),
            nn.Tanh(),
            nn.Linear(9, 4),
        )
        x = torch.randn(7, 1, 4, 4, 4)
    return model.double(), x.double()


@pytest.mark.parametrize("first", ["linear", "conv2d", "conv1d", "conv3d"])
def test_products_above_the_dense_limit(first):
    model, x = _wide(first)
    p = sum(t.numel() for t in model.parameters())
    assert p > CompilePolicy().dense_limit
    truth = gt.fim(model, x, "classif_logits")
    loader = loader_of(x, sizes=(4,))
    g = torch.Generator().manual_seed(1)
    v = torch.randn(p, 2, dtype=torch.float64, generator=g)
    plain = FIM(model, loader, PMatImplicit, progress=False)
    cached = FIM(model, loader, CACHED, progress=False)
    torch.testing.assert_close(plain.op @ v[:, 0], truth @ v[:, 0])
    torch.testing.assert_close(cached.op @ v[:, 0], truth @ v[:, 0])  # builds the cache
    assert all(_first_products(cached))
    torch.testing.assert_close(cached.op @ v[:, 1], truth @ v[:, 1])  # double-VJP
    torch.testing.assert_close(cached.op @ v, plain.op @ v)


def _matmuls(fn) -> int:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    names = ("aten::mm", "aten::addmm")
    return sum(e.count for e in prof.key_averages() if e.key in names)


@pytest.mark.parametrize("bias", [True, False])
def test_dual_forward_skips_the_data_tangent(bias):
    # the data carries no tangent: the first layer costs its primal product and the weight's
    # tangent product, not a third product of a zero tangent by W
    torch.manual_seed(0)
    model = nn.Linear(6, 5, bias=bias).double()
    x = torch.randn(4, 6, dtype=torch.float64)
    F = FIM(model, loader_of(x), PMatImplicit, progress=False)
    fm = F._products.fm
    v = torch.randn(fm.flat0.numel(), dtype=torch.float64)

    def run():
        w = fm.flat0.detach().requires_grad_(True)
        with torch.enable_grad():
            return dual_forward(fm, (x,), w, v)

    out, jv = run()
    assert out.requires_grad  # on the reverse graph of w
    weight = v[:30].view(5, 6)
    want = x @ weight.T + (v[30:] if bias else 0)
    torch.testing.assert_close(jv, want)
    assert _matmuls(run) == 2

    def torch_formula():  # without the mode: torch's own formula, one more product
        import torch.autograd.forward_ad as fwAD

        w = fm.flat0.detach().requires_grad_(True)
        with torch.enable_grad(), fwAD.dual_level():
            return fwAD.unpack_dual(fm(fwAD.make_dual(w, v), (x,)))

    assert _matmuls(torch_formula) == 3
    torch.testing.assert_close(torch_formula()[1], jv)


def _nodes(t) -> int:
    seen, stack = set(), [t.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            stack.extend(f for f, _ in node.next_functions)
    return len(seen)


def test_dual_forward_records_the_plain_forward_graph():
    # the mode links the primals directly: no make_dual / unpack_dual alias nodes on the reverse
    # graph that every backward, and the cached graph of Jᵀu, would run (every call intercepted)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)).double()
    x = torch.randn(6, 4, dtype=torch.float64)
    F = FIM(model, loader_of(x), PMatImplicit, progress=False)
    fm = F._products.fm
    v = torch.randn(fm.flat0.numel(), dtype=torch.float64)
    w = fm.flat0.detach().requires_grad_(True)
    with torch.enable_grad():
        out, _ = dual_forward(fm, (x,), w, v)
        plain = fm(w, (x,))
    assert _nodes(out) == _nodes(plain)


class _InPlace(nn.Module):
    """A layer's output changed in place before an intercepted call reads it."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(5, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = self.a(x)
        h.mul_(2.0)  # its derivative and tangent must reach the intercepted relu
        return self.b(torch.relu(h))


def test_dual_changed_in_place_keeps_its_derivative():
    torch.manual_seed(0)
    model, x = _InPlace().double(), torch.randn(7, 5, dtype=torch.float64)
    truth = gt.fim(model, x, "classif_logits")
    v = torch.randn(truth.shape[0], 2, dtype=torch.float64)
    for rep in (PMatImplicit, CACHED):
        F = FIM(model, loader_of(x), rep, progress=False)
        torch.testing.assert_close(F.op @ v[:, 0], truth @ v[:, 0])
        torch.testing.assert_close(F.op @ v, truth @ v)


def test_mode_leaves_other_calls_alone():
    # keyword arguments, a dual input and plain tensors: the mode defers to torch
    import torch.autograd.forward_ad as fwAD

    x = torch.randn(2, 3, 8, dtype=torch.float64)
    w, t = torch.randn(4, 3, 3, dtype=torch.float64), torch.randn(4, 3, 3, dtype=torch.float64)
    dx = torch.randn_like(x)
    with fwAD.dual_level(), DataTangentMode():
        a = torch.nn.functional.conv1d(x, fwAD.make_dual(w, t), stride=2)
        b = torch.nn.functional.conv1d(fwAD.make_dual(x, dx), fwAD.make_dual(w, t))
        c = torch.nn.functional.conv1d(x, w)
        ta, tb = fwAD.unpack_dual(a).tangent, fwAD.unpack_dual(b).tangent
        assert fwAD.unpack_dual(c).tangent is None
    conv = torch.nn.functional.conv1d
    torch.testing.assert_close(ta, conv(x, t, stride=2))
    torch.testing.assert_close(tb, conv(dx, w) + conv(x, t))


def test_adjoint_test_runs_only_on_graphs_with_foreign_nodes(monkeypatch):
    calls = []
    real = fx.Linearised._adjoint_test

    def counted(self):
        calls.append(1)
        return real(self)

    monkeypatch.setattr(fx.Linearised, "_adjoint_test", counted)
    model, x = make("conv2d")
    F = FIM(model, loader_of(x), CACHED, progress=False)
    F.op @ torch.randn(F.layer_collection.numel(), dtype=torch.float64)
    assert calls == [] and all(lin.double for lin in F._products._lin)

    class Twice(torch.autograd.Function):  # a correct custom Function: tested, then trusted
        generate_vmap_rule = True

        @staticmethod
        def forward(t):
            return 2 * t

        @staticmethod
        def setup_context(ctx, inputs, output):
            pass

        @staticmethod
        def backward(ctx, g):
            return 2 * g

        @staticmethod
        def jvp(ctx, t):
            return 2 * t

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 3)

        def forward(self, t):
            return self.b(Twice.apply(torch.tanh(self.a(t))))

    torch.manual_seed(0)
    model = M().double()
    x = torch.randn(6, 4, dtype=torch.float64)
    truth = gt.fim(model, x, "classif_logits")
    F = FIM(model, loader_of(x), CACHED, progress=False)
    v = torch.randn(truth.shape[0], dtype=torch.float64)
    torch.testing.assert_close(F.op @ v, truth @ v)
    assert len(calls) == len(F._products._lin) and all(lin.double for lin in F._products._lin)
    torch.testing.assert_close(F.op @ v, truth @ v)


def test_first_product_with_a_backward_without_double_backward():
    # the cube's backward cannot be differentiated: the first product (forward mode) is right, the
    # adjoint test at linearisation rejects the double-VJP graph, later products use forward mode
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), Cube(), nn.Linear(5, 3)).double()
    x = torch.randn(6, 4, dtype=torch.float64)
    truth = gt.fim(model, x, "classif_logits")
    F = FIM(model, loader_of(x), CACHED, progress=False)
    v = torch.randn(truth.shape[0], 2, dtype=torch.float64)
    torch.testing.assert_close(F.op @ v[:, 0], truth @ v[:, 0])
    assert all(_first_products(F)) and not any(lin.double for lin in F._products._lin)
    torch.testing.assert_close(F.op @ v, truth @ v)


def test_first_cached_monte_carlo_product_is_the_uncached_one():
    model, x = make("mlp")
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    plain, cached = (seeded_monte_carlo(model, x, r) for r in (PMatImplicit, CACHED))
    torch.testing.assert_close(cached.op @ v, plain.op @ v)
    assert all(_first_products(cached))
    torch.testing.assert_close(cached.op @ v, plain.op @ v)


@pytest.mark.parametrize("conv", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("rep", [PMatImplicit, CACHED], ids=["plain", "cached"])
def test_frozen_weight_of_the_data_layer(conv, rep):
    # the data's layer has only its bias in the collection: the mode defers to torch's formula
    torch.manual_seed(0)
    if conv:
        model = nn.Sequential(nn.Conv1d(3, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(20, 3))
        x = torch.randn(5, 3, 7, dtype=torch.float64)
    else:
        model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
        x = torch.randn(6, 4, dtype=torch.float64)
    model = model.double()
    model[0].weight.requires_grad_(False)
    truth = gt.fim(model, x, "classif_logits")
    F = FIM(model, loader_of(x), rep, progress=False)
    v = torch.randn(truth.shape[0], dtype=torch.float64)
    for _ in range(2):
        torch.testing.assert_close(F.op @ v, truth @ v)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("cache", [False, True])
def test_non_finite_outputs_are_refused_by_the_products(bad, cache):
    # the outputs are checked at each product (the first of a cached operator too), whatever the
    # sign of an infinity (a -inf logit gives a finite softmax: the check is on the outputs)
    from nngeo_ops.errors import NonFiniteError

    model, x = make("mlp")
    x = x.clone()
    x[0] = bad
    F = FIM(model, loader_of(x), CACHED if cache else PMatImplicit, progress=False)
    v = torch.randn(F.layer_collection.numel(), dtype=x.dtype)
    with pytest.raises(NonFiniteError, match="model output contains NaN or inf"):
        F.op @ v
