"""Arithmetic floors of the curvature rows where a peer is close: the bare torch work, timed.

For each case the *floor* is the minimum of tensor work any implementation must do for that matrix
at that size, run as bare torch calls with no library around them (no hooks, no Python bookkeeping),
and timed in CPU time (``time.process_time``, one thread) against the same forward+backward as the
benchmark, so that it holds on a shared machine. A library's distance to the floor is its ratio
divided by the floor's. The cases (benchmarks/models.py, float32):

* ``mlp diag build`` — exact diagonal of the GGN of the MLP: the forward; the C = 10 columns of the
  loss Hessian's square root propagated back as one batch of 10·N rows (data gradients of layers 3
  and 2 only); per layer one product (Σ_c g²)ᵀ a² (the sum over c can come first because a does not
  depend on c).
* ``mlp diag (MC) build`` — the Monte-Carlo diagonal: the forward, one sampled label per example
  (the logits' cotangent p − e_ŷ), its data gradients back through layers 3 and 2, and per layer
  one product (g²)ᵀ a².
* ``mlp diag solve1`` — a first damped solve of a diagonal: ``v / (d + λ)``, two elementwise passes
  (no check of the shifted diagonal, which the library promises).
* ``mlp kfac mv`` — G V A per layer with the first layer's A kept as its N rows (A = Rᵀ R / N):
  G (V Rᵀ) R / N (G applied to the N columns of V Rᵀ: 119 M multiply-adds against 153 M for
  (G V) Rᵀ R), and dense A for the other layers.
* ``mlp kfac solve1`` — the factorisations an exactly damped Kronecker solve needs: ``eigh`` of
  every G and of every dense A, the complete QR of the first layer's 785 × 256 rows, then one
  application of the eigenbases to v (the floor of the route nngeo_ops takes today; the thin-basis
  solve described in the README would lower it).

The CNN's KFAC build has no bare-torch floor here: written with ``unfold``, ``max_unpool2d`` and
``conv2d_input`` it is slower than the libraries themselves (their strided patches and autograd's
kernels are faster), so its floor is given as a count of multiply-adds in benchmarks/README.md.

Run: ``python -m benchmarks.floors [--calls 5]``; reading in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as Fn

from benchmarks.models import batch


def cpu_time(fn, calls: int) -> float:
    """Median CPU seconds of ``calls`` calls after one warm-up."""
    fn()
    ts = []
    for _ in range(calls):
        c = time.process_time()
        fn()
        ts.append(time.process_time() - c)
    return sorted(ts)[len(ts) // 2]


def fwd_bwd_of(model, x, y):
    def f():
        model.zero_grad()
        Fn.cross_entropy(model(x), y).backward()

    return f


def mlp_floors(calls: int) -> dict[str, float]:
    model, x, y = batch("mlp")
    fb = cpu_time(fwd_bwd_of(model, x, y), calls)
    W = [m.weight.detach() for m in model if isinstance(m, torch.nn.Linear)]
    b = [m.bias.detach() for m in model if isinstance(m, torch.nn.Linear)]
    n, c = x.shape[0], 10
    xf = x.flatten(1)

    def forward():
        a0 = torch.cat([xf, torch.ones(n, 1)], 1)
        h1 = torch.addmm(b[0], xf, W[0].T).relu_()
        a1 = torch.cat([h1, torch.ones(n, 1)], 1)
        h2 = torch.addmm(b[1], h1, W[1].T).relu_()
        a2 = torch.cat([h2, torch.ones(n, 1)], 1)
        return (a0, a1, a2), (h1, h2), torch.addmm(b[2], h2, W[2].T)

    def diag_build():
        (a0, a1, a2), (h1, h2), out = forward()
        p = out.softmax(1)
        s = torch.diag_embed(p.sqrt()) - p.unsqueeze(2) * p.sqrt().unsqueeze(1)  # H = S Sᵀ
        g3 = s.permute(2, 0, 1).reshape(c * n, c)  # 10·N rows, column-major: row k·N + i
        g2 = (g3 @ W[2]) * (h2 > 0).repeat(c, 1)
        g1 = (g2 @ W[1]) * (h1 > 0).repeat(c, 1)
        for g, a in ((g3, a2), (g2, a1), (g1, a0)):
            g2sum = g.square().view(c, n, -1).sum(0)
            g2sum.T @ a.square()

    def diag_mc_build():
        # one sampled label per example: the logits' cotangent is p − e_ŷ (one column, N rows)
        (a0, a1, a2), (h1, h2), out = forward()
        p = out.softmax(1)
        yhat = torch.multinomial(p, 1).squeeze(1)
        g3 = p - Fn.one_hot(yhat, c).to(p.dtype)
        g2 = (g3 @ W[2]) * (h2 > 0)
        g1 = (g2 @ W[1]) * (h1 > 0)
        for g, a in ((g3, a2), (g2, a1), (g1, a0)):
            g.square().T @ a.square()

    d = torch.rand(sum(w.numel() + bb.numel() for w, bb in zip(W, b)))
    v = torch.randn_like(d)

    def diag_solve1():
        v / (d + 1e-3)  # the shift, then the division: two elementwise passes

    R = torch.randn(n, 785)
    G = [torch.randn(k, k) for k in (256, 128, 10)]
    G = [g @ g.T for g in G]
    A = [None] + [torch.randn(k, k) for k in (257, 129)]
    A = [None] + [a @ a.T for a in A[1:]]
    V = [torch.randn(256, 785), torch.randn(128, 257), torch.randn(10, 129)]

    def kfac_mv():
        (G[0] @ (V[0] @ R.T)) @ R  # G acts on the batch's n columns, not A's 785
        for i in (1, 2):
            G[i] @ V[i] @ A[i]

    def kfac_solve1():
        eg = [torch.linalg.eigh(g) for g in G]
        ea = [torch.linalg.eigh(a) for a in A[1:]]
        q, _ = torch.linalg.qr(R.T, mode="complete")
        qs = [q] + [e.eigenvectors for e in ea]
        for i in range(3):
            qg = eg[i].eigenvectors
            qg.T @ V[i] @ qs[i]  # to the eigenbasis (the damped division is elementwise)
            qg @ V[i] @ qs[i].T  # and back

    return {
        "mlp forward+backward (ms)": 1e3 * fb,
        "mlp diag build": cpu_time(diag_build, calls) / fb,
        "mlp diag (MC) build": cpu_time(diag_mc_build, calls) / fb,
        "mlp diag solve1": cpu_time(diag_solve1, calls) / fb,
        "mlp kfac mv": cpu_time(kfac_mv, calls) / fb,
        "mlp kfac solve1": cpu_time(kfac_solve1, calls) / fb,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=5)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    res = mlp_floors(args.calls)
    print("| case | floor (× forward+backward, CPU time, 1 thread) |")
    print("|---|---:|")
    for k, v in res.items():
        print(f"| {k} | {v:.2f} |")


if __name__ == "__main__":
    main()
