"""KFAC / EKFAC blocks against Kronecker products of expectations computed here, with torch.func."""

import groundtruth as gt
import pytest
import torch
import torch.nn.functional as Fn
from models import loader_of, make

from nngeo_ops.errors import UnsupportedError
from nngeo_ops.nn import FIM, FIM_MonteCarlo, LayerCollection, PMatDense, PMatEKFAC, PMatKFAC


def _param_index_map(n_out, n_in, bias):
    """Kronecker index (o, i) of each parameter index: weights row-major, then biases (i = n_in)."""
    idx = [o * (n_in + bias) + i for o in range(n_out) for i in range(n_in)]
    if bias:
        idx += [o * (n_in + 1) + n_in for o in range(n_out)]
    return torch.tensor(idx)


def _layer_block(F, lid):
    sl = F.layer_collection.layer_slices()[lid]
    return F.to_torch()[sl, sl]


def _ones(a):
    return torch.cat([a, torch.ones(*a.shape[:-1], 1, dtype=a.dtype)], -1)


def _check_ga(F, lid, A, G, bias):
    idx = _param_index_map(G.shape[0], A.shape[0] - bias, bias)
    truth = torch.kron(G, A)[idx][:, idx]
    torch.testing.assert_close(_layer_block(F, lid), truth)


@pytest.mark.parametrize("case", ["mlp", "mlp_nobias"])
def test_linear_kfac(case):
    model, x = make(case)
    F = FIM(model, loader_of(x, sizes=(2, 2)), PMatKFAC, progress=False)
    hb = gt.fisher_blocks(model(x), "classif_logits")
    for i in (0, 2):
        layer = model[i]
        a = model[:i](x).detach()
        bias = layer.bias is not None
        at = _ones(a) if bias else a
        A = at.T @ at / x.shape[0]
        G = gt.output_cotangent_grams(model[i + 1 :], layer(a), hb, lambda j: [j])
        _check_ga(F, str(i), A, G, bias)


@pytest.mark.parametrize("mode", ["expand", "reduce"])
def test_sequence_linear_kfac(mode):
    model, x = make("seq")
    F = FIM(model, loader_of(x), PMatKFAC, kfac_mode=mode, progress=False)
    hb = gt.fisher_blocks(model(x), "classif_logits")
    for i in (0, 2):
        a = _ones(model[:i](x).detach())  # (B, R, d+1)
        s = model[i](model[:i](x))
        if mode == "expand":
            A = torch.einsum("bri,brj->ij", a, a) / (a.shape[0] * a.shape[1])
            G = gt.output_cotangent_grams(model[i + 1 :], s, hb, lambda j: list(j.unbind(1)))
        else:
            abar = a.mean(1)
            A = abar.T @ abar / a.shape[0]
            G = gt.output_cotangent_grams(model[i + 1 :], s, hb, lambda j: [j.sum(1)])
        _check_ga(F, str(i), A, G, True)


def test_expand_and_reduce_differ_on_sequences():
    model, x = make("seq")
    Fe = FIM(model, loader_of(x), PMatKFAC, kfac_mode="expand", progress=False)
    Fr = FIM(model, loader_of(x), PMatKFAC, kfac_mode="reduce", progress=False)
    assert not torch.allclose(Fe.to_torch(), Fr.to_torch())


@pytest.mark.parametrize("case", ["conv2d", "conv1d"])
def test_conv_kfc(case):
    model, x = make(case)
    F = FIM(model, loader_of(x), PMatKFAC, progress=False)
    hb = gt.fisher_blocks(model(x), "classif_logits")
    convs = [i for i, m in enumerate(model) if isinstance(m, torch.nn.Conv1d | torch.nn.Conv2d)]
    for i in convs:
        layer = model[i]
        a = model[:i](x).detach()
        if case == "conv1d":
            patches = Fn.unfold(a[:, :, None], (1, 3), padding=(0, 1))
        else:
            patches = Fn.unfold(a, layer.kernel_size, padding=layer.padding, stride=layer.stride)
        p = patches.transpose(1, 2)  # (B, L, dA)
        bias = layer.bias is not None
        p = _ones(p) if bias else p
        A = torch.einsum("bli,blj->ij", p, p) / (p.shape[0] * p.shape[1])
        s = layer(a)
        G = gt.output_cotangent_grams(
            model[i + 1 :], s, hb, lambda j: list(j.reshape(j.shape[0], j.shape[1], -1).unbind(2))
        )
        _check_ga(F, str(i), A, G, bias)


