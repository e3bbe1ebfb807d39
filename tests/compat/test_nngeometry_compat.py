"""The NNGeometry compatibility layer against torch.func ground truth (never against NNGeometry).

Each NNGeometry convention the layer reproduces is checked against a closed form written here: the
backend's second moment (1/N) Σ JᵀJ and its centred version, the interleaved weight / bias layout,
π-damped KFAC inverses, EKFAC not refitted until ``update_diag``, the mixed EKFAC / block-diagonal
representation, the Hessian of a user loss ``function(prediction, target)``, custom layers.
"""

import math
import warnings

import groundtruth as gt
import pytest
import torch
from torch import nn

from nngeo_ops.compat.nngeometry import FIM, GramMatrix, Hessian, Jacobian
from nngeo_ops.compat.nngeometry.backend import TorchHooksJacobianBackend, torch_hooks
from nngeo_ops.compat.nngeometry.layercollection import LayerCollection, LinearLayer
from nngeo_ops.compat.nngeometry.layers import Affine1d, Cosine1d, WeightNorm1d, WeightNorm2d
from nngeo_ops.compat.nngeometry.maths import kronecker
from nngeo_ops.compat.nngeometry.object.fspace import FMatDense
from nngeo_ops.compat.nngeometry.object.map import PFMapDense, random_pfmap
from nngeo_ops.compat.nngeometry.object.pspace import (
    PMatBlockDiag,
    PMatDense,
    PMatDiag,
    PMatEKFAC,
    PMatEKFACBlockDiag,
    PMatEye,
    PMatImplicit,
    PMatKFAC,
    PMatLowRank,
    PMatQuasiDiag,
)
from nngeo_ops.compat.nngeometry.object.vector import PVector, random_pvector
from nngeo_ops.compat.nngeometry.utils import grad
from nngeo_ops.errors import NNGeoError

D = torch.float64


def _mlp(seed=0, bias=True):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 4, bias=bias), nn.Tanh(), nn.Linear(4, 3)).to(D).eval()


def _data(n=7, d=5, classes=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=D), torch.randint(0, classes, (n,), generator=g)


def _loader(x, y, bs=3):
    return [(x[i : i + bs], y[i : i + bs]) for i in range(0, x.shape[0], bs)]


def _second_moment(model, x, centering=False):
    j = gt.jacobian(model, x)  # (N, C, P)
    if centering:
        j = j - j.mean(0, keepdim=True)
    flat = j.reshape(-1, j.shape[-1])
    return flat.T @ flat / x.shape[0], j


# ---------------------------------------------------------------------- backend and centring
@pytest.mark.parametrize("centering", [False, True])
def test_backend_matrices_are_the_jacobian_second_moment(centering):
    model = _mlp()
    x, y = _data()
    lc = LayerCollection.from_model(model)
    backend = TorchHooksJacobianBackend(model, centering=centering)
    ref, j = _second_moment(model, x, centering)
    loader = _loader(x, y)
    dense = PMatDense(lc, backend, examples=loader)
    torch.testing.assert_close(dense.to_torch(), ref)
    torch.testing.assert_close(PMatDiag(lc, backend, examples=loader).get_diag(), ref.diagonal())
    torch.testing.assert_close(PMatLowRank(lc, backend, examples=loader).to_torch(), ref)
    bd = PMatBlockDiag(lc, backend, examples=loader).to_torch()
    for sl in lc.layer_slices().values():
        torch.testing.assert_close(bd[sl, sl], ref[sl, sl])
    # the Jacobian [C, N, P] and the Gram matrix [C, N, C, N] of the same (centred) Jacobian
    jac = PFMapDense(lc, backend, examples=loader).to_torch()
    torch.testing.assert_close(jac, j.permute(1, 0, 2))
    flat = j.permute(1, 0, 2).reshape(-1, j.shape[-1])
    gram = FMatDense(lc, backend, examples=loader).to_torch()
    torch.testing.assert_close(gram.reshape(flat.shape[0], -1), flat @ flat.T)


def test_centering_refuses_kfac():
    model = _mlp()
    x, y = _data()
    backend = TorchHooksJacobianBackend(model, centering=True)
    with pytest.raises(NotImplementedError, match="centering"):
        PMatKFAC(LayerCollection.from_model(model), backend, examples=_loader(x, y))


