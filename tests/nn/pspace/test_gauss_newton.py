"""The implicit GGN / Fisher is the ops expression Jᵀ·H·J built from the Jacobian node.

Checked against the torch.func ground truth of ``groundtruth.py``: the fused product, the product
evaluated factor by factor (J, then H, then Jᵀ), H against the closed-form output Fisher / loss
Hessian (reordered to the Jacobian's output-major rows), and the algebra on the expression.
"""

import functools

import groundtruth as gt
import pytest
import torch
from models import loader_of, make
from torch import nn

from nngeo_ops.errors import DataError
from nngeo_ops.nn import (
    FIM,
    GGN,
    EmpiricalFisher,
    FIM_MonteCarlo,
    Hessian,
    Jacobian,
    PMatDense,
    PMatImplicit,
)
from nngeo_ops.nn.pspace.implicit import GaussNewton, OutputCurvature
from nngeo_ops.ops import Identity, MatFree, Product, Transpose

F64 = torch.float64
CACHED = functools.partial(PMatImplicit, cache=True)


def output_major(h_example_major, n, c):
    """Reorder a (N·C)² matrix from rows n·C + c (the ground truth) to rows c·N + n (the Jacobian)."""
    idx = torch.arange(n * c).view(n, c).T.reshape(-1)  # output-major row r -> example-major row
    return h_example_major[idx][:, idx]


