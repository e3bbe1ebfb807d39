"""A module registered under two names and called twice (``Sequential(lin, Tanh(), lin, ...)``).

``torch.func.functional_call`` ties weights by name and, for such a module, leaves the user's
``Parameter`` replaced by a plain tensor; the library's functional path must not. Every route
(hooks, torch.func, implicit products, Hessians, Jacobian, Gram matrix) is checked against dense
``jacrev`` ground truth, and the autouse fixture of ``conftest.py`` checks the model is untouched.
"""

import groundtruth as gt
import pytest
import torch
from models import loader_of, make

from nngeo_ops.errors import UnsupportedError
from nngeo_ops.nn import (
    FIM,
    GGN,
    FMatImplicit,
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
    PMatQuasiDiag,
)


def _ones(a):
    return torch.cat([a, torch.ones(*a.shape[:-1], 1, dtype=a.dtype)], -1)


def _intact(model, params):
    assert (
        list(model.parameters()) == params
    )  # same objects (``==`` on a list compares by identity)
    assert all(isinstance(p, torch.nn.Parameter) and p.requires_grad for p in model.parameters())


def test_issue_example_jacobian_and_model_intact():
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 4).double()
    model = torch.nn.Sequential(lin, torch.nn.Tanh(), lin)
    x = torch.randn(5, 4, dtype=torch.float64)
    params = list(model.parameters())
    J = Jacobian(model, [(x, torch.zeros(5))], progress=False)
    _intact(model, params)
    truth = gt.jacobian(model, x).permute(1, 0, 2)  # (C, N, P)
    torch.testing.assert_close(J.to_torch(), truth)
    v = torch.randn(truth.shape[-1], dtype=torch.float64)
    torch.testing.assert_close(J @ v, truth.reshape(-1, truth.shape[-1]) @ v)
    u = torch.randn(truth.shape[0] * truth.shape[1], dtype=torch.float64)
    torch.testing.assert_close(J.T @ u, truth.reshape(-1, truth.shape[-1]).T @ u)
    _intact(model, params)
    # the model still trains, and a later curvature on it still works
    model(x).sum().backward()
    assert lin.weight.grad is not None
    F = FIM(model, [(x,)], PMatImplicit, progress=False)
    torch.testing.assert_close(F.op @ v, gt.fim(model, x, "classif_logits") @ v)
    _intact(model, params)


def test_gram_matrix():
    model, x = make("twice")
    jt = gt.jacobian(model, x).permute(1, 0, 2)  # (C, N, P)
    truth = torch.einsum("cnp,dmp->cndm", jt, jt)
    for backend in ("hooks", "func"):
        K = GramMatrix(model, loader_of(x), backend=backend, progress=False)
        torch.testing.assert_close(K.to_torch(), truth)
    Ki = GramMatrix(model, loader_of(x), representation=FMatImplicit, progress=False)
    c, n = truth.shape[:2]
    v = torch.randn(c * n, dtype=torch.float64)
    torch.testing.assert_close(Ki.op @ v, truth.reshape(c * n, c * n) @ v)


@pytest.mark.parametrize("cache", [False, True], ids=["plain", "cached"])
def test_exact_representations_and_implicit(cache):
    model, x = make("twice")
    lc = LayerCollection.from_model(model)
    assert list(lc.layers) == ["0", "4"]  # the shared module once, under its first name
    truth = gt.fim(model, x, "classif_logits")
    loader = loader_of(x, sizes=(2, 2))
    torch.testing.assert_close(FIM(model, loader, PMatDense, progress=False).to_torch(), truth)
    torch.testing.assert_close(FIM(model, loader, PMatLowRank, progress=False).to_torch(), truth)
    diag = FIM(model, loader, PMatDiag, progress=False)
    torch.testing.assert_close(diag.get_diag(), truth.diagonal())
    blocks = torch.zeros_like(truth)
    for sl in lc.layer_slices().values():
        blocks[sl, sl] = truth[sl, sl]
    torch.testing.assert_close(FIM(model, loader, PMatBlockDiag, progress=False).to_torch(), blocks)
    impl = FIM(model, loader, lambda **kw: PMatImplicit(cache=cache, **kw), progress=False)
    v = torch.randn(lc.numel(), 3, dtype=torch.float64)
    torch.testing.assert_close(impl.op @ v, truth @ v)
    torch.testing.assert_close(
        impl.op.J.to_dense(), gt.jacobian(model, x).permute(1, 0, 2).reshape(-1, lc.numel())
    )
    # the quasi-diagonal: the diagonal and, per output unit, the bias-weight coupling of its row
    quasi = FIM(model, loader, PMatQuasiDiag, progress=False).to_torch()
    mask = torch.eye(lc.numel(), dtype=torch.bool)
    for lid, sl in lc.layer_slices().items():
        n_out, n_in = model.get_submodule(lid).weight.shape
        for o in range(n_out):
            w = sl.start + o * n_in + torch.arange(n_in)
            b = sl.start + n_out * n_in + o
            mask[w, b] = mask[b, w] = True
    torch.testing.assert_close(quasi, torch.where(mask, truth, torch.zeros_like(truth)))


