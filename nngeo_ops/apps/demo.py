"""The demo: what the library is for, on a small network, in about a minute on 2 CPU cores.

Run with ``python -m nngeo_ops demo`` (or the console script ``nngeo-ops demo``; ``--help`` lists the
options, ``--quick`` is the short version the tests run). On scikit-learn's handwritten digits (or a
generated Gaussian mixture when scikit-learn is not installed) it

1. trains a small MLP and builds its Fisher information in every representation, reporting for each
   the build time, the memory it keeps, the error of its matrix-vector products and the quality of
   its damped natural-gradient direction ``(F + λI)⁻¹ g`` against the exact (dense) Fisher;
2. shows the operator expression and compile plan behind KFAC's damped solve;
3. trains the same network from the same start with KFAC natural gradient, SGD and Adam;
4. fits a KFAC Laplace posterior, tunes its prior precision on the marginal likelihood, and compares
   the calibration (NLL, ECE) of the MAP network with the GLM predictive;
5. trains on a second task with and without an EWC penalty and prints the accuracy kept on the first;
6. computes the Fisher's spectrum (top eigenvalues and density).

It writes PNGs into ``--out`` (matplotlib needed: the ``demo`` extra): the representation errors, the
loss curves and the spectrum. Every printed number is computed in the run.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import nn

from ..nn import (
    FIM,
    PMatBlockDiag,
    PMatDense,
    PMatDiag,
    PMatEKFAC,
    PMatImplicit,
    PMatKFAC,
    PMatLowRank,
    PVector,
)
from ..ops import Identity
from ._demo_data import (
    accuracy,
    calibration,
    figure,
    load_digits_or_mixture,
    loader_of,
    make_mlp,
    progress_bar,
    stored_bytes,
)
from .ewc import EWC
from .laplace import Laplace
from .optim import NaturalGradient
from .plotting import plot_spectrum
from .spectrum import spectrum

REPRESENTATIONS = [PMatDiag, PMatBlockDiag, PMatKFAC, PMatEKFAC, PMatLowRank, PMatImplicit]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nngeo-ops demo",
        description="Fisher representations, natural gradient, Laplace, EWC and spectra of a small "
        "network on scikit-learn's digits, with pictures.",
    )
    p.add_argument("--quick", action="store_true", help="fewer steps and examples (CI, ~20 s)")
    p.add_argument("--out", default="nngeo_demo", help="folder for the PNGs (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of every random choice")
    p.add_argument("--damping", type=float, default=1e-3, help="λ of the damped solves and of NG")
    p.add_argument("--steps", type=int, default=None, help="training steps (default 150, quick 40)")
    p.add_argument("--ewc", type=float, default=100.0, help="EWC strength λ")
    p.add_argument("--no-plots", action="store_true", help="print only, write no PNG")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return p


def section(title: str) -> None:
    print(f"\n== {title} " + "=" * max(0, 70 - len(title)))


def compare_representations(model, loader, g, damping, progress):
    """Build every representation; errors against the dense Fisher (itself exact, tested against
    torch.func in the test suite)."""
    exact = FIM(model, loader, PMatDense, progress=progress)
    Fd = exact.to_torch()
    gf = g.get_flat_representation()
    eye = torch.eye(Fd.shape[0], dtype=Fd.dtype)
    exact_step = torch.linalg.solve(Fd + damping * eye, gf)
    probe = torch.randn(Fd.shape[0], dtype=Fd.dtype, generator=torch.Generator().manual_seed(0))
    rows, fishers = [], {"PMatDense": exact}
    for rep in REPRESENTATIONS:
        t0 = time.perf_counter()
        F = FIM(model, loader, rep, progress=progress)
        built = time.perf_counter() - t0
        mv = F.op @ probe
        mv_err = float((mv - Fd @ probe).norm() / (Fd @ probe).norm())
        step = F.solve(g, regul=damping).get_flat_representation()
        cos = float(step @ exact_step / (step.norm() * exact_step.norm()))
        rows.append((rep.__name__, built, stored_bytes(F.op), mv_err, cos))
        fishers[rep.__name__] = F
    print(f"{'representation':<15}{'build (s)':>10}{'stored':>11}{'mv error':>11}{'cos(step)':>11}")
    print(f"{'PMatDense':<15}{'':>10}{stored_bytes(exact.op) / 1e6:>9.2f}MB{0:>11.1e}{1:>11.4f}")
    for name, built, mem, err, cos in rows:
        print(f"{name:<15}{built:>10.3f}{mem / 1e6:>9.2f}MB{err:>11.1e}{cos:>11.4f}")
    print(
        "mv error: ‖F v − F_exact v‖/‖F_exact v‖;  cos(step): cosine of (F + λI)⁻¹g with the exact"
    )
    return fishers, rows


def train_all(make, x, y, steps, damping, seed, progress):
    """The same start, the same batches: KFAC natural gradient, SGD and Adam."""
    batches = list(loader_of(x, y, batch_size=128, shuffle=True, seed=seed))
    curves, times = {}, {}
    for name in ["KFAC natural gradient", "SGD (momentum)", "Adam"]:
        model = make()
        if name.startswith("KFAC"):
            opt = NaturalGradient(
                model, lr=0.1, representation=PMatKFAC, damping=0.1, fisher="mc",
                update_every=1, ema_decay=0.9, momentum=0.9,
                generator=torch.Generator().manual_seed(seed),
            )  # fmt: skip
        elif name.startswith("SGD"):
            opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
        else:
            opt = torch.optim.Adam(model.parameters(), lr=0.03)
        losses, t0 = [], time.perf_counter()
        for i in progress_bar(range(steps), desc=name, enabled=progress):
            xb, yb = batches[i % len(batches)]
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(xb), yb)
            loss.backward()
            opt.step(batch=(xb, yb)) if isinstance(opt, NaturalGradient) else opt.step()
            with torch.no_grad():
                losses.append(float(nn.functional.cross_entropy(model(x), y)))
        times[name] = time.perf_counter() - t0
        curves[name] = (losses, model)
    for name, (losses, _) in curves.items():
        print(
            f"{name:<24} training loss {losses[-1]:.4f} after {steps} steps ({times[name]:.1f} s)"
        )
    return curves


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    progress = not args.no_progress
    steps = args.steps or (40 if args.quick else 150)
    torch.manual_seed(args.seed)
    data = load_digits_or_mixture(args.seed, n_max=400 if args.quick else None)
    (x, y), (xt, yt), source = data["train"], data["test"], data["source"]
    n_in, n_classes = x.shape[1], int(y.max()) + 1
    out = Path(args.out)
    results: dict = {"source": source}

    def make():
        torch.manual_seed(args.seed)
        return make_mlp(n_in, n_classes, hidden=16 if args.quick else 32)

    section(f"data: {source}, {len(x)} training and {len(xt)} test examples")
    curves = train_all(make, x, y, steps, args.damping, args.seed, progress)
    results["final_loss"] = {k: v[0][-1] for k, v in curves.items()}
    model = curves["Adam"][1]
    print(f"MAP network (Adam): test accuracy {accuracy(model, xt, yt):.3f}")

    section("Fisher information in every representation (mean over examples)")
    loader = loader_of(x, y, batch_size=128)
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    g = PVector.from_model_grad(model)
    fishers, rows = compare_representations(model, loader, g, args.damping, progress)
    results["representations"] = rows

    section("KFAC's damped solve as an operator expression")
    kfac = fishers["PMatKFAC"]
    compiled = (kfac.op + args.damping * Identity(kfac.op.shape[0])).compile()
    compiled.solve(g.get_flat_representation())
    print(compiled.explain())

    section("Laplace posterior (KFAC), prior precision tuned on the marginal likelihood")
    la = Laplace(model, loader, likelihood="classification", representation=PMatKFAC)
    before = float(la.log_marginal_likelihood())
    prior = la.optimize_prior_precision()
    after = float(la.log_marginal_likelihood())
    print(f"log marginal likelihood {before:.2f} (δ = 1) → {after:.2f} (δ = {float(prior):.3g})")
    with torch.no_grad():
        p_map = torch.softmax(model(xt), -1)
    p_la = la.predictive(xt, link="probit")
    for name, p in [("MAP", p_map), ("Laplace (GLM, probit)", p_la)]:
        nll, ece = calibration(p, yt)
        results[f"calibration {name}"] = (nll, ece)
        print(
            f"{name:<22} test NLL {nll:.4f}   ECE {ece:.4f}   accuracy {float((p.argmax(1) == yt).float().mean()):.3f}"
        )

    section(f"EWC: classes < {n_classes // 2} first, then the rest (strength {args.ewc:g})")
    results["ewc"] = run_ewc(make, x, y, n_classes, steps, args.ewc)

    section("spectrum of the exact Fisher (Lanczos on the implicit Fisher)")
    s = spectrum(
        fishers["PMatImplicit"],
        k=10,
        density=True,
        generator=torch.Generator().manual_seed(args.seed),
    )
    dense_top = torch.linalg.eigvalsh(fishers["PMatDense"].to_torch())[-10:].flip(0)
    print("top eigenvalues:", ", ".join(f"{float(v):.4g}" for v in s.eigenvalues[:5]), "…")
    print("dense eigvalsh :", ", ".join(f"{float(v):.4g}" for v in dense_top[:5]), "…")
    print(s.explain())
    results["top_eigenvalues"] = (s.eigenvalues, dense_top)

    if not args.no_plots:
        results["files"] = write_plots(out, curves, rows, s)
        print("\nwrote " + ", ".join(str(p) for p in results["files"]))
    return results


def run_ewc(make, x, y, n_classes, steps, strength):
    first = y < n_classes // 2
    xa, ya, xb, yb = x[first], y[first], x[~first], y[~first]
    model = make()
    train_sgd(model, xa, ya, steps)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ewc = EWC(model, strength=strength)
    ewc.add_task(loader_of(xa, ya, batch_size=128), representation=PMatKFAC)
    kept = {}
    for label, penalty in [("plain SGD on task B", None), ("SGD on task B + EWC", ewc.penalty)]:
        model.load_state_dict(state)
        train_sgd(model, xb, yb, steps, penalty)
        kept[label] = (accuracy(model, xa, ya), accuracy(model, xb, yb))
        print(
            f"{label:<22} accuracy on task A {kept[label][0]:.3f}, on task B {kept[label][1]:.3f}"
        )
    return kept


def train_sgd(model, x, y, steps, penalty=None):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        if penalty is not None:
            loss = loss + penalty()
        loss.backward()
        opt.step()


def write_plots(out: Path, curves, rows, s) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "loss_curves.png", out / "representation_errors.png", out / "spectrum.png"]
    fig, (ax,) = figure()
    for name, (losses, _) in curves.items():
        ax.plot(range(1, len(losses) + 1), losses, label=name)
    ax.set(xlabel="step", ylabel="training loss", yscale="log", title="same start, same batches")
    ax.legend()
    fig.savefig(files[0], dpi=120)
    fig, (a1, a2) = figure(ncols=2, size=(5.0, 4.0))
    names = [r[0].removeprefix("PMat") for r in rows]
    a1.bar(names, [r[3] for r in rows])
    a1.set(yscale="log", ylabel="‖F v − F_exact v‖ / ‖F_exact v‖", title="matrix-vector error")
    a2.bar(names, [r[4] for r in rows])
    a2.set(
        ylim=(min(r[4] for r in rows) - 0.05, 1.0), ylabel="cosine", title="(F + λI)⁻¹g vs exact"
    )
    for a in (a1, a2):
        a.tick_params(axis="x", rotation=30)
    fig.savefig(files[1], dpi=120)
    plot_spectrum(s, files[2], title="Fisher spectrum (top-10 marked)")
    return files


if __name__ == "__main__":
    main()
