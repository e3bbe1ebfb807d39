"""Damped solves of the implicit GGN of the MLP benchmark model: function space against CG.

``(Jᵀ H J + λI)⁻¹ v`` for the Fisher of an MLP 784-256-128-10 on one batch of 256 examples (P = 235 146
parameters, C·N = 2 560 outputs), float32: the ops rule "Woodbury in function space" (an m × m system
from the NTK J Jᵀ and H, LU-factorised once) against the CG fallback (forced with a small
``CompilePolicy.dense_limit``). Three solves per compiled operator (the first includes the
factorisation), the relative residual of the last one, and the exact log-determinant from the same
factorisation. Times in seconds and as ratios to one forward+backward of the model on the batch.
Run: ``python benchmarks/bench_implicit_solve.py [--quick] [--out DIR]`` (``--quick``: λ = 1e-3,
the function-space route only, two solves); results in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout first

from benchmarks.contract import Tee, add_contract_args, write_report  # noqa: E402
from nngeo_ops.nn import FIM, PMatImplicit  # noqa: E402
from nngeo_ops.ops import CompilePolicy, Identity  # noqa: E402


def main(argv=None) -> None:
    args = add_contract_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    args = args.parse_args(argv)
    with Tee() as tee:
        run(args.quick)
    write_report(args.out, "bench_implicit_solve", tee.text)


def run(quick: bool) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10)
    )
    x, y = torch.randn(256, 784), torch.randint(0, 10, (256,))
    F = FIM(model, [(x, y)], PMatImplicit, progress=False)
    p = F.op.shape[0]
    F.op @ torch.randn(p)  # warm-up: lazy imports of torch's forward-mode machinery

    def fwd_bwd():
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()

    fwd_bwd()
    fb = []
    for _ in range(5):
        t = time.perf_counter()
        fwd_bwd()
        fb.append(time.perf_counter() - t)
    fb = min(fb)
    n_solves = 2 if quick else 3
    print(f"one forward+backward: {1e3 * fb:.2f} ms (best of 5)\n")
    print(
        "| λ | route | 1st solve (s) | later solves (s) | 1st / fwd+bwd | later / fwd+bwd "
        "| rel. residual |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    for lam in (1e-3,) if quick else (1e-3, 1e-6):
        routes = [("function space", None), ("CG", CompilePolicy(dense_limit=100))]
        for name, policy in routes[:1] if quick else routes:  # CG: seconds per solve
            compiled = (F.op + lam * Identity(p)).compile(policy)
            times = []
            for _ in range(n_solves):
                v = torch.randn(p)
                t = time.perf_counter()
                sol = compiled.solve(v)
                times.append(time.perf_counter() - t)
            res = float(((F.op @ sol) + lam * sol - v).norm() / v.norm())
            later = min(times[1:])
            cells = f"{times[0]:.3f} | {later:.3f} | {times[0] / fb:.1f} | {later / fb:.1f}"
            print(f"| {lam:g} | {name} | {cells} | {res:.1e} |")
    if quick:
        return
    compiled = (F.op + 1e-3 * Identity(p)).compile()
    t = time.perf_counter()
    logdet = compiled.logdet()
    print(f"\nlogdet(F + 1e-3·I) = {float(logdet):.6g}, exact, in {time.perf_counter() - t:.2f} s")


if __name__ == "__main__":
    main()
