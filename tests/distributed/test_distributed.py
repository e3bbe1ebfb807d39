"""Data-parallel curvature: 2 and 3 gloo processes (file init, no network) with unequal shards give
on every rank the single-process result on the union of the shards, to 1e-10 in float64."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

from .workers import SHARDS, worker


@pytest.fixture(scope="module", params=sorted(SHARDS))
def results(request, tmp_path_factory):
    world = request.param
    d = tmp_path_factory.mktemp(f"dist{world}")
    mp.spawn(worker, args=(world, str(d / "init"), str(d)), nprocs=world, join=True)
    return world, [torch.load(os.path.join(d, f"rank{r}.pt")) for r in range(world)]


def test_every_check_matches_single_process(results):
    world, per_rank = results
    bad = {
        (r, name): err
        for r, res in enumerate(per_rank)
        for name, err in res.items()
        if not err <= 1e-10
    }
    assert not bad, f"{world} processes: {bad}"
    assert len(per_rank[0]) >= 39  # every check ran


def test_same_checks_on_every_rank(results):
    _, per_rank = results
    assert all(set(r) == set(per_rank[0]) for r in per_rank)
