"""The demo: Fisher matrices of a trained network in every representation, on generated data.

Run with ``python -m nngeo_ops.apps.demo`` (about a minute on 2 CPU cores). It

1. trains a small MLP on task A, a generated 3-class Gaussian-mixture problem;
2. builds its Fisher information in the dense, diagonal, block-diagonal, KFAC, EKFAC and implicit
   representations, and reports for each one the build time, the distance to the exact (dense)
   Fisher and the quality of its damped natural-gradient direction ``(F + λI)⁻¹ g``;
3. shows the operator expression and compile plan behind KFAC's damped solve;
4. estimates the top of the spectrum with Lanczos on the implicit Fisher (no P×P matrix);
5. trains on a second task B with and without an EWC penalty ``½ (w − w_A)ᵀ F (w − w_A)`` using the
   KFAC Fisher, and prints the accuracy kept on task A.

Every printed number is computed in the run.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from .. import FIM, PMatBlockDiag, PMatDense, PMatDiag, PMatEKFAC, PMatImplicit, PMatKFAC, PVector
from ..linalg import lanczos
from ..ops import Identity

REPRESENTATIONS = [PMatDense, PMatDiag, PMatBlockDiag, PMatKFAC, PMatEKFAC, PMatImplicit]


def make_task(gen: torch.Generator, n: int, dim: int = 10, classes: int = 3):
    """A Gaussian mixture: one random mean per class, unit noise."""
    means = 2.0 * torch.randn(classes, dim, generator=gen)
    y = torch.randint(classes, (n,), generator=gen)
    x = means[y] + torch.randn(n, dim, generator=gen)
    return x, y


def loader_of(x, y, batch_size=128):
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size)


def train(model, x, y, steps, penalty=None, lr=0.05):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        if penalty is not None:
            loss = loss + penalty()
        loss.backward()
        opt.step()


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="nngeo_ops demo")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--damping", type=float, default=1e-3)
    parser.add_argument("--ewc", type=float, default=1000.0, help="EWC strength")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    xa, ya = make_task(gen, 1024)
    model = nn.Sequential(
        nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 3)
    )
    train(model, xa, ya, steps=200)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"task A: MLP 10-32-32-3 ({n_params} parameters), train accuracy {accuracy(model, xa, ya):.3f}"
    )

    loader = loader_of(xa, ya)
    model.zero_grad()
    nn.functional.cross_entropy(model(xa), ya).backward()
    g = PVector.from_model_grad(model)

    print(
        f"\nFisher information on task A (mean over {len(xa)} examples), damping λ = {args.damping:g}"
    )
    print(
        f"{'representation':<15}{'build (s)':>10}{'‖F − F_exact‖/‖F_exact‖':>26}{'cos(step, exact step)':>24}"
    )
    fishers, exact, exact_step = {}, None, None
    for rep in REPRESENTATIONS:
        t0 = time.perf_counter()
        F = FIM(model=model, loader=loader, representation=rep, n_output=3, progress=False)
        built = time.perf_counter() - t0
        step = F.solve(g, regul=args.damping).to_torch()
        if rep is PMatDense:
            exact, exact_step = F.to_torch(), step
        rel = float((F.to_torch() - exact).norm() / exact.norm())
        cos = float(torch.dot(step, exact_step) / (step.norm() * exact_step.norm()))
        print(f"{rep.__name__:<15}{built:>10.3f}{rel:>26.3e}{cos:>24.4f}")
        fishers[rep] = F

    kfac = fishers[PMatKFAC]
    damped = kfac.op + args.damping * Identity(kfac.op.shape[0])
    print(f"\nKFAC as an operator: {kfac.op}")
    compiled = damped.compile()
    compiled.solve(g.to_torch())
    print(compiled.explain())

    implicit = fishers[PMatImplicit].op
    print(
        f"\nimplicit Fisher as an operator: {implicit}  (J: {tuple(implicit.J.shape)} per-example "
        f"Jacobian, H: output-space Fisher; products fused, nothing P×P stored)"
    )
    top, _ = lanczos(
        implicit, 5, which="LA", num_iter=60, generator=torch.Generator().manual_seed(1)
    )
    true_top = torch.linalg.eigvalsh(exact)[-5:]
    print("\ntop-5 Fisher eigenvalues, Lanczos on the implicit Fisher:", _fmt(top))
    print("                          eigenvalues of the dense Fisher:", _fmt(true_top))

    w_a = PVector.from_model(model).clone().detach()  # clone: detach alone shares storage
    state = {k: v.clone() for k, v in model.state_dict().items()}
    xb, yb = make_task(gen, 1024)
    print(f"\ntask B, then accuracy kept on task A (EWC strength {args.ewc:g}, KFAC Fisher):")
    for label, penalty in [("plain SGD on B", None), ("SGD on B + EWC", kfac)]:
        model.load_state_dict(state)

        def ewc(F=penalty):
            return 0.5 * args.ewc * F.vTMv(PVector.from_model(model) - w_a)

        train(model, xb, yb, steps=200, penalty=None if penalty is None else ewc)
        print(
            f"  {label:<16} task B {accuracy(model, xb, yb):.3f}   task A {accuracy(model, xa, ya):.3f}"
        )


def _fmt(values) -> str:
    return "[" + ", ".join(f"{float(v):.4f}" for v in sorted(values.tolist(), reverse=True)) + "]"


if __name__ == "__main__":
    main()
