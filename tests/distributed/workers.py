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


def run_checks(rank, world, shards):
    """{check name: max abs difference with the single-process result on all data}."""
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
    local, full = _batches(x, y, lo, hi), _batches(x, y, 0, 13)
    wlocal, wfull = _batches(wx, y, lo, hi), _batches(wx, y, 0, 13)
    w64local, w64full = _batches(wx64, y, lo, hi), _batches(wx64, y, 0, 13)
    ce = nn.CrossEntropyLoss()
    out = {}

    def compare(name, build, m=model, a=local, b=full, get=_dense):
        got = get(build(m, a, None))
        ref = get(build(m, b, False))
        out[name] = float((got - ref).abs().max()) / max(float(ref.abs().max()), 1e-300)

    for rep in (
        PMatDense,
        PMatDiag,
        PMatBlockDiag,
        PMatKFAC,
        PMatEKFAC,
        PMatQuasiDiag,
        PMatLowRank,
    ):
        compare(
            f"FIM {rep.__name__}",
            lambda m, d, pg, rep=rep: FIM(m, d, rep, progress=False, process_group=pg),
        )
        compare(
            f"GGN CE(ignore) {rep.__name__}",
            lambda m, d, pg, rep=rep: GGN(m, d, ce, rep, progress=False, process_group=pg),
        )
    # the reduce form of KFAC (weight sharing) and the EKFAC bases / refit diagonal themselves
    compare(
        "FIM KFAC reduce",
        lambda m, d, pg: FIM(m, d, PMatKFAC, progress=False, process_group=pg, kfac_mode="reduce"),
    )

    def ekfac_parts(f):
        return torch.cat(
            [
                torch.cat([v["QA"].abs().reshape(-1), v["QG"].abs().reshape(-1), v["diag"]])
                for v in f.data.values()
                if "diag" in v
            ]
        )

    compare(
        "EKFAC bases and diag",
        lambda m, d, pg: FIM(m, d, PMatEKFAC, progress=False, process_group=pg),
        get=ekfac_parts,
    )
    # low-rank input factors: rows gathered (64 wide) or densified when the union has too many
    for name, m, a, b in (
        ("rows gathered", wider, w64local, w64full),
        ("rows densified", wide, wlocal, wfull),
    ):
        compare(
            f"KFAC low-rank A {name}",
            lambda m, d, pg: FIM(m, d, PMatKFAC, progress=False, process_group=pg),
            m,
            a,
            b,
        )
        f = FIM(m, a, PMatKFAC, progress=False)
        out[f"KFAC low-rank A {name} form"] = float(("A_rows" in f.data["0"]) != (m is wider))
    for rep in (PMatDense, PMatBlockDiag, PMatDiag):
        compare(
            f"Hessian {rep.__name__}",
            lambda m, d, pg, rep=rep: Hessian(m, d, ce, rep, progress=False, process_group=pg),
        )

    # implicit products: all-reduced, so iterative algorithms run unchanged on top
    p = sum(q.numel() for q in model.parameters())
    gv = torch.Generator().manual_seed(7)
    v = torch.randn(p, 3, generator=gv, dtype=torch.float64)
    for kind, build in (
        ("GGN", lambda d, pg: GGN(model, d, ce, PMatImplicit, progress=False, process_group=pg)),
        (
            "Hessian",
            lambda d, pg: Hessian(model, d, ce, PMatImplicit, progress=False, process_group=pg),
        ),
        (
            "Fisher cached",
            lambda d, pg: FIM(
                model,
                d,
                lambda generator, examples: PMatImplicit(generator, examples=examples, cache=True),
                progress=False,
                process_group=pg,
            ),
        ),
    ):
        fd, fr = build(local, None), build(full, False)
        rel = lambda a, b: float((a - b).abs().max()) / float(b.abs().max())  # noqa: E731
        out[f"implicit {kind} matmat"] = rel(fd.op @ v, fr.op @ v)
        if kind != "Hessian":
            sd, _ = cg(lambda z, f=fd: f.op @ z + 0.5 * z, v, tol=1e-13, maxiter=300)
            sr, _ = cg(lambda z, f=fr: f.op @ z + 0.5 * z, v, tol=1e-13, maxiter=300)
            out[f"implicit {kind} CG"] = rel(sd, sr)
        ld = lanczos(fd.op, k=3, num_iter=40, generator=torch.Generator().manual_seed(1))
        lr = lanczos(fr.op, k=3, num_iter=40, generator=torch.Generator().manual_seed(1))
        out[f"implicit {kind} Lanczos"] = rel(ld[0], lr[0])
        td = hutchpp(fd.op, 12, generator=torch.Generator().manual_seed(2))
        tr = hutchpp(fr.op, 12, generator=torch.Generator().manual_seed(2))
        out[f"implicit {kind} Hutch++"] = abs(float(td.value) - float(tr.value)) / abs(
            float(tr.value)
        )
    # probes drawn differently on different ranks: every rank raises
    fd = GGN(model, local, ce, PMatImplicit, progress=False)
    try:
        fd.op @ torch.randn(
            p, generator=torch.Generator().manual_seed(100 + rank), dtype=torch.float64
        )
        out["different probes raise"] = 1.0
    except DataError:
        out["different probes raise"] = 0.0

    # function space: the Gram matrix gathered, the Jacobian sharded
    xs = [b[0] for b in local]
    xf = [b[0] for b in full]
    compare(
        "GramMatrix",
        lambda m, d, pg: GramMatrix(m, d, progress=False, process_group=pg),
        a=xs,
        b=xf,
    )
    compare(  # both loaders sharded; the same examples on both sides, through the cross path
        "CrossGramMatrix",
        lambda m, d, pg: CrossGramMatrix(m, d, d, progress=False, process_group=pg),
        a=xs,
        b=xf,
    )
    jd = Jacobian(model, xs, progress=False)
    jr = Jacobian(generator=JacobianGenerator(model, process_group=False), loader=xf)
    c = jr.n_output
    u_full = torch.randn(c, 13, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    u_local = u_full[:, lo:hi].reshape(-1)
    got, ref = jd.T @ u_local, jr.T @ u_full.reshape(-1)
    out["Jacobian J.T @ u (sharded u)"] = float((got - ref).abs().max()) / float(ref.abs().max())
    w = torch.randn(p, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    got = (jd @ w).view(c, -1)
    ref = (jr @ w).view(c, 13)[:, lo:hi]
    out["Jacobian J @ v (rows of this shard)"] = float((got - ref).abs().max())
    return out


def worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        res = run_checks(rank, world, SHARDS[world])
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
