"""Spectrum estimation (issue 11): top eigenvalues and density of the GGN and Hessian of the CNN.

The benchmark CNN of ``bench_curvature.py`` (two conv layers on 3×32×32, P = 25 578) on one batch of
random data, float32 (PyHessian works in float32 only). Rows:

* ``ours``: :func:`nngeo_ops.apps.spectrum` (the implicit GGN takes the exact Gram-matrix route when
  C·N is small; ``method=lanczos`` forces thick-restart block Lanczos; the Hessian always iterates),
  ``tol=1e-6`` on the relative residual;
* ``scipy eigsh``: ARPACK over ``nngeo_ops.linalg.to_scipy(op)`` (one product per call), tol 1e-6;
* ``PyHessian``: power iteration with deflation (``eigenvalues(top_n=k, tol=1e-6)``) and its SLQ
  density, on the Hessian of the same batch (its GGN is not offered). PyHessian's density calls
  ``torch.eig``, removed from torch; it is shimmed here by ``torch.linalg.eigh`` of its symmetric
  tridiagonal, which is what ``torch.eig`` computed there.

Times are ratios to one forward+backward of the same model and batch (best of two), measured in the
same run; ``max rel err`` is against a float64 reference (the exact Gram route for the GGN,
Lanczos at tol 1e-8 for the Hessian, 1e-6 with ``--quick``), relative to the largest eigenvalue. Peers are imported optionally (``/work/venv-peers/bin/python`` has them).

Run: ``python benchmarks/bench_spectrum.py [--quick] [--out DIR]``; reading in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import warnings
from pathlib import Path

import torch
from models import cnn as benchmark_cnn  # the benchmark CNN (the script's folder is on sys.path)
from torch import nn

from nngeo_ops.apps import SpectrumSettings, spectrum
from nngeo_ops.linalg import to_scipy
from nngeo_ops.nn import GGN, Hessian, PMatImplicit


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def fwd_bwd_time(model, x, y, loss) -> float:
    best = float("inf")
    for _ in range(2):
        model.zero_grad()
        t = time.perf_counter()
        loss(model(x), y).backward()
        best = min(best, time.perf_counter() - t)
    model.zero_grad()
    return best


def rel_err(vals, ref) -> float:
    vals = torch.as_tensor(vals, dtype=torch.float64).sort(descending=True).values
    ref = ref.sort(descending=True).values[: vals.shape[0]]
    return float((vals - ref).abs().max() / ref.abs().max())


def ours(F, k, method, tol=1e-6, max_restarts=30, density=False):
    s = SpectrumSettings(method=method, tol=tol, max_restarts=max_restarts, num_probes=4)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        res, t = timed(
            lambda: spectrum(
                F,
                k,
                trace=False,
                density=density,
                settings=s,
                generator=torch.Generator().manual_seed(0),
                progress=False,
            )
        )
    note = "not converged" if any("converged" in str(x.message) for x in w) else ""
    return res, t, note


def scipy_eigsh(op, k, tol=1e-6):
    from scipy.sparse.linalg import eigsh

    A = to_scipy(op, symmetric=True)
    vals, t = timed(lambda: eigsh(A, k=k, which="LA", tol=tol, v0=None)[0])
    return vals, t


def pyhessian_top(model, x, y, loss, k):
    from pyhessian import hessian as ph

    h = ph(model, loss, data=(x, y), cuda=False)
    vals, t = timed(lambda: h.eigenvalues(top_n=k, tol=1e-6, maxIter=100)[0])
    return vals, t


def pyhessian_density(model, x, y, loss, iters):
    from pyhessian import hessian as ph

    def eig_shim(T, eigenvectors=False):  # torch.eig of a symmetric tridiagonal
        w, V = torch.linalg.eigh(T)
        return torch.stack([w, torch.zeros_like(w)], 1), V

    torch.eig = eig_shim
    h = ph(model, loss, data=(x, y), cuda=False)
    return timed(lambda: h.density(iter=iters, n_v=4))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--quick", action="store_true", help="batch 8, top-3, SLQ 4 × 8, Hessian reference to 1e-6"
    )
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--no-peers", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    batch = 8 if args.quick else 64
    ks = (3,) if args.quick else (10, 50)
    model, _ = benchmark_cnn()
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))
    loss = nn.CrossEntropyLoss()
    loader = [(x, y)]
    t0 = fwd_bwd_time(model, x, y, loss)
    G = GGN(model, loader, loss, PMatImplicit, progress=False)
    H = Hessian(model, loader, loss, PMatImplicit, progress=False)
    P = G.op.shape[0]
    H.op @ torch.randn(P, 1)  # warm-up: lazy imports of torch.func
    m64 = copy.deepcopy(model).double()
    loader64 = [(x.double(), y)]
    refs = {
        "GGN": GGN(m64, loader64, loss, PMatImplicit, progress=False),
        "Hessian": Hessian(m64, loader64, loss, PMatImplicit, progress=False),
    }
    kmax = max(ks)
    t_ref = time.perf_counter()
    # the GGN's reference is exact (its Gram-matrix route in float64); the Hessian's is Lanczos
    ref_vals = {
        "GGN": ours(refs["GGN"], kmax, "auto")[0].eigenvalues,
        "Hessian": ours(
            refs["Hessian"], kmax, "lanczos", tol=1e-6 if args.quick else 1e-8, max_restarts=30
        )[0].eigenvalues,
    }
    print(f"reference computed ({time.perf_counter() - t_ref:.1f} s)", file=sys.stderr)
    rows = []

    def row(matrix, k, method, t, err, matvecs="", note=""):
        rows.append((matrix, k, method, t, t / t0, err, matvecs, note))
        print(f"  {matrix} {k} {method}: {t:.1f} s", file=sys.stderr, flush=True)

    for k in ks:
        for name, F in (("GGN", G), ("Hessian", H)):
            methods = ("auto", "lanczos") if name == "GGN" else ("auto",)
            for method in methods:
                r, t, note = ours(F, k, method)
                route = "exact (Gram)" if r.exact else "block Lanczos"
                row(
                    name,
                    k,
                    f"ours, {route}",
                    t,
                    rel_err(r.eigenvalues, ref_vals[name]),
                    r.num_matvecs,
                    note,
                )
            if args.no_peers:
                continue
            try:
                vals, t = scipy_eigsh(F.op, k)
                row(name, k, "scipy eigsh (ARPACK)", t, rel_err(vals, ref_vals[name]))
            except Exception as exc:  # noqa: BLE001 - a peer failing is reported, not fatal
                row(name, k, "scipy eigsh (ARPACK)", float("nan"), float("nan"), note=str(exc)[:60])
            if name == "Hessian" and k <= 10:
                try:
                    vals, t = pyhessian_top(copy.deepcopy(model), x, y, loss, k)
                    row(name, k, "PyHessian (power + deflation)", t, rel_err(vals, ref_vals[name]))
                except ImportError:
                    row(name, k, "PyHessian", float("nan"), float("nan"), note="not installed")
    # density: SLQ with 4 probes × 64 steps (ours batches the 4 probes in one product per step)
    iters = 8 if args.quick else 64
    s = SpectrumSettings(num_probes=4, num_iter_slq=iters, method="lanczos", max_restarts=0)
    dens, t = timed(
        lambda: spectrum(
            H, 1, trace=False, density=True, settings=s, generator=torch.Generator().manual_seed(0)
        )
    )
    row(
        "Hessian",
        "density",
        f"ours, SLQ 4 × {iters} (+1 eigenpair)",
        t,
        float("nan"),
        dens.num_matvecs,
    )
    if not args.no_peers:
        try:
            _, t = pyhessian_density(copy.deepcopy(model), x, y, loss, iters)
            row("Hessian", "density", f"PyHessian, SLQ 4 × {iters}", t, float("nan"))
        except ImportError:
            row("Hessian", "density", "PyHessian", float("nan"), float("nan"), note="not installed")
    lines = [
        f"CNN, P = {P}, batch {batch}, float32, CPU ({torch.get_num_threads()} threads); "
        f"forward+backward = {t0 * 1e3:.1f} ms",
        "",
        "| matrix | k | method | time (s) | time / fwd+bwd | max rel err | products | note |",
        "|---|---|---|---:|---:|---:|---:|---|",
    ]
    for m, k, meth, sec, ratio, err, mv, note in rows:
        e = "" if err != err else f"{err:.1e}"
        rr = "" if ratio != ratio else f"{ratio:.2g}"
        lines.append(f"| {m} | {k} | {meth} | {sec:.1f} | {rr} | {e} | {mv} | {note} |")
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_spectrum.md").write_text(text + "\n")
        try:
            from nngeo_ops.apps import plot_spectrum

            plot_spectrum(dens, args.out / "bench_spectrum_density.png", title="Hessian, SLQ")
        except ImportError:
            pass


if __name__ == "__main__":
    main()