def test_conv_switch_both_routes_match_ground_truth():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 2)).to(D)
    x = torch.randn(5, 2, 4, 4, dtype=D)
    loader = [(x[:3],), (x[3:],)]
    lc = LayerCollection.from_model(model)
    backend = TorchHooksJacobianBackend(model)
    ref, _ = _second_moment(model, x)
    with torch_hooks.use_unfold_impl_for_convs():
        unfold = PMatDense(lc, backend, examples=loader).to_torch()
    with torch_hooks.use_conv_impl_for_convs():
        assert backend.uses_jacobian_route
        conv = PMatDense(lc, backend, examples=loader).to_torch()
    assert not backend.uses_jacobian_route
    torch.testing.assert_close(unfold, ref)
    torch.testing.assert_close(conv, ref)


def test_function_receives_inputs_and_targets():
    model = _mlp()
    x, y = _data()
    seen = []

    def function(inputs, targets):
        seen.append(targets.shape)
        return model(inputs)

    lc = LayerCollection.from_model(model)
    F = PMatDense(lc, TorchHooksJacobianBackend(model, function), examples=_loader(x, y))
    torch.testing.assert_close(F.to_torch(), _second_moment(model, x)[0])
    assert seen and all(s[0] > 0 for s in seen)


def test_model_called_only_through_another_models_function_gives_zero():
    model1, model2 = _mlp(0), _mlp(1)
    x, y = _data()
    lc = LayerCollection.from_model(model2)
    backend = TorchHooksJacobianBackend(model2, function=lambda *d: model1(d[0]))
    zero = torch.zeros(lc.numel(), lc.numel(), dtype=D)
    torch.testing.assert_close(PMatDense(lc, backend, examples=_loader(x, y)).to_torch(), zero)
    torch.testing.assert_close(PMatKFAC(lc, backend, examples=_loader(x, y)).to_torch(), zero)


def test_errors_have_nngeometry_kinds():
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2).to(D))
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="dtypes"):
        FIM(model, [(x, torch.zeros(4, dtype=torch.long))], PMatDense)
    bn = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)).to(D).train()
    backend = TorchHooksJacobianBackend(bn)
    with pytest.raises(RuntimeError, match="eval"):
        FMatDense(LayerCollection.from_model(bn), backend, examples=[(x.to(D),)])
    model = _mlp()
    F = PMatDiag(
        LayerCollection.from_model(model),
        TorchHooksJacobianBackend(model),
        examples=[(_data()[0],)],
    )
    with pytest.raises(RuntimeError, match="order"):
        F.norm("nuclear")
    with pytest.raises(NNGeoError):
        F.norm("nuclear")
    with pytest.raises(RuntimeError, match="per layer"):
        grad(random_pvector(F.layer_collection).norm(), random_pvector(F.layer_collection))


# ---------------------------------------------------------------------- KFAC / EKFAC conventions
def _single_linear(n_in, n_out, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(n_in, n_out)).to(D)


def test_kfac_interleaved_layout_and_pi_damping():
    # one Linear layer with identity output curvature: J_(n,c) = e_c ⊗ [x_n, 1] in the interleaved
    # order, so the matrix is I_C ⊗ E[x̃x̃ᵀ] there, and KFAC is exact
    model = _single_linear(4, 3)
    x, y = _data(n=9, d=4)
    lc = LayerCollection.from_model(model)
    K = PMatKFAC(lc, TorchHooksJacobianBackend(model), examples=_loader(x, y))
    xt = torch.cat([x, torch.ones(9, 1, dtype=D)], 1)
    a = xt.T @ xt / 9
    inter = torch.kron(torch.eye(3, dtype=D), a)
    torch.testing.assert_close(K.to_torch(split_weight_bias=False), inter)
    torch.testing.assert_close(K.get_diag(split_weight_bias=False), inter.diagonal())
    torch.testing.assert_close(K.to_torch(), _second_moment(model, x)[0])
    # NNGeometry's π-damped inverse, (G + √λ/π I)⁻¹ ⊗ (A + π√λ I)⁻¹ in the interleaved order
    A, G = K.get_factors("0")
    lam = 0.3
    pi = math.sqrt((A.trace() / A.shape[0]) / (G.trace() / G.shape[0]))
    eye = lambda n: torch.eye(n, dtype=D)  # noqa: E731
    ref = torch.kron(
        torch.linalg.inv(G + math.sqrt(lam) / pi * eye(3)),
        torch.linalg.inv(A + pi * math.sqrt(lam) * eye(5)),
    )
    torch.testing.assert_close(K.inv(lam).to_torch(split_weight_bias=False), ref)
    v = random_pvector(lc)
    perm = torch.argsort(_interleave(3, 4))
    torch.testing.assert_close(
        K.solve(v, regul=lam).to_torch(), (ref @ v.to_torch()[_interleave(3, 4)])[perm]
    )
    plain = torch.kron(
        torch.linalg.inv(G + math.sqrt(lam) * eye(3)), torch.linalg.inv(A + math.sqrt(lam) * eye(5))
    )
    torch.testing.assert_close(K.inv(lam, use_pi=False).to_torch(split_weight_bias=False), plain)


