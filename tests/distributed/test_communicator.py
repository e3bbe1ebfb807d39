"""The bucketed reduction itself, in a one-process gloo group (a sum over one rank is the identity):
symmetric matrices come back from their upper triangles, tensors share buckets by dtype, and a
bucket is split only past ``bucket_elements``."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from nngeo_ops.nn.engine.distributed import (
    Communicator,
    DistributedConfig,
    gather_rows,
    resolve_group,
)


@pytest.fixture(scope="module")
def group(tmp_path_factory):
    init = tmp_path_factory.mktemp("comm") / "init"
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


def _sym(n, seed):
    a = torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return a + a.T


def test_triangles_buckets_and_dtypes(group):
    # a group of one process is not distributed: builders stay local
    assert resolve_group(None) is None and resolve_group(group) is None
    mats = [_sym(n, n) for n in (3, 5, 8)]
    vec = torch.randn(7, dtype=torch.float64)
    counts = torch.tensor([3, 4], dtype=torch.int64)
    half = torch.randn(4, dtype=torch.bfloat16)
    want = [m.clone() for m in mats] + [vec.clone(), counts.clone(), half.clone()]
    comm = Communicator(group)
    for m in mats:
        comm.sum(m, symmetric=True)
    comm.sum(vec)
    comm.sum(counts)
    comm.sum(half)
    seen = []
    comm.then(lambda: seen.append(True))
    comm.flush()
    for got, w in zip(mats + [vec, counts, half], want):
        assert got.dtype == w.dtype
        assert torch.equal(got, w)
    assert comm.collectives == 3  # float64 (matrices and vector), int64, bfloat16 in float32
    assert seen == [True]
    # a bucket is split past bucket_elements: the triangles have 6, 15, 36 numbers
    comm = Communicator(group, DistributedConfig(bucket_elements=40))
    for m in mats:
        comm.sum(m, symmetric=True)
    comm.flush()
    assert comm.collectives == 2  # [6 + 15], [36]
    assert all(torch.equal(m, w) for m, w in zip(mats, want))


def test_gather_rows_of_one_rank(group):
    rows = torch.randn(5, 3, dtype=torch.float64)
    assert torch.equal(gather_rows(group, rows), rows)
