"""The benchmark entry point and its harness (no timing is asserted: only that they run and report).

``python -m benchmarks --quick`` must keep working on a machine with only the library installed
(peers absent are skipped with a note), and the harness must pair rounds, alternate them, report
failures and skipped peers, and refuse a loaded machine. This module is also the tiny *suite* the
harness test runs (``setup`` below is called in the worker processes).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import harness as H
from benchmarks import report as R

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------- a tiny suite for the harness
def setup(case_id: str, lib: str, device: torch.device) -> H.Case:
    """Called in the harness's worker: a matmul as the reference, two quantities, one failing."""
    a = torch.randn(64, 64, device=device)

    def mm(k):
        def run(_):
            for _ in range(k):
                a @ a

        return run

    def broken(_):
        raise RuntimeError("this quantity cannot be computed")

    k = 2 if lib == H.OURS else 3
    q = {
        "product": H.Workload(run=mm(k)),
        "prepared": H.Workload(prepare=lambda: 2, run=lambda n: mm(n)(None), max_rounds=2),
        "broken": H.Workload(run=broken),
    }
    return H.Case(reference=lambda: mm(1)(None), quantities=q, note=f"{lib} note", version="0.0")


def test_statistics():
    assert H.quartiles([3.0]) == (3.0, 3.0, 3.0)
    q1, m, q3 = H.quartiles([1, 2, 3, 4, 5, 6, 7])
    assert (q1, m, q3) == (2.5, 4.0, 5.5)
    assert H.paired_ratios([2.0, 3.0], [4.0, 1.5]) == [0.5, 2.0]
    with pytest.raises(ValueError, match="differ in length"):
        H.paired_ratios([1.0], [1.0, 2.0])


def test_load_refusal_and_readme_markers(tmp_path):
    cfg = H.HarnessConfig(max_load=0.05)
    assert H.check_load(0.01, cfg, allow=False) is None
    why = H.check_load(0.4, cfg, allow=False)
    assert "40%" in why and "--allow-load" in why
    assert "could not be read" in H.check_load(None, cfg, allow=True)
    meter = H.LoadMeter()
    meter.start()
    sum(i * i for i in range(10**5))
    share = meter.stop()
    assert share is None or 0.0 <= share <= 1.0

    doc = tmp_path / "README.md"
    doc.write_text("a\n<!-- harness:t:start -->\nold\n<!-- harness:t:end -->\nb\n")
    R.replace_section(doc, "t", "new table")
    assert doc.read_text() == "a\n<!-- harness:t:start -->\nnew table\n<!-- harness:t:end -->\nb\n"
    with pytest.raises(ValueError, match="no markers"):
        R.replace_section(doc, "other", "x")


def test_harness_pairs_rounds_and_reports_failures():
    spec = H.CaseSpec(
        "tiny",
        "tiny case",
        peers={"fakepeer": "json", "absentpeer": "no_such_module_for_the_benchmark"},
    )
    cfg = H.HarnessConfig(rounds=7, budget_s=0.01, max_pairs=2, python_peers=None)
    res = H.run_case("tests.test_benchmarks_quick", spec, cfg, log=lambda s: None)
    assert res.libs == [H.OURS, "fakepeer"]
    assert "not installed" in res.notes["absentpeer"]
    assert "cannot be computed" in res.notes[f"{H.OURS}:broken"]
    assert res.notes[H.OURS] == f"{H.OURS} note" and res.versions["fakepeer"] == "0.0"
    for lib in res.libs:
        assert len(res.ratios(lib, "product")) == 7  # at least 7 rounds, one value each
        assert len(res.ratios(lib, "prepared")) == 2  # capped by max_rounds
        assert "broken" not in res.rounds[lib]
        assert set(res.memory[lib]) == {"product", "prepared"}
        assert all(m >= 0 for m in res.memory[lib].values())
    paired = res.paired("fakepeer", "product")
    assert len(paired) == 7 and all(r > 0 for r in paired)
    assert res.load is None or 0.0 <= res.load <= 1.0
    assert res.to_json()["case"] == "tiny"


def test_quick_entry_point_without_peers(tmp_path):
    out = tmp_path / "bench"
    env = dict(os.environ, MPLBACKEND="Agg")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--no-peers", "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=3600,  # a hang guard only: a shared machine stretches the ~1 min of CPU work
    )
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    report = (out / "results.md").read_text()
    scripts = sorted(p.stem for p in (REPO / "benchmarks").glob("bench_*.py"))
    assert scripts, "no benchmark script found"
    for name in scripts:
        assert f"## {name} (" in report, name
        assert (out / f"{name}.md").exists(), name
    assert "CPU share used by other processes" in report
    assert "|---" in proc.stdout  # the table is printed
    # the curvature suite skipped its peers cleanly and still timed nngeo_ops
    curv = (out / "bench_curvature.md").read_text()
    assert "| mlp | kfac | build |" in curv
    assert "Skipped (not installed)" in curv or "Peers:" in curv
    pytest.importorskip("matplotlib")
    assert (out / "bench_curvature.png").exists()
