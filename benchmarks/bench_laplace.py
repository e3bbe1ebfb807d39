"""Laplace posteriors: nngeo_ops against laplace-torch 0.3, same model, data and numbers.

For the diagonal, KFAC and full (dense) GGN of a float64 MLP classifier, both libraries

1. fit the Laplace approximation (the curvature, plus for ours the eigen form);
2. evaluate the log marginal likelihood at δ = 1;
3. evaluate it on a grid of 100 prior precisions (10⁻² … 10²);
4. compute the GLM predictive (probit link) on the test points.

The model has no biases (laplace-torch's KFAC keeps a bias as a separate block, ours appends it to
the input factor: two different approximations). The numbers are compared (relative difference of
the evidence, absolute of the probabilities; the conventions agree — P = N·GGN + δI of the summed
loss, the same evidence — so they must match to 1e-6), and the times are reported as ratios: to one
plain forward+backward pass over the training set, and ours / laplace-torch. laplace-torch
accumulates KFAC factors per batch; with one batch (as here) its factors are ours.

Run with the peers' python to compare (laplace-torch imports torchmetrics only for its running-loss
metrics; a small stand-in is installed when torchmetrics is absent)::

    /work/venv-peers/bin/python benchmarks/bench_laplace.py [--quick] [--out DIR]

With a python without laplace-torch only nngeo_ops is timed (noted in the output).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
import types

import torch
from torch import nn

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from nngeo_ops.apps import Laplace  # noqa: E402
from nngeo_ops.nn import PMatDense, PMatDiag, PMatKFAC  # noqa: E402

STRUCTURES = [("diag", PMatDiag), ("kron", PMatKFAC), ("full", PMatDense)]


def _peer():
    """laplace-torch's ``Laplace`` or None (with a stand-in for a missing torchmetrics)."""
    if importlib.util.find_spec("laplace") is None:
        return None, "laplace-torch not installed: only nngeo_ops is timed"
    note = ""
    if importlib.util.find_spec("torchmetrics") is None:
        tm = types.ModuleType("torchmetrics")

        class Metric(nn.Module):  # what laplace-torch's RunningNLLMetric needs of it
            def add_state(self, name, default, dist_reduce_fx=None):
                setattr(self, name, default)

        tm.Metric = tm.MeanSquaredError = Metric
        sys.modules["torchmetrics"] = tm
        note = "torchmetrics absent: a stand-in Metric class was installed for laplace-torch"
    try:
        from laplace import Laplace as PeerLaplace
    except Exception as err:  # a peer that does not import here
        return None, f"laplace-torch does not import ({err})"
    return PeerLaplace, note


def _timed(fn, reps=1):
    best, out = float("inf"), None
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return out, best


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a smaller problem (~20 s)")
    ap.add_argument("--out", default=None, help="write DIR/bench_laplace.md")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    n, d, h, c, n_test = (300, 10, 20, 5, 300) if args.quick else (1000, 20, 40, 10, 1000)
    dt = torch.float64
    x, y = torch.randn(n, d, dtype=dt), torch.randint(c, (n,))
    x_test = torch.randn(n_test, d, dtype=dt)
    # no biases: laplace-torch's KFAC keeps a bias as its own block, ours appends it to the
    # input factor (a different approximation); without biases the two KFACs are the same matrix
    model = nn.Sequential(
        nn.Linear(d, h, bias=False),
        nn.Tanh(),
        nn.Linear(h, h, bias=False),
        nn.Tanh(),
        nn.Linear(h, c, bias=False),
    ).to(dt)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(100):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=n)
    p = sum(q.numel() for q in model.parameters())
    grid = torch.logspace(-2, 2, 100, dtype=dt)

    def fwd_bwd():
        model.zero_grad()
        for xb, yb in loader:
            nn.functional.cross_entropy(model(xb), yb, reduction="sum").backward()

    fwd_bwd()
    _, base = _timed(fwd_bwd, 5)
    PeerLaplace, note = _peer()
    lines = [
        f"MLP {d}-{h}-{h}-{c}, P = {p} parameters, N = {n} training / {n_test} test points, "
        f"float64, {torch.get_num_threads()} threads; forward+backward over the data = "
        f"{base * 1e3:.1f} ms",
        "",
        "| structure | step | nngeo_ops (s) | × fwd+bwd | laplace-torch (s) | ours / peer "
        "| max diff |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, rep in STRUCTURES:
        ours = {}
        la, ours["fit"] = _timed(
            lambda rep=rep: Laplace(model, loader, representation=rep, prior_precision=1.0)
        )
        # the eigen form is computed at the first query and belongs to the fit
        _, t_eig = _timed(lambda la=la: la.log_det_posterior_precision())
        ours["fit"] += t_eig
        ml, ours["marglik"] = _timed(lambda la=la: la.log_marginal_likelihood().detach(), 3)
        gv, ours["grid (100)"] = _timed(
            lambda la=la: torch.stack([la.log_marginal_likelihood(g).detach() for g in grid])
        )
        pr, ours["predictive"] = _timed(lambda la=la: la.predictive(x_test))
        peer, diff = {}, {}
        if PeerLaplace is not None:
            pl = PeerLaplace(
                model,
                "classification",
                subset_of_weights="all",
                hessian_structure=name,
                prior_precision=1.0,
            )
            _, peer["fit"] = _timed(lambda pl=pl: pl.fit(loader))
            pml, peer["marglik"] = _timed(lambda pl=pl: pl.log_marginal_likelihood().detach(), 3)
            pgv, peer["grid (100)"] = _timed(
                lambda pl=pl: torch.stack(
                    [pl.log_marginal_likelihood(prior_precision=g).detach() for g in grid]
                )
            )
            pl.prior_precision = 1.0  # its log_marginal_likelihood(δ) keeps δ as the prior
            ppr, peer["predictive"] = _timed(
                lambda pl=pl: pl(x_test, pred_type="glm", link_approx="probit")
            )
            diff = {
                "marglik": float((ml - pml).abs() / pml.abs()),
                "grid (100)": float(((gv - pgv).abs() / pgv.abs()).max()),
                "predictive": float((pr - ppr).abs().max()),
            }
        for step, t in ours.items():
            tp = peer.get(step)
            cells = [
                name,
                step,
                f"{t:.3f}",
                f"{t / base:.0f}",
                f"{tp:.3f}" if tp is not None else "–",
                f"{t / tp:.2f}" if tp else "–",
                f"{diff[step]:.1e}" if step in diff else "–",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "max diff: relative for the log marginal likelihood, absolute for the probabilities.",
    ]
    if note:
        lines += [f"note: {note}"]
    text = "\n".join(lines)
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench_laplace.md"), "w") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()
