"""The implicit GGN / Fisher / Hessian products: the uncached path (dual numbers for one column, vmapped
jvp for several) and the cached linearisation, against the torch.func ground truth."""

import functools

import groundtruth as gt
import pytest
import torch
from models import CASES, Cube, loader_of, make, seeded_monte_carlo
from torch import nn

from nngeo_ops.nn import FIM, GGN, Hessian, PMatDense, PMatImplicit, PVector

CACHED = functools.partial(PMatImplicit, cache=True)


@pytest.mark.parametrize("case", CASES)
def test_cached_products_match_torch_func(case):
    model, x = make(case)
    truth = gt.fim(model, x, "classif_logits")
    loader = loader_of(x, sizes=(2, 2))
    plain = FIM(model, loader, PMatImplicit, progress=False)
    cached = FIM(model, loader, CACHED, progress=False)
    g = torch.Generator().manual_seed(0)
    v = torch.randn(truth.shape[0], 3, dtype=torch.float64, generator=g)
    for _ in range(2):  # the second product reuses the linearisation
        torch.testing.assert_close(cached.op @ v, truth @ v)
        torch.testing.assert_close(cached.op @ v[:, 0], truth @ v[:, 0])
    torch.testing.assert_close(plain.op @ v[:, :1], truth @ v[:, :1])  # one column: dual numbers
    torch.testing.assert_close(plain.op @ v, truth @ v)  # several: vmapped jvp


