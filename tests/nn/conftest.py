"""Shared fixtures of the nn tests.

``_model_untouched`` (autouse) checks that the library never modifies a user's model: every model
handed to a curvature or Jacobian generator (the door of every entry point: FIM..., Hessian,
Jacobian, GramMatrix, PFMaps) must come back, at the end of the test, with the same ``Parameter``
objects under the same names, the same ``requires_grad`` and the same values. A test that changes a
model on purpose (to check that stale operators notice) is marked ``@pytest.mark.mutates_model``.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import pytest  # noqa: E402
import torch  # noqa: E402

from nngeo_ops.nn.engine import curvature_generator as _generator  # noqa: E402
from nngeo_ops.nn.engine import jacobian_generator as _jacobian_generator  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "mutates_model: the test changes a model's parameters on purpose"
    )


def _snapshot(model):
    return [
        (n, p, p.requires_grad, p.detach().clone())
        for n, p in model.named_parameters(remove_duplicate=False)
    ]


def _differences(model, snap) -> list[str]:
    now = list(model.named_parameters(remove_duplicate=False))
    if [n for n, _ in now] != [n for n, *_ in snap]:
        return [f"parameter names changed: {[n for n, *_ in snap]} -> {[n for n, _ in now]}"]
    bad = []
    for (n, p), (_, p0, rg0, v0) in zip(now, snap):
        if p is not p0 or not isinstance(p, torch.nn.Parameter):
            bad.append(f"{n} is no longer the user's Parameter ({type(p).__name__})")
        elif p.requires_grad != rg0:
            bad.append(f"{n}.requires_grad changed to {p.requires_grad}")
        elif not torch.equal(p.detach(), v0):
            bad.append(f"{n} changed value")
    return bad


@pytest.fixture(autouse=True)
def _model_untouched(request, monkeypatch):
    seen = {}

    def watch(cls):
        init = cls.__init__

        def wrapped(self, model, *args, **kwargs):
            if isinstance(model, torch.nn.Module) and id(model) not in seen:
                seen[id(model)] = (model, _snapshot(model))
            init(self, model, *args, **kwargs)

        monkeypatch.setattr(cls, "__init__", wrapped)

    watch(_generator.CurvatureGenerator)
    watch(_jacobian_generator.JacobianGenerator)
    yield
    if request.node.get_closest_marker("mutates_model") is not None:
        return
    bad = [d for model, snap in seen.values() for d in _differences(model, snap)]
    assert not bad, "the library modified the user's model: " + "; ".join(bad)
