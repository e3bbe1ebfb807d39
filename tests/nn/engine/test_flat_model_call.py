"""FlatModel.call swaps the tensors into the modules itself (no functional_call per call): the
outputs, the gradients and the model after the call are those of torch.func.functional_call; a
location that changed since construction takes the general route."""

import pytest
import torch
from torch import nn
from torch.func import functional_call

from nngeo_ops.nn import LayerCollection
from nngeo_ops.nn.data import ModelOnFirst
from nngeo_ops.nn.engine.functional import FlatModel


class Tied(nn.Module):
    # an embedding tied to the output projection, and one linear registered under two names
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.lin = nn.Linear(4, 4)
        self.again = self.lin
        self.out = nn.Linear(4, 7, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, t):
        h = torch.tanh(self.again(self.lin(self.emb(t)).sum(1)))
        return self.out(h)


def _setup(model):
    lc = LayerCollection.from_model(model)
    return FlatModel(model, lc, ModelOnFirst(model)), lc


def test_call_is_functional_call_with_ties_and_model_intact():
    torch.manual_seed(0)
    model = Tied().double()
    fm, lc = _setup(model)
    assert fm.slots is not None
    before = {n: p for n, p in model.named_parameters()}
    t = torch.randint(0, 7, (5, 3))
    w = (fm.flat0 + 0.1 * torch.randn_like(fm.flat0)).requires_grad_(True)
    out = fm(w, (t,))
    # the reference: functional_call with every tied location given the same tensor
    params = fm.params(w)
    full = {path[len("model.") :]: params[n] for n in fm.names for path in fm.locations[n]}
    ref = functional_call(model, full, (t,), tie_weights=False, strict=False)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    u = torch.randn_like(out)
    (g,) = torch.autograd.grad(out, w, u)
    w2 = w.detach().clone().requires_grad_(True)
    params2 = fm.params(w2)
    full2 = {path[len("model.") :]: params2[n] for n in fm.names for path in fm.locations[n]}
    ref2 = functional_call(model, full2, (t,), tie_weights=False, strict=False)
    (g2,) = torch.autograd.grad(ref2, w2, u)
    torch.testing.assert_close(g, g2)
    after = {n: p for n, p in model.named_parameters()}
    assert before.keys() == after.keys() and all(before[n] is after[n] for n in before)
    assert model.out.weight is model.emb.weight and model.again is model.lin


def test_parameters_restored_after_an_error():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2)).double()
    own = [p for p in model.parameters()]

    def boom(x):
        model(x)
        raise ValueError("in the forward")

    lc = LayerCollection.from_model(model)
    fm = FlatModel(model, lc, boom)
    with pytest.raises(ValueError, match="in the forward"):
        fm(fm.flat0.clone(), (torch.randn(4, 3, dtype=torch.float64),))
    assert all(a is b for a, b in zip(own, model.parameters()))
    assert all(isinstance(p, nn.Parameter) for p in model.parameters())


def test_a_location_changed_since_construction_takes_the_general_route():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2)).double()
    fm, _ = _setup(model)
    x = torch.randn(4, 3, dtype=torch.float64)
    w = fm.flat0 + 1.0
    want = fm(w, (x,))
    # the bias of the last layer becomes a plain attribute (no longer a registered parameter)
    b = model[1].bias
    del model[1]._parameters["bias"]
    model[1].bias = b.detach().clone()
    got = fm(w, (x,))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert "bias" not in model[1]._parameters and "weight" in model[1]._parameters
