"""A small transformer end to end, against torch.func ground truth computed here.

The model: token and position ``Embedding``, a pre-norm block (``LayerNorm``, causal multi-head
attention written with ``Linear`` layers, residual, ``RMSNorm``, GELU MLP, residual), a final
``LayerNorm`` and a vocabulary head, giving (B, T, V) logits; the Fisher is taken over every token
(``variant="sequence_logits"``).
"""

import math

import groundtruth as gt
import pytest
import torch
import torch.nn.functional as Fn
from torch import nn

from nngeo_ops.errors import UnsupportedError
from nngeo_ops.nn import (
    FIM,
    GGN,
    GramMatrix,
    PMatBlockDiag,
    PMatDense,
    PMatDiag,
    PMatEKFAC,
    PMatImplicit,
    PMatKFAC,
)

V, T, D, HEADS, B = 5, 3, 4, 2, 4
F64 = torch.float64


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm1 = nn.LayerNorm(D)
        self.q = nn.Linear(D, D)
        self.k = nn.Linear(D, D, bias=False)
        self.v = nn.Linear(D, D)
        self.o = nn.Linear(D, D)
        self.norm2 = nn.RMSNorm(D)
        self.up = nn.Linear(D, 2 * D)
        self.down = nn.Linear(2 * D, D)

    def attention(self, x):
        b, t, _ = x.shape

        def heads(z):
            return z.reshape(b, t, HEADS, D // HEADS).transpose(1, 2)

        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        scores = q @ k.transpose(-1, -2) / math.sqrt(D // HEADS)
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        att = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
        return self.o((att @ v).transpose(1, 2).reshape(b, t, D))

    def forward(self, h):
        h = h + self.attention(self.norm1(h))
        return h + self.down(Fn.gelu(self.up(self.norm2(h))))


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(V, D)
        self.pos = nn.Embedding(T, D)
        self.block = Block()
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, V)

    def forward(self, idx):
        positions = torch.arange(idx.shape[1]).expand_as(idx)  # per example, so hooks see a batch
        return self.head(self.norm(self.block(self.tok(idx) + self.pos(positions))))


def randomise(model):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.7)
    return model


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    model = randomise(TinyLM().to(F64))
    idx = torch.randint(V, (B, T), generator=torch.Generator().manual_seed(1))
    return model, idx


def loader(idx, labels=None, batch_size=2):
    parts = (idx,) if labels is None else (idx, labels)
    return torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(*parts), batch_size=batch_size
    )


def token_fisher_blocks(logits):
    """Per sequence: block-diagonal over tokens of diag(p) − ppᵀ, in the (T, V) flat order."""
    blocks = []
    for seq in logits.detach():
        p = torch.softmax(seq, -1)
        blocks.append(torch.block_diag(*[torch.diag(pt) - torch.outer(pt, pt) for pt in p]))
    return blocks


@pytest.fixture(scope="module")
def truth(lm):
    model, idx = lm
    H = torch.block_diag(*token_fisher_blocks(model(idx)))
    return gt.ggn_from_output_hessian(model, idx, H) / B


@pytest.mark.parametrize("rep", [PMatDense, PMatDiag, PMatBlockDiag, PMatImplicit])
def test_fisher_over_every_token(lm, truth, rep):
    model, idx = lm
    F = FIM(model, loader(idx), rep, variant="sequence_logits", n_output=V, progress=False)
    if rep is PMatDense or rep is PMatImplicit:
        torch.testing.assert_close(F.to_torch(), truth)
    if rep is PMatDiag:
        torch.testing.assert_close(F.get_diag(), truth.diagonal())
    if rep is PMatBlockDiag:
        for sl in F.layer_collection.layer_slices().values():
            torch.testing.assert_close(F.to_torch()[sl, sl], truth[sl, sl])
    v = torch.randn(truth.shape[0], dtype=F64)
    torch.testing.assert_close(F.mv(v), F.to_torch() @ v)
    if rep is PMatImplicit:  # Jᵀ·H·J over [B, T, V] logits: C = T·V outputs per sequence
        J, H = F.op.J, F.op.H
        assert str(F.op) == "Jᵀ·H·J" and J.shape == (T * V * B, truth.shape[0])
        torch.testing.assert_close(J.T @ (H @ (J @ v)), truth @ v)


