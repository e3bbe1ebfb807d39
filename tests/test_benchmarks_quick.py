"""The benchmark entry point and its harness (no timing is asserted: only that they run and report).

``python -m benchmarks --quick`` must keep working on a machine with only the library installed
(peers absent are skipped with a note), and the harness must pair rounds, alternate them, report
failures and skipped peers, and refuse a loaded machine. This module is also the tiny *suite* the
harness test runs (``setup`` below is called in the worker processes).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks import bench_curvature as B
from benchmarks import harness as H
from benchmarks import report as R

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------- a tiny suite for the harness
def _burn(seconds: float) -> None:
    """Busy for ``seconds`` of CPU time (the harness's cap is on CPU time: a sleep is not)."""
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def setup(case_id: str, lib: str, device: torch.device) -> H.Case:
    """Called in the harness's worker: a matmul as the reference, two quantities, one failing
    (case "tiny"); case "slow": a quantity over the cap, one whose init is, and a fast one."""
    a = torch.randn(64, 64, device=device)
    if case_id == "slow":
        ref = lambda: a @ a  # noqa: E731
        q = {
            "slow": H.Workload(run=lambda _: _burn(0.3 if lib == H.OURS else 0.6)),
            "slow-init": H.Workload(init=lambda: _burn(0.3), run=lambda _: a @ a),
            "fast": H.Workload(run=lambda _: a @ a),
        }
        return H.Case(reference=ref, quantities=q)

    def mm(k):
        def run(_):
            for _ in range(k):
                a @ a

        return run

    def broken(_):
        raise RuntimeError("this quantity cannot be computed")

    def needs_broken(_):
        raise H.SameFailure("broken")

    k = 2 if lib == H.OURS else 3
    q = {
        "product": H.Workload(run=mm(k)),
        "prepared": H.Workload(prepare=lambda: 2, run=lambda n: mm(n)(None), max_rounds=2),
        "broken": H.Workload(run=broken),
        "needs-broken": H.Workload(run=needs_broken),
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
        assert "needs-broken" not in res.rounds[lib] and f"{lib}:needs-broken" not in res.notes
        assert set(res.memory[lib]) == {"product", "prepared"}
        assert all(m >= 0 for m in res.memory[lib].values())
    paired = res.paired("fakepeer", "product")
    assert len(paired) == 7 and all(r > 0 for r in paired)
    assert res.load is None or 0.0 <= res.load <= 1.0
    assert res.to_json()["case"] == "tiny"


def test_call_cap_measures_a_slow_quantity_by_its_warm_up_call():
    """A call over the cap is its quantity's one measurement (against its own adjacent reference),
    paired as one ratio of medians, marked few; a quantity whose init is over the cap is timed in
    rounds but its peak memory comes from the timing worker (no fresh worker repeats the init)."""
    spec = H.CaseSpec("slow", "slow case", peers={"fakepeer": "json"})
    cfg = H.HarnessConfig(rounds=3, budget_s=0.01, max_pairs=1, python_peers=None, call_cap_s=0.15)
    res = H.run_case("tests.test_benchmarks_quick", spec, cfg, log=lambda s: None)
    assert res.libs == [H.OURS, "fakepeer"]
    for lib in res.libs:
        assert res.few(lib, "slow") and not res.few(lib, "fast") and not res.few(lib, "slow-init")
        (m,) = res.rounds[lib]["slow"]  # the warm-up call alone, no rounds
        assert m["n"] == 1 and m["few"] and m["ratio_cpu"] > 1  # ≥ 0.3 s over a 64² matmul
        assert len(res.ratios(lib, "fast")) == 3 and len(res.ratios(lib, "slow-init")) == 3
        assert res.info[lib]["slow-init"]["init_s"] >= 0.3
        assert res.memory_from_timing(lib, "slow") and res.memory_from_timing(lib, "slow-init")
        assert not res.memory_from_timing(lib, "fast")
        assert set(res.memory[lib]) == {"slow", "slow-init", "fast"}
    # ours burns 0.3 s, the peer 0.6 s: one ratio of the two measurements, about 1/2
    (r,) = res.paired("fakepeer", "slow", "cpu")
    assert r == res.ratios(H.OURS, "slow", "cpu")[0] / res.ratios("fakepeer", "slow", "cpu")[0]
    assert 0.25 < r < 1.0
    assert len(res.paired("fakepeer", "fast")) == 3
    # the report marks it and never shows an IQR for it
    assert R.fmt_combined(R.combine([res.paired("fakepeer", "slow")], [True])).endswith(R.FEW)


def test_repeat_runs_the_case_list_in_passes_and_the_report_combines_them():
    spec = H.CaseSpec("tiny", "tiny case")
    cfg = H.HarnessConfig(rounds=2, budget_s=0.01, max_pairs=1, python_peers=None)
    logs = []
    res = H.run_suite("tests.test_benchmarks_quick", [spec], cfg, log=logs.append, repeat=2)
    assert [r.pass_no for r in res] == [0, 1] and [r.spec.case_id for r in res] == ["tiny"] * 2
    assert "pass 2/2" in logs
    assert H.CaseResult.from_json(res[1].to_json()).pass_no == 1
    (runs,) = R.group_runs(res)
    assert runs == res
    c = R.combine([r.ratios(H.OURS, "product") for r in runs])
    assert len(c.runs) == 2 and c.median == statistics.median(
        H.quartiles(r.ratios(H.OURS, "product"))[1] for r in runs
    )


def test_combine_runs_arithmetic():
    one = R.combine([[0.5, 0.6, 0.7, 0.8, 0.9]])
    assert one.median == 0.7 and one.pooled == H.quartiles([0.5, 0.6, 0.7, 0.8, 0.9])
    assert one.runs == (one.pooled,) and one.spread == (0.7, 0.7) and not one.few
    assert R.fmt_combined(one) == "0.70 [0.60–0.80]"
    assert R.judge(one) == "target"  # one run: the single-run verdict (median ≤ 0.8, q3 < 1)
    # three runs: the median of the run medians, the pooled IQR, the spread of the run medians
    runs = [[0.70, 0.75, 0.80], [0.95, 1.00, 1.05], [0.60, 0.65, 0.70]]
    c = R.combine(runs)
    assert c.median == 0.75 and c.spread == (0.65, 1.0)
    assert c.pooled == H.quartiles([x for r in runs for x in r])
    assert R.fmt_combined(c) == f"0.75 [{c.pooled[0]:.2f}–{c.pooled[2]:.2f}] (3 runs 0.65–1.00)"
    assert c.bounds() == pytest.approx((0.625, 1.025))  # quartiles of 3 values, inclusive
    assert R.judge(c) == "tie"  # one run's IQR reaches 1: no lead, whatever the pooled IQR says
    assert R.judge(R.combine([[0.7, 0.75, 0.8], [0.8, 0.85, 0.9]])) == "target"  # median 0.8
    assert R.judge(R.combine([[0.8, 0.85, 0.9], [0.85, 0.9, 0.95]])) == "lead"
    assert R.judge(R.combine([[1.1, 1.2], [1.05, 1.3]])) == "peer wins"
    assert R.judge(R.combine([[1.1, 1.2], [0.9, 1.3]])) == "tie"
    # runs without a value are left out; none at all: None
    assert R.combine([[], [0.5]]).runs == ((0.5, 0.5, 0.5),)
    assert R.combine([[], []]) is None
    # few calls: one value per run, a ±FEW_BAND band stands in for the IQR
    f = R.combine([[0.8]], [True])
    assert f.few and R.fmt_combined(f) == f"0.80 {R.FEW}"
    assert f.bounds() == pytest.approx((0.8 / R.FEW_BAND, 0.8 * R.FEW_BAND))
    assert R.FEW_BAND == 1.35
    assert R.judge(f) == "tie"  # 0.8 × 1.35 > 1
    assert R.judge(R.combine([[0.7]], [True])) == "target"  # 0.7 × 1.35 < 1
    assert R.judge(R.combine([[0.5], [0.8]], [True, True])) == "tie"
    assert R.judge(R.combine([[1.4]], [True])) == "peer wins"  # 1.4 / 1.35 > 1
    assert R.fmt_combined(R.combine([[0.5], [0.6]], [True, True])) == "0.55 ‡ (2 runs 0.50–0.60)"
    lo, m, hi = c.whiskers()
    assert lo <= c.pooled[0] and lo <= 0.65 and hi >= 1.0 and m == c.median


def _saved_case(case_id, ours, peer, few=False, memory=(10.0, 20.0)):
    """The JSON of one run of a case (the harness's CaseResult.to_json), ours and NNGeometry."""

    def series(rs):
        return {"build": [{"ratio": r, "ratio_cpu": r, "t": r, "tb": 1.0, "n": 1} for r in rs]}

    info = {lib: {"build": {"comparable": True, "few": few}} for lib in (H.OURS, B.NNG)}
    return {
        "case": case_id,
        "title": case_id,
        "libs": [H.OURS, B.NNG],
        "rounds": {H.OURS: series(ours), B.NNG: series(peer)},
        "memory": {H.OURS: {"build": memory[0]}, B.NNG: {"build": memory[1]}},
        "notes": {},
        "versions": {},
        "load": 0.0,
        "seconds": 1.0,
        "info": info,
        "t_ref": {},
    }


def test_from_json_combines_runs_of_a_case_and_concatenates_others(tmp_path, capsys):
    info = {
        "date": "2026-12-07 12:00 UTC", "commit": "abc", "machine": "m", "torch": "t",
        "python": "p", "threads": "1", "device": "cpu", "rounds": "3", "call_cap": "10",
    }  # fmt: skip
    a = {
        "info": info,
        "cases": [
            _saved_case("mlp/kfac", [1.0, 1.0, 1.0], [2.0, 2.0, 2.0]),  # 0.5 in this run
            _saved_case("cnn/block-diag", [5.0], [20.0], few=True, memory=(100.0, 900.0)),
        ],
    }
    b = {
        "info": dict(info, date="2026-12-07 13:00 UTC"),
        "cases": [
            _saved_case("mlp/kfac", [1.0, 1.0, 1.0], [1.0, 1.0, 1.0], memory=(12.0, 18.0)),
            _saved_case("transformer/diag", [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]),  # one run only
        ],
    }
    c = {"info": dict(info, date="2026-12-07 14:00 UTC"),
         "cases": [_saved_case("mlp/kfac", [1.0, 1.0, 1.0], [1.25, 1.25, 1.25])]}  # fmt: skip
    paths = []
    for name, doc in zip("abc", (a, b, c)):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(doc))
    out = tmp_path / "out"
    assert B.main(["--from-json", *map(str, paths), "--out", str(out), "--clock", "cpu"]) == 0
    capsys.readouterr()
    md = (out / "bench_curvature.md").read_text()
    lines = {tuple(x.strip() for x in ln.split("|")[1:4]): ln for ln in md.splitlines()}
    kfac = lines[("mlp", "kfac", "build")]
    # per-run paired medians 0.5, 1.0, 0.8: median 0.8, spread 0.5–1.0; one run is a tie: tie
    assert "0.80 [" in kfac and "(3 runs 0.50–1.00)" in kfac and "| tie |" in kfac
    assert "12 / 20" in kfac  # the largest peak of the runs, per library
    bd = lines[("cnn", "block-diag", "build")]
    assert f"0.25 {R.FEW}" in bd and "runs" not in bd and "**target**" in bd
    assert "runs" not in lines[("transformer", "diag", "build")]
    assert "combined over 1–3 runs" in md and "2026-12-07 14:00 UTC `abc`" in md
    # the written JSON keeps every run, and renders the same again
    doc = json.loads((out / "bench_curvature.json").read_text())
    assert [x["case"] for x in doc["cases"]].count("mlp/kfac") == 3 and len(doc["infos"]) == 3
    again = tmp_path / "again"
    B.main(
        ["--from-json", str(out / "bench_curvature.json"), "--out", str(again), "--clock", "cpu"]
    )
    capsys.readouterr()
    assert (again / "bench_curvature.md").read_text() == md


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
