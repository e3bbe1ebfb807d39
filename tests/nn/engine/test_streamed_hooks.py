"""The streamed path: where the K output columns are back-propagated one at a time, tensor hooks on
the recorded layer outputs hand each layer's cotangent to the accumulators as the backward forms it
(nngeo_ops.nn.engine.streaming). Checked here against dense torch.func ground truth on small float64
CNNs (an in-place ReLU after a convolution, max-pooling, a convolution called twice, a layer whose
output the loss does not use), and for what the hooks leave behind: no hook after a build, also
after an error half-way, and no parameter gradient written."""

import copy

import groundtruth as gt
import pytest
import torch
import torch.nn.functional as Fn
from models import Flat, loader_of
from torch import nn

from nngeo_ops.nn import FIM, PMatDense, PMatDiag, PMatEKFAC, PMatEye, PMatKFAC, build_many
from nngeo_ops.nn.engine import accumulators as _stats
from nngeo_ops.nn.layers import conv as _conv
from nngeo_ops.nn.layers import moments as _moments


def _cnn():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.ReLU(inplace=True),  # rewrites the first convolution's output after its hook
        nn.MaxPool2d(2),
        nn.Conv2d(3, 4, 3, padding=1, stride=(1, 2)),
        nn.Tanh(),
        Flat(),
        nn.Linear(4 * 3 * 2, 3),
    ).double()
    return model, torch.randn(7, 2, 6, 6, dtype=torch.float64)


class _Twice(nn.Module):
    """A convolution called twice (its per-example gradient sums over both calls) and a linear
    layer whose output the loss never uses (zero curvature, its hook never fires)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Conv2d(2, 3, 3, padding=1)
        self.shared = nn.Conv2d(3, 3, 3, padding=1)
        self.unused = nn.Linear(3, 2)
        self.out = nn.Linear(3 * 4 * 4, 3)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.shared(h))
        h = self.shared(h)
        self.unused(h.mean((2, 3)))
        return self.out(h.flatten(1))


def _twice():
    torch.manual_seed(1)
    return _Twice().double(), torch.randn(5, 2, 4, 4, dtype=torch.float64)


class _SeqHead(nn.Module):
    """A Conv1d (streamed columns) and a Linear over its positions: the Linear's EKFAC refit takes
    the path of projected input rows (several positions, no per-example kernel)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 3, 3, padding=1)
        self.seq = nn.Linear(3, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.conv(x)).transpose(1, 2)  # (B, L, 3)
        return self.out(torch.tanh(self.seq(h)).mean(1))


def _seq():
    torch.manual_seed(2)
    return _SeqHead().double(), torch.randn(6, 2, 5, dtype=torch.float64)


def _index_map(n_out, n_in, bias):
    """Kronecker index (o, i) of each parameter index: weights row-major, then biases."""
    idx = [o * (n_in + bias) + i for o in range(n_out) for i in range(n_in)]
    if bias:
        idx += [o * (n_in + 1) + n_in for o in range(n_out)]
    return torch.tensor(idx)


@pytest.mark.parametrize("make", [_cnn, _twice])
def test_streamed_diagonal_is_the_torch_func_diagonal(make):
    model, x = make()
    loader = loader_of(x, sizes=(3,))
    F = FIM(model, loader, PMatDiag, progress=False)
    truth = torch.diagonal(gt.fim(model, x, "classif_logits"))
    torch.testing.assert_close(F.get_diag(), truth)
    if make is _twice:  # the unused layer: exactly zero, not left out
        sl = F.layer_collection.layer_slices()["unused"]
        assert torch.equal(F.get_diag()[sl], torch.zeros_like(truth[sl]))


def test_streamed_kfac_factors_are_the_torch_func_factors():
    model, x = _cnn()
    F = FIM(model, loader_of(x, sizes=(4,)), PMatKFAC, progress=False)
    hb = gt.fisher_blocks(model(x), "classif_logits")
    twin = copy.deepcopy(model)  # the same function; torch.func cannot differentiate a relu_
    twin[1].inplace = False  # applied to the input it differentiates at
    for i in (0, 3):
        layer = model[i]
        a = model[:i](x).detach()
        p = Fn.unfold(a, layer.kernel_size, padding=layer.padding, stride=layer.stride)
        p = p.transpose(1, 2)
        p = torch.cat([p, torch.ones(*p.shape[:-1], 1, dtype=p.dtype)], -1)
        A = torch.einsum("bli,blj->ij", p, p) / (p.shape[0] * p.shape[1])
        s = layer(a)  # the output before the in-place ReLU
        G = gt.output_cotangent_grams(
            twin[i + 1 :], s, hb, lambda j: list(j.reshape(j.shape[0], j.shape[1], -1).unbind(2))
        )
        torch.testing.assert_close(F.data[str(i)]["A"], A)
        torch.testing.assert_close(F.data[str(i)]["G"], G)
        idx = _index_map(G.shape[0], A.shape[0] - 1, True)
        sl = F.layer_collection.layer_slices()[str(i)]
        torch.testing.assert_close(F.to_torch()[sl, sl], torch.kron(G, A)[idx][:, idx])