def test_ggn_with_cross_entropy_over_tokens(lm):
    model, idx = lm
    y = torch.randint(V, (B, T), generator=torch.Generator().manual_seed(2))
    loss_fn = nn.CrossEntropyLoss()  # mean over every token
    G = GGN(
        model,
        loader(idx, y),
        loss_fn,
        PMatDense,
        function=lambda x, _y: model(x).transpose(1, 2),  # CE wants (B, V, T)
        progress=False,
    )
    truth = _ggn_truth(model, idx, y, loss_fn)
    torch.testing.assert_close(G.to_torch(), truth)


def _ggn_truth(model, idx, y, loss_fn):
    out = model(idx).transpose(1, 2)
    h = torch.func.hessian(lambda o: loss_fn(o, y))(out.detach())
    h = h.reshape(out.numel(), out.numel())
    f, flat0 = gt.flat_fn(model)
    j = torch.func.jacrev(lambda w: f(w, idx).transpose(1, 2))(flat0).reshape(out.numel(), -1)
    return j.T @ h @ j


def _post_from(model, layer):
    """post(s): the logits when ``layer``'s output is replaced by ``s`` (for per-layer cotangents)."""

    def post(s):
        handle = layer.register_forward_hook(lambda m, i, o: s)
        try:
            return model(post.idx)
        finally:
            handle.remove()

    return post


@pytest.mark.parametrize("mode", ["expand", "reduce"])
def test_kfac_linear_layers(lm, mode):
    model, idx = lm
    F = FIM(model, loader(idx), PMatKFAC, variant="sequence_logits", kfac_mode=mode, progress=False)
    hb = token_fisher_blocks(model(idx))
    slices = F.layer_collection.layer_slices()
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert set(linears) <= set(slices)
    for name, layer in linears.items():
        inputs = {}
        h = layer.register_forward_hook(
            lambda m, i, o, inputs=inputs: inputs.update(a=i[0].detach(), s=o.detach())
        )
        model(idx)
        h.remove()
        a, s = inputs["a"], inputs["s"]
        bias = layer.bias is not None
        if bias:
            a = torch.cat([a, torch.ones(*a.shape[:-1], 1, dtype=F64)], -1)
        # post(s_n) runs one example: the hook feeds that example's layer output
        post = _post_from(model, layer)
        rows = []
        for n in range(B):
            post.idx = idx[n : n + 1]
            jn = torch.func.jacrev(lambda sn, post=post: post(sn[None])[0])(s[n])  # (T,V,T,d)
            rows.append(jn.reshape(T * V, T, -1))
        if mode == "expand":
            A = torch.einsum("bti,btj->ij", a, a) / (B * T)
            G = sum(j[:, t].T @ hb[n] @ j[:, t] for n, j in enumerate(rows) for t in range(T)) / B
        else:
            abar = a.mean(1)
            A = abar.T @ abar / B
            G = sum(j.sum(1).T @ hb[n] @ j.sum(1) for n, j in enumerate(rows)) / B
        n_out, n_in = G.shape[0], A.shape[0] - bias
        idx_map = [o * (n_in + bias) + i for o in range(n_out) for i in range(n_in)]
        if bias:
            idx_map += [o * (n_in + 1) + n_in for o in range(n_out)]
        expected = torch.kron(G, A)[idx_map][:, idx_map]
        sl = slices[name]
        torch.testing.assert_close(F.to_torch()[sl, sl], expected, msg=f"layer {name}")