def _interleave(n_out, n_in):
    w = torch.arange(n_out * n_in).view(n_out, n_in)
    b = n_out * n_in + torch.arange(n_out).view(n_out, 1)
    return torch.cat([w, b], 1).reshape(-1)


def test_kfac_pi_solve_above_dense_limit():
    # P = 60·51 + ... > CompilePolicy.dense_limit: the structured route, against the matrix form
    model = _single_linear(60, 51)
    x, y = _data(n=80, d=60)
    lc = LayerCollection.from_model(model)
    assert lc.numel() > 3000
    K = PMatKFAC(lc, TorchHooksJacobianBackend(model), examples=_loader(x, y, 40))
    A, G = K.get_factors("0")
    lam = 1e-2
    pi = math.sqrt((A.trace() / A.shape[0]) / (G.trace() / G.shape[0]))
    v = random_pvector(lc)
    w, b = v.to_torch_layer("0")
    V = torch.cat([w, b[:, None]], 1)
    ad = A + pi * math.sqrt(lam) * torch.eye(61, dtype=D)
    gd = G + math.sqrt(lam) / pi * torch.eye(51, dtype=D)
    X = torch.linalg.solve(gd, torch.linalg.solve(ad, V.T).T)
    out = K.solve(v, regul=lam)
    sw, sb = out.to_torch_layer("0")
    torch.testing.assert_close(sw, X[:, :-1])
    torch.testing.assert_close(sb, X[:, -1])


def test_ekfac_is_kfac_until_update_diag():
    model = _mlp()
    x, y = _data(n=12)
    lc = LayerCollection.from_model(model)
    backend = TorchHooksJacobianBackend(model)
    loader = _loader(x, y, 4)
    K = PMatKFAC(lc, backend, examples=loader)
    E = PMatEKFAC(lc, backend, examples=loader)
    torch.testing.assert_close(E.to_torch(), K.to_torch())
    E.update_diag(loader)
    # the refitted diagonal is diag(Qᵀ F Q) per layer, F the exact second moment
    ref, _ = _second_moment(model, x)
    for lid, sl in lc.layer_slices().items():
        f = E.data[lid]
        q = torch.kron(f["QG"], f["QA"])
        perm = _interleave(f["QG"].shape[0], f["QA"].shape[0] - 1)
        block = ref[sl, sl][perm][:, perm]
        torch.testing.assert_close(f["diag"], (q.T @ block @ q).diagonal())
    # and the operator follows: inverses, pseudo-inverses, powers
    dense = E.to_torch()
    torch.testing.assert_close((E**2).to_torch(), dense @ dense, atol=1e-7, rtol=1e-6)
    ev, q = torch.linalg.eigh(dense)
    atol = 1e-3 * ev.max()
    pinv = (q * torch.where(ev <= atol, 0, 1 / ev)) @ q.T
    torch.testing.assert_close(E.pinv(atol).to_torch(), pinv)
    v = random_pvector(lc)
    torch.testing.assert_close(
        E.solve(v, regul=atol, solve="lstsq").to_torch(), pinv @ v.to_torch()
    )


