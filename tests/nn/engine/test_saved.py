"""The cached linearisation keeps no cotangent saved by the graph of u ↦ Jᵀu (``engine.saved``):
which tensors are dropped, and the products against the torch.func ground truth (float64), on
models whose double-backward nodes save cotangents (convolutions, attention, normalisation), below
and above ``CompilePolicy.dense_limit``."""

import functools
import gc
import weakref

import groundtruth as gt
import pytest
import torch
import torch.nn.functional as F
from models import loader_of
from torch import nn

from nngeo_ops.nn import FIM, PMatImplicit
from nngeo_ops.nn.engine.saved import _Unread, unread_saves
from nngeo_ops.ops import CompilePolicy

CACHED = functools.partial(PMatImplicit, cache=True)


def test_only_what_depends_on_u_is_dropped():
    torch.manual_seed(0)
    w = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    x = torch.randn(5, 3, dtype=torch.float64)
    y = torch.tanh(x @ w.T)  # the saved output is re-attached to its node when unpacked
    u = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    hooks = unread_saves(u)
    pack = hooks.pack_hook
    assert isinstance(pack(u), _Unread)
    assert isinstance(pack(u * y.detach()), _Unread)
    assert isinstance(pack((u * y).sum(0)), _Unread)  # u and w: still read only for w's derivative
    for kept in (y, y.square(), w, x, w.detach()):  # w-dependent or constant: kept as it is
        assert pack(kept) is kept
    packed = pack(u.T.exp())
    assert packed.shape == (4, 5) and packed.dtype == torch.float64
    zeros = hooks.unpack_hook(packed)
    assert zeros.shape == (4, 5) and zeros.dtype == torch.float64 and not zeros.any()


def _double_vjp(f, w, v):
    """J v through the graph of Jᵀu with and without the hooks, and J v by torch.func."""
    out = f(w)
    u = torch.zeros_like(out, requires_grad=True)
    res = []
    for hooks in (True, False):
        with (
            unread_saves(u)
            if hooks
            else torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)
        ):
            (jtu,) = torch.autograd.grad(out, w, u, create_graph=True)
        (jv,) = torch.autograd.grad(jtu, u, v)
        res.append(jv)
    res.append(torch.func.jvp(f, (w.detach(),), (v,))[1])
    return res


@pytest.mark.parametrize(
    "op",
    [
        lambda w, x: F.relu(F.conv2d(x, w.view(3, 2, 3, 3), padding=1)),
        lambda w, x: F.max_pool2d(torch.tanh(F.conv2d(x, w.view(3, 2, 3, 3))), 2),
        lambda w, x: F.layer_norm(torch.tanh(F.conv2d(x, w.view(3, 2, 3, 3))), (4, 4)),
        lambda w, x: torch.softmax(F.conv2d(x, w.view(3, 2, 3, 3)).flatten(2), -1),
        lambda w, x: F.gelu(F.conv2d(x, w.view(3, 2, 3, 3))).square(),
    ],
    ids=["conv-relu", "conv-tanh-pool", "layer_norm", "softmax", "gelu-square"],
)
def test_double_vjp_is_unchanged(op):
    torch.manual_seed(0)
    x = torch.randn(4, 2, 6, 6, dtype=torch.float64)
    w = torch.randn(54, dtype=torch.float64, requires_grad=True)
    v = torch.randn(54, dtype=torch.float64)
    with_hooks, without, truth = _double_vjp(lambda p: op(p, x), w, v)
    torch.testing.assert_close(with_hooks, without, rtol=0, atol=0)
    torch.testing.assert_close(with_hooks, truth)


class _Attention(nn.Module):
    def __init__(self, d, wide):
        super().__init__()
        self.inp = nn.Linear(3, d)
        self.ln = nn.LayerNorm(d)
        self.q, self.k, self.v = (nn.Linear(d, d) for _ in range(3))
        self.fc = nn.Linear(d, 40 if wide else 4)
        self.head = nn.Linear(40 if wide else 4, 3)

    def forward(self, x):
        h = self.inp(x)
        z = self.ln(h)
        att = torch.softmax(self.q(z) @ self.k(z).transpose(-1, -2), dim=-1)
        h = h + att @ self.v(z)
        return self.head(F.gelu(self.fc(h.mean(1))))


def _models(wide):
    torch.manual_seed(0)
    c = 8 if wide else 3
    cnn = nn.Sequential(
        nn.Conv2d(2, c, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(c, c, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(c * 16, 40 if wide else 4),
        nn.Tanh(),
        nn.Linear(40 if wide else 4, 3),
    ).double()
    attention = _Attention(24 if wide else 4, wide).double()
    return [
        (cnn, torch.randn(7, 2, 8, 8, dtype=torch.float64)),
        (attention, torch.randn(7, 5, 3, dtype=torch.float64)),
    ]


@pytest.mark.parametrize("wide", [False, True], ids=["small", "above-dense-limit"])
def test_cached_products(wide):
    for model, x in _models(wide):
        p = sum(t.numel() for t in model.parameters())
        assert (p > CompilePolicy().dense_limit) == wide
        truth = gt.fim(model, x, "classif_logits")
        cached = FIM(model, loader_of(x, sizes=(4, 3)), CACHED, progress=False)
        v = torch.randn(p, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(cached.op @ v[:, 0], truth @ v[:, 0])  # builds the cache
        torch.testing.assert_close(cached.op @ v, truth @ v)  # through the kept graphs
        torch.testing.assert_close(cached.op @ v[:, 1], truth @ v[:, 1])


def test_cached_graphs_are_freed(monkeypatch):
    # the hooks stay with the graph's saved variables: they must not hold its nodes (a cycle
    # through C++ that the collector cannot see would keep every cached graph alive)
    import nngeo_ops.nn.engine.functional as fx

    made = []

    def recorded(u, *args):
        hooks = unread_saves(u, *args)
        made.append(weakref.ref(hooks))
        return hooks

    monkeypatch.setattr(fx, "unread_saves", recorded)
    model, x = _models(False)[0]
    cached = FIM(model, loader_of(x, sizes=(4, 3)), CACHED, progress=False)
    v = torch.randn(sum(p.numel() for p in model.parameters()), 2, dtype=torch.float64)
    cached.op @ v[:, 0]
    cached.op @ v
    gc.collect()
    assert len(made) == 2 and all(r() is not None for r in made)  # held by the cached graphs
    del cached
    gc.collect()
    assert all(r() is None for r in made)
