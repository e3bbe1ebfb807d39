"""A user-registered layer kind gets KFAC and the structured diagonal, with the same numbers as
the built-in kind it mirrors (itself tested against torch.func), and the generic path before."""

import pytest
import torch
import torch.nn.functional as Fn
from torch import nn

from nngeo_ops.nn import FIM, PMatDense, PMatDiag, PMatKFAC
from nngeo_ops.nn.layers import registry as layer_rules
from nngeo_ops.nn.layers.linear import LinearRule
from nngeo_ops.nn.layers.registry import register_layer_rule, rule_for


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


def test_no_module_outside_layers_branches_on_a_rule_class():
    """The engine asks a layer kind through the methods of its rule (``kfac_rows``,
    ``input_moment``, ``diag``, ``diagonal_input``...), never by testing which rule class it is: a
    kind registered by a user is then handled like a built-in one."""
    import ast
    import inspect
    from pathlib import Path

    import nngeo_ops.nn as nn_pkg
    from nngeo_ops.nn.layers.base import Rule

    def subclasses(cls):
        out = {cls}
        for sub in cls.__subclasses__():
            out |= subclasses(sub)
        return out

    names = {c.__name__ for c in subclasses(Rule)}
    assert {"Rule", "KronRule", "ConvRule", "EmbeddingRule", "NormRule"} <= names
    root = Path(inspect.getfile(nn_pkg)).parent
    found = []
    for path in root.rglob("*.py"):
        if "layers" in path.relative_to(root).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in ("isinstance", "issubclass")
                and len(node.args) == 2
            ):
                continue
            kinds = node.args[1].elts if isinstance(node.args[1], ast.Tuple) else [node.args[1]]
            for kind in kinds:
                name = kind.attr if isinstance(kind, ast.Attribute) else getattr(kind, "id", None)
                if name in names:
                    found.append(f"{path.relative_to(root)}:{node.lineno} {node.func.id} {name}")
    assert found == [], "\n".join(found)