def _vectors(p, k=2, seed=0):
    return torch.randn(p, k, dtype=F64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("rep", [PMatImplicit, CACHED], ids=["plain", "cached"])
@pytest.mark.parametrize("case", ["mlp", "conv2d", "embedding"])
def test_fisher_is_jt_h_j(case, rep):
    model, x = make(case)
    loader = loader_of(x, sizes=(2, 2))
    F = FIM(model, loader, rep, progress=False)
    op = F.op
    assert isinstance(op, GaussNewton) and str(op) == "Jᵀ·H·J"
    assert isinstance(op.factors[2], Jacobian) and op.factors[2] is op.J
    assert isinstance(op.factors[0], Transpose) and op.factors[0].child is op.J
    assert isinstance(op.factors[1], OutputCurvature) and op.H.psd
    assert op.symmetric and op.psd
    out = model(x)
    n, c = out.shape
    assert op.J.shape == (c * n, F.layer_collection.numel())
    # H against the closed-form output Fisher (softmax covariance per example, mean over examples)
    h_truth = gt.fisher_output_matrix(out, "classif_logits") / n
    torch.testing.assert_close(op.H.to_dense(), output_major(h_truth, n, c))
    truth = gt.fim(model, x, "classif_logits")
    v = _vectors(truth.shape[0])
    torch.testing.assert_close(op @ v, truth @ v)  # fused
    torch.testing.assert_close(op.J.T @ (op.H @ (op.J @ v)), truth @ v)  # factor by factor
    torch.testing.assert_close(Product(*op.factors) @ v, truth @ v)


@pytest.mark.parametrize(
    "loss_fn", [nn.CrossEntropyLoss(reduction="sum"), nn.MSELoss(), nn.BCEWithLogitsLoss()]
)
def test_ggn_output_curvature_is_the_loss_hessian(loss_fn):
    model, x = make("mlp")
    out = model(x)
    g = torch.Generator().manual_seed(3)
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        y = torch.randint(0, out.shape[1], (out.shape[0],), generator=g)
    elif isinstance(loss_fn, nn.BCEWithLogitsLoss):
        y = torch.randint(0, 2, out.shape, generator=g).to(F64)
    else:
        y = torch.randn(out.shape, generator=g, dtype=F64)
    F = GGN(model, loader_of(x, y, sizes=(2, 3)), loss_fn, PMatImplicit, progress=False)
    n, c = out.shape
    h_truth = gt.loss_output_hessian(out, y, loss_fn)  # the whole dataset's loss: one batch
    torch.testing.assert_close(F.op.H.to_dense(), output_major(h_truth, n, c))
    truth = gt.ggn(model, x, y, loss_fn)
    v = _vectors(truth.shape[0])
    torch.testing.assert_close(F.op @ v, truth @ v)
    torch.testing.assert_close(F.op.J.T @ (F.op.H @ (F.op.J @ v)), truth @ v)


def test_monte_carlo_and_empirical_factors_agree_with_the_fused_path():
    model, x = make("mlp")
    out = model(x)
    y = torch.randint(0, out.shape[1], (out.shape[0],), generator=torch.Generator().manual_seed(1))
    mc = FIM_MonteCarlo(
        model,
        loader_of(x, sizes=(2, 2)),
        PMatImplicit,
        trials=3,
        generator=torch.Generator().manual_seed(7),
        progress=False,
    )
    v = _vectors(mc.layer_collection.numel())
    # the same labels are drawn for H as for the fused product: an exact match, not a statistical one
    torch.testing.assert_close(mc.op.J.T @ (mc.op.H @ (mc.op.J @ v)), mc.op @ v)
    ef = EmpiricalFisher(model, loader_of(x, y), PMatImplicit, progress=False)
    truth = gt.empirical_fisher(
        model, x, y, lambda o, t: nn.functional.cross_entropy(o[None], t[None])
    )
    torch.testing.assert_close(ef.op.J.T @ (ef.op.H @ (ef.op.J @ v)), truth @ v)
    torch.testing.assert_close(ef.op @ v, truth @ v)


def test_algebra_sees_the_structure():
    model, x = make("mlp")
    loader = loader_of(x, sizes=(3,))
    F = FIM(model, loader, PMatImplicit, progress=False)
    truth = gt.fim(model, x, "classif_logits")
    assert F.op.simplify() is F.op  # nothing to rewrite: the fused node survives compilation
    assert "Jᵀ·H·J" in F.op.compile().explain()
    p = truth.shape[0]
    damped = F.op + 1e-2 * Identity(p)
    assert "Jᵀ·H·J" in str(damped)
    b = _vectors(p, k=1)[:, 0]
    torch.testing.assert_close(
        damped.solve(b), torch.linalg.solve(truth + 1e-2 * torch.eye(p, dtype=F64), b)
    )
    # pushed to function space: J (Jᵀ H J) Jᵀ is one flat product, evaluated factor by factor
    J = F.op.J
    K = J @ F.op @ J.T
    assert isinstance(K, Product) and not isinstance(K, GaussNewton)
    assert str(K) == "J·Jᵀ·H·J·Jᵀ"
    jt = gt.jacobian(model, x)  # (N, C, P) -> output-major rows
    jflat = jt.permute(1, 0, 2).reshape(-1, p)
    u = _vectors(jflat.shape[0], seed=2)
    torch.testing.assert_close(K @ u, jflat @ truth @ jflat.T @ u)
    # the same as the pushforward of the dense representation
    D = FIM(model, loader, PMatDense, progress=False)
    torch.testing.assert_close(K @ u, J @ (D.op @ (J.T @ u)))


def test_output_curvature_checks_the_loader():
    model, x = make("mlp")
    batches = loader_of(x, sizes=(2,))
    F = FIM(model, batches, PMatImplicit, progress=False)
    H = F.op.H  # the factors are built at first use, from the loader as it is then
    batches.append(batches[0])  # the loader now yields more examples than at construction
    with pytest.raises(DataError, match="same examples"):
        H @ torch.zeros(H.shape[0], dtype=F64)
    batches.pop()
    batches[0] = (batches[0][0].flip(0),)  # the same sizes, the examples reshuffled
    with pytest.raises(DataError, match="same examples"):
        H @ torch.zeros(H.shape[0], dtype=F64)


def test_replayed_batches_skip_the_fingerprint_unless_changed_in_place(monkeypatch):
    # the same tensor objects at the same version are the same batch: no fingerprint is taken
    # again; a tensor changed in place is fingerprinted and, changed, refused
    from nngeo_ops.nn import data as data_mod

    model, x = make("mlp")
    y = torch.randn(model(x).shape, dtype=F64)
    batches = [(a.clone(), b.clone()) for a, b in loader_of(x, y, sizes=(2,))]  # own storage
    H = GGN(model, batches, nn.MSELoss(), PMatImplicit, progress=False)
    v = torch.randn(H.op.shape[0], dtype=F64)
    first = H.op @ v
    calls = []
    real = data_mod.fingerprint
    monkeypatch.setattr(data_mod, "fingerprint", lambda *a: calls.append(1) or real(*a))
    again = H.op @ v
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    assert calls == []
    batches[1][0].mul_(1.0)  # in place, the values unchanged: fingerprinted and accepted
    H.op @ v
    assert len(calls) == 1
    batches[1][0][0] += 1.0  # in place, one example changed
    with pytest.raises(DataError, match="same examples"):
        H.op @ v


def test_cached_operator_fingerprints_its_batches_when_cleared(monkeypatch):
    # the cache holds the batches: their fingerprints are taken when it is cleared (before it
    # drops them), not at the first product; a later pass checks against them
    from nngeo_ops.nn import data as data_mod

    model, x = make("mlp")
    y = torch.randn(model(x).shape, dtype=F64)
    batches = [(a.clone(), b.clone()) for a, b in loader_of(x, y, sizes=(2,))]  # own storage
    calls = []
    real = data_mod.fingerprint
    monkeypatch.setattr(data_mod, "fingerprint", lambda *a: calls.append(1) or real(*a))
    H = GGN(
        model, batches, nn.MSELoss(), functools.partial(PMatImplicit, cache=True), progress=False
    )
    v = torch.randn(H.op.shape[0], dtype=F64)
    first = (H.op @ v).clone()
    torch.testing.assert_close(H.op @ v, first)
    assert calls == []
    H.clear_cache()
    assert len(calls) == len(batches)
    torch.testing.assert_close(H.op @ v, first)  # the same tensors: not fingerprinted again
    assert len(calls) == len(batches)
    H.clear_cache()
    batches[0] = (batches[0][0].flip(0), batches[0][1].flip(0))  # reshuffled
    with pytest.raises(DataError, match="same examples"):
        H.op @ v
    # a batch changed in place while the cache held it has no fingerprint: refused
    batches = [(a.clone(), b.clone()) for a, b in loader_of(x, y, sizes=(2,))]
    H = GGN(
        model, batches, nn.MSELoss(), functools.partial(PMatImplicit, cache=True), progress=False
    )
    H.op @ v
    batches[1][0].mul_(1.0)
    H.clear_cache()
    with pytest.raises(DataError, match="same examples"):
        H.op @ v


def test_hessian_is_not_a_congruence():
    model, x = make("mlp")
    y = torch.randn(model(x).shape, dtype=F64)
    H = Hessian(model, loader_of(x, y), nn.MSELoss(), PMatImplicit, progress=False)
    assert isinstance(H.op, MatFree) and str(H.op) == "∇²L" and not H.op.psd


class CountingLoader:
    def __init__(self, batches):
        self.batches, self.passes = batches, 0

    def __iter__(self):
        self.passes += 1
        return iter(self.batches)


def test_products_do_not_build_the_factors():
    # building J costs a pass over the loader (sizes, outputs, fingerprints) that products do not
    # need: the factors wait for their first use
    model, x = make("mlp")
    loader = CountingLoader(loader_of(x, sizes=(2,)))
    F = FIM(model, loader, PMatImplicit, progress=False)
    assert loader.passes == 0 and str(F.op) == "Jᵀ·H·J"
    v = _vectors(F.layer_collection.numel())
    F.op @ v
    F.vTMv(v[:, 0])
    assert loader.passes == 2 and F.op._built is None
    assert isinstance(F.op.J, Jacobian) and loader.passes == 3


@pytest.mark.mutates_model  # changes the parameters to check the snapshot
def test_damped_solve_in_function_space():
    # C·N = 18 outputs against P = 43 parameters: (Jᵀ H J + λI)⁻¹ v through an 18 × 18 system built
    # from the NTK J Jᵀ and H, exactly, without CG and without H⁻¹ (H is singular for a Fisher)
    from nngeo_ops.ops import Identity

    model, x = make("mlp")
    loader = loader_of(x, sizes=(2, 2))
    F = FIM(model, loader, PMatImplicit, progress=False)
    truth = gt.fim(model, x, "classif_logits")
    p = truth.shape[0]
    assert F.op.J.shape[0] < p
    calls = []
    gram = type(F.op.J).gram

    def counted(self):
        calls.append(1)
        return gram(self)

    jt = gt.jacobian(model, x)  # (N, C, P) -> output-major rows
    jflat = jt.permute(1, 0, 2).reshape(-1, p)
    torch.testing.assert_close(F.op.J.gram(), jflat @ jflat.T)
    v = _vectors(p, k=1)[:, 0]
    damped = F.op + 0.05 * Identity(p)
    c = damped.compile()
    import unittest.mock as mock

    with mock.patch.object(type(F.op.J), "gram", counted):
        x_sol = c.solve(v)
    assert calls == [1]  # the NTK engine, not C·N Jacobian products
    assert "function space" in c.explain()
    dense = truth + 0.05 * torch.eye(p, dtype=F64)
    torch.testing.assert_close(x_sol, torch.linalg.solve(dense, v))
    torch.testing.assert_close(c.logdet(), torch.linalg.slogdet(dense)[1])
    torch.testing.assert_close(F.solve(v, regul=0.05), torch.linalg.solve(dense, v))
    # after an update of the model the engine would see other parameters: the node's own products
    # (at its snapshot) give K instead, and the answer is unchanged
    with torch.no_grad():
        for prm in model.parameters():
            prm.mul_(1.2)
    assert F.op.J.gram() is None
    c2 = (F.op + 0.05 * Identity(p)).compile()
    torch.testing.assert_close(c2.solve(v), torch.linalg.solve(dense, v))


@pytest.mark.parametrize("case", ["mlp", "conv2d"])
def test_trace_and_norm_from_the_gram_matrix(case):
    # tr(JᵀHJ) = tr(H·J Jᵀ) and ‖JᵀHJ‖²_F = tr((H·J Jᵀ)²): exact, from the NTK engine, no P × P
    model, x = make(case)
    F = FIM(model, loader_of(x, sizes=(2, 2)), PMatImplicit, progress=False)
    truth = gt.fim(model, x, "classif_logits")
    c = F.op.compile()
    torch.testing.assert_close(c.trace(), truth.trace())
    torch.testing.assert_close(c.frobenius_norm(), torch.linalg.matrix_norm(truth))
    text = c.explain()
    assert "from the Gram matrix" in text and "fallback" not in text
    torch.testing.assert_close(F.trace(), truth.trace())


def test_spectrum_from_the_gram_matrix():
    # the nonzero eigenpairs of JᵀHJ from the m × m matrix Lᵀ(J Jᵀ)L; the basis Jᵀ·C stays lazy
    from nngeo_ops.ops import Eigen

    model, x = make("mlp")
    F = FIM(model, loader_of(x, sizes=(3,)), PMatImplicit, progress=False)
    truth = gt.fim(model, x, "classif_logits")
    E = F.op.eigh()
    assert isinstance(E, Eigen) and not E.full and isinstance(E.Q, Product)
    r = E.evals.numel()
    assert r <= F.op.J.shape[0]
    exact = torch.linalg.eigvalsh(truth)
    torch.testing.assert_close(E.evals.sort().values, exact[-r:])
    assert exact[:-r].abs().max() < 1e-10  # the rest of the spectrum is zero
    Q = E.Q.to_dense()
    torch.testing.assert_close(Q.T @ Q, torch.eye(r, dtype=F64))
    torch.testing.assert_close(E.to_dense(), truth)
    v = _vectors(truth.shape[0])
    torch.testing.assert_close(E @ v, truth @ v)


@pytest.mark.parametrize("case", ["mlp", "conv2d"])
def test_diagonal_from_the_statistics_engine(case):
    model, x = make(case)
    F = FIM(model, loader_of(x, sizes=(2, 2)), PMatImplicit, progress=False)
    truth = gt.fim(model, x, "classif_logits")
    c = F.op.compile()
    torch.testing.assert_close(c.diag(), truth.diagonal())
    assert "per-example gradients" in c.explain()
    torch.testing.assert_close(F.get_diag(), truth.diagonal())
    # a Monte-Carlo operator's labels are its own: its diagonal is that of its own products
    mc = FIM_MonteCarlo(
        model,
        loader_of(x),
        PMatImplicit,
        generator=torch.Generator().manual_seed(0),
        progress=False,
    )
    cm = mc.op.compile()
    torch.testing.assert_close(cm.diag(), mc.op.to_dense().diagonal())
    assert "per-example gradients" not in cm.explain()


def test_gram_checks_the_loader():
    model, x = make("mlp")
    batches = loader_of(x, sizes=(2,))
    F = FIM(model, batches, PMatImplicit, progress=False)
    J = F.op.J
    batches[0] = (batches[0][0].flip(0),)  # the first batch's examples reshuffled
    with pytest.raises(DataError, match="same examples"):
        J.gram()
