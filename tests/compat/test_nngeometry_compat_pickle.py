"""Pickling of the NNGeometry compatibility layer's representations, NNGeometry's way.

NNGeometry pickles a representation's data and drops its generator (whose function is usually a
local closure, which ``pickle`` refuses), restoring a ``DummyGenerator`` in its place: the restored
object computes everything from its data, and a refit (``update_diag``) raises AttributeError.
Checked here with a local closure as the function, against the dense second moment of the Jacobian
from torch.func (the restored matrix must still be that matrix, not merely equal to the original).
"""

import io
import pickle

import groundtruth as gt
import pytest
import torch
from torch import nn

from nngeo_ops.compat.nngeometry.backend import DummyGenerator, TorchHooksJacobianBackend
from nngeo_ops.compat.nngeometry.layercollection import LayerCollection
from nngeo_ops.compat.nngeometry.object.pspace import (
    PMatBlockDiag,
    PMatDense,
    PMatDiag,
    PMatEKFAC,
    PMatEKFACBlockDiag,
    PMatImplicit,
    PMatKFAC,
    PMatLowRank,
    PMatQuasiDiag,
)
from nngeo_ops.compat.nngeometry.object.vector import random_pvector
from nngeo_ops.errors import NNGeoError

D = torch.float64


def _task():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 3)).to(D)
    model.eval()

    def output_fn(inputs, targets):  # a local closure, as in NNGeometry's tests: not picklable
        return model(inputs)

    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 5, generator=g, dtype=D), torch.randint(0, 3, (8,), generator=g)
    loader = [(x[:4], y[:4]), (x[4:], y[4:])]
    return model, output_fn, loader, x


def _round_trip(obj, how):
    if how == "pickle":
        return pickle.loads(pickle.dumps(obj))
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


REPRS = [
    PMatDense,
    PMatDiag,
    PMatBlockDiag,
    PMatLowRank,
    PMatQuasiDiag,
    PMatKFAC,
    PMatEKFAC,
    PMatEKFACBlockDiag,
]


@pytest.mark.parametrize("how", ["pickle", "torch.save"])
@pytest.mark.parametrize("cls", REPRS, ids=[c.__name__ for c in REPRS])
def test_representation_with_a_local_function_pickles_without_its_generator(cls, how):
    model, fn, loader, x = _task()
    lc = LayerCollection.from_model(model)
    M = cls(generator=TorchHooksJacobianBackend(model=model, function=fn), examples=loader)
    v = random_pvector(lc)
    solved = M.solve(v, regul=1e-2).to_torch()  # fills caches, which must not travel
    back = _round_trip(M, how)
    assert type(back) is cls
    assert isinstance(back.generator, DummyGenerator)
    assert back.generator.get_device() == torch.device("cpu")
    torch.testing.assert_close(back.to_torch(), M.to_torch())
    torch.testing.assert_close(back.mv(v).to_torch(), M.mv(v).to_torch())
    torch.testing.assert_close(back.solve(v, regul=1e-2).to_torch(), solved)
    if cls in (PMatDense, PMatBlockDiag):  # exact representations: the matrix itself
        j = gt.jacobian(model, x).reshape(-1, lc.numel())
        ref = j.T @ j / x.shape[0]
        if cls is PMatBlockDiag:
            sl = lc.layer_slices()
            mask = torch.zeros_like(ref, dtype=torch.bool)
            for s in sl.values():
                mask[s, s] = True
            ref = torch.where(mask, ref, torch.zeros_like(ref))
        torch.testing.assert_close(back.to_torch(), ref)
    # the original keeps its generator and can still refit
    assert not isinstance(M.generator, DummyGenerator)
    if hasattr(M, "update_diag"):
        M.update_diag(loader)
        with pytest.raises(AttributeError, match="restored from a pickle") as err:
            back.update_diag(loader)
        assert isinstance(err.value, NNGeoError)


def test_implicit_representation_refuses_pickling_with_the_fix():
    model, fn, loader, _ = _task()
    M = PMatImplicit(generator=TorchHooksJacobianBackend(model=model, function=fn), examples=loader)
    with pytest.raises(NotImplementedError, match="PMatDense"):
        pickle.dumps(M)