def test_conv_transpose_kfac():
    model, x = make("convT")
    F = FIM(model, loader_of(x), PMatKFAC, progress=False)
    hb = gt.fisher_blocks(model(x), "classif_logits")
    layer = model[0]
    xa = x.reshape(x.shape[0], x.shape[1], -1).transpose(1, 2)  # (B, L_in, C_in)
    A = torch.einsum("bli,blj->ij", xa, xa) / (xa.shape[0] * xa.shape[1])
    s = layer(x)

    def unfold_rows(j):  # j: (C, C_out, Ho, Wo) -> per input pixel l: (C, C_out·k·k)
        u = Fn.unfold(j, 3, padding=1, stride=2)  # (C, C_out·9, L_in)
        return list(u.unbind(2))

    G = gt.output_cotangent_grams(model[1:], s, hb, unfold_rows)
    Gb = gt.output_cotangent_grams(model[1:], s, hb, lambda j: [j.sum((2, 3))])
    n_w = layer.weight.numel()
    block = _layer_block(F, "0")
    torch.testing.assert_close(block[:n_w, :n_w], torch.kron(A, G))
    torch.testing.assert_close(block[n_w:, n_w:], Gb)
    assert block[:n_w, n_w:].abs().max() == 0


def test_embedding_kfac():
    model, x = make("embedding")
    F = FIM(model, loader_of(x), PMatKFAC, progress=False)
    hb = gt.fisher_blocks(model(x), "classif_logits")
    counts = torch.bincount(x.reshape(-1), minlength=6).double()
    counts[0] = 0  # padding_idx
    A = torch.diag(counts) / x.numel()
    s = model[0](x)
    G = gt.output_cotangent_grams(model[1:], s, hb, lambda j: list(j.unbind(1)))
    torch.testing.assert_close(_layer_block(F, "0"), torch.kron(A, G))


@pytest.mark.parametrize("case", ["batchnorm2d", "layernorm", "rmsnorm", "groupnorm"])
def test_norm_layers_exact_elementwise_block(case):
    model, x = make(case)
    truth = gt.fim(model, x, "classif_logits")
    F = FIM(model, loader_of(x), PMatKFAC, progress=False)
    lc = F.layer_collection
    sl = lc.layer_slices()["1"]
    tb = truth[sl, sl]
    n = lc.layers["1"].numels[0]
    eye = torch.eye(n, dtype=torch.bool)
    mask = eye.repeat(tb.shape[0] // n, tb.shape[0] // n)  # γ_e with γ_e, β_e; never across e
    torch.testing.assert_close(_layer_block(F, "1"), torch.where(mask, tb, torch.zeros_like(tb)))


def test_single_linear_regression_kfac_is_exact():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3).double()
    x = torch.randn(6, 4, dtype=torch.float64)
    truth = gt.fim(model, x, "regression")
    F = FIM(model, loader_of(x), PMatKFAC, variant="regression", progress=False)
    torch.testing.assert_close(F.to_torch(), truth)


def test_kfac_unsupported_layer_names_it():
    model, x = make("generic")
    with pytest.raises(UnsupportedError, match=r"1 \(Scale\).*2 \(PReLU\)"):
        FIM(model, loader_of(x), PMatKFAC, progress=False)
    model, x = make("tied")
    with pytest.raises(UnsupportedError, match="emb"):
        FIM(model, loader_of(x), PMatKFAC, n_output=5, progress=False)


def test_kfac_on_supported_sub_collection():
    model, x = make("generic")
    lc = LayerCollection.from_model(model, ignore_unsupported_layers=True)
    assert list(lc.layers) == ["0", "3"]
    F = FIM(model, loader_of(x), PMatKFAC, layer_collection=lc, progress=False)
    assert F.to_torch().shape == (lc.numel(), lc.numel())