def test_pmat_ekfac_blockdiag_mixes_ekfac_and_exact_blocks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 3)).to(D)
    x, y = _data(n=10)
    loader = _loader(x, y, 5)
    lc = LayerCollection.from_model(model)
    backend = TorchHooksJacobianBackend(model)
    M = PMatEKFACBlockDiag(lc, backend, examples=loader)
    E = PMatEKFAC(
        LayerCollection.from_modules(model, [model[0], model[3]]), backend, examples=loader
    )
    ref, _ = _second_moment(model, x)
    dense = M.to_torch()
    sl = lc.layer_slices()
    torch.testing.assert_close(dense[sl["1"], sl["1"]], ref[sl["1"], sl["1"]])  # LayerNorm: exact
    ed, esl = E.to_torch(), E.layer_collection.layer_slices()
    for lid in ("0", "3"):
        torch.testing.assert_close(dense[sl[lid], sl[lid]], ed[esl[lid], esl[lid]])
    v = random_pvector(lc)
    lam = 1e-3
    ref_solve = torch.linalg.solve(dense + lam * torch.eye(lc.numel(), dtype=D), v.to_torch())
    torch.testing.assert_close(M.solve(v, regul=lam).to_torch(), ref_solve)
    torch.testing.assert_close(M.norm(2), torch.linalg.norm(dense, 2))
    M.update_diag(loader)
    E.update_diag(loader)
    ed = E.to_torch()
    torch.testing.assert_close(M.to_torch()[sl["0"], sl["0"]], ed[esl["0"], esl["0"]])


# ---------------------------------------------------------------------- other NNGeometry API
def test_hessian_of_a_user_loss_function():
    model = _mlp()
    x, y = _data()

    def f(pred, target):
        return nn.functional.cross_entropy(pred, target, reduction="sum")

    loader = _loader(x, y)
    H = Hessian(model, loader, PMatDense, function=f)
    ref = gt.exact_hessian(model, x, y, f)
    torch.testing.assert_close(H.to_torch(), ref)
    Hi = Hessian(model, loader, PMatImplicit, function=f)
    pf = random_pfmap(H.layer_collection, (2, 3))
    rows = pf.to_torch().reshape(6, -1)
    torch.testing.assert_close(Hi.mmap(pf).to_torch().reshape(6, -1), rows @ ref)


def test_implicit_solve_is_preconditioned_cg():
    model = _mlp()
    x, y = _data()
    lc = LayerCollection.from_model(model)
    backend = TorchHooksJacobianBackend(model)
    loader = _loader(x, y)
    Fi = PMatImplicit(lc, backend, examples=loader)
    Fd = PMatDense(lc, backend, examples=loader)
    ref = _second_moment(model, x)[0] + 1e-2 * torch.eye(lc.numel(), dtype=D)
    v = random_pvector(lc)
    exact = torch.linalg.solve(ref, v.to_torch())
    # with the exact matrix as preconditioner one iteration solves the system
    out = Fi.solve(v, regul=1e-2, M=Fd, max_iter=1)
    torch.testing.assert_close(out.to_torch(), exact)
    out = Fi.solve(v, regul=1e-2, rtol=1e-12, max_iter=500)
    torch.testing.assert_close(out.to_torch(), exact, atol=1e-6, rtol=1e-6)


def test_solve_and_mmap_of_jacobians_and_norms():
    model = _mlp()
    x, y = _data()
    lc = LayerCollection.from_model(model)
    F = PMatDense(lc, TorchHooksJacobianBackend(model), examples=_loader(x, y))
    dense = F.to_torch()
    pf = random_pfmap(lc, (2, 3))
    rows = pf.to_torch().reshape(6, -1)
    torch.testing.assert_close((F @ pf).to_torch().reshape(6, -1), rows @ dense)
    lam = 1e-3
    sol = F.solve(pf, regul=lam).to_torch().reshape(6, -1)
    torch.testing.assert_close(
        sol, torch.linalg.solve(dense + lam * torch.eye(lc.numel(), dtype=D), rows.T).T
    )
    for ord in ("fro", 2, -2):
        torch.testing.assert_close(F.norm(ord), torch.linalg.norm(dense, ord))
    torch.testing.assert_close((F - 2.0 * F).to_torch(), -dense)
    torch.testing.assert_close((pf - pf).to_torch(), torch.zeros_like(pf.to_torch()))
    with pytest.warns(DeprecationWarning):
        F.frobenius_norm()
    with pytest.warns(DeprecationWarning):
        F.inverse(1e-3)
    q = PMatQuasiDiag(lc, TorchHooksJacobianBackend(model), examples=_loader(x, y))
    with pytest.raises(NotImplementedError):
        q.inverse()
    torch.testing.assert_close(
        q.inv(1e-3).mv(q.mv(v := random_pvector(lc)) + 1e-3 * v).to_torch(), v.to_torch()
    )


