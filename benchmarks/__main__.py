"""``python -m benchmarks [--quick] [--out DIR]``: every benchmark of ``benchmarks/``, one report.

Runs each ``benchmarks/bench_*.py`` (found by name, so a script added later is picked up) as
``python benchmarks/bench_<x>.py [--quick] --out DIR`` in its own process, one after the other,
collects the ``DIR/bench_<x>.md`` each writes (its stdout where it writes none) into
``DIR/results.md`` under a header with the date, commit, machine and the CPU share that other
processes used during the whole run, prints that file, and leaves the scripts' bar-chart PNGs in
``DIR``. A script that fails is reported with the tail of its error and makes the exit status 1;
the others still run.

Peers: the scripts run under ``--python-peers`` (default ``/work/venv-peers/bin/python``, or the
``BENCH_PYTHON_PEERS`` environment variable) when that interpreter exists, so that they can import
the peer libraries (which share this torch); with ``--no-peers``, or where it does not exist, under
this interpreter, and peers that do not import there are skipped by each script with a note.
``--quick`` runs the whole suite in under two minutes on an idle 2-core machine (each script in
about 20 s).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import harness as H
from benchmarks import report as R

HERE = Path(__file__).resolve().parent


def scripts(only: list[str] | None = None) -> list[Path]:
    """The benchmark scripts of this folder, sorted by name (``only``: those names, no suffix)."""
    found = sorted(HERE.glob("bench_*.py"))
    if only:
        found = [p for p in found if p.stem in only or p.stem.removeprefix("bench_") in only]
    return found


def run_script(
    path: Path, python: str, quick: bool, out: Path, env: dict, timeout: float
) -> tuple[int, float, str]:
    """(exit status, seconds, the script's report) of one script."""
    cmd = [python, str(path), "--out", str(out)] + (["--quick"] if quick else [])
    t = time.perf_counter()
    with tempfile.TemporaryFile("w+") as so, tempfile.TemporaryFile("w+") as se:
        try:
            rc = subprocess.run(
                cmd, stdout=so, stderr=se, cwd=str(HERE.parent), env=env, timeout=timeout
            ).returncode
        except subprocess.TimeoutExpired:
            rc = 124
        so.seek(0)
        se.seek(0)
        stdout, stderr = so.read(), se.read()
    seconds = time.perf_counter() - t
    md = out / f"{path.stem}.md"
    text = md.read_text() if md.exists() else stdout
    if rc != 0:
        tail = "\n".join(stderr.strip().splitlines()[-15:])
        why = "timed out" if rc == 124 else f"failed (exit {rc})"
        text = f"**{path.name} {why}.**\n\n```\n{tail}\n```\n\n{text}"
    return rc, seconds, text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="every script's short run (< 2 min)")
    p.add_argument("--out", default="benchmark-results", help="folder of results.md and PNGs")
    p.add_argument("--only", nargs="*", default=None, help="only these scripts (e.g. ops ntk)")
    p.add_argument("--no-peers", action="store_true", help="run without the peers' interpreter")
    p.add_argument(
        "--python-peers",
        default=os.environ.get("BENCH_PYTHON_PEERS", H.DEFAULT_PEERS_PYTHON),
        help="interpreter where the peer libraries import (shares this torch)",
    )
    p.add_argument("--timeout", type=float, default=None, help="seconds per script")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    peers = None if args.no_peers else args.python_peers
    python = peers if peers and os.path.exists(peers) else sys.executable
    env = dict(os.environ)
    env["BENCH_PYTHON_PEERS"] = peers or ""
    root = str(HERE.parent)
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("MPLBACKEND", "Agg")
    # only a guard against a hung script: a shared machine stretches a 20 s quick run tenfold
    timeout = args.timeout or (1200.0 if args.quick else 7200.0)

    cfg = H.HarnessConfig(python_peers=peers, peers=bool(peers))
    info = R.machine_info(cfg)
    meter = H.LoadMeter()
    meter.start()
    sections, failed, t0 = [], [], time.perf_counter()
    for path in scripts(args.only):
        print(f"running {path.name} …", file=sys.stderr, flush=True)
        rc, seconds, text = run_script(path, python, args.quick, out, env, timeout)
        print(f"  {path.name}: exit {rc}, {seconds:.0f} s", file=sys.stderr, flush=True)
        if rc != 0:
            failed.append(path.name)
        sections.append(f"## {path.stem} ({seconds:.0f} s)\n\n{text.strip()}\n")
    load = meter.stop()
    share = "?" if load is None else f"{100 * load:.0f}%"
    pngs = sorted(q.name for q in out.glob("*.png"))
    head = [
        "# nngeo_ops benchmarks" + (" (--quick)" if args.quick else ""),
        "",
        f"{info['date']}, commit `{info['commit']}`, {info['machine']}, torch {info['torch']}, "
        f"Python {info['python']}; interpreter {python}. Total {time.perf_counter() - t0:.0f} s; "
        f"CPU share used by other processes during the run: **{share}**"
        + (" (timings of a loaded machine: exploratory)" if load and load > cfg.max_load else "")
        + ".",
        "",
        "Charts: " + (", ".join(pngs) if pngs else "none (matplotlib missing?)") + ".",
    ]
    if failed:
        head += ["", "**Failed: " + ", ".join(failed) + ".**"]
    report = "\n".join(head) + "\n\n" + "\n".join(sections)
    (out / "results.md").write_text(report)
    print(report)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
