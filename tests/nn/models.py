"""Tiny float64 models covering every layer kind, for tests against torch.func ground truth."""

from __future__ import annotations

import torch
from torch import nn


class Flat(nn.Module):
    def forward(self, x):
        return x.flatten(1)


class SeqMean(nn.Module):
    def forward(self, x):
        return x.mean(1)


class Scale(nn.Module):
    """A module with a parameter and no layer rule (generic torch.func path)."""

    def __init__(self, n):
        super().__init__()
        self.s = nn.Parameter(torch.randn(n))

    def forward(self, x):
        return x * self.s


class Residual(nn.Module):
    """x + f(x), with the same Linear called twice."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 5)
        self.shared = nn.Linear(5, 5)
        self.out = nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h = h + torch.tanh(self.shared(h))
        h = h + torch.tanh(self.shared(h))
        return self.out(h)


class Tied(nn.Module):
    """A weight used by two modules (embedding and output projection)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(5, 4)
        self.proj = nn.Linear(4, 5)
        self.proj.weight = self.emb.weight

    def forward(self, idx):
        return self.proj(torch.tanh(self.emb(idx)).mean(1))


def twice():
    """``Sequential(lin, Tanh(), lin, ...)``: one module registered under two names, called twice."""
    lin = nn.Linear(4, 4)
    return nn.Sequential(lin, nn.Tanh(), lin, nn.Tanh(), nn.Linear(4, 3))


def _randomise_norms(model):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
            if isinstance(
                m, nn.modules.batchnorm._BatchNorm | nn.LayerNorm | nn.GroupNorm | nn.RMSNorm
            ):
                m.weight.normal_(generator=g)
                if getattr(m, "bias", None) is not None:
                    m.bias.normal_(generator=g)
    return model


# every layer-kind case of make(), for tests that run them all
CASES = [
    "mlp",
    "mlp_nobias",
    "conv2d",
    "conv1d",
    "convT",
    "seq",
    "embedding",
    "batchnorm2d",
    "batchnorm1d",
    "layernorm",
    "rmsnorm",
    "groupnorm",
    "generic",
    "residual",
    "tied",
    "twice",
]


def make(name):
    """(model, inputs) for a named case; every model maps to 3 outputs."""
    torch.manual_seed(0)
    d = torch.float64
    cases = {
        "mlp": lambda: (
            nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)),
            torch.randn(6, 4),
        ),
        "mlp_nobias": lambda: (
            nn.Sequential(nn.Linear(4, 5, bias=False), nn.Tanh(), nn.Linear(5, 3, bias=False)),
            torch.randn(6, 4),
        ),
        "conv2d": lambda: (
            nn.Sequential(
                nn.Conv2d(2, 3, 3, padding=1, stride=2),
                nn.ReLU(),
                nn.Conv2d(3, 2, 2, bias=False),
                Flat(),
                nn.Linear(8, 3),
            ),
            torch.randn(5, 2, 6, 6),
        ),
        "conv1d": lambda: (
            nn.Sequential(nn.Conv1d(2, 3, 3, padding="same"), nn.Tanh(), Flat(), nn.Linear(18, 3)),
            torch.randn(5, 2, 6),
        ),
        "convT": lambda: (
            nn.Sequential(
                nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1, output_padding=1),
                nn.Tanh(),
                Flat(),
                nn.Linear(3 * 6 * 6, 3),
            ),
            torch.randn(5, 2, 3, 3),
        ),
        "seq": lambda: (
            nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3), SeqMean()),
            torch.randn(5, 4, 4),
        ),
        "embedding": lambda: (
            nn.Sequential(nn.Embedding(6, 4, padding_idx=0), nn.Linear(4, 3), SeqMean()),
            torch.randint(0, 6, (5, 3)),
        ),
        "batchnorm2d": lambda: (
            _randomise_norms(
                nn.Sequential(
                    nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), Flat(), nn.Linear(12, 3)
                )
            ).eval(),
            torch.randn(5, 2, 4, 4),
        ),
        "batchnorm1d": lambda: (
            _randomise_norms(
                nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3))
            ).eval(),
            torch.randn(5, 4),
        ),
        "layernorm": lambda: (
            _randomise_norms(
                nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 3))
            ),
            torch.randn(5, 4),
        ),
        "rmsnorm": lambda: (
            _randomise_norms(
                nn.Sequential(nn.Linear(4, 5), nn.RMSNorm(5), nn.Tanh(), nn.Linear(5, 3))
            ),
            torch.randn(5, 4),
        ),
        "groupnorm": lambda: (
            _randomise_norms(
                nn.Sequential(
                    nn.Conv2d(2, 4, 3), nn.GroupNorm(2, 4), nn.Tanh(), Flat(), nn.Linear(16, 3)
                )
            ),
            torch.randn(5, 2, 4, 4),
        ),
        "generic": lambda: (
            nn.Sequential(nn.Linear(4, 3), Scale(3), nn.PReLU(), nn.Linear(3, 3)),
            torch.randn(5, 4),
        ),
        "residual": lambda: (Residual(), torch.randn(5, 4)),
        "tied": lambda: (Tied(), torch.randint(0, 5, (5, 3))),
        "twice": lambda: (twice(), torch.randn(5, 4)),
    }
    model, x = cases[name]()
    model = model.to(d)
    if x.is_floating_point():
        x = x.to(d)
    return model, x


def seeded_monte_carlo(model, x, rep):
    """``FIM_MonteCarlo`` of ``rep`` over two batches of 2 and the rest, 2 trials, seed 4: two
    builds draw the same samples, so their operators are the same matrix."""
    from nngeo_ops.nn import FIM_MonteCarlo

    return FIM_MonteCarlo(
        model,
        loader_of(x, sizes=(2, 2)),
        rep,
        trials=2,
        generator=torch.Generator().manual_seed(4),
        progress=False,
    )


def loader_of(x, y=None, sizes=(3,)):
    """Split into batches of the given sizes (the remainder is the last batch)."""
    out, i = [], 0
    for s in sizes:
        out.append((x[i : i + s],) if y is None else (x[i : i + s], y[i : i + s]))
        i += s
    if i < x.shape[0]:
        out.append((x[i:],) if y is None else (x[i:], y[i:]))
    return out


class _Cube(torch.autograd.Function):
    """x³ with a backward that autograd cannot differentiate (``once_differentiable``)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x**3

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 3 * x**2 * g

    @staticmethod
    def jvp(ctx, t):
        (x,) = ctx.saved_tensors
        return 3 * x**2 * t


class Cube(nn.Module):
    def forward(self, x):
        return _Cube.apply(x)