def test_pmateye_keeps_the_vector_dtype():
    model = _mlp()
    lc = LayerCollection.from_model(model)
    eye = PMatEye(lc, scaling=torch.tensor(2.0, dtype=torch.float64))
    v = random_pvector(lc, dtype=torch.float32)
    out = eye.mv(v).to_torch()
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, 2 * v.to_torch())
    torch.testing.assert_close(eye.solve(eye.mv(v), regul=0.0).to_torch(), v.to_torch())
    torch.testing.assert_close((-0.5 * eye).to_torch(), -torch.eye(lc.numel(), dtype=D))
    assert torch.all(eye.pinv(atol=5.0).to_torch() == 0)


def test_jacobian_and_gram_entry_points():
    model = _mlp()
    x, y = _data()
    loader = _loader(x, y)
    j = gt.jacobian(model, x).permute(1, 0, 2)
    torch.testing.assert_close(Jacobian(model, loader).to_torch(), j)
    flat = j.reshape(-1, j.shape[-1])
    torch.testing.assert_close(
        GramMatrix(model, loader).to_torch().reshape(flat.shape[0], -1), flat @ flat.T
    )


def test_layer_collection_objects():
    model = _mlp()
    lc = LayerCollection.from_model(model)
    layer = lc.layers["0"]
    assert isinstance(layer, LinearLayer) and layer.has_bias()
    assert layer.weight.numel() == 20 and tuple(layer.weight.size) == (4, 5)
    sub = LayerCollection()
    sub.add_layer_from_model(model, model[2])
    sub.add_layer("0", lc.layers["0"])
    assert list(sub.layers) == ["2", "0"] and sub.p_pos["0"] == 15
    F = PMatDense(sub, TorchHooksJacobianBackend(model), examples=[(_data()[0],)])
    names = ["2.weight", "2.bias", "0.weight", "0.bias"]
    ref, _ = _second_moment_named(model, _data()[0], names)
    torch.testing.assert_close(F.to_torch(), ref)


def _second_moment_named(model, x, names):
    j = gt.jacobian(model, x, names)
    flat = j.reshape(-1, j.shape[-1])
    return flat.T @ flat / x.shape[0], j


def test_kronecker_and_grad():
    a, b = torch.randn(2, 3), torch.randn(4, 1)
    torch.testing.assert_close(kronecker(a, b), torch.kron(a, b))
    torch.testing.assert_close(kronecker(a, b, transpose=True), torch.kron(b, a))
    model = _mlp()
    x, _ = _data()
    vec = PVector.from_model(model)
    g = grad(model(x).sum(), vec)
    ref = torch.func.jacrev(lambda w: gt.flat_fn(model)[0](w, x).sum())(gt.flat_fn(model)[1])
    torch.testing.assert_close(g.to_torch(), ref)


# ---------------------------------------------------------------------- custom layers
def test_custom_layers_forward():
    torch.manual_seed(0)
    c = Cosine1d(3, 2).to(D)
    x = torch.randn(4, 3, dtype=D)
    ref = (x / x.norm(dim=1, keepdim=True)) @ (c.weight / c.weight.norm(dim=1, keepdim=True)).T
    torch.testing.assert_close(c(x), ref, atol=1e-4, rtol=1e-4)  # ε = 1e-5 inside the norms
    w = WeightNorm1d(3, 2).to(D)
    torch.testing.assert_close(
        w(x), x @ (w.weight / torch.sqrt((w.weight**2).sum(1, keepdim=True) + 1e-5)).T
    )
    w2 = WeightNorm2d(2, 3, 2).to(D)
    xi = torch.randn(2, 2, 4, 4, dtype=D)
    k = w2.weight / torch.sqrt((w2.weight**2).sum((1, 2, 3), keepdim=True) + 1e-5)
    torch.testing.assert_close(w2(xi), nn.functional.conv2d(xi, k))
    a = Affine1d(3)
    with torch.no_grad():
        a.weight.copy_(torch.tensor([1.0, 2.0, 3.0]))
        a.bias.copy_(torch.tensor([0.5, 0.0, -1.0]))
    torch.testing.assert_close(a(torch.ones(2, 3)), torch.tensor([[1.5, 2.0, 2.0]] * 2))
    assert Affine1d(3, bias=False).bias is None