def test_module_called_twice_kfac_expand():
    model, x = make("residual")
    F = FIM(model, loader_of(x), PMatKFAC, progress=False)
    dense = FIM(model, loader_of(x), PMatDense, progress=False)
    # the single-call layers' blocks are the usual KFAC; the shared one treats calls as positions
    hb = gt.fisher_blocks(model(x), "classif_logits")
    h0 = torch.tanh(model.inp(x))
    h1 = h0 + torch.tanh(model.shared(h0))
    a = _ones(torch.stack([h0, h1], 1)).detach()
    A = torch.einsum("bri,brj->ij", a, a) / (a.shape[0] * 2)

    s = torch.stack([model.shared(h0), model.shared(h1)], 1)

    def post(s, n):
        # s[:, 0] and s[:, 1] are the outputs of the two calls on example n; the second call's value
        # still depends on the first (as in the network), s[:, 1] enters as a perturbation of it
        g1 = h0[n : n + 1] + torch.tanh(s[:, 0])
        s1 = model.shared(g1) + (s[:, 1] - s[:, 1].detach())
        return model.out(g1 + torch.tanh(s1))

    G = 0
    for n in range(x.shape[0]):
        j = torch.func.jacrev(lambda sn, n=n: post(sn[None], n)[0])(s[n].detach())  # (C, 2, 5)
        G = G + sum(j[:, c].T @ hb[n] @ j[:, c] for c in range(2))
    G = G / x.shape[0]
    _check_ga(F, "shared", A, G, True)
    assert F.to_torch().shape == dense.to_torch().shape


def test_ekfac_equals_kfac_then_refit_is_closer():
    model, x = make("conv2d")
    loader = loader_of(x)
    K = FIM(model, loader, PMatKFAC, progress=False)
    E = PMatEKFAC(K.generator, examples=loader, fit_diag=False)
    torch.testing.assert_close(E.to_torch(), K.to_torch())
    truth = gt.fim(model, x, "classif_logits")
    E.update_diag(loader)
    # FIM(..., PMatEKFAC) fits the diagonal on the same data at construction
    torch.testing.assert_close(
        FIM(model, loader, PMatEKFAC, progress=False).to_torch(), E.to_torch()
    )
    for lid, sl in K.layer_collection.layer_slices().items():
        t = truth[sl, sl]
        err_k = (K.to_torch()[sl, sl] - t).norm()
        err_e = (E.to_torch()[sl, sl] - t).norm()
        assert err_e <= err_k + 1e-12, lid
    assert not torch.allclose(E.to_torch(), K.to_torch())


def test_monte_carlo_kfac_uses_generator():
    model, x = make("mlp")
    loader = loader_of(x)
    F1 = FIM_MonteCarlo(
        model, loader, PMatKFAC, generator=torch.Generator().manual_seed(3), progress=False
    )
    F2 = FIM_MonteCarlo(
        model, loader, PMatKFAC, generator=torch.Generator().manual_seed(3), progress=False
    )
    torch.testing.assert_close(F1.to_torch(), F2.to_torch())


@pytest.mark.parametrize("case", ["mlp", "mlp_nobias", "conv2d"])
def test_built_kfac_does_not_need_its_generator(case):
    # the layout of each layer (Kronecker order, bias) is kept at construction, so that the
    # algebra of a KFAC whose generator was dropped (a pickle without the model) still works
    model, x = make(case)
    F = FIM(model, loader_of(x), PMatKFAC, progress=False)
    dense = F.to_torch()
    F.generator = None
    lam = 0.1
    v = torch.randn(dense.shape[0], dtype=torch.float64)
    # π-damped blocks built afresh from the factors, against the closed form per layer
    blocks = []
    for lid, entry in F.layer_collection.layers.items():
        A, G = F.get_factors(lid)
        p = ((A.trace() / A.shape[0]) / (G.trace() / G.shape[0])).sqrt()
        s = lam**0.5
        bias = len(entry.attrs) == 2
        idx = _param_index_map(G.shape[0], A.shape[0] - bias, bias)
        eye = torch.eye
        kron = torch.kron(
            G + s / p * eye(len(G), dtype=G.dtype), A + p * s * eye(len(A), dtype=A.dtype)
        )
        blocks.append(kron[idx][:, idx])
    damped = torch.block_diag(*blocks)
    torch.testing.assert_close(F.solve(v, regul=lam, damping="pi"), torch.linalg.solve(damped, v))
    torch.testing.assert_close(F.to_torch(), dense)
