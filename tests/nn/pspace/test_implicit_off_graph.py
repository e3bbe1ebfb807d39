"""The dual forward's off-graph tangents (``DataTangentMode(off_graph=True)``): ``linear`` / ``conv``
with an input tangent, ``relu`` and ``max_pool2d`` run on the primal and compute the tangent under
``no_grad``. Checked against the torch.func ground truth (float64), on models below and above
``CompilePolicy.dense_limit``, and against torch's own forward-mode formulas op by op."""

import functools

import groundtruth as gt
import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from models import loader_of
from torch import nn

from nngeo_ops.nn import FIM, PMatImplicit, PVector
from nngeo_ops.nn.engine.dual import DataTangentMode, dual_forward
from nngeo_ops.ops import CompilePolicy

CACHED = functools.partial(PMatImplicit, cache=True)


class Pool(nn.Module):
    """``F.max_pool2d`` with explicit arguments (positional or keyword, indices or not)."""

    def __init__(self, how):
        super().__init__()
        self.how = how

    def forward(self, x):
        if self.how == "indices":
            return F.max_pool2d(x, 2, return_indices=True)[0]
        if self.how == "positional":  # kernel, stride, padding, dilation, ceil_mode, return_indices
            return F.max_pool2d(x, 3, 2, 1, 1, True, True)[0]
        if self.how == "dilated":
            return F.max_pool2d(x, kernel_size=2, stride=1, dilation=2)
        return torch.relu(F.max_pool2d(x, 2, ceil_mode=True))  # pool before the ReLU


