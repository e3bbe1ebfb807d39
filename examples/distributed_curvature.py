"""Data-parallel curvature with torchrun: each rank reads its shard, every rank gets the matrix of
all the data.

    torchrun --standalone --nproc-per-node 2 examples/distributed_curvature.py

Builds KFAC and the implicit GGN on sharded data (unequal shards), runs a damped CG solve on the
all-reduced implicit products, gathers the NTK Gram matrix, and — to show that nothing is
approximated — compares each with the single-process result on all the data (``process_group=False``).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

from nngeo_ops.linalg import cg
from nngeo_ops.nn import GGN, GramMatrix, PMatImplicit, PMatKFAC


def main():
    dist.init_process_group("gloo")  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR/PORT
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # the same model (and probes) on every rank
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4)).double()
    x = torch.randn(50, 6, dtype=torch.float64)
    y = torch.randint(0, 4, (50,))
    # rank r reads examples [cuts[r], cuts[r+1]): unequal shards are fine
    cuts = [round(50 * (r / world) ** 0.8) for r in range(world + 1)]
    lo, hi = cuts[rank], cuts[rank + 1]
    shard = [(x[i : min(i + 8, hi)], y[i : min(i + 8, hi)]) for i in range(lo, hi, 8)]
    loss = nn.CrossEntropyLoss()

    kfac = GGN(model, shard, loss, PMatKFAC, progress=False)  # factors all-reduced
    ggn = GGN(model, shard, loss, PMatImplicit, progress=False)  # products all-reduced
    v = torch.randn(kfac.size(0), dtype=torch.float64)  # same on every rank (same seed)
    sol, info = cg(lambda z: ggn.op @ z + 0.1 * z, v, tol=1e-12)
    ntk = GramMatrix(model, [(b[0],) for b in shard], progress=False)  # gathered, replicated

    # the single-process results on all the data, for comparison
    full = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 50, 8)]
    ref_kfac = GGN(model, full, loss, PMatKFAC, progress=False, process_group=False)
    ref_ggn = GGN(model, full, loss, PMatImplicit, progress=False, process_group=False)
    ref_sol, _ = cg(lambda z: ref_ggn.op @ z + 0.1 * z, v, tol=1e-12)
    ref_ntk = GramMatrix(model, x, progress=False, process_group=False)
    errs = {
        "KFAC": (kfac.to_torch() - ref_kfac.to_torch()).abs().max(),
        "CG solve": (sol - ref_sol).abs().max(),
        "NTK": (ntk.to_torch() - ref_ntk.to_torch()).abs().max(),
    }
    worst = max(float(e) for e in errs.values())
    print(
        f"rank {rank}/{world}: {hi - lo} examples, CG {info.iterations} iterations, "
        f"max difference with one process {worst:.1e}",
        flush=True,
    )
    if rank == 0:
        print("OK" if worst < 1e-10 else f"MISMATCH {errs}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