def test_kfac_shared_layer_treats_calls_as_positions_and_ekfac_refit():
    model, x = make("twice")
    lin, head = model[0], model[4]
    F = FIM(model, loader_of(x), PMatKFAC, progress=False)
    # expand mode: A over the inputs of both calls, G over the cotangents of both outputs
    s0 = lin(x)
    h = torch.tanh(s0)
    a = _ones(torch.stack([x, h], 1)).detach()
    A = torch.einsum("bri,brj->ij", a, a) / (a.shape[0] * 2)
    s = torch.stack([s0, lin(h)], 1).detach()
    hb = gt.fisher_blocks(model(x), "classif_logits")

    def post(sn, n):
        # the second call's output depends on the first (as in the network); sn[:, 1] enters as a
        # perturbation of it, so that its cotangent is the direct one
        s1 = lin(torch.tanh(sn[:, 0])) + (sn[:, 1] - sn[:, 1].detach())
        return head(torch.tanh(s1))

    G = 0
    for n in range(x.shape[0]):
        j = torch.func.jacrev(lambda sn, n=n: post(sn[None], n)[0])(s[n])  # (C, 2, 4)
        G = G + sum(j[:, r].T @ hb[n] @ j[:, r] for r in range(2))
    G = G / x.shape[0]
    idx = [o * 5 + i for o in range(4) for i in range(4)] + [o * 5 + 4 for o in range(4)]
    sl = F.layer_collection.layer_slices()["0"]
    torch.testing.assert_close(F.to_torch()[sl, sl], torch.kron(G, A)[idx][:, idx])
    # EKFAC: in the eigenbasis Q of each KFAC block, the refit eigenvalues are diag(Qᵀ F Q)
    truth = gt.fim(model, x, "classif_logits")
    E = FIM(model, loader_of(x), PMatEKFAC, progress=False).to_torch()
    for sl in F.layer_collection.layer_slices().values():
        _, q = torch.linalg.eigh(F.to_torch()[sl, sl])
        torch.testing.assert_close(
            q.T @ E[sl, sl] @ q, torch.diag((q.T @ truth[sl, sl] @ q).diagonal())
        )


def test_hessian_and_ggn():
    model, x = make("twice")
    y = torch.randint(0, 3, (x.shape[0],))
    loss = torch.nn.CrossEntropyLoss()
    truth = gt.exact_hessian(model, x, y, loss)
    loader = loader_of(x, y)
    torch.testing.assert_close(
        Hessian(model, loader, loss, PMatDense, progress=False).to_torch(), truth
    )
    H = Hessian(model, loader, loss, PMatImplicit, progress=False)
    v = torch.randn(truth.shape[0], 2, dtype=torch.float64)
    torch.testing.assert_close(H.op @ v, truth @ v)
    ggn = gt.ggn(model, x, y, loss)
    G = GGN(model, loader, loss, PMatImplicit, progress=False)
    torch.testing.assert_close(G.op @ v, ggn @ v)
    torch.testing.assert_close(GGN(model, loader, loss, PMatDense, progress=False).to_torch(), ggn)


def test_forward_reading_another_modules_parameter():
    """A module whose forward reads a parameter its parent owns (``lin.forward = lambda t:
    f(t) * root.scale``): the root's parameter goes through the generic per-example path, whose
    recomputation also meets ``lin``'s weights (which require grad). Its statistics must not record
    a graph (they raised "A view was created in no_grad mode" when written into the diagonal's
    buffer); the diagonal and the dense Fisher against torch.func."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 3).double()
    model = torch.nn.Sequential(lin)
    model.scale = torch.nn.Parameter(torch.linspace(0.5, 1.5, 3, dtype=torch.float64))
    plain = lin.forward
    lin.forward = lambda t: plain(t) * model.scale
    x = torch.randn(10, 4, dtype=torch.float64)
    truth = gt.fim(model, x, "classif_logits")
    loader = loader_of(x, torch.zeros(10, dtype=torch.long), sizes=(4, 6))
    D = FIM(model, loader, PMatDiag, n_output=3, progress=False)
    torch.testing.assert_close(D.op.to_dense().diagonal(), truth.diagonal())
    assert not D.op.to_dense().requires_grad
    F = FIM(model, loader, PMatDense, n_output=3, progress=False)
    torch.testing.assert_close(F.op.to_dense(), truth)
    # the Linear's own forward is replaced: its closed form (W a + b) no longer holds, so KFAC,
    # which needs it, refuses the layer instead of treating the scaled output as W a + b
    with pytest.raises(UnsupportedError, match="structured rule.*0: a forward of the instance"):
        FIM(model, loader, PMatKFAC, n_output=3, progress=False)