@pytest.mark.parametrize("loss_fn", [nn.CrossEntropyLoss(), nn.MSELoss(reduction="sum")])
def test_cached_ggn_and_hessian(loss_fn):
    model, x = make("mlp")
    out = model(x)
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        y = torch.randint(0, 3, (x.shape[0],), generator=torch.Generator().manual_seed(0))
    else:
        y = torch.randn(out.shape, dtype=torch.float64)
    loader = loader_of(x, y, sizes=(2,))
    n = sum(p.numel() for p in model.parameters())
    v = torch.randn(n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ggn = gt.ggn(model, x, y, loss_fn)
    G = GGN(model, loader, loss_fn, CACHED, progress=False)
    torch.testing.assert_close(G.op @ v, ggn @ v)
    torch.testing.assert_close(G.op @ v, ggn @ v)
    hess = gt.exact_hessian(model, x, y, loss_fn)
    H = Hessian(model, loader, loss_fn, CACHED, progress=False)
    for _ in range(2):
        torch.testing.assert_close(H.op @ v, hess @ v)
    assert not H.op.psd


@pytest.mark.parametrize(
    "loss_fn", [nn.CrossEntropyLoss(ignore_index=1), nn.MSELoss(), nn.BCEWithLogitsLoss()]
)
def test_cached_ggn_output_curvature_in_closed_form(loss_fn):
    # the exact kind's output curvature is applied in closed form at every cached product (the
    # first one, fused with the linearisation, and the later ones): ignored labels masked, a
    # squared error and sigmoid outputs, against torch.func's GGN
    model, x = make("mlp")
    g = torch.Generator().manual_seed(0)
    out = model(x)
    if isinstance(loss_fn, nn.BCEWithLogitsLoss):
        y = (torch.rand(out.shape, generator=g) > 0.5).to(torch.float64)
    elif isinstance(loss_fn, nn.MSELoss):
        y = torch.randn(out.shape, dtype=torch.float64, generator=g)
    else:
        y = torch.randint(0, 3, (x.shape[0],), generator=g)
    loader = loader_of(x, y, sizes=(2,))
    n = sum(p.numel() for p in model.parameters())
    v = torch.randn(n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ggn = gt.ggn(model, x, y, loss_fn)
    G = GGN(model, loader, loss_fn, CACHED, progress=False)
    torch.testing.assert_close(G.op @ v[:, 0], ggn @ v[:, 0])  # first: fused
    torch.testing.assert_close(G.op @ v, ggn @ v)
    plain = GGN(model, loader, loss_fn, PMatImplicit, progress=False)
    torch.testing.assert_close(plain.op @ v[:, 1], ggn @ v[:, 1])


@pytest.mark.mutates_model  # changes the parameters to check the snapshot
@pytest.mark.parametrize("rep", [PMatImplicit, CACHED], ids=["plain", "cached"])
def test_operator_is_the_curvature_at_construction(rep):
    # like a dense Fisher, the operator keeps the parameters it was built at: an optimiser step
    # (in place) changes neither its fused products nor its factors J and H
    model, x = make("mlp")
    loader = loader_of(x, sizes=(2,))
    F = FIM(model, loader, rep, progress=False)
    before = gt.fim(model, x, "classif_logits")
    v = torch.randn(F.layer_collection.numel(), 2, dtype=torch.float64)
    torch.testing.assert_close(F.op @ v, before @ v)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    after = gt.fim(model, x, "classif_logits")
    assert (after @ v - before @ v).norm() > 1e-3 * (before @ v).norm()
    J, H = F.op.J, F.op.H
    for _ in range(2):
        torch.testing.assert_close(F.op @ v, before @ v)
    torch.testing.assert_close(J.T @ (H @ (J @ v)), before @ v)
    G = FIM(model, loader, rep, progress=False)  # a new operator sees the new parameters
    torch.testing.assert_close(G.op @ v, after @ v)
    F.clear_cache()
    assert F._products._lin is None
    torch.testing.assert_close(F.op @ v, before @ v)


def test_cached_monte_carlo_is_the_uncached_operator():
    model, x = make("mlp")
    v = torch.randn(sum(p.numel() for p in model.parameters()), 2, dtype=torch.float64)
    plain, cached = (seeded_monte_carlo(model, x, r) for r in (PMatImplicit, CACHED))
    torch.testing.assert_close(cached.op @ v, plain.op @ v)
    torch.testing.assert_close(cached.op @ v, plain.op @ v)


@pytest.mark.parametrize("rep", [PMatImplicit, CACHED], ids=["plain", "cached"])
def test_products_are_differentiable_in_the_vector(rep):
    model, x = make("conv2d")
    truth = gt.fim(model, x, "classif_logits")
    F = FIM(model, loader_of(x), rep, progress=False)
    v = torch.randn(truth.shape[0], dtype=torch.float64, requires_grad=True)
    q = F.vTMv(PVector(F.layer_collection, vector_repr=v))
    (g,) = torch.autograd.grad(q, v)
    torch.testing.assert_close(q, v.detach() @ truth @ v.detach())
    torch.testing.assert_close(g, 2 * truth @ v.detach())


def test_cached_dense_equals_dense():
    model, x = make("residual")
    loader = loader_of(x, sizes=(2,))
    torch.testing.assert_close(
        FIM(model, loader, CACHED, progress=False).to_torch(),
        FIM(model, loader, PMatDense, progress=False).to_torch(),
    )


def test_cache_detects_a_backward_without_double_backward():
    # the double-VJP graph would silently miss the paths through the cube: the adjoint test at
    # linearisation sees it and J V falls back to forward mode
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), Cube(), nn.Linear(5, 3)).double()
    x = torch.randn(6, 4, dtype=torch.float64)
    truth = gt.fim(model, x, "classif_logits")
    F = FIM(model, loader_of(x), CACHED, progress=False)
    v = torch.randn(truth.shape[0], 2, dtype=torch.float64)
    torch.testing.assert_close(F.op @ v, truth @ v)
    assert not any(lin.double for lin in F._products._lin)
    torch.testing.assert_close(F.op @ v, truth @ v)
    # on an ordinary model the double-VJP path is the one taken
    model, x = make("conv2d")
    F = FIM(model, loader_of(x), CACHED, progress=False)
    F.op @ torch.randn(F.layer_collection.numel(), dtype=torch.float64)
    assert all(lin.double for lin in F._products._lin)
