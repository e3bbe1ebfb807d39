"""EKFAC over a thin input basis (A kept as its rows, rank r < dA) against a dense ground truth.

The truth is built here, without nngeo_ops.nn: the Kronecker factors A, G of each layer and the exact
Fisher F with torch.func (groundtruth.py), the eigenbases of the dense factors with torch.linalg.eigh,
and the EKFAC matrices from them: eigh only, (Q_G ⊗ Q_A) diag(λ_G ⊗ λ_A) (Q_G ⊗ Q_A)ᵀ = G ⊗ A; refit,
(Q_G ⊗ Q_A) diag(s) (Q_G ⊗ Q_A)ᵀ with s = diag((Q_G ⊗ Q_A)ᵀ F (Q_G ⊗ Q_A)), the second moments of
the per-example gradients in that basis (George et al. 2018).
"""

import copy
import functools
import pickle

import groundtruth as gt
import pytest
import torch
from models import loader_of
from torch import nn

from nngeo_ops.nn import FIM, PMatEKFAC
from nngeo_ops.nn.pspace.ekfac_thin import EKFACFactors
from nngeo_ops.ops import CompilePolicy, Identity

F64 = torch.float64


def mlp(n_in, hidden, dtype=F64, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(n_in, hidden), nn.Tanh(), nn.Linear(hidden, 3)).to(dtype)
    return model


def _perm(n_out, n_in):
    """Kronecker position (o, i) with i = n_in the bias → parameter index (weights, then biases)."""
    idx = [o * (n_in + 1) + j for o in range(n_out) for j in range(n_in)]
    idx += [o * (n_in + 1) + n_in for o in range(n_out)]
    return torch.tensor(idx)


def _truth(model, x, refit_x=None, fit=None, spectra=None):
    """(eigh-only EKFAC, refit EKFAC) dense in parameter order (float64), refit on ``refit_x``;
    ``fit`` False / True: only that one (the other is None), which halves the O(P³) work.
    ``spectra``: a dict that receives each matrix's largest eigenvalue (``"e"``, ``"r"``), read
    off its construction q diag(λ) qᵀ with q orthogonal (an eigvalsh of P = 3651 takes ~10 s)."""
    m = copy.deepcopy(model).double()
    x = x.double()
    want_e, want_r = fit is not True, fit is not False
    fisher = (
        gt.fim(m, x if refit_x is None else refit_x.double(), "classif_logits") if want_r else None
    )
    hb = gt.fisher_blocks(m(x), "classif_logits")
    blocks_e, blocks_r, start = [], [], 0
    for i in (0, 2):
        layer = m[i]
        a = m[:i](x).detach()
        at = torch.cat([a, torch.ones(a.shape[0], 1, dtype=F64)], 1)
        A = at.T @ at / x.shape[0]
        G = gt.output_cotangent_grams(m[i + 1 :], layer(a), hb, lambda j: [j])
        ea, qa = torch.linalg.eigh(A)
        eg, qg = torch.linalg.eigh(G)
        q = torch.kron(qg, qa)
        n = q.shape[0]
        idx = _perm(G.shape[0], a.shape[1])
        if want_e:
            lam_e = torch.kron(eg, ea).clamp_min(0)
            ekfac = (q * lam_e) @ q.T
            blocks_e.append(ekfac[idx][:, idx])
            if spectra is not None:
                spectra["e"] = max(spectra.get("e", 0.0), float(lam_e.max()))
        if want_r:
            back = torch.empty_like(idx)
            back[idx] = torch.arange(n)
            t = fisher[start : start + n, start : start + n][back][:, back]  # Kronecker order
            s = ((t @ q) * q).sum(0)  # diag(qᵀ t q), one product
            refit = (q * s) @ q.T
            blocks_r.append(refit[idx][:, idx])
            if spectra is not None:
                spectra["r"] = max(spectra.get("r", 0.0), float(s.max()))
        start += n
    return tuple(torch.block_diag(*b).detach() if b else None for b in (blocks_e, blocks_r))


