"""Workers of the distributed tests: each rank builds every representation on its shard and compares
it with the single-process result on the union of the shards (``process_group=False``), computed on
the same rank. Run by ``torch.multiprocessing.spawn`` from ``test_distributed.py``."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

from nngeo_ops.errors import DataError
from nngeo_ops.linalg import cg, hutchpp, lanczos
from nngeo_ops.nn import (
    FIM,
    GGN,
    CrossGramMatrix,
    GramMatrix,
    Hessian,
    Jacobian,
    JacobianGenerator,
    PMatBlockDiag,
    PMatDense,
    PMatDiag,
    PMatEKFAC,
    PMatImplicit,
    PMatKFAC,
    PMatLowRank,
    PMatQuasiDiag,
)
from nngeo_ops.nn.engine.distributed import Communicator, resolve_group

SHARDS = {2: [7, 6], 3: [6, 4, 3]}  # unequal shards, 13 examples in all
BATCH = 3


class ConvNet(nn.Module):
    """Conv (several positions per example, KFAC expand), a wide Linear and a small head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 3, 3, padding=1)
        self.fc = nn.Linear(3 * 4, 5)
        self.out = nn.Linear(5, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.fc(torch.tanh(self.conv(x)).flatten(1))))


def _data(n=13):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 2, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    y[2] = -100  # an ignored target: mean reductions divide by the non-ignored ones
    wide_x = torch.randn(n, 24, generator=g, dtype=torch.float64)
    return x, y, wide_x


def _batches(x, y, lo, hi):
    return [(x[i : min(i + BATCH, hi)], y[i : min(i + BATCH, hi)]) for i in range(lo, hi, BATCH)]


def _dense(m):
    return m.to_torch() if hasattr(m, "to_torch") else m


