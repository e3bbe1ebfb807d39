"""Data, models and small measurements of the demo (kept apart from its narrative)."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import NNGeoError


def load_digits_or_mixture(seed: int, n_max: int | None = None) -> dict:
    """scikit-learn's 8×8 digits (1 797 images, 10 classes), standardised, split 75/25; a generated
    10-class Gaussian mixture of the same shape when scikit-learn is not installed."""
    gen = torch.Generator().manual_seed(seed)
    try:
        from sklearn.datasets import load_digits

        d = load_digits()
        x = torch.tensor(d.data, dtype=torch.get_default_dtype())
        y = torch.tensor(d.target, dtype=torch.long)
        source = "scikit-learn digits"
    except ImportError:
        means = 2.0 * torch.randn(10, 64, generator=gen)
        y = torch.randint(10, (1797,), generator=gen)
        x = means[y] + torch.randn(1797, 64, generator=gen)
        source = "a generated 10-class Gaussian mixture (scikit-learn is not installed)"
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    perm = torch.randperm(len(x), generator=gen)
    if n_max is not None:
        perm = perm[: int(n_max * 4 / 3)]
    cut = int(0.75 * len(perm))
    tr, te = perm[:cut], perm[cut:]
    return {"train": (x[tr], y[tr]), "test": (x[te], y[te]), "source": source}


def make_mlp(n_in: int, n_out: int, hidden: int = 32) -> nn.Module:
    return nn.Sequential(nn.Linear(n_in, hidden), nn.Tanh(), nn.Linear(hidden, n_out))


def loader_of(x, y, batch_size: int = 128, shuffle: bool = False, seed: int = 0):
    g = torch.Generator().manual_seed(seed) if shuffle else None
    ds = torch.utils.data.TensorDataset(x, y)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=g)


def accuracy(model: nn.Module, x, y) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).sum().item() / len(y)


def calibration(p: torch.Tensor, y: torch.Tensor, bins: int = 10) -> tuple[float, float]:
    """Negative log-likelihood (mean) and expected calibration error (equal-width confidence bins,
    weighted by their share of the examples) of predictive probabilities ``p`` [B, C]."""
    p = p.detach().double()
    nll = float(-torch.log(p[torch.arange(len(y)), y].clamp_min(1e-12)).mean())
    conf, pred = p.max(1)
    correct = (pred == y).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=p.dtype)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            ece += float(
                inside.double().mean() * (conf[inside].mean() - correct[inside].mean()).abs()
            )
    return nll, ece


def stored_bytes(op) -> int:
    """Bytes of the distinct tensors an operator expression holds (its leaves)."""
    seen, total = set(), 0
    for t in op.leaf_tensors():
        key = (t.untyped_storage().data_ptr(), t.shape, t.stride())
        if key not in seen:
            seen.add(key)
            total += math.prod(t.shape) * t.element_size()
    return total


def progress_bar(it, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, disable=not enabled, leave=False)


def figure(ncols: int = 1, size: tuple[float, float] = (6.0, 4.0)):
    """A matplotlib figure without pyplot (no display backend needed), or a clear error."""
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise NNGeoError(
            "the demo's plots need matplotlib: pip install -e '.[demo]' (or run with --no-plots)"
        ) from exc
    fig = Figure(figsize=(size[0] * ncols, size[1]), layout="constrained")
    return fig, fig.subplots(1, ncols, squeeze=False)[0]