def _check_quantities(E, truth, dtype, lmax=None):
    tol = dict(rtol=1e-4, atol=1e-6) if dtype == torch.float32 else {}
    p = truth.shape[0]
    torch.testing.assert_close(E.to_torch().double(), truth, **tol)
    v = torch.randn(p, dtype=F64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(E.mv(v.to(dtype)).double(), truth @ v, **tol)
    if dtype == torch.float32 and lmax is None:  # ‖truth + λI‖₂ = λ_max(truth) + λ (PSD)
        lmax = float(torch.linalg.eigvalsh(truth)[-1])
    for lam in (1e-2, 1.0):
        damped = truth + lam * torch.eye(p, dtype=F64)
        sol = E.solve(v.to(dtype), regul=lam).double()
        want = torch.linalg.solve(damped, v)
        if dtype == torch.float32:  # rounding of float32 amplified by the condition number
            cond = (lmax + lam) / lam
            tol = dict(rtol=1e-4, atol=1e-6 * cond * float(want.abs().max()))
        torch.testing.assert_close(sol, want, **tol)
        node = E.op + lam * Identity(p, dtype=dtype)
        torch.testing.assert_close(node.logdet().double(), torch.linalg.slogdet(damped)[1], **tol)
    tol = dict(rtol=1e-4, atol=1e-6) if dtype == torch.float32 else {}
    torch.testing.assert_close(E.trace().double(), truth.trace(), **tol)
    torch.testing.assert_close(E.get_diag().double(), truth.diagonal(), **tol)


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("fit", [False, True])
@pytest.mark.parametrize("size", ["small", "above_dense_limit"])
def test_thin_route_matches_the_dense_truth(dtype, fit, size):
    n_in, hidden, n = (20, 6, 6) if size == "small" else (250, 12, 8)
    model = mlp(n_in, hidden, dtype)
    x = torch.randn(n, n_in, dtype=dtype, generator=torch.Generator().manual_seed(3))
    E = FIM(model, loader_of(x, sizes=(n,)), functools.partial(PMatEKFAC, fit_diag=fit))
    f = E.data["0"]
    assert isinstance(f, EKFACFactors) and f.thin[0].shape == (n_in + 1, n)  # r = n rows
    assert "Q₁_A" in str(E.op) and "Q₁" not in str(E.op.blocks[1])
    if size != "small":
        assert (n_in + 1) * hidden > CompilePolicy().dense_limit
    spectra = {}
    truth_e, truth_r = _truth(model, x, fit=fit, spectra=spectra)
    _check_quantities(E, truth_r if fit else truth_e, dtype, spectra["r" if fit else "e"])
    # the damped solve takes the thin route, and says so
    node = E.op + 0.1 * Identity(E.op.shape[0], dtype=dtype)
    c = node.compile()
    c.solve(torch.ones(node.shape[0], dtype=dtype))
    assert "shifted thin eigen form" in c.explain()


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_full_rank_factor_keeps_the_complete_basis(dtype):
    model = mlp(8, 5, dtype)
    x = torch.randn(30, 8, dtype=dtype, generator=torch.Generator().manual_seed(4))  # 30 > 9/2
    E = FIM(model, loader_of(x, sizes=(30,)), PMatEKFAC)
    assert not any(isinstance(f, EKFACFactors) for f in E.data.values())
    assert "Q₁" not in str(E.op) and E.data["0"]["QA"].shape == (9, 9)
    _check_quantities(E, _truth(model, x, fit=True)[1], dtype)


def test_complete_keys_are_formed_on_read_only():
    model = mlp(20, 6)
    x = torch.randn(6, 20, dtype=F64, generator=torch.Generator().manual_seed(5))
    E = FIM(model, loader_of(x, sizes=(6,)), PMatEKFAC)
    f = E.data["0"]
    assert dict.get(f, "QA") is None and dict.get(f, "diag") is None  # not formed by the build
    assert "QA" in f and "diag" in f and set(f) >= {"A_rows", "G", "QG", "QA", "diag"}
    before = E.to_torch()
    qa, d = f["QA"], f["diag"]
    q1, d1, _ = f.thin
    assert qa.shape == (21, 21)
    torch.testing.assert_close(qa.T @ qa, torch.eye(21, dtype=F64))
    torch.testing.assert_close(qa[:, :6], q1)
    grid = d.reshape(6, 21)
    torch.testing.assert_close(grid[:, :6].reshape(-1), d1)
    assert (grid[:, 6:] == 0).all()
    # the complete keys describe the same matrix, through the complete-basis route
    plain = {lid: dict(g) for lid, g in E.data.items()}
    assert all(type(g) is dict and "QA" in g for g in plain.values())
    C = PMatEKFAC(E.generator, data=plain)
    assert "Q₁" not in str(C.op)
    torch.testing.assert_close(C.to_torch(), before)
    # a write to the diagonal replaces the thin form by what was written
    f2 = f.copy()
    f2["diag"] = 2 * f["diag"]
    assert f2.thin is None and f.thin is not None
    E2 = PMatEKFAC(E.generator, data={**E.data, "0": f2})
    sl = E.layer_collection.layer_slices()["0"]
    torch.testing.assert_close(E2.to_torch()[sl, sl], 2 * before[sl, sl])


def test_pickle_keeps_the_thin_form():
    model = mlp(20, 6)
    x = torch.randn(6, 20, dtype=F64, generator=torch.Generator().manual_seed(6))
    E = FIM(model, loader_of(x, sizes=(6,)), PMatEKFAC)
    E.data["0"]["QA"]  # noqa: B018 (formed, then not pickled: the thin form is)
    f = pickle.loads(pickle.dumps(E.data["0"]))
    assert isinstance(f, EKFACFactors) and dict.get(f, "QA") is None
    torch.testing.assert_close(f["QA"], E.data["0"]["QA"])
    torch.testing.assert_close(f["diag"], E.data["0"]["diag"])
    E2 = pickle.loads(pickle.dumps(E))
    torch.testing.assert_close(E2.to_torch(), E.to_torch())


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_refit_on_other_examples_completes_the_basis(dtype):
    # gradients of other inputs leave range(Q₁): the layer is refit over its complete basis,
    # exactly as before thin bases (the diagonal is not 0 on the complement there)
    model = mlp(20, 6, dtype)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(6, 20, dtype=dtype, generator=g)
    x2 = torch.randn(6, 20, dtype=dtype, generator=g)
    E = FIM(model, loader_of(x, sizes=(6,)), functools.partial(PMatEKFAC, fit_diag=False))
    qa = E.data["0"]["QA"].clone()
    qg = E.data["0"]["QG"].clone()
    E.update_diag(loader_of(x2, sizes=(3,)))
    f = E.data["0"]
    assert not isinstance(f, EKFACFactors) and "Q₁" not in str(E.op.blocks[0])
    torch.testing.assert_close(f["QA"], qa)
    # truth: s = diag(Qᵀ F(x2) Q) over the same complete basis, F from torch.func
    fisher = gt.fim(copy.deepcopy(model).double(), x2.double(), "classif_logits")
    sl = E.layer_collection.layer_slices()["0"]
    idx = _perm(6, 20)
    back = torch.empty_like(idx)
    back[idx] = torch.arange(idx.numel())
    q = torch.kron(qg.double(), qa.double())
    s = (q.T @ fisher[sl, sl][back][:, back] @ q).diagonal()
    truth = ((q * s) @ q.T)[idx][:, idx]
    tol = dict(rtol=1e-4, atol=1e-6) if dtype == torch.float32 else {}
    torch.testing.assert_close(E.to_torch()[sl, sl].double(), truth, **tol)
    assert (s.reshape(6, 21)[:, 6:].abs().sum()) > 1e-3 * s.sum()  # mass off range(Q₁)
    # and the same refit on the examples of A keeps (or returns to) nothing off the range
    E3 = FIM(model, loader_of(x, sizes=(6,)), functools.partial(PMatEKFAC, fit_diag=False))
    E3.update_diag(loader_of(x, sizes=(2, 2, 2)))
    assert isinstance(E3.data["0"], EKFACFactors)
    torch.testing.assert_close(E3.to_torch().double(), _truth(model, x, fit=True)[1], **tol)
