"""Construction, ``mv`` and ``solve`` time of each representation, as a ratio to one forward+backward.

Models (issue 3): an MLP 784-256-128-10 on a batch of 256, and a small CNN (two conv layers on
3×32×32) on a batch of 128; one batch of random data, float32, on the default device. Peers
(NNGeometry, curvlinops, BackPACK, ASDL) are timed only where installed; none is a dependency.

Run: ``python benchmarks/bench_curvature.py [--repeats 3] [--device cuda]``.
"""

from __future__ import annotations

import argparse
import importlib.util
import time

import torch
from torch import nn

from nngeo_ops.nn import (
    FIM,
    FIM_MonteCarlo,
    PMatBlockDiag,
    PMatDiag,
    PMatEKFAC,
    PMatImplicit,
    PMatKFAC,
    PVector,
)

PEERS = ["nngeometry", "curvlinops", "backpack", "asdl"]


def mlp():
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, 256),
        nn.ReLU(),
        nn.Linear(256, 128),
        nn.ReLU(),
        nn.Linear(128, 10),
    ), (256, 1, 28, 28)


def cnn():
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 8 * 8, 10),
    ), (128, 3, 32, 32)


def best_of(fn, repeats, device):
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return min(times), out


def bench(name, make, repeats, device):
    torch.manual_seed(0)
    model, shape = make()
    model = model.to(device)
    x = torch.randn(shape, device=device)
    y = torch.randint(0, 10, (shape[0],), device=device)
    loader = [(x, y)]
    loss_fn = nn.CrossEntropyLoss()

    def fwd_bwd():
        model.zero_grad()
        loss_fn(model(x), y).backward()

    fwd_bwd()
    base, _ = best_of(fwd_bwd, repeats, device)
    rows = []
    cases = [
        ("diag (exact)", lambda: FIM(model, loader, PMatDiag, progress=False)),
        ("block-diag (exact)", lambda: FIM(model, loader, PMatBlockDiag, progress=False))
        if name == "cnn"
        else None,
        ("kfac (exact)", lambda: FIM(model, loader, PMatKFAC, progress=False)),
        ("kfac (MC, 1 trial)", lambda: FIM_MonteCarlo(model, loader, PMatKFAC, progress=False)),
        ("ekfac (exact)", lambda: FIM(model, loader, PMatEKFAC, progress=False)),
        ("implicit GGN", lambda: FIM(model, loader, PMatImplicit, progress=False)),
    ]
    v = PVector.from_model(model).detach().clone()
    for label, build in filter(None, cases):
        t_build, F = best_of(build, repeats, device)
        t_mv, _ = best_of(lambda F=F: F.mv(v), repeats, device)
        if isinstance(F, PMatImplicit):
            t_solve = float("nan")  # an iterative solve: many products, see linalg benchmarks
        else:
            F.solve(v, regul=1e-3)  # factorise once (cached), then time the solve
            t_solve, _ = best_of(lambda F=F: F.solve(v, regul=1e-3), repeats, device)
        rows.append((label, t_build / base, t_mv / base, t_solve / base))
    print(f"\n{name}: one forward+backward = {base * 1e3:.2f} ms ({device})")
    print(f"{'representation':<22}{'build':>10}{'mv':>10}{'solve':>10}   (× forward+backward)")
    for label, b, m, s in rows:
        print(f"{label:<22}{b:>10.2f}{m:>10.2f}{s:>10.2f}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    installed = [m for m in PEERS if importlib.util.find_spec(m) is not None]
    print("peers installed:", installed or "none (only nngeo_ops is timed)")
    bench("mlp", mlp, args.repeats, device)
    bench("cnn", cnn, args.repeats, device)


if __name__ == "__main__":
    main()