def test_ekfac_refit_is_at_least_as_close_per_layer(lm, truth):
    model, idx = lm
    K = FIM(model, loader(idx), PMatKFAC, variant="sequence_logits", progress=False)
    E = FIM(model, loader(idx), PMatEKFAC, variant="sequence_logits", progress=False)
    for name, sl in K.layer_collection.layer_slices().items():
        err_k = (K.to_torch()[sl, sl] - truth[sl, sl]).norm()
        err_e = (E.to_torch()[sl, sl] - truth[sl, sl]).norm()
        assert err_e <= err_k + 1e-10, name


def test_damped_kfac_solve_on_the_transformer(lm):
    model, idx = lm
    F = FIM(model, loader(idx), PMatKFAC, variant="sequence_logits", progress=False)
    v = torch.randn(F.size(0), dtype=F64)
    dense = F.to_torch() + 1e-2 * torch.eye(F.size(0), dtype=F64)
    torch.testing.assert_close(F.solve(v, regul=1e-2), torch.linalg.solve(dense, v))


def test_ntk_of_the_last_token_logits(lm):
    model, idx = lm
    K = GramMatrix(model, loader(idx), function=lambda x: model(x)[:, -1, :])
    f, flat0 = gt.flat_fn(model)
    j = torch.func.jacrev(lambda w: f(w, idx)[:, -1, :])(flat0)  # (B, V, P)
    truth = torch.einsum("ncp,mdp->cndm", j, j)
    torch.testing.assert_close(K.to_torch(), truth)


class TorchMHA(nn.Module):
    """The same kind of model with torch.nn.MultiheadAttention (packed in_proj_weight)."""

    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(V, D)
        self.att = nn.MultiheadAttention(D, HEADS, batch_first=True)
        self.head = nn.Linear(D, V)

    def forward(self, idx):
        h = self.tok(idx)
        a, _ = self.att(h, h, h, need_weights=False)
        return self.head(h + a)


def test_torch_multihead_attention_generic_path_and_kfac_message():
    torch.manual_seed(0)
    model = randomise(TorchMHA().to(F64))
    idx = torch.randint(V, (B, T), generator=torch.Generator().manual_seed(5))
    H = torch.block_diag(*token_fisher_blocks(model(idx)))
    truth = gt.ggn_from_output_hessian(model, idx, H) / B
    for rep in (PMatDense, PMatDiag):
        F = FIM(model, loader(idx), rep, variant="sequence_logits", progress=False)
        if rep is PMatDense:
            torch.testing.assert_close(F.to_torch(), truth)
        else:
            torch.testing.assert_close(F.get_diag(), truth.diagonal())
    with pytest.raises(UnsupportedError, match="att"):
        FIM(model, loader(idx), PMatKFAC, variant="sequence_logits", progress=False)


def test_dict_batches_as_tokenisers_yield_them(lm, truth):
    model, idx = lm
    y = torch.randint(V, (B, T), generator=torch.Generator().manual_seed(2))
    batches = [{"input_ids": idx[i : i + 2], "labels": y[i : i + 2]} for i in (0, 2)]
    F = FIM(
        model,
        batches,
        PMatDense,
        variant="sequence_logits",
        function=lambda b: model(b["input_ids"]),
        progress=False,
    )
    torch.testing.assert_close(F.to_torch(), truth)
    loss_fn = nn.CrossEntropyLoss()
    G = GGN(  # the targets come from the dicts' "labels"
        model,
        batches,
        loss_fn,
        PMatImplicit,
        function=lambda b: model(b["input_ids"]).transpose(1, 2),
        progress=False,
    )
    torch.testing.assert_close(G.to_torch(), _ggn_truth(model, idx, y, loss_fn))
    K = GramMatrix(model, batches, function=lambda b: model(b["input_ids"])[:, -1, :])
    f, flat0 = gt.flat_fn(model)
    j = torch.func.jacrev(lambda w: f(w, idx)[:, -1, :])(flat0)
    torch.testing.assert_close(K.to_torch(), torch.einsum("ncp,mdp->cndm", j, j))
