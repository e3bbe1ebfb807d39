"""One minibatch or a loader: the one rule of every entry point (nngeo_ops.nn.data)."""

import itertools

import groundtruth as gt
import pytest
import torch
from models import loader_of, make
from torch.utils.data import DataLoader, TensorDataset

from nngeo_ops.errors import ArgumentTypeError, InvalidArgumentError
from nngeo_ops.nn import (
    FIM,
    FMatImplicit,
    GramMatrix,
    Hessian,
    Jacobian,
    PMatDense,
    PMatDiag,
    PMatImplicit,
)
from nngeo_ops.nn import data as nn_data


def test_rule():
    x, y = torch.randn(4, 3), torch.arange(4)
    one = nn_data.is_single_batch
    assert one(x) and one((x, y)) and one([x, y]) and one({"input_ids": x, "labels": y})
    assert one(({"input_ids": x}, y))  # a dict part with the same batch size
    assert not one([(x, y), (x, y)]) and not one([{"a": x}]) and not one([])
    assert not one(DataLoader(TensorDataset(x, y)))
    assert nn_data.as_loader((x, y)) == [(x, y)]
    loader = [(x,), (x,)]
    assert nn_data.as_loader(loader) is loader
    assert nn_data.as_loader(nn_data.as_loader((x, y))) == [(x, y)]  # idempotent
    # ambiguous: tensors that are not one batch; the message names both fixes
    for bad in [(x, y[:3]), [x, torch.randn(2, 3)], (x, "meta"), (x, torch.tensor(1.0))]:
        with pytest.raises(ArgumentTypeError, match=r"\[batch\].*\[\(x1,\), \(x2,\)"):
            nn_data.as_loader(bad)
    with pytest.raises(ArgumentTypeError, match="neither one batch"):
        nn_data.as_loader(3)


def test_every_entry_point_reads_a_tuple_as_one_batch():
    model, x = make("mlp")
    y = torch.randint(0, 3, (x.shape[0],))
    truth = gt.fim(model, x, "classif_logits")
    for examples in [(x, y), [x, y], x, [(x, y)]]:
        F = FIM(model, examples, PMatDense, progress=False)
        torch.testing.assert_close(F.to_torch(), truth)
        Fi = FIM(model, examples, PMatImplicit, progress=False)
        torch.testing.assert_close(Fi.to_torch(), truth)
    # a DataLoader yields [x, y] lists: each is one batch
    dl = DataLoader(TensorDataset(x, y), batch_size=4)
    torch.testing.assert_close(FIM(model, dl, PMatDense, progress=False).to_torch(), truth)
    jt = gt.jacobian(model, x).permute(1, 0, 2)
    torch.testing.assert_close(Jacobian(model, (x, y), progress=False).to_torch(), jt)
    torch.testing.assert_close(Jacobian(model, [x, y], progress=False).to_torch(), jt)
    k = torch.einsum("cnp,dmp->cndm", jt, jt)
    torch.testing.assert_close(GramMatrix(model, (x, y), progress=False).to_torch(), k)
    kd = GramMatrix(model, [x, y], representation=FMatImplicit, progress=False).diag()
    torch.testing.assert_close(kd, torch.einsum("cnp,cnp->cn", jt, jt))
    loss = torch.nn.CrossEntropyLoss()
    h = Hessian(model, (x, y), loss, PMatDense, progress=False).to_torch()
    torch.testing.assert_close(h, gt.exact_hessian(model, x, y, loss))


def test_ambiguous_examples_raise_at_entry_points():
    model, x = make("mlp")
    bad = (x, torch.zeros(2, dtype=torch.long))  # labels of another batch size
    for call in [
        lambda: FIM(model, bad, PMatDense, progress=False),
        lambda: FIM(model, bad, PMatImplicit, progress=False),
        lambda: Jacobian(model, bad, progress=False),
        lambda: GramMatrix(model, bad, progress=False),
    ]:
        with pytest.raises(ArgumentTypeError, match="ambiguous"):
            call()


def test_one_shot_iterator_only_where_one_pass_is_enough():
    model, x = make("mlp")
    truth = gt.fim(model, x, "classif_logits")
    F = FIM(model, iter(loader_of(x)), PMatDense, progress=False)  # one pass: fine
    torch.testing.assert_close(F.to_torch(), truth)
    for call in [
        lambda: FIM(model, iter(loader_of(x)), PMatImplicit, progress=False),
        lambda: Jacobian(model, (b for b in loader_of(x)), progress=False),
        lambda: GramMatrix(model, iter(loader_of(x)), representation=FMatImplicit, progress=False),
    ]:
        with pytest.raises(ArgumentTypeError, match=r"one-shot iterator.*list\(iterator\)"):
            call()


class Stream:
    """A re-iterable loader without ``__len__`` that never ends (a streaming dataset)."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return itertools.cycle(self.batches)


class NoLen:
    """A finite re-iterable loader without ``__len__``."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)


def test_max_batches_for_a_loader_without_len(monkeypatch):
    model, x = make("mlp")
    loader = loader_of(x, sizes=(2, 2))
    truth = gt.fim(model, x[:4], "classif_logits")
    F = FIM(model, Stream(loader), PMatDiag, max_batches=2, progress=False)
    torch.testing.assert_close(F.get_diag(), truth.diagonal())
    Fi = FIM(model, Stream(loader), PMatImplicit, max_batches=2, progress=False)
    v = torch.randn(truth.shape[0], dtype=torch.float64)
    torch.testing.assert_close(Fi.mv(v), truth @ v)
    J = Jacobian(model, Stream(loader), max_batches=2, progress=False)
    assert J.n_examples == 4
    with pytest.raises(InvalidArgumentError, match="max_batches"):
        FIM(model, loader, PMatDiag, max_batches=0, progress=False)
    # a pass over a loader without __len__ that runs long says how to bound it
    monkeypatch.setattr(nn_data, "LONG_PASS_SECONDS", 0.0)
    with pytest.warns(UserWarning, match="no __len__.*max_batches="):
        FIM(model, NoLen(loader), PMatDiag, progress=False)
