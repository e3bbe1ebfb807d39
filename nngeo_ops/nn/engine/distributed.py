"""Data-parallel curvature on ``torch.distributed``: every statistic reduced where it is produced.

Inside an initialised process group (``torchrun``, gloo on CPU, NCCL on GPUs) each rank reads its
own shard of the data; the builders of :mod:`nngeo_ops.nn` reduce what they gathered so that every
rank holds **exactly the matrix one process would build on the union of the shards**:

* sums (dense, diagonal, block-diagonal, Kronecker factors, EKFAC refit diagonals, quasi-diagonal
  statistics, dense Hessians) are all-reduced; symmetric matrices send only their upper triangle
  (d(d+1)/2 numbers instead of d²), and all tensors of a pass travel in a few flat buckets — one
  collective per dtype and per :attr:`DistributedConfig.bucket_elements` numbers, not one per layer;
* example counts (and, for ``mean`` reductions, the non-ignored targets) are summed before any
  normalisation, so unequal shards give the right mean;
* row statistics (the per-example gradients of ``PMatLowRank``, the rows of a low-rank KFAC input
  factor) are gathered with ``all_gather`` (padded to the longest shard), in rank order;
* implicit products (implicit Fisher / GGN / Hessian) are the all-reduce of the per-shard products,
  so CG, Lanczos, SLQ and Hutch++ run on top unchanged. The vector must be the same on every rank
  (random probes drawn from generators seeded identically): each product checks this at no extra
  collective and raises :class:`~nngeo_ops.errors.DataError` otherwise.

The group is chosen by ``process_group=``: None (the default) means the default group when
``torch.distributed`` is initialised with more than one process, and today's single-process
behaviour otherwise; ``False`` forces a local computation inside a group; a ``ProcessGroup``
selects it. Only ``torch.distributed`` collectives are used; nothing here starts processes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ...errors import ArgumentTypeError, DataError, UnsupportedError

__all__ = [
    "Communicator",
    "DistributedConfig",
    "all_reduce_sum",
    "gather_rows",
    "reduce_counts",
    "resolve_group",
    "world_size",
]


@dataclass(frozen=True)
class DistributedConfig:
    """Settings of the reductions.

    ``bucket_elements``: at most this many numbers per collective (a bucket is one flat buffer;
    larger statistics are split). ``symmetric_triangles``: send only the upper triangle of
    symmetric matrices.
    """

    bucket_elements: int = 1 << 25
    symmetric_triangles: bool = True


DEFAULT_CONFIG = DistributedConfig()


def resolve_group(process_group=None):
    """The process group to reduce over, or None for a single-process computation.

    None: the default group if ``torch.distributed`` is initialised with world size > 1; False:
    none (local); a ``ProcessGroup``: that group (None again if it has a single member).
    """
    if process_group is False:
        return None
    available = dist.is_available() and dist.is_initialized()
    if process_group is None:
        if not available:
            return None
        process_group = dist.group.WORLD
    elif not available:
        raise ArgumentTypeError(
            "process_group was given but torch.distributed is not initialised: call "
            "torch.distributed.init_process_group first (torchrun does it from the environment)"
        )
    return process_group if dist.get_world_size(process_group) > 1 else None


def world_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


# ---------------------------------------------------------------------- triangles
def _triu(n: int, device) -> torch.Tensor:
    # flat indices of the upper triangle of an n × n matrix (row-major); cheap next to the matrix
    i, j = torch.triu_indices(n, n, device=device)
    return i * n + j


def _is_square(t: torch.Tensor) -> bool:
    return t.dim() == 2 and t.shape[0] == t.shape[1]


def _wire_dtype(dtype: torch.dtype) -> torch.dtype:
    # half precisions are summed in float32 (gloo lacks bfloat16 sums; statistics are float32 anyway)
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class Communicator:
    """Bucketed in-place sums over a group: :meth:`sum` registers, :meth:`flush` reduces.

    Every rank must register the same tensors (shapes, dtypes) in the same order — the builders do,
    since they iterate the layers of the same collection. After :meth:`flush` each registered tensor
    holds the sum over the ranks (a symmetric one is rebuilt from the summed upper triangle,
    mirrored), and the callbacks of :meth:`then` have run.
    """

    def __init__(self, group, config: DistributedConfig = DEFAULT_CONFIG):
        self.group = group
        self.config = config
        self._pending: list[tuple[torch.Tensor, bool]] = []
        self._after = []
        self.collectives = 0  # how many collectives were issued (tests, benchmarks)

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.group)

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    def sum(self, t: torch.Tensor, symmetric: bool = False) -> torch.Tensor:
        """Register ``t`` to be replaced in place by its sum over the ranks; returns ``t``."""
        self._pending.append((t, bool(symmetric) and _is_square(t)))
        return t

    def then(self, fn) -> None:
        """Run ``fn()`` after the next :meth:`flush` (to read back reduced counts)."""
        self._after.append(fn)

    def flush(self) -> None:
        pending, self._pending = self._pending, []
        groups: dict = {}
        for t, sym in pending:
            groups.setdefault((_wire_dtype(t.dtype), t.device), []).append((t, sym))
        for (dtype, device), items in groups.items():
            self._reduce_group(items, dtype, device)
        after, self._after = self._after, []
        for fn in after:
            fn()

    def _reduce_group(self, items, dtype, device):
        tri = self.config.symmetric_triangles
        parts, layout = [], []
        for t, sym in items:
            idx = _triu(t.shape[0], device) if (sym and tri) else None
            flat = t.reshape(-1) if idx is None else t.reshape(-1)[idx]
            parts.append(flat.to(dtype))
            layout.append((t, idx, sym and tri))
        cap = self.config.bucket_elements
        bucket, size = [], 0
        for i, p in enumerate(parts):
            if bucket and size + p.numel() > cap:
                self._reduce_bucket([parts[k] for k in bucket], [layout[k] for k in bucket])
                bucket, size = [], 0
            bucket.append(i)
            size += p.numel()
        if bucket:
            self._reduce_bucket([parts[k] for k in bucket], [layout[k] for k in bucket])

    def _reduce_bucket(self, parts, layout):
        buf = torch.cat(parts) if len(parts) > 1 else parts[0].clone()
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=self.group)
        self.collectives += 1
        off = 0
        for p, (t, idx, tri) in zip(parts, layout):
            seg = buf[off : off + p.numel()].to(t.dtype)
            off += p.numel()
            if not tri:
                t.copy_(seg.view(t.shape))
                continue
            n = t.shape[0]
            full = torch.zeros(n * n, dtype=t.dtype, device=t.device)
            full[idx] = seg
            m = full.view(n, n)
            t.copy_(m + m.triu(1).T)


def all_reduce_sum(group, tensors, symmetric=None, config: DistributedConfig = DEFAULT_CONFIG):
    """Sum ``tensors`` over ``group`` in place (bucketed; upper triangles where ``symmetric``)."""
    comm = Communicator(group, config)
    symmetric = symmetric or [False] * len(tensors)
    for t, s in zip(tensors, symmetric):
        comm.sum(t, s)
    comm.flush()
    return tensors


def reduce_counts(group, counts, device=None, allow_empty: bool = False) -> list[int]:
    """Sum integer counts over ``group``; ``counts[0]`` is this rank's number of examples.

    Unless ``allow_empty``, a rank whose shard is empty makes every rank raise the same
    :class:`DataError` (the ranks agree on the counts, so none waits in a collective).
    """
    t = torch.tensor([int(c) for c in counts], dtype=torch.int64, device=device)
    out = [torch.zeros_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, t, group=group)
    per_rank = torch.stack(out)
    if not allow_empty:
        empty = [r for r in range(per_rank.shape[0]) if int(per_rank[r, 0]) == 0]
        if empty:
            raise DataError(
                f"the data shard of rank(s) {empty} is empty: give every rank at least one example "
                "(e.g. a DistributedSampler with drop_last=False), or build on a subgroup"
            )
    return [int(v) for v in per_rank.sum(0)]


def gather_rows(group, rows: torch.Tensor) -> torch.Tensor:
    """``all_gather`` of per-rank (n_r, d) row blocks with different n_r: (Σ n_r, d), rank order."""
    n = torch.tensor([rows.shape[0]], dtype=torch.int64, device=rows.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, n, group=group)
    sizes = [int(s) for s in sizes]
    longest = max(sizes)
    wire = _wire_dtype(rows.dtype)
    pad = rows.new_zeros((longest, *rows.shape[1:]), dtype=wire)
    pad[: rows.shape[0]] = rows
    out = [torch.empty_like(pad) for _ in sizes]
    dist.all_gather(out, pad, group=group)
    return torch.cat([o[:s] for o, s in zip(out, sizes)]).to(rows.dtype)


def reduce_pass(group, accumulators, total: int, n_ex: int) -> tuple[int, int]:
    """After one pass of the capture engine: sum the counts and every accumulator's raw sums.

    Called before the accumulators normalise (``finalize``); returns the global (total, n_ex).
    Each accumulator takes part through its ``reduce(comm)`` method.
    """
    n_ex, total = reduce_counts(group, [n_ex, total])
    comm = Communicator(group)
    for acc in accumulators:
        reduce = getattr(acc, "reduce", None)
        if reduce is None:
            raise UnsupportedError(
                f"the accumulator {type(acc).__name__} has no reduce(comm) method, so its "
                "statistics cannot be summed over the process group: add one (see "
                "nngeo_ops.nn.engine.distributed), or pass process_group=False for per-rank statistics"
            )
        reduce(comm)
    comm.flush()
    return total, n_ex


class ConsistentProduct:
    """The all-reduce of per-shard products M_r V, with a check that V is the same on every rank.

    A weighted sum f of V's entries travels with the product (two float64 numbers appended to the
    bucket): W·Σ f_r² = (Σ f_r)² holds exactly when every rank has the same f, and fails otherwise —
    different random probes on different ranks would silently give a wrong answer.
    """

    def __init__(self, group):
        self.group = group
        self._weights = {}

    def _fingerprint(self, v: torch.Tensor) -> torch.Tensor:
        n = v.shape[0]
        w = self._weights.get((n, v.device))
        if w is None:
            g = torch.Generator().manual_seed(12345)
            w = torch.rand(n, generator=g, dtype=torch.float64).to(v.device) + 0.5
            self._weights[(n, v.device)] = w
        f = (v.detach().to(torch.float64).reshape(n, -1) * w[:, None]).sum()
        return torch.stack([f, f * f])

    def reduce(self, acc: torch.Tensor, v: torch.Tensor, counts=()) -> tuple[torch.Tensor, list]:
        """(Σ_r acc_r, [Σ_r count_r ...]) after checking that ``v`` is identical on every rank."""
        check = torch.cat(
            [self._fingerprint(v), torch.tensor(counts, dtype=torch.float64, device=v.device)]
        )
        all_reduce_sum(self.group, [acc, check])
        w = dist.get_world_size(self.group)
        s, s2 = float(check[0]), float(check[1])
        if abs(w * s2 - s * s) > 1e-9 * max(w * s2, 1e-300):
            raise DataError(
                "the vector of a distributed product differs across ranks: every rank must apply "
                "the operator to the same vector. Draw random probes from a torch.Generator seeded "
                "identically on every rank (or torch.manual_seed(s) with the same s everywhere)"
            )
        return acc, [int(round(float(c))) for c in check[2:]]