def test_custom_layers_fisher():
    torch.manual_seed(0)
    model = nn.Sequential(Cosine1d(5, 4), Affine1d(4), nn.Tanh(), WeightNorm1d(4, 3)).to(D)
    x, y = _data()
    F = FIM(model, _loader(x, y), PMatDense, variant="classif_logits")
    torch.testing.assert_close(F.to_torch(), gt.fim(model, x, "classif_logits"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(NotImplementedError, match="structured"):
            FIM(model, _loader(x, y), PMatKFAC)


def test_core_mixed_representation_through_our_fim():
    from nngeo_ops.nn import FIM as OurFIM
    from nngeo_ops.nn import LayerCollection as OurLC
    from nngeo_ops.nn import PMatEKFAC as OurEKFAC
    from nngeo_ops.nn.pspace.mixed import PMatEKFACBlockDiag as OurMixed

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 3)).to(D)
    x, y = _data(n=10)
    loader = _loader(x, y, 5)
    M = OurFIM(model, loader, OurMixed, progress=False)
    assert M.layer_map["1"].__name__ == "PMatBlockDiag"
    ref = gt.fim(model, x, "classif_logits")
    sl = M.layer_collection.layer_slices()
    dense = M.to_torch()
    torch.testing.assert_close(dense[sl["1"], sl["1"]], ref[sl["1"], sl["1"]])
    lc = OurLC.from_modules(model, [model[0], model[3]])
    E = OurFIM(model, loader, OurEKFAC, layer_collection=lc, progress=False).to_torch()
    esl = lc.layer_slices()
    for lid in ("0", "3"):  # ours refits the EKFAC diagonal at construction
        torch.testing.assert_close(dense[sl[lid], sl[lid]], E[esl[lid], esl[lid]])
    torch.testing.assert_close(M.trace(), dense.trace())
    lam = 1e-2
    v = torch.randn(dense.shape[0], dtype=D)
    torch.testing.assert_close(
        M.solve(v, regul=lam), torch.linalg.solve(dense + lam * torch.eye(len(v), dtype=D), v)
    )


def test_monte_carlo_regression_covariance_is_nngeometry_s():
    from nngeo_ops.compat.nngeometry.metrics import FIM_MonteCarlo

    model = _mlp()
    x, y = _data(n=40)
    loader = _loader(x, y, 20)
    torch.manual_seed(0)
    F = FIM_MonteCarlo(model, loader, PMatDense, variant="regression", trials=400, covariance=4.0)
    ref = 4.0 * _second_moment(model, x)[0]  # NNGeometry: Jᵀ Σ J for y ~ N(f, Σ)
    err = torch.linalg.norm(F.to_torch() - ref) / torch.linalg.norm(ref)
    assert err < 0.15


def test_one_batch_as_examples():
    model = _mlp()
    x, y = _data(n=6)
    lc = LayerCollection.from_model(model)
    backend = TorchHooksJacobianBackend(model)
    ref = _second_moment(model, x)[0]
    for batch in ([x, y], (x, y), x):
        torch.testing.assert_close(PMatDense(lc, backend, examples=batch).to_torch(), ref)
    torch.testing.assert_close(
        PFMapDense(lc, backend, examples=[x, y]).to_torch(), gt.jacobian(model, x).permute(1, 0, 2)
    )


def test_module_called_twice_is_supported():
    # NNGeometry raises NotImplementedError here; the total derivative is well defined and ours
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(4, 4)] * 2).to(D)
    d = torch.rand((5, 4), dtype=D)
    J = Jacobian(model, (d,), lambda x: model(x)).to_torch()
    torch.testing.assert_close(J, gt.jacobian(model, d).permute(1, 0, 2))
