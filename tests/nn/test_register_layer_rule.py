"""A user-registered layer kind gets KFAC and the structured diagonal, with the same numbers as
the built-in kind it mirrors (itself tested against torch.func), and the generic path before."""

import pytest
import torch
import torch.nn.functional as Fn
from torch import nn

from nngeo_ops.nn import FIM, PMatDense, PMatDiag, PMatKFAC
from nngeo_ops.nn.layers import base as layer_rules
from nngeo_ops.nn.layers.base import LinearRule, register_layer_rule, rule_for


class MyLinear(nn.Module):
    """A linear layer of the user's own (not a subclass of nn.Linear)."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in, dtype=torch.float64) / n_in**0.5)
        self.bias = nn.Parameter(torch.randn(n_out, dtype=torch.float64))

    def forward(self, x):
        return Fn.linear(x, self.weight, self.bias)


class MyLinearRule(LinearRule):
    kinds = (MyLinear,)


@pytest.fixture
def registered():
    before = list(layer_rules.RULES)
    yield register_layer_rule(MyLinearRule())
    layer_rules.RULES[:] = before


def twin_models():
    torch.manual_seed(0)
    mine = nn.Sequential(MyLinear(5, 6), nn.Tanh(), MyLinear(6, 3))
    ref = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    with torch.no_grad():
        for a, b in zip(mine.parameters(), ref.parameters()):
            b.copy_(a)
    return mine, ref


def test_registered_kind_gets_kfac_and_diag(registered):
    mine, ref = twin_models()
    x = torch.randn(20, 5, dtype=torch.float64)
    y = torch.randint(3, (20,))
    loader = [(x, y)]
    assert rule_for(mine[0]) is registered
    for rep in (PMatKFAC, PMatDiag, PMatDense):
        got = FIM(mine, loader, rep, progress=False).to_torch()
        want = FIM(ref, loader, rep, progress=False).to_torch()
        torch.testing.assert_close(got, want)


def test_unregistered_kind_has_no_kfac():
    mine, _ = twin_models()
    assert rule_for(mine[0]) is None
    with pytest.raises(NotImplementedError):
        FIM(mine, [(torch.randn(4, 5, dtype=torch.float64), torch.zeros(4).long())], PMatKFAC)


def test_bad_rule_is_refused():
    with pytest.raises(TypeError, match="kinds"):
        register_layer_rule(LinearRule.__new__(type("NoKinds", (LinearRule,), {"kinds": ()})))