def run_checks(rank, shards, pg=None):
    """{check name: tensor} built on this rank's shard (``pg=None``: over the initialised group).

    The test calls it once more without a group on a single shard of all 13 examples: the
    single-process reference on the union of the shards (same models, data and probes)."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = ConvNet().double()
    wide = nn.Sequential(nn.Linear(24, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    wider = nn.Sequential(nn.Linear(64, 3)).double()
    x, y, wx = _data()
    g = torch.Generator().manual_seed(3)
    wx64 = torch.randn(13, 64, generator=g, dtype=torch.float64)
    lo = sum(shards[:rank])
    hi = lo + shards[rank]
    local, wlocal, w64local = (_batches(t, y, lo, hi) for t in (x, wx, wx64))
    ce = nn.CrossEntropyLoss()
    kw = {"progress": False, "process_group": pg}
    out = {}

    for rep in (
        PMatDense,
        PMatDiag,
        PMatBlockDiag,
        PMatKFAC,
        PMatEKFAC,
        PMatQuasiDiag,
        PMatLowRank,
    ):
        out[f"FIM {rep.__name__}"] = FIM(model, local, rep, **kw).to_torch()
    for rep in (PMatDense, PMatKFAC, PMatLowRank):  # mean over the non-ignored targets
        out[f"GGN CE(ignore) {rep.__name__}"] = GGN(model, local, ce, rep, **kw).to_torch()
    f = FIM(model, local, PMatKFAC, kfac_mode="reduce", **kw)
    out["FIM KFAC reduce"] = f.to_torch()
    f = FIM(model, local, PMatEKFAC, **kw)  # the bases (up to signs) and the refit diagonals
    out["EKFAC bases and diag"] = torch.cat(
        [
            torch.cat([v["QA"].abs().reshape(-1), v["QG"].abs().reshape(-1), v["diag"]])
            for v in f.data.values()
            if "diag" in v
        ]
    )
    # low-rank input factors: rows gathered (64 wide) or densified when the union has too many
    for name, m, d in (("rows gathered", wider, w64local), ("rows densified", wide, wlocal)):
        f = FIM(m, d, PMatKFAC, **kw)
        out[f"KFAC low-rank A {name}"] = f.to_torch()
        out[f"KFAC low-rank A {name} form"] = torch.tensor(float("A_rows" in f.data["0"]))
    for rep in (PMatDense, PMatBlockDiag, PMatDiag):
        out[f"Hessian {rep.__name__}"] = Hessian(model, local, ce, rep, **kw).to_torch()

    # implicit products: all-reduced, so iterative algorithms run unchanged on top
    p = sum(q.numel() for q in model.parameters())
    v = torch.randn(p, 3, generator=torch.Generator().manual_seed(7), dtype=torch.float64)

    def cached(generator, examples):
        return PMatImplicit(generator, examples=examples, cache=True)

    for kind, f in (
        ("GGN", GGN(model, local, ce, PMatImplicit, **kw)),
        ("Hessian", Hessian(model, local, ce, PMatImplicit, **kw)),
        ("Fisher cached", FIM(model, local, cached, **kw)),
    ):
        out[f"implicit {kind} matmat"] = f.op @ v
        if kind == "Hessian":
            continue
        out[f"implicit {kind} CG"] = cg(lambda z, f=f: f.op @ z + 0.5 * z, v, tol=1e-13)[0]
        out[f"implicit {kind} Lanczos"] = lanczos(
            f.op, k=3, num_iter=40, generator=torch.Generator().manual_seed(1)
        )[0]
        est = hutchpp(f.op, 12, generator=torch.Generator().manual_seed(2))
        out[f"implicit {kind} Hutch++"] = torch.as_tensor(est.value)
    if pg is None:  # probes drawn differently on different ranks: every rank raises
        f = GGN(model, local, ce, PMatImplicit, **kw)
        g = torch.Generator().manual_seed(100 + rank)
        try:
            f.op @ torch.randn(p, generator=g, dtype=torch.float64)
            out["different probes raise"] = torch.tensor(0.0)
        except DataError:
            out["different probes raise"] = torch.tensor(1.0)

    # function space: the Gram matrix gathered, the Jacobian sharded
    xs = [(b[0],) for b in local]  # a loader of input-only batches (one rule: nn.batching)
    out["GramMatrix"] = GramMatrix(model, xs, **kw).to_torch()
    out["CrossGramMatrix"] = CrossGramMatrix(model, xs, xs, **kw).to_torch()
    j = Jacobian(generator=JacobianGenerator(model, process_group=pg), loader=xs)
    c = j.n_output
    u_full = torch.randn(c, 13, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    out["Jacobian J.T @ u (sharded u)"] = j.T @ u_full[:, lo:hi].reshape(-1)
    w = torch.randn(p, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    out["Jacobian J @ v (rows of this shard)"] = (j @ w).view(c, -1)
    # the bucketed sum of a (P, 1) column with strides (1, P) (a transposed gradient row) on some
    # ranks and a contiguous one on others, next to a symmetric matrix in the same bucket
    col = wx[lo:hi].sum(0).reshape(1, -1).T
    if rank % 2:
        col = col.contiguous()
    sym = wx[lo:hi].T @ wx[lo:hi]
    grp = resolve_group(pg)
    if grp is not None:
        comm = Communicator(grp)
        comm.sum(sym, symmetric=True)
        comm.sum(col)
        comm.flush()
    out["Communicator strided column"] = torch.cat([col.reshape(-1), sym.reshape(-1)])
    out.update(app_checks(rank, shards, pg))
    return out


def app_checks(rank, shards, pg):
    """A natural-gradient step of a DDP model, a Laplace marginal likelihood, an EWC penalty."""
    from torch.nn.parallel import DistributedDataParallel

    from nngeo_ops.apps import EWC, Laplace, NaturalGradient

    out = {}
    x, y, _ = _data()
    y = y.clamp_min(0)  # the apps' losses take every target
    world, lo = len(shards), sum(shards[:rank])
    local = _batches(x, y, lo, lo + shards[rank])

    def mlp():
        torch.manual_seed(4)
        return nn.Sequential(nn.Flatten(), nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 3)).double()

    # DDP averages the per-rank mean gradients: equal shards of the first 12 examples
    lo, hi = rank * 12 // world, (rank + 1) * 12 // world
    xb, yb = x[lo:hi], y[lo:hi]
    for rep in (PMatKFAC, PMatEKFAC, PMatDense):
        net = mlp()
        model = DistributedDataParallel(net) if pg is None else net
        before = torch.cat([q.detach().reshape(-1) for q in net.parameters()])
        opt = NaturalGradient(model, lr=0.5, representation=rep, damping=1e-2, fisher="exact")
        opt.zero_grad()
        nn.functional.cross_entropy(model(xb), yb).backward()
        opt.step(batch=(xb, yb))
        after = torch.cat([q.detach().reshape(-1) for q in net.parameters()])
        out[f"NaturalGradient DDP step {rep.__name__}"] = after - before
    for rep in (PMatKFAC, PMatDiag, PMatDense):
        lap = Laplace(mlp(), local, representation=rep, prior_precision=0.7)
        out[f"Laplace log marginal likelihood {rep.__name__}"] = lap.log_marginal_likelihood()
    net = mlp()
    ewc = EWC(net, strength=2.0)
    ewc.add_task(local, representation=PMatKFAC)
    with torch.no_grad():
        for q in net.parameters():
            q.add_(0.1)
    out["EWC penalty"] = ewc.penalty().detach()
    return out


def worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        res = run_checks(rank, SHARDS[world])
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
