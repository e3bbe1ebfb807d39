"""Data-parallel curvature: 2 and 3 gloo processes (file init, no network) with unequal shards give
on every rank the single-process result on the union of the shards, to 1e-10 in float64."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch.multiprocessing as mp

from .workers import SHARDS, run_checks, worker


@pytest.fixture(scope="module")
def reference():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return run_checks(0, [13], pg=False)


@pytest.fixture(scope="module", params=sorted(SHARDS))
def results(request, tmp_path_factory):
    world = request.param
    d = tmp_path_factory.mktemp(f"dist{world}")
    mp.spawn(worker, args=(world, str(d / "init"), str(d)), nprocs=world, join=True)
    return world, [torch.load(os.path.join(d, f"rank{r}.pt")) for r in range(world)]


def _rel(a, b):
    return float((a - b).abs().max()) / max(float(b.abs().max()), 1e-300)


def test_every_rank_holds_the_single_process_result(results, reference):
    world, per_rank = results
    bad = {}
    for r, res in enumerate(per_rank):
        assert set(res) == set(reference) | {"different probes raise"}
        lo = sum(SHARDS[world][:r])
        for name, ref in reference.items():
            if name.startswith("Jacobian J @ v"):  # sharded: this rank's rows of J v
                ref = ref[:, lo : lo + SHARDS[world][r]]
            err = _rel(res[name], ref)
            if not err <= 1e-10:
                bad[(r, name)] = err
    assert not bad, f"{world} processes: {bad}"
    assert len(reference) >= 30


def test_low_rank_input_factor_form_follows_the_union(reference):
    # the single-process rule on the union: 13 rows of a 65-wide A stay rows, of a 25-wide A not
    assert float(reference["KFAC low-rank A rows gathered form"]) == 1.0
    assert float(reference["KFAC low-rank A rows densified form"]) == 0.0


def test_different_probes_on_ranks_raise_everywhere(results):
    _, per_rank = results
    assert all(float(r["different probes raise"]) == 1.0 for r in per_rank)
