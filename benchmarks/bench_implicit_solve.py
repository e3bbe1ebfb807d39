"""Damped solves of the implicit GGN of the MLP benchmark model: function space against CG.

``(Jᵀ H J + λI)⁻¹ v`` for the Fisher of an MLP 784-256-128-10 on one batch of 256 examples (P = 235 146
parameters, C·N = 2 560 outputs), float32: the ops rule "Woodbury in function space" (an m × m system
from the NTK J Jᵀ and H, LU-factorised once) against the CG fallback (forced with a small
``CompilePolicy.dense_limit``). Three solves per compiled operator (the first includes the
factorisation), the relative residual of the last one, and the exact log-determinant from the same
factorisation. Run: ``python benchmarks/bench_implicit_solve.py``; results in benchmarks/README.md.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from nngeo_ops.nn import FIM, PMatImplicit
from nngeo_ops.ops import CompilePolicy, Identity


def main() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10)
    )
    x, y = torch.randn(256, 784), torch.randint(0, 10, (256,))
    F = FIM(model, [(x, y)], PMatImplicit, progress=False)
    p = F.op.shape[0]
    F.op @ torch.randn(p)  # warm-up: lazy imports of torch's forward-mode machinery
    print("| λ | route | 1st solve (s) | 2nd | 3rd | rel. residual |")
    print("|---|---|---:|---:|---:|---:|")
    for lam in (1e-3, 1e-6):
        for name, policy in (("function space", None), ("CG", CompilePolicy(dense_limit=100))):
            compiled = (F.op + lam * Identity(p)).compile(policy)
            times = []
            for _ in range(3):
                v = torch.randn(p)
                t = time.perf_counter()
                sol = compiled.solve(v)
                times.append(time.perf_counter() - t)
            res = float(((F.op @ sol) + lam * sol - v).norm() / v.norm())
            cells = " | ".join(f"{t:.2f}" for t in times)
            print(f"| {lam:g} | {name} | {cells} | {res:.1e} |")
    compiled = (F.op + 1e-3 * Identity(p)).compile()
    t = time.perf_counter()
    logdet = compiled.logdet()
    print(f"\nlogdet(F + 1e-3·I) = {float(logdet):.6g}, exact, in {time.perf_counter() - t:.2f} s")


if __name__ == "__main__":
    main()
