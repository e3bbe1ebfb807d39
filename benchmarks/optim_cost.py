"""Per-step cost of natural-gradient training against SGD, in CPU time (a loaded machine's wall
time is meaningless): ``time.process_time`` with torch pinned to one thread.

    python benchmarks/optim_cost.py [--models cnn mlp] [--warmup 200] [--window 100] [--rounds 2]
        [--configs "SGD" "u=10" "u=100" "u=10 β=0" "u=100 β=0" "u=10 inv=100"] [--profile LABEL]

Each configuration trains its own copy of the model (same initialisation, the same 8 batches in
turn, a learning rate small enough to stay finite) for ``--warmup`` steps, so that the moving
average of the KFAC factors reaches its steady state (an input factor gathered from 128 rows per
refresh is full rank after 16 refreshes), then ``--rounds`` windows of ``--window`` steps (a whole
number of refreshes) are timed, the configurations interleaved round by round. Each cell is the
median over rounds of the mean CPU time of a step (forward, backward, optimiser step); the ratio is
to the SGD row (``torch.optim.SGD``, momentum 0.9). ``--profile LABEL`` prints a cProfile (CPU
time) of one timed window of that configuration instead.

Natural gradient: ``NaturalGradient(PMatKFAC, fisher="mc", damping=1, momentum=0.9)`` as in
``bench_optim.py``, ``ema_decay`` 0.95 unless ``β=0``, ``inverse_every`` = ``update_every`` unless
``inv=``; ``π`` rows use ``pi_damping=True`` (the factored damping, an approximation).
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import os
import pstats
import statistics
import sys
import time
import warnings

import torch
import torch.nn.functional as Fn

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]
from bench_optim import make_data  # noqa: E402
from models import cnn, mlp  # noqa: E402

from nngeo_ops.apps import NaturalGradient  # noqa: E402
from nngeo_ops.nn import PMatKFAC  # noqa: E402

MODELS = {"cnn": cnn, "mlp": mlp}
CONFIGS = {
    "SGD": None,
    "u=10": dict(update_every=10, ema_decay=0.95),
    "u=100": dict(update_every=100, ema_decay=0.95),
    "u=10 β=0": dict(update_every=10, ema_decay=0.0),
    "u=100 β=0": dict(update_every=100, ema_decay=0.0),
    "u=10 inv=100": dict(update_every=10, inverse_every=100, ema_decay=0.95),
    # Martens & Grosse's factored damping: an explicit approximation of (F + λI)⁻¹, whose factor
    # inverses need no eigendecomposition of the averaged (full-rank) input factor
    "u=10 π": dict(update_every=10, ema_decay=0.95, pi_damping=True),
    "u=100 π": dict(update_every=100, ema_decay=0.95, pi_damping=True),
}


def make(label, model):
    cfg = CONFIGS[label]
    if cfg is None:
        opt = torch.optim.SGD(model.parameters(), lr=0.005, momentum=0.9)

        def step(x, y):
            opt.zero_grad()
            Fn.cross_entropy(model(x), y).backward()
            opt.step()

        return step
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = NaturalGradient(
            model,
            lr=0.005,
            representation=PMatKFAC,
            damping=1.0,
            fisher="mc",
            momentum=0.9,
            generator=torch.Generator().manual_seed(0),
            **cfg,
        )

    def step(x, y):
        opt.zero_grad()
        Fn.cross_entropy(model(x), y).backward()
        opt.step(batch=(x, y))

    step.opt = opt
    return step


def run(name, labels, args):
    base, _ = MODELS[name]()
    data = make_data(name, 8, torch.device("cpu"))
    steps = {lab: make(lab, copy.deepcopy(base)) for lab in labels}
    for st in steps.values():
        for i in range(args.warmup):
            st(*data[i % 8])
    if args.profile:
        st = steps[args.profile]
        pr = cProfile.Profile(time.process_time)
        pr.enable()
        for i in range(args.window):
            st(*data[i % 8])
        pr.disable()
        pstats.Stats(pr).sort_stats("tottime").print_stats(args.rows)
        pstats.Stats(pr).sort_stats("cumtime").print_stats(args.rows)
        return {}
    times = {lab: [] for lab in labels}
    for _ in range(args.rounds):
        for lab, st in steps.items():
            t = time.process_time()
            for i in range(args.window):
                st(*data[i % 8])
            times[lab].append((time.process_time() - t) / args.window)
    return {lab: statistics.median(v) for lab, v in times.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="*", default=["cnn", "mlp"], choices=list(MODELS))
    ap.add_argument("--configs", nargs="*", default=["SGD", "u=10", "u=100"])
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--window", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--profile", default=None, help="cProfile one window of this configuration")
    ap.add_argument("--rows", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(1)
    labels = list(dict.fromkeys(["SGD", *args.configs]))
    if args.profile:
        labels = [args.profile]
    print(
        f"CPU time (time.process_time), 1 thread, torch {torch.__version__}; warm-up "
        f"{args.warmup} steps, {args.rounds} windows of {args.window} steps, median\n"
    )
    print("| model | optimiser | CPU ms / step | × SGD step |\n|---|---|---|---|")
    for name in args.models:
        res = run(name, labels, args)
        for lab, t in res.items():
            print(f"| {name} | {lab} | {t * 1e3:.1f} | {t / res['SGD']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
