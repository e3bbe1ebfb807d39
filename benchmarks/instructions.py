"""Instruction counts of one benchmark case under valgrind's callgrind: a noise-free second figure.

Wall-clock ratios on a shared machine move by 10–20 % between runs; the number of instructions a
call executes does not depend on the load, so it tells a 10 % change of a close row from noise
(it does not see memory stalls or thread counts: use it next to the timings, not instead of them).
``perf stat -e instructions`` would be the cheap way, but virtual machines often expose no hardware
counters (this one prints ``<not supported>``); callgrind counts by simulation, ~50× slower.

    python -m benchmarks.instructions --case mlp/kfac --quantity build [--lib nngeo_ops] \\
        [--calls 3] [--python /work/venv-peers/bin/python] [--suite benchmarks.bench_curvature]

runs, under ``valgrind --tool=callgrind --instr-atstart=no`` (apt package ``valgrind``), a process
that sets the case up exactly as a harness worker does (benchmarks/harness.py), warms it up with
instrumentation off (importing torch under full instrumentation would take many minutes), then
turns it on (``callgrind_control -i on``) around ``--calls`` forward+backwards and ``--calls`` calls
of the quantity (its untimed ``prepare`` with instrumentation off), dumping the counts of each
phase (``callgrind_control -d``). A quantity with a ``prepare`` (a first solve or product, rebuilt
before each call) is one window per call, whose switching counts ~0.4 M instructions of the tool's
own; as many empty windows are counted and subtracted (figures before 2026-12-07's stop 24 carry
that +0.4 M per call, the same for every library). It prints the instructions per call of each and their ratio,
the instruction analogue of the harness's ratio to one forward+backward. One case takes 2–4 min on
an idle 2-core machine, mostly the import of torch under valgrind. Peer libraries: pass the
peers' interpreter with ``--python`` and the peer's label (e.g. ``--lib curvlinops``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _control(*args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(os.getpid())], check=True, capture_output=True)


def _last_dump_total(out_dir: str) -> int:
    """Instructions of the most recent dump of this process (its ``totals:`` / ``summary:`` line)."""
    pid = os.getpid()
    dumps = sorted(
        (p for p in Path(out_dir).glob(f"cg.{pid}.*") if p.suffix[1:].isdigit()),
        key=lambda p: int(p.suffix[1:]),
    )
    for line in dumps[-1].read_text().splitlines():
        if line.startswith(("totals:", "summary:")):
            return int(line.split()[1])
    raise RuntimeError(f"no totals in {dumps[-1]}")


def inner(args: argparse.Namespace) -> None:
    """The process under valgrind: set up, warm up, count the two phases, print a JSON line."""
    import torch

    torch.set_num_threads(1)
    suite = importlib.import_module(args.suite)
    case = suite.setup(args.case, args.lib, torch.device("cpu"))
    if args.quantity not in case.quantities:
        raise SystemExit(f"{args.lib} has no quantity {args.quantity!r} in {args.case}")
    w = case.quantities[args.quantity]
    for _ in range(2):  # warm-up, uninstrumented: lazy imports, first-call caches
        case.reference()
        w.run(w.prepare() if w.prepare else None)

    # instrumentation is off whenever this process reads a dump back: the read (a splitlines of
    # the ~0.5 MB file, ~4 M instructions) would otherwise be counted in the next phase
    counts = {}
    _control("-i", "on")
    _control("-z")
    for _ in range(args.calls):
        case.reference()
    _control("-d", "reference")
    _control("-i", "off")
    counts["reference"] = _last_dump_total(args.cg_dir)
    parts = []
    for i in range(args.calls):
        state = w.prepare() if w.prepare else None
        if w.prepare or i == 0:
            _control("-i", "on")
            _control("-z")
        w.run(state)
        if w.prepare:
            _control("-d", "part")
            _control("-i", "off")
            parts.append(_last_dump_total(args.cg_dir))
    if not w.prepare:
        _control("-d", args.quantity)
        _control("-i", "off")
        counts["quantity"] = _last_dump_total(args.cg_dir)
    else:
        # a window per call counts the tool's own switching inside it (the tail of `-z`, the spawn
        # of `callgrind_control -d`: ~0.4 M instructions): measured on empty windows, subtracted
        empty = []
        for _ in range(args.calls):
            _control("-i", "on")
            _control("-z")
            _control("-d", "empty")
            _control("-i", "off")
            empty.append(_last_dump_total(args.cg_dir))
        counts["window"] = sum(empty)
        counts["quantity"] = sum(parts) - sum(empty)
    print(json.dumps({k: v / args.calls for k, v in counts.items()}), flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--case", default="mlp/kfac", help="'<model>/<representation>' of the suite")
    p.add_argument("--quantity", default="build", help="build, mv, mv1, solve, solve1")
    p.add_argument("--lib", default="nngeo_ops")
    p.add_argument("--calls", type=int, default=3)
    p.add_argument("--suite", default="benchmarks.bench_curvature")
    p.add_argument("--python", default=sys.executable, help="interpreter (a peer's: its venv)")
    p.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--cg-dir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.inner:
        inner(args)
        return 0
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("valgrind is not installed: `apt-get install valgrind`", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        # the real interpreter, not a shell shim (valgrind does not follow an exec by default)
        python = subprocess.run(
            [args.python, "-c", "import sys; print(sys.executable)"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        cmd = [
            "valgrind", "--tool=callgrind", "--instr-atstart=no",
            f"--callgrind-out-file={tmp}/cg.%p",
            python, "-m", "benchmarks.instructions", "--inner", "--cg-dir", tmp,
            "--case", args.case, "--quantity", args.quantity, "--lib", args.lib,
            "--calls", str(args.calls), "--suite", args.suite,
        ]  # fmt: skip
        env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        lines = [s for s in proc.stdout.splitlines() if s.startswith("{")]
        if proc.returncode != 0 or not lines:
            print(proc.stderr[-2000:], file=sys.stderr)
            return 1
        c = json.loads(lines[-1])
    print(
        f"{args.lib} {args.case} {args.quantity}: {c['quantity'] / 1e6:.1f} M instructions per "
        f"call; forward+backward {c['reference'] / 1e6:.1f} M; ratio "
        f"{c['quantity'] / c['reference']:.2f}"
        + (
            f" (tool's own {c['window'] / 1e6:.2f} M per window, subtracted)"
            if "window" in c
            else ""
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
