"""Convergence on scikit-learn's digits: KFAC natural gradient reaches a lower training loss than SGD
(with momentum) and Adam after the same number of steps, each baseline at the best learning rate of
a grid whose best point is inside the grid (seeded; a few seconds)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nngeo_ops.apps import NaturalGradient

datasets = pytest.importorskip("sklearn.datasets")

STEPS, BATCH = 40, 128


def _data():
    d = datasets.load_digits()
    return torch.tensor(d.data, dtype=torch.float32) / 16, torch.tensor(d.target)


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))


def cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(8 * 16, 10),
    )


def train(make, kind, lr, X, Y):
    model = make()
    order = torch.Generator().manual_seed(0)
    if kind == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    elif kind == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=lr)
    else:
        opt = NaturalGradient(
            model,
            lr=lr,
            damping=0.1,
            fisher="mc",
            ema_decay=0.9,
            momentum=0.9,
            generator=torch.Generator().manual_seed(0),
        )
    for _ in range(STEPS):
        idx = torch.randint(0, X.shape[0], (BATCH,), generator=order)
        x, y = X[idx], Y[idx]
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if kind == "ng":
            opt.step(batch=(x, y))
        else:
            opt.step()
    with torch.no_grad():
        return float(F.cross_entropy(model(X), Y))


@pytest.fixture
def one_thread():
    # tiny models: thread hand-offs cost more than they save, and the test machine is shared
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("make", [mlp, cnn])
def test_kfac_natural_gradient_beats_tuned_sgd_and_adam_on_digits(make):
    X, Y = _data()
    sgd = [train(make, "sgd", lr, X, Y) for lr in (0.1, 0.3, 1.0)]
    adam = [train(make, "adam", lr, X, Y) for lr in (0.01, 0.03, 0.1)]
    # the tuned learning rate is not at the edge of either grid
    assert min(sgd) < sgd[0] and min(adam) < adam[0] and min(adam) < adam[-1]
    ng = train(make, "ng", 0.1, X, Y)
    assert ng < min(sgd) and ng < min(adam), (ng, sgd, adam)
