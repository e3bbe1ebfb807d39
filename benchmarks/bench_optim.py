"""Natural-gradient training: time per step, optimiser memory and loss curves, against SGD, Adam and
ASDL's KFAC (KFAC-pytorch where it imports).

Models: the MLP (784-256-128-10, batch 256) and the CNN (two conv layers on 3×32×32, batch 128) of
``bench_curvature.py``, and a small transformer classifier (Embedding 100×64, one
``TransformerEncoderLayer`` with 4 heads and a 128-wide feed-forward, sequences of 16 tokens, batch
64); float32, CPU unless ``--device``. Labels come from a random teacher network of the same
architecture, so that the task is learnable.

Time per step (``opt.zero_grad(); loss.backward(); step``, forward included) is averaged over a
window of steps holding a whole number of curvature refreshes (10 steps for update_every=1, 50 for
10, 100 for 100), after a warm-up window; the windows of all optimisers are interleaved in
``--rounds`` rounds and each cell is the median over rounds, so that the load of other processes
weighs on every optimiser alike. Ratios are to one plain forward+backward (``fwd+bwd``, measured in
every round) and to one SGD step (``/SGD``): the issue's target is KFAC ≤ 1.3× SGD with
update_every=10 and ≤ 1.1× with update_every=100. ``state MB``: tensors held by the optimiser
(momentum, Adam moments, curvature statistics and the factors of the current operator; not the
transient cost of a refresh). Loss curves: ``--steps`` steps of each optimiser from the same
initialisation and the same batches; a PNG of loss against steps and against wall time; the notes
give each trained model's mean loss over all the batches of its run (one batch's loss says more
about the batch than about the optimiser). CPU time per step at the steady state of the moving
averages: ``benchmarks/optim_cost.py``.

Ours: ``NaturalGradient`` with KFAC, MC Fisher (one sample), ``ema_decay=0.95``, λ = 1 exact
damping, momentum 0.9; the statistics come from the training step's own forward/backward (one
extra partial backward of sampled labels on refresh steps). ASDL: ``KfacGradientMaker`` (MC Fisher,
its own damping convention: λ = 0.1 added to each factor) with ``torch.optim.SGD`` (momentum 0.9), in the
same process (run with a Python where ``asdl`` imports, e.g. /work/venv-peers/bin/python; its NVTX
calls are stubbed on CPU). KFAC-pytorch (``kfac``) is listed when it imports, else skipped with a note.

Run: ``python benchmarks/bench_optim.py [--quick] [--out DIR] [--rounds 2] [--steps 60]
[--only mlp cnn transformer] [--device cuda]``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import os
import statistics
import sys
import time
import warnings

import torch
import torch.nn.functional as Fn
from torch import nn

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]  # the benchmark models; this checkout
from models import cnn, mlp  # noqa: E402  (the models of the curvature benchmark)

from nngeo_ops.apps import NaturalGradient  # noqa: E402
from nngeo_ops.nn import PMatEKFAC, PMatKFAC  # noqa: E402

DAMPING = {"NG": 1.0, "ASDL": 0.1}  # picked by a short trial on the CNN (not tuned)
BATCH = [0]  # the batch size of the model being run (ASDL's data_size)
LR = {"SGD": 0.05, "Adam": 1e-3, "NG": 0.05, "ASDL": 0.02}


class TinyTransformer(nn.Module):
    def __init__(self, vocab=100, d=64, heads=4, ff=128, classes=10):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.enc = nn.TransformerEncoderLayer(d, heads, ff, dropout=0.0, batch_first=True)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        return self.head(self.enc(self.emb(x)).mean(1))


def transformer():
    return TinyTransformer(), (64, 16)


MODELS = {"mlp": mlp, "cnn": cnn, "transformer": transformer}


def make_data(name, n_batches, device, seed=0):
    """Batches with labels of a random teacher of the same architecture."""
    torch.manual_seed(seed + 1)
    teacher, shape = MODELS[name]()
    teacher = teacher.to(device)
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        if name == "transformer":
            x = torch.randint(0, 100, shape, generator=g)
        else:
            x = torch.randn(*shape, generator=g)
        x = x.to(device)
        with torch.no_grad():
            y = teacher(x).argmax(1)
        out.append((x, y))
    return out


# ---------------------------------------------------------------------- optimisers
def _stub_nvtx():
    """ASDL calls torch.cuda.nvtx directly, which raises on a CPU build."""
    if torch.cuda.is_available():
        return

    class NoRange(contextlib.ContextDecorator):
        def __init__(self, *a, **k):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    nvtx = torch.cuda.nvtx
    nvtx.range_push = lambda *a, **k: None
    nvtx.range_pop = lambda *a, **k: None
    nvtx.range = NoRange


class Runner:
    """One optimiser on one model: ``step(x, y)`` is a whole training step."""

    def __init__(self, label, model, make):
        self.label, self.model = label, model
        self.opt, self._step = make(model)

    def step(self, x, y):
        return self._step(self.model, self.opt, x, y)


def torch_step(model, opt, x, y):
    opt.zero_grad()
    loss = Fn.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return loss.detach()


def ng_step(model, opt, x, y):
    opt.zero_grad()
    loss = Fn.cross_entropy(model(x), y)
    loss.backward()
    opt.step(batch=(x, y))
    return loss.detach()


def ours(rep, update_every, ema_decay=0.95):
    def make(model):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the transformer's attention weights: plain SGD
            opt = NaturalGradient(
                model,
                lr=LR["NG"],
                representation=rep,
                damping=DAMPING["NG"],
                fisher="mc",
                update_every=update_every,
                ema_decay=ema_decay,
                momentum=0.9,
                generator=torch.Generator().manual_seed(0),
            )
        return opt, ng_step

    return make


def asdl_kfac(update_every):
    def make(model):
        _stub_nvtx()
        import asdl

        cfg = asdl.PreconditioningConfig(
            data_size=BATCH[0],  # the Fisher as a mean over the batch, as ours
            damping=DAMPING["ASDL"],
            preconditioner_upd_interval=update_every,
            curvature_upd_interval=update_every,
            ema_decay=0.05,  # ASDL: ema = ema·(1 − d) + new·d, i.e. our β = 0.95
            ignore_modules=[nn.MultiheadAttention, nn.LayerNorm, nn.Embedding],
        )
        gm = asdl.KfacGradientMaker(model, cfg, fisher_type=asdl.FISHER_MC)
        opt = torch.optim.SGD(model.parameters(), lr=LR["ASDL"], momentum=0.9)

        def step(model, opt, x, y):
            opt.zero_grad()
            dummy = gm.setup_model_call(model, x)
            gm.setup_loss_call(Fn.cross_entropy, dummy, y)
            _, loss = gm.forward_and_backward()
            opt.step()
            return loss.detach()

        return opt, step

    return make


def optimisers(quick, peers):
    cases = [
        (
            "SGD",
            lambda m: (torch.optim.SGD(m.parameters(), lr=LR["SGD"], momentum=0.9), torch_step),
            1,
        ),
        ("Adam", lambda m: (torch.optim.Adam(m.parameters(), lr=LR["Adam"]), torch_step), 1),
        ("KFAC u=10 (ours)", ours(PMatKFAC, 10), 10),
    ]
    if not quick:
        cases += [
            ("KFAC u=100 (ours)", ours(PMatKFAC, 100), 100),
            ("KFAC u=10 β=0 (ours)", ours(PMatKFAC, 10, 0.0), 10),
            ("KFAC u=100 β=0 (ours)", ours(PMatKFAC, 100, 0.0), 100),
            ("EKFAC u=10 (ours)", ours(PMatEKFAC, 10), 10),
        ]
    notes = []
    if peers and importlib.util.find_spec("asdl") is not None:
        cases += [("KFAC u=10 (ASDL)", asdl_kfac(10), 10)]
    elif peers:
        notes.append("ASDL (asdl) does not import in this Python: skipped")
    if peers and importlib.util.find_spec("kfac") is not None:
        notes.append("KFAC-pytorch imports but is not wired into this benchmark yet")
    elif peers:
        notes.append("KFAC-pytorch (kfac) does not import in this Python: skipped")
    return cases, notes


# ---------------------------------------------------------------------- measurements
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def state_mb(opt) -> float:
    seen, total = set(), 0

    def walk(o):
        nonlocal total
        if torch.is_tensor(o):
            if id(o) not in seen:
                seen.add(id(o))
                total += o.numel() * o.element_size()
        elif isinstance(o, dict):
            for v in o.values():
                walk(v)
        elif isinstance(o, list | tuple):
            for v in o:
                walk(v)

    walk(opt.state_dict() if hasattr(opt, "state_dict") else {})
    return total / 2**20


def window_of(u: int) -> int:
    return {1: 10, 10: 50, 100: 100}[u]


def bench_model(name, args, device, peers):
    cases, notes = optimisers(args.quick, peers)
    base, shape = MODELS[name]()
    base = base.to(device)
    BATCH[0] = shape[0]
    data = make_data(name, 8, device)
    runners, errors = [], {}
    for label, make, u in cases:
        try:
            r = Runner(label, copy.deepcopy(base), make)
            r.u = u
            r.step(*data[0])  # one step: lazy imports, first refresh
            runners.append(r)
        except Exception as err:  # a peer that does not support the model
            errors[label] = f"{type(err).__name__}: {str(err)[:80]}"
    # plain forward+backward of the same model, for the ratios
    fb_model = copy.deepcopy(base)

    def fwd_bwd(x, y):
        fb_model.zero_grad()
        Fn.cross_entropy(fb_model(x), y).backward()

    # timing cycles 8 batches many times: a tenth of the learning rates keeps every run finite
    for r in runners:
        for group in r.opt.param_groups:
            group["lr"] *= 0.1
    times = {r.label: [] for r in runners}
    fb = []
    for rnd in range(args.rounds):
        for r in list(runners):
            w = window_of(r.u) if not args.quick else min(window_of(r.u), 20)
            for i in range(2 if rnd == 0 else 0):  # warm-up
                r.step(*data[i % len(data)])
            sync(device)
            t = time.perf_counter()
            try:
                for i in range(w):
                    r.step(*data[i % len(data)])
            except Exception as err:  # diverged: reported in the table, not timed further
                errors[r.label] = f"failed in the timing window: {type(err).__name__}"
                runners.remove(r)
                continue
            sync(device)
            times[r.label].append((time.perf_counter() - t) / w)
            t = time.perf_counter()
            for i in range(5):
                fwd_bwd(*data[i % len(data)])
            sync(device)
            fb.append((time.perf_counter() - t) / 5)
    fbm = statistics.median(fb)
    sgd = statistics.median(times["SGD"]) if "SGD" in times else float("nan")
    rows = []
    for r in runners:
        t = statistics.median(times[r.label])
        rows.append((name, r.label, t * 1e3, t / fbm, t / sgd, state_mb(r.opt)))
    for label, err in errors.items():
        rows.append((name, label, None, None, None, err))
    curves = train_curves(name, base, cases, errors, args, device)
    return rows, fbm, curves, notes


def train_curves(name, base, cases, errors, args, device):
    steps = args.steps
    data = make_data(name, steps, device, seed=1)
    curves = {}
    for label, make, _ in cases:
        if label in errors:
            continue
        r = Runner(label, copy.deepcopy(base), make)
        losses, clock, t0 = [], [], time.perf_counter()
        try:
            for x, y in data:
                losses.append(float(r.step(x, y)))
                clock.append(time.perf_counter() - t0)
        except Exception as err:  # a diverging run ends its curve
            print(f"  {name} {label}: stopped at step {len(losses)} ({type(err).__name__})")
        # the loss of one batch moves more from batch to batch than between optimisers after a few
        # steps (SGD and Adam printed the same last loss to 3 decimals): compare the trained models
        # on the same data instead, the mean loss over every batch of the run
        with torch.no_grad():
            final = sum(float(Fn.cross_entropy(r.model(x), y)) for x, y in data) / len(data)
        curves[label] = (losses, clock, final)
    return curves


def plot(curves_by_model, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(curves_by_model)
    fig, axes = plt.subplots(2, n, figsize=(4.5 * n, 7), squeeze=False)
    for j, (name, curves) in enumerate(curves_by_model.items()):
        for label, (losses, clock, _) in curves.items():
            axes[0, j].plot(range(1, len(losses) + 1), losses, label=label)
            axes[1, j].plot(clock, losses, label=label)
        axes[0, j].set_title(name)
        axes[0, j].set_xlabel("step")
        axes[1, j].set_xlabel("wall time (s)")
        for i in range(2):
            axes[i, j].set_ylabel("training loss")
            axes[i, j].set_yscale("log")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--quick", action="store_true", help="the MLP, SGD/Adam/KFAC u=10 (+ ASDL) (< 20 s)"
    )
    ap.add_argument("--out", default=None, help="write bench_optim.md and bench_optim.png there")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None, help="steps of the loss curves")
    ap.add_argument("--only", nargs="*", choices=list(MODELS), default=None)
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch threads on CPU (default 1)")
    args = ap.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    if args.rounds is None:
        args.rounds = 1 if args.quick else 2
    if args.steps is None:
        args.steps = 10 if args.quick else 60
    device = torch.device(args.device)
    names = args.only or (["mlp"] if args.quick else list(MODELS))
    lines = [
        "| model | optimiser | ms / step | × fwd+bwd | × SGD step | state MB |",
        "|---|---|---|---|---|---|",
    ]
    curves, notes, fbs = {}, [], {}
    for name in names:
        rows, fbm, c, n = bench_model(name, args, device, not args.no_peers)
        curves[name], fbs[name] = c, fbm
        notes += [x for x in n if x not in notes]
        for model, label, ms, rf, rs, mem in rows:
            if ms is None:
                lines.append(f"| {model} | {label} | – | – | – | {mem} |")
            else:
                lines.append(f"| {model} | {label} | {ms:.1f} | {rf:.2f} | {rs:.2f} | {mem:.2f} |")
        for label, (losses, _, final) in c.items():
            if losses:
                notes.append(
                    f"{name} {label}: first batch loss {losses[0]:.4f}; after {len(losses)} steps, "
                    f"mean loss over the {len(losses)} batches {final:.4f}"
                )
    header = [
        f"device: {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"rounds {args.rounds}; fwd+bwd ms: "
        + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in fbs.items()),
        f"learning rates: {LR}; damping {DAMPING}",
        "",
    ]
    text = "\n".join(header + lines + [""] + [f"- {n}" for n in notes]) + "\n"
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench_optim.md"), "w") as f:
            f.write(text)
        try:
            plot(curves, os.path.join(args.out, "bench_optim.png"))
        except ImportError:
            print("matplotlib is missing: no plot (pip install matplotlib)")


if __name__ == "__main__":
    main()