@pytest.mark.parametrize("make", [_cnn, _twice, _seq])
def test_streamed_ekfac_refit_is_the_diagonal_in_the_eigenbasis(make):
    # the refit diagonal is diag(Qᵀ F Q) for the layer's Kronecker eigenbasis Q = Q_G ⊗ Q_A
    model, x = make()
    E = FIM(model, loader_of(x, sizes=(2, 2)), PMatEKFAC, progress=False)
    truth = gt.fim(model, x, "classif_logits")
    for lid, sl in E.layer_collection.layer_slices().items():
        f = E.data[lid]
        qa, qg = f["QA"], f["QG"]
        q = torch.kron(qg, qa)[_index_map(qg.shape[0], qa.shape[0] - 1, True)]
        torch.testing.assert_close(f["diag"], torch.diagonal(q.T @ truth[sl, sl] @ q))


@pytest.mark.parametrize("make", [_cnn, _seq])
def test_chunked_paths_equal_one_chunk(make, monkeypatch):
    # chunks of one or two examples in the grouped diagonal kernel and the EKFAC projections
    model, x = make()
    loader = loader_of(x, sizes=(5,))
    whole = [FIM(model, loader, rep, progress=False) for rep in (PMatDiag, PMatEKFAC)]
    monkeypatch.setattr(_conv, "_CONV_CHUNK", 300)
    monkeypatch.setattr(_stats, "_PATCH_CHUNK", 60)
    monkeypatch.setattr(_moments, "_PATCH_CHUNK", 60)
    chunked = [FIM(model, loader, rep, progress=False) for rep in (PMatDiag, PMatEKFAC)]
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a.to_torch(), b.to_torch())


def test_streamed_twice_called_layer_equals_the_stacked_pass():
    model, x = _twice()
    loader = loader_of(x, sizes=(2,))
    streamed = FIM(model, loader, PMatKFAC, progress=False)
    gen = FIM(model, loader, PMatEye).generator
    stacked, _ = build_many(gen, loader, [PMatKFAC, PMatDense])  # not column-wise: no streaming
    torch.testing.assert_close(streamed.to_torch(), stacked.to_torch())


def _stash_outputs(model):
    """The output tensors of every parameterised module, recorded by the test's own forward hooks
    (registered first, so they see the tensors the library's hooks see)."""
    stash = []
    handles = [
        m.register_forward_hook(lambda mod, args, out: stash.append(out))
        for m in model.modules()
        if any(True for _ in m.parameters(recurse=False))
    ]
    return stash, handles


def _no_hooks_left(model, stash):
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks, m
    for t in stash:
        assert not t._backward_hooks, "a tensor hook of the capture was left on a layer output"


@pytest.mark.parametrize("rep", [PMatKFAC, PMatDiag, PMatEKFAC])
def test_no_hook_and_no_parameter_gradient_left_after_a_build(rep):
    model, x = _cnn()
    stash, handles = _stash_outputs(model)
    FIM(model, loader_of(x), rep, progress=False)
    for h in handles:
        h.remove()
    assert stash
    _no_hooks_left(model, stash)
    # the backward passes to the layer outputs write no parameter gradient
    assert all(p.grad is None for p in model.parameters())


def test_no_hook_left_after_an_error_half_way(monkeypatch):
    model, x = _cnn()
    loader = loader_of(x)
    truth = FIM(model, loader, PMatDiag, progress=False).get_diag()
    stash, handles = _stash_outputs(model)
    calls = []
    orig = _stats.DiagAcc.update

    def failing(self, ctx):
        calls.append(ctx.column)
        if ctx.column == 1:
            raise RuntimeError("accumulator failed")
        return orig(self, ctx)

    monkeypatch.setattr(_stats.DiagAcc, "update", failing)
    gen = FIM(model, loader, PMatEye).generator
    with pytest.raises(RuntimeError, match="accumulator failed"):
        PMatDiag(generator=gen, examples=loader)
    for h in handles:
        h.remove()
    assert calls[-1] == 1  # the error came from the second column, inside its backward
    _no_hooks_left(model, stash)
    # the graph of the failed batch is still alive here (retained for the third column): a
    # backward through it calls nothing of the capture's
    n = len(calls)
    out = stash[-1]
    torch.autograd.grad(out, [p for p in model.parameters()], torch.ones_like(out))
    assert len(calls) == n
    monkeypatch.setattr(_stats.DiagAcc, "update", orig)
    # the shared capture of the generator is usable again, and gives the same result
    torch.testing.assert_close(PMatDiag(generator=gen, examples=loader).get_diag(), truth)


@pytest.mark.parametrize("rep", [PMatKFAC, PMatEKFAC, PMatDiag])
def test_a_pass_keeps_no_batch_graph_and_pickles(rep):
    """The calls of the last batch (its inputs and the gradient edges of its outputs, hence its
    autograd graph) go with the pass: the representation, generator included, pickles and equals."""
    import pickle

    model, x = _cnn()
    F = FIM(model, loader_of(x, sizes=(4, 3)), rep, progress=False)
    assert all(not u.calls for u in F.generator.capture().users)
    F2 = pickle.loads(pickle.dumps(F))
    torch.testing.assert_close(F2.to_torch(), F.to_torch())
