"""Construction, ``mv`` and ``solve`` time of each representation, as a ratio to one forward+backward.

Models (issue 3): an MLP 784-256-128-10 on a batch of 256, and a small CNN (two conv layers on
3×32×32) on a batch of 128; one batch of random data, float32 (NNGeometry 0.4 fails in float64 for
``classif_logits``), on the default device. The Fisher of ``classif_logits`` / the GGN of
``CrossEntropyLoss(reduction="mean")`` is the same matrix, so every library computes the same thing.

Peers (NNGeometry, curvlinops, BackPACK, ASDL) are timed in the same process, on the same batch, against
the same forward+backward, only where installed and where they support the case; none is a dependency.
Install them in a scratch environment, e.g.::

    python -m venv /tmp/peers --system-site-packages
    /tmp/peers/bin/pip install --no-deps nngeometry curvlinops-for-pytorch backpack-for-pytorch \
        asdfghjkl einops einconv opt-einsum unfoldNd linear_operator jaxtyping wadler-lindig
    /tmp/peers/bin/python benchmarks/bench_curvature.py

Each timed call is paired with one forward+backward run just before it, and each ratio is the best of
``--repeats`` calls over the best of their paired forward+backwards, so that load from other processes
weighs on both sides of a ratio; with ``--rounds`` the whole table is measured again and each cell is
the median of its rounds (the block-diagonal cases, GB-sized, run once, after everything else).
One-time process costs (torch's lazy imports) are paid before the first case. Columns (ratios to one
forward+backward):

* ``build``: constructing the representation from the loader (one pass over the data, plus whatever
  the library does at construction: NNGeometry/ours EKFAC eigendecompose, curvlinops builds lazily, so
  its factors are forced here);
* ``mv``: one matrix-vector product (for the implicit GGN: one Jᵀ H J v over the batch);
* ``solve``: ``(F + λI)⁻¹ v`` with λ = 1e-3 once the factorisation is cached, and ``1st solve``
  including the factorisation (ours: eigendecompositions of the Kronecker factors, exact damping;
  NNGeometry's KFAC solve damps each factor (π-damping), a different matrix, and caches nothing).

Run: ``python benchmarks/bench_curvature.py [--repeats 5] [--rounds 3] [--only mlp|cnn]``
``[--reps kfac ...] [--no-peers] [--device cuda]``; results and their reading: benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import copy
import functools
import importlib.util
import math
import os
import statistics
import time
import warnings

import torch
import torch.nn.functional as Fn
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

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
DAMPING = 1e-3


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


class OneBatch(DataLoader):
    """A DataLoader (NNGeometry needs ``.sampler``) that yields one prepared batch, without collation."""

    def __init__(self, x, y):
        super().__init__(TensorDataset(x, y), batch_size=x.shape[0])
        self._batch = (x, y)

    def __iter__(self):
        return iter([self._batch])

    def __len__(self):
        return 1


class Timer:
    def __init__(self, device, repeats):
        self.device, self.repeats = device, repeats

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def once(self, fn):
        self._sync()
        t = time.perf_counter()
        out = fn()
        self._sync()
        return time.perf_counter() - t, out

    def best(self, fn, repeats=None):
        best, out = math.inf, None
        for _ in range(repeats or self.repeats):
            t, out = self.once(fn)
            best = min(best, t)
        return best, out


# ---------------------------------------------------------------------- the cases
# each case: (representation, library, build, mv, solve, note); build() -> obj, mv(obj, v) and
# solve(obj, v) take a flat parameter-space tensor (None where the library has no such operation)


def ours(model, x, y, loader):
    pv = lambda F, v: PVector(F.layer_collection, vector_repr=v)  # noqa: E731

    def mv(F, v):
        return F.mv(pv(F, v))

    def solve(F, v):
        return F.solve(pv(F, v), regul=DAMPING)

    cases = [
        ("diag", lambda: FIM(model, loader, PMatDiag, progress=False), mv, solve, ""),
        (
            "diag (MC)",
            lambda: FIM_MonteCarlo(model, loader, PMatDiag, progress=False),
            mv,
            solve,
            "",
        ),
        ("block-diag", lambda: FIM(model, loader, PMatBlockDiag, progress=False), mv, solve, ""),
        ("kfac", lambda: FIM(model, loader, PMatKFAC, progress=False), mv, solve, ""),
        (
            "kfac (MC)",
            lambda: FIM_MonteCarlo(model, loader, PMatKFAC, progress=False),
            mv,
            solve,
            "",
        ),
        (
            "ekfac (eigh only)",
            lambda: FIM(
                model, loader, functools.partial(PMatEKFAC, fit_diag=False), progress=False
            ),
            mv,
            solve,
            "KFAC pass + eigh",
        ),
        (
            "ekfac (refit)",
            lambda: FIM(model, loader, PMatEKFAC, progress=False),
            mv,
            solve,
            "2 passes + eigh",
        ),
        (
            "implicit GGN",
            lambda: FIM(model, loader, PMatImplicit, progress=False),
            mv,
            None,
            "uncached: each mv runs the model",
        ),
        (
            "implicit GGN (cache)",
            lambda: FIM(model, loader, functools.partial(PMatImplicit, cache=True), progress=False),
            mv,
            None,
            "mv: warm; 1st mv linearises",
        ),
    ]
    return [(rep, "nngeo_ops", b, m, s, n) for rep, b, m, s, n in cases]


def nngeometry(model, x, y, loader):
    import nngeometry.metrics as M
    from nngeometry.object import PVector as NPV
    from nngeometry.object import pspace as P

    model = copy.deepcopy(model)
    xs = x.clone()  # NNGeometry sets requires_grad on the inputs it is given
    ld = OneBatch(xs, y)

    def as_pv(F, v):
        return NPV(F.generator.layer_collection, vector_repr=v)

    def mv(F, v):
        return F.mv(as_pv(F, v))

    def solve(F, v):
        return F.solve(as_pv(F, v), regul=DAMPING)

    def fim(rep, mc=False):
        f = M.FIM_MonteCarlo if mc else M.FIM
        return lambda: f(model, ld, rep, variant="classif_logits")

    return [
        ("diag", "NNGeometry", fim(P.PMatDiag), mv, solve, ""),
        ("diag (MC)", "NNGeometry", fim(P.PMatDiag, True), mv, solve, ""),
        ("block-diag", "NNGeometry", fim(P.PMatBlockDiag), mv, solve, ""),
        ("kfac", "NNGeometry", fim(P.PMatKFAC), mv, solve, "solve: π-damped factors"),
        ("kfac (MC)", "NNGeometry", fim(P.PMatKFAC, True), mv, solve, "solve: π-damped factors"),
        ("ekfac (eigh only)", "NNGeometry", fim(P.PMatEKFAC), mv, solve, "KFAC pass + eigh"),
        ("implicit GGN", "NNGeometry", fim(P.PMatImplicit), mv, None, "one backward per class"),
    ]


def curvlinops(model, x, y, loader):
    from curvlinops import (
        EKFACLinearOperator,
        FisherType,
        GGNLinearOperator,
        KFACInverseLinearOperator,
        KFACLinearOperator,
    )

    params = [p for p in model.parameters() if p.requires_grad]
    data = [(x, y)]
    loss = nn.CrossEntropyLoss()
    common = dict(check_deterministic=False, num_data=x.shape[0])
    kf = dict(common, num_per_example_loss_terms=1, separate_weight_and_bias=False)

    def split(v):
        return [t.view_as(p) for t, p in zip(v.split([p.numel() for p in params]), params)]

    def mv(op, v):
        return op @ split(v)

    def solve(op, v):
        key = "_bench_inverse"
        if not hasattr(op, key):  # curvlinops caches the factors' inverses in the inverse operator
            setattr(op, key, KFACInverseLinearOperator(op, damping=DAMPING, use_exact_damping=True))
        return getattr(op, key) @ split(v)

    def kfac(cls, fisher_type):
        def build():
            op = cls(model, loss, params, data, fisher_type=fisher_type, **kf)
            if cls is EKFACLinearOperator:
                op._maybe_compute_ekfac()
            else:
                op.compute_kronecker_factors()
            return op

        return build

    def ggn():
        return GGNLinearOperator(model, loss, params, data, **common)

    return [
        ("kfac", "curvlinops", kfac(KFACLinearOperator, FisherType.TYPE2), mv, solve, ""),
        ("kfac (MC)", "curvlinops", kfac(KFACLinearOperator, FisherType.MC), mv, solve, ""),
        ("ekfac (refit)", "curvlinops", kfac(EKFACLinearOperator, FisherType.TYPE2), mv, solve, ""),
        ("implicit GGN", "curvlinops", ggn, mv, None, ""),
    ]


def backpack(model, x, y, loader):
    from backpack import backpack as bp_ctx
    from backpack import extend
    from backpack import extensions as E
    from backpack.hessianfree.ggnvp import ggn_vector_product_from_plist

    model = extend(copy.deepcopy(model))
    lossf = extend(nn.CrossEntropyLoss())
    params = [p for p in model.parameters() if p.requires_grad]

    def ext(e):
        def build():
            model.zero_grad()
            with bp_ctx(e):
                lossf(model(x), y).backward()
            return None

        return build

    def ggnvp(_, v):
        out = model(x)
        vs = [t.view_as(p) for t, p in zip(v.split([p.numel() for p in params]), params)]
        return ggn_vector_product_from_plist(lossf(out, y), out, params, vs)

    return [
        ("diag", "BackPACK", ext(E.DiagGGNExact()), None, None, "DiagGGNExact"),
        ("diag (MC)", "BackPACK", ext(E.DiagGGNMC()), None, None, "DiagGGNMC"),
        ("kfac", "BackPACK", ext(E.KFLR()), None, None, "KFLR; factors only"),
        ("kfac (MC)", "BackPACK", ext(E.KFAC()), None, None, "KFAC; factors only"),
        ("implicit GGN", "BackPACK", lambda: None, ggnvp, None, "hessianfree.ggn_vector_product"),
    ]


def asdl(model, x, y, loader):
    import asdl as A

    model = copy.deepcopy(model)

    def fisher(kind, shape):
        def build():
            cfg = A.FisherConfig(
                fisher_type=kind,
                fisher_shapes=[shape],
                loss_type=A.LOSS_CROSS_ENTROPY,
                data_size=x.shape[0],
            )
            fm = A.get_fisher_maker(model, cfg)
            dummy = fm.setup_model_call(model, x)
            fm.setup_loss_call(Fn.cross_entropy, dummy, y)
            fm.forward_and_backward()
            return fm

        return build

    return [
        ("diag", "ASDL", fisher(A.FISHER_EXACT, A.SHAPE_DIAG), None, None, ""),
        ("diag (MC)", "ASDL", fisher(A.FISHER_MC, A.SHAPE_DIAG), None, None, ""),
        ("block-diag", "ASDL", fisher(A.FISHER_EXACT, A.SHAPE_LAYER_WISE), None, None, ""),
        ("kfac", "ASDL", fisher(A.FISHER_EXACT, A.SHAPE_KRON), None, None, ""),
        ("kfac (MC)", "ASDL", fisher(A.FISHER_MC, A.SHAPE_KRON), None, None, ""),
    ]


LIBS = {"nngeometry": nngeometry, "curvlinops": curvlinops, "backpack": backpack, "asdl": asdl}

# cases too large for this benchmark: a block of the MLP's first layer is 200 960² floats (160 GB)
SKIP = {("mlp", "block-diag")}
# block-diag last: its dense blocks (GBs for the CNN's dense layer) change the allocator's state
# for whatever runs after it
ORDER = [
    "diag",
    "diag (MC)",
    "kfac",
    "kfac (MC)",
    "ekfac (eigh only)",
    "ekfac (refit)",
    "implicit GGN",
    "implicit GGN (cache)",
    "block-diag",
]


def time_case(timer, fwd_bwd, build, mv, solve, v, big=False):
    """Ratios to one forward+backward: {build, mv1, mv, solve1, solve}.

    Every timed call is preceded by one forward+backward, and each ratio divides the best time of
    the call by the best of *those* forward+backwards: on a shared machine the load then weighs on
    both sides of a ratio alike. The first mv / solve are kept apart (they may linearise or
    factorise); the others are the best of the repeats after them.
    """
    base = []

    def paired(fn):
        base.append(timer.once(fwd_bwd)[0])
        return timer.once(fn)

    t, F = paired(build)
    times = {"build": [t]}
    for _ in range(0 if big else timer.repeats - 1):
        times["build"].append(paired(build)[0])
    for key, fn in (("mv", mv), ("solve", solve)):
        if fn is None:
            continue
        call = functools.partial(fn, F, v)
        times[key + "1"] = [paired(call)[0]]
        times[key] = times[key + "1"] + [
            paired(call)[0] for _ in range(1 if big and key == "solve" else timer.repeats)
        ]
    b = min(base)
    return {k: min(ts) / b for k, ts in times.items()}, b


def bench(name, make, timer, installed, only_reps=None, rounds=1):
    torch.manual_seed(0)
    model, shape = make()
    model = model.to(timer.device)
    x = torch.randn(shape, device=timer.device)
    y = torch.randint(0, 10, (shape[0],), device=timer.device)
    loader = [(x, y)]
    loss_fn = nn.CrossEntropyLoss()

    def fwd_bwd():
        model.zero_grad()
        loss_fn(model(x), y).backward()

    for _ in range(3):
        fwd_bwd()  # warm-up
    base_times = [timer.best(fwd_bwd, max(timer.repeats, 10))[0]]

    cases = ours(model, x, y, loader)
    for lib in installed:
        try:
            cases += LIBS[lib](model, x, y, loader)
        except Exception as e:  # a peer that does not import or set up here
            print(f"  [{lib}] skipped: {type(e).__name__}: {e}")
    torch.manual_seed(1)
    v = torch.randn(sum(p.numel() for p in model.parameters()), device=timer.device)

    results = {}
    for rnd in range(rounds):  # rounds spread each case's repeats over the run: median per cell
        for rep, lib, build, mv, solve, note in sorted(cases, key=lambda c: ORDER.index(c[0])):
            if (name, rep) in SKIP or (only_reps and rep not in only_reps):
                continue
            if rnd < rounds - 1 and rep == "block-diag":  # seconds per build: the last round only
                continue
            row = results.setdefault((rep, lib), {"rep": rep, "lib": lib, "note": note})
            try:
                ratios, b = time_case(timer, fwd_bwd, build, mv, solve, v, big=rep == "block-diag")
            except Exception as e:  # the library does not support this case
                row["note"] = f"fails: {type(e).__name__}: {str(e)[:60]}"
                continue
            base_times.append(b)
            for k, r in ratios.items():
                row.setdefault(k, []).append(r)
    results = list(results.values())
    for row in results:
        for k in ("build", "mv1", "mv", "solve1", "solve"):
            if k in row:
                row[k] = statistics.median(row[k])
    base = min(base_times)
    spread = statistics.median(base_times) / base
    print(
        f"\n{name}: one forward+backward = {base * 1e3:.2f} ms at best, median of the paired ones "
        f"{spread:.2f}× that ({timer.device}; {rounds} round(s))"
    )
    print(table(results))
    return results, base


def _fmt(row, key):
    t = row.get(key)
    return "—" if t is None else f"{t:.2f}"


def table(results):
    head = "| representation | library | build | mv | solve | 1st solve | note |"
    lines = [head, "|---|---|---:|---:|---:|---:|---|"]
    for r in results:
        cells = [r["rep"], r["lib"]] + [_fmt(r, k) for k in ("build", "mv", "solve", "solve1")]
        note = r["note"]
        if r.get("mv1") is not None and r.get("mv") and r["mv1"] > 1.5 * r["mv"]:
            note = (note + "; " if note else "") + f"1st mv {r['mv1']:.2f}"
        lines.append("| " + " | ".join(cells + [note]) + " |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--only", choices=["mlp", "cnn"], default=None)
    p.add_argument("--reps", nargs="*", default=None, help="only these representations")
    p.add_argument("--no-peers", action="store_true")
    p.add_argument(
        "--rounds", type=int, default=1, help="measure the table again, report medians per cell"
    )
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    timer = Timer(torch.device(args.device), args.repeats)
    installed = [] if args.no_peers else [m for m in PEERS if importlib.util.find_spec(m)]
    print("peers installed:", installed or "none (only nngeo_ops is timed)")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("load average at start: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    # torch imports some modules lazily at the first autograd.grad with grad_outputs and at the
    # first dual number (~0.5 s on CPU): pay that here, not in whichever case runs first
    w = torch.ones(3, requires_grad=True)
    torch.autograd.grad(w * 2, w, torch.ones(3))
    with torch.autograd.forward_ad.dual_level():  # loads the forward-mode decompositions (~0.2 s)
        torch.autograd.forward_ad.make_dual(torch.ones(1), torch.ones(1))
    for name, make in (("mlp", mlp), ("cnn", cnn)):
        if args.only in (None, name):
            bench(name, make, timer, installed, args.reps, args.rounds)
    print("load average at end: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))


if __name__ == "__main__":
    main()