def _cnn(pool="module", wide=False, inplace=False, frozen=None):
    torch.manual_seed(0)
    c = 8 if wide else 3
    pooled = {"module": 4, "indices": 4, "positional": 5, "dilated": 6, "ceil": 4}[pool]
    model = nn.Sequential(
        nn.Conv2d(2, c, 3, padding=1),
        nn.ReLU(inplace=inplace),
        nn.MaxPool2d(2) if pool == "module" else Pool(pool if pool != "ceil" else "ceil"),
        nn.Conv2d(c, c, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(c * pooled * pooled, 40 if wide else 6),
        nn.Tanh(),
        nn.Linear(40 if wide else 6, 4),
    ).double()
    if frozen == "weight":  # a middle layer's weight outside the collection, its bias in it
        model[3].weight.requires_grad_(False)
    elif frozen == "both":  # a middle layer entirely outside the collection
        model[3].requires_grad_(False)
    x = torch.randn(7, 2, 8, 8, dtype=torch.float64)
    x[:, :, ::3] = 0.25  # flat patches: ties inside pooling windows
    return model, x


def _check(model, x, wide):
    p = sum(t.numel() for t in model.parameters() if t.requires_grad)
    assert (p > CompilePolicy().dense_limit) == wide
    truth = gt.fim(model, x, "classif_logits")
    loader = loader_of(x, sizes=(4, 3))
    g = torch.Generator().manual_seed(1)
    v = torch.randn(p, 2, dtype=torch.float64, generator=g)
    plain = FIM(model, loader, PMatImplicit, progress=False)
    cached = FIM(model, loader, CACHED, progress=False)
    torch.testing.assert_close(plain.op @ v[:, 0], truth @ v[:, 0])
    torch.testing.assert_close(cached.op @ v[:, 0], truth @ v[:, 0])  # the first: dual forward
    torch.testing.assert_close(cached.op @ v[:, 1], truth @ v[:, 1])
    return plain, truth


@pytest.mark.parametrize("wide", [False, True], ids=["small", "above-dense-limit"])
@pytest.mark.parametrize("pool", ["module", "indices", "positional", "dilated", "ceil"])
def test_cnn_with_pooling(pool, wide):
    _check(*_cnn(pool, wide), wide)


@pytest.mark.parametrize("frozen", [None, "weight", "both"])
@pytest.mark.parametrize("inplace", [False, True])
def test_cnn_inplace_relu_and_frozen_layers(inplace, frozen):
    # an in-place ReLU and a middle layer with a lone bias tangent take torch's formulas
    _check(*_cnn(inplace=inplace, frozen=frozen), False)


def test_differentiable_in_the_vector():
    # v requires grad: torch's formulas, J v on the graph of v
    model, x = _cnn()
    truth = gt.fim(model, x, "classif_logits")
    Fm = FIM(model, loader_of(x), PMatImplicit, progress=False)
    v = torch.randn(truth.shape[0], dtype=torch.float64, requires_grad=True)
    q = Fm.vTMv(PVector(Fm.layer_collection, vector_repr=v))
    (g,) = torch.autograd.grad(q, v)
    torch.testing.assert_close(g, 2 * truth @ v.detach())


def _tangents(fn, args, tangents, off_graph):
    with fwAD.dual_level(), DataTangentMode(off_graph):
        duals = [fwAD.make_dual(a, t) if t is not None else a for a, t in zip(args, tangents)]
        out = fn(*duals)
        outs = out if isinstance(out, tuple) else (out,)
        # the gradient of a fixed weighting of the first output: its primal is on the reverse graph
        p = fwAD.unpack_dual(outs[0]).primal
        c = torch.randn(p.shape, dtype=p.dtype, generator=torch.Generator().manual_seed(2))
        grads = torch.autograd.grad((p * c).sum(), args, allow_unused=True)
        return [(o.detach().clone(), fwAD.unpack_dual(o).tangent) for o in outs], grads


CALLS = {
    "linear": (lambda x, w, b: F.linear(x, w, b), [(5, 3, 4), (6, 4), (6,)]),
    # a matrix input: the tangent's two products accumulated by one addmm_
    "linear-2d": (lambda x, w, b: F.linear(x, w, b), [(5, 4), (6, 4), (6,)]),
    "linear-2d-nobias": (lambda x, w: F.linear(x, w), [(5, 4), (6, 4)]),
    "conv1d": (lambda x, w, b: F.conv1d(x, w, b, 2, 0, 1, 2), [(5, 4, 9), (6, 2, 3), (6,)]),
    "conv2d": (lambda x, w, b: torch.conv2d(x, w, b, 1, 1), [(2, 3, 5, 5), (4, 3, 3, 3), (4,)]),
    "relu": (torch.relu, [(4, 6)]),
    "relu-method": (lambda x: x.relu(), [(4, 6)]),
    "F.relu": (F.relu, [(4, 6)]),
    "max_pool2d": (lambda x: F.max_pool2d(x, 2, return_indices=True), [(2, 3, 6, 6)]),
    "max_pool2d-3d": (lambda x: F.max_pool2d(x, (2, 3), ceil_mode=True), [(3, 7, 8)]),
    "matmul": (lambda a, b: a @ b.transpose(-1, -2), [(2, 3, 5, 4), (2, 3, 6, 4)]),
    "torch.matmul": (torch.matmul, [(3, 5, 4), (4, 2)]),
    "bmm": (torch.bmm, [(3, 5, 4), (3, 4, 2)]),
    "softmax": (lambda x: torch.softmax(x, dim=-1), [(3, 4, 5)]),
    "F.softmax": (lambda x: F.softmax(x, 1), [(3, 4, 5)]),
    "softmax-method": (lambda x: x.softmax(0), [(3, 4)]),
    "gelu": (F.gelu, [(4, 6)]),
    "gelu-tanh": (lambda x: F.gelu(x, approximate="tanh"), [(4, 6)]),
    "layer_norm": (
        lambda x, w, b: F.layer_norm(x, (4, 5), w, b, 1e-3),
        [(3, 4, 5), (4, 5), (4, 5)],
    ),
    "layer_norm-int": (
        lambda x, w, b: F.layer_norm(x, (5,), weight=w, bias=b),
        [(3, 5), (5,), (5,)],
    ),
    "layer_norm-plain": (lambda x: F.layer_norm(x, [6]), [(2, 3, 6)]),
}


@pytest.mark.parametrize("name", list(CALLS))
def test_off_graph_tangent_is_torch_formula(name):
    fn, shapes = CALLS[name]
    g = torch.Generator().manual_seed(0)
    args = [torch.randn(s, dtype=torch.float64, generator=g) for s in shapes]
    args[0] = torch.where(args[0] > 0.5, 0.5, args[0])  # ties and zeros
    tangents = [torch.randn(s, dtype=torch.float64, generator=g) for s in shapes]
    for drop in [None] + list(range(len(args))):  # inputs or parameters without tangent too
        tans = [t if i != drop else None for i, t in enumerate(tangents)]
        leaves = [a.clone().requires_grad_(True) for a in args]
        want, g0 = _tangents(fn, leaves, tans, off_graph=False)
        leaves = [a.clone().requires_grad_(True) for a in args]
        got, g1 = _tangents(fn, leaves, tans, off_graph=True)
        for (p0, t0), (p1, t1) in zip(want, got):
            torch.testing.assert_close(p1, p0, rtol=0, atol=0)
            torch.testing.assert_close(t1, t0)
        for a, b in zip(g0, g1):
            torch.testing.assert_close(b, a)


def test_off_graph_primal_keeps_the_reverse_graph():
    # the primal is on the reverse graph of the parameters (Jᵀu is the plain backward's); J v is
    # detached and equals the differentiable one
    model, x = _cnn()
    Fm = FIM(model, loader_of(x), PMatImplicit, progress=False)
    fm = Fm._products.fm
    w = fm.flat0.detach().requires_grad_(True)
    v = torch.randn(w.numel(), dtype=torch.float64)
    with torch.enable_grad():
        out, jv = dual_forward(fm, (x,), w, v)
        v2 = v.clone().requires_grad_(True)
        out2, jv2 = dual_forward(fm, (x,), fm.flat0.detach().requires_grad_(True), v2)
        w3 = fm.flat0.detach().requires_grad_(True)
        ref = fm(w3, (x,))
    assert out.requires_grad and not jv.requires_grad and jv2.requires_grad
    torch.testing.assert_close(jv, jv2.detach())
    torch.testing.assert_close(out.detach(), ref.detach(), rtol=0, atol=0)
    u = torch.randn_like(out)
    (g1,) = torch.autograd.grad(out, w, u)
    (g3,) = torch.autograd.grad(ref, w3, u)
    torch.testing.assert_close(g1, g3)


@pytest.mark.parametrize("model", ["cnn", "block"])
def test_the_models_take_the_off_graph_rules(model, monkeypatch):
    import nngeo_ops.nn.engine.dual as dual

    rules = {
        "cnn": ["_max_pool2d", "_relu"],
        "block": ["_gelu", "_layer_norm", "_matmul", "_softmax"],
    }[model]
    taken = []
    for name in rules:
        real = getattr(dual, name)

        def counted(*args, real=real, name=name):
            out = real(*args)
            taken.append((name, out is not None))
            return out

        monkeypatch.setattr(dual, name, counted)
    if model == "cnn":
        net, x = _cnn()
    else:
        torch.manual_seed(0)
        net, x = Block(6).double(), torch.randn(5, 4, 8, dtype=torch.float64)
    Fm = FIM(net, loader_of(x), PMatImplicit, progress=False)
    Fm.op @ torch.randn(Fm.layer_collection.numel(), dtype=torch.float64)
    assert sorted(set(taken)) == [(name, True) for name in rules]


@pytest.mark.parametrize(
    "kw",
    [
        dict(kernel_size=2),
        dict(kernel_size=3, stride=2, padding=1, ceil_mode=True),
        dict(kernel_size=(2, 3), stride=1, dilation=2),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pool_indices_are_torch_indices(kw, dtype, monkeypatch):
    # the channels-last kernel, chunk by chunk, against torch's (N, C, H, W) kernel: ties (first
    # maximum), NaN (taken), -inf windows, chunks that do not divide the batch
    import nngeo_ops.nn.engine.dual as dual

    monkeypatch.setattr(dual, "_POOL_CHUNK", 3 * 4 * 9 * 10 * 8)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 4, 9, 10, generator=g).round().to(dtype)  # many ties
    x[0, 0, :4, :4] = float("-inf")
    x[1, 1, 2, 3] = float("nan")
    x[2, 2, :3, :] = float("nan")
    want = F.max_pool2d_with_indices(x, **kw)[1]
    got = dual._pool_indices(x, [], kw)
    assert got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=0, atol=0)


class Block(nn.Module):
    """A pre-LayerNorm attention block written out (the benchmark's transformer, smaller): linear
    layers on 3-D inputs, q kᵀ and att v products of two tangents, softmax, GELU, LayerNorms."""

    def __init__(self, d):
        super().__init__()
        self.inp, self.ln1, self.ln2 = nn.Linear(8, d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.fc1, self.fc2, self.head = nn.Linear(d, 2 * d), nn.Linear(2 * d, d), nn.Linear(d, 4)

    def forward(self, x):
        h = self.inp(x)
        b, t, d = h.shape
        z = self.ln1(h)

        def heads(u):
            return u.view(b, t, 2, d // 2).transpose(1, 2)

        q, k, v = heads(self.q(z)), heads(self.k(z)), heads(self.v(z))
        att = torch.softmax(q @ k.transpose(-1, -2) / (d // 2) ** 0.5, dim=-1)
        h = h + self.o((att @ v).transpose(1, 2).reshape(b, t, d))
        h = h + self.fc2(F.gelu(self.fc1(self.ln2(h))))
        return self.head(h.mean(1))


@pytest.mark.parametrize("wide", [False, True], ids=["small", "above-dense-limit"])
def test_attention_block(wide):
    torch.manual_seed(0)
    model = Block(20 if wide else 6).double()
    with torch.no_grad():  # LayerNorm affine parameters away from (1, 0)
        for ln in (model.ln1, model.ln2):
            ln.weight.add_(0.3 * torch.randn_like(ln.weight))
            ln.bias.add_(0.3 * torch.randn_like(ln.bias))
    x = torch.randn(5, 4, 8, dtype=torch.float64)
    _check(model, x, wide)
