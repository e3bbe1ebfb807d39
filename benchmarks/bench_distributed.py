"""Data-parallel curvature: a GGN product and a KFAC build with 1 and 2 processes on the same data.

The total data (N examples of an MLP) are split into equal shards, one per process (gloo on the
CPU, spawned with ``torch.multiprocessing``, file rendezvous). Each process times, after a warm-up,

* ``KFAC build``: ``GGN(model, shard, CrossEntropyLoss(), PMatKFAC)`` — one pass over its shard and
  the bucketed all-reduce of the factors (upper triangles);
* ``GGN product``: one product ``F.op @ v`` of the implicit GGN (``PMatImplicit``), the all-reduce of
  the per-shard products (with its same-vector check);

and the slowest rank's time is reported (the collective makes every rank wait for it), as a ratio to
one plain forward + backward of the model on all N examples in one process, timed in the same run.

On a machine with 2 shared CPU cores this measures the **overhead** of the distributed path
(process start excluded, collectives, the sharded passes competing for the same cores), not a
speed-up: with each process given one thread, the 2-process run does the same arithmetic on the same
cores as the 1-process run. No peer library distributes curvature (curvlinops, laplace-torch,
PyHessian have no distributed code), so there is no peer column.

Run: ``python benchmarks/bench_distributed.py [--quick] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

if importlib.util.find_spec("nngeo_ops") is None:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nngeo_ops.nn import GGN, PMatImplicit, PMatKFAC  # noqa: E402


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10))


def _data(n):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 256, generator=g), torch.randint(0, 10, (n,), generator=g)


def _best(fn, repeats):
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        if dist.is_initialized():
            dist.barrier()
        t = time.perf_counter()
        fn()
        if dist.is_initialized():
            dist.barrier()  # the slowest rank's time
        best = min(best, time.perf_counter() - t)
    return best


def _measure(rank, world, n, repeats):
    torch.set_num_threads(1)
    model, (x, y) = _model(), _data(n)
    lo, hi = rank * n // world, (rank + 1) * n // world
    shard = [(x[i : min(i + 128, hi)], y[i : min(i + 128, hi)]) for i in range(lo, hi, 128)]
    ce = nn.CrossEntropyLoss()
    kfac = _best(lambda: GGN(model, shard, ce, PMatKFAC, progress=False), repeats)
    f = GGN(model, shard, ce, PMatImplicit, progress=False)
    v = torch.randn(sum(p.numel() for p in model.parameters()), generator=torch.Generator())
    prod = _best(lambda: f.op @ v, repeats)
    return kfac, prod


def _worker(rank, world, init, out, n, repeats):
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        res = _measure(rank, world, n, repeats)
        if rank == 0:
            torch.save(res, out)
    finally:
        dist.destroy_process_group()


def _forward_backward(n, repeats):
    torch.set_num_threads(1)
    model, (x, y) = _model(), _data(n)
    ce = nn.CrossEntropyLoss()

    def step():
        model.zero_grad()
        for i in range(0, n, 128):
            ce(model(x[i : i + 128]), y[i : i + 128]).backward()

    return _best(step, repeats)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    n, repeats = (512, 2) if args.quick else (2048, 5)
    base = _forward_backward(n, repeats)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for world in (1, 2):
            if world == 1:
                kfac, prod = _measure(0, 1, n, repeats)
            else:
                out = os.path.join(tmp, "res.pt")
                mp.spawn(
                    _worker,
                    args=(world, os.path.join(tmp, "init"), out, n, repeats),
                    nprocs=world,
                    join=True,
                )
                kfac, prod = torch.load(out)
            rows.append((world, kfac, prod))
    lines = [
        f"MLP 256-128-10, N = {n} examples in all (equal shards), gloo on CPU, 1 thread per "
        f"process, {os.cpu_count()} CPU cores; plain forward+backward on all data: "
        f"{base * 1e3:.1f} ms. On 2 cores the 2-process rows measure overhead, not speed-up.",
        "",
        "| processes | KFAC build (ms) | ratio to fwd+bwd | GGN product (ms) | ratio to fwd+bwd |",
        "|---|---|---|---|---|",
    ]
    for world, kfac, prod in rows:
        lines.append(
            f"| {world} | {kfac * 1e3:.1f} | {kfac / base:.2f} | {prod * 1e3:.1f} | "
            f"{prod / base:.2f} |"
        )
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "bench_distributed.md").write_text(text + "\n")
    return text


if __name__ == "__main__":
    main()
