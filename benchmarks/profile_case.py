"""Where the time of one benchmark case goes: ``torch.profiler`` over a few calls of one quantity.

    python -m benchmarks.profile_case --case mlp/diag --quantity build [--lib nngeo_ops] \\
        [--calls 10] [--rows 15] [--suite benchmarks.bench_curvature]

sets the case up as a harness worker does (benchmarks/harness.py; a peer's case with the peers'
interpreter, e.g. ``/work/venv-peers/bin/python -m benchmarks.profile_case --lib BackPACK ...``),
warms it up, then profiles ``--calls`` forward+backwards and ``--calls`` calls of the quantity (its
untimed ``prepare`` outside the profile) with one thread, and prints for each the ops with the
largest self time, their share, and the time outside any torch op (Python, hooks, dispatch).
torch.profiler measures wall time, which a preempted process inflates at random: on a shared
machine use ``--timer cpu``, a ``cProfile`` of the same calls timed by the process's CPU time
(``time.process_time``), which lists Python functions and torch calls by their own CPU time.
The reading of the rows where a peer is faster is in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import cProfile
import importlib
import io
import pstats
import time

import torch
from torch.profiler import ProfilerActivity, profile


def _profile(fn, calls: int, prepare=None):
    states = [prepare() if prepare else None for _ in range(calls)]
    t = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for s in states:
            fn(s)
    wall = (time.perf_counter() - t) / calls
    return prof, wall


def _table(prof, wall: float, calls: int, rows: int) -> str:
    evs = [e for e in prof.key_averages() if e.key.startswith("aten::") or e.key.startswith("mkl")]
    evs.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    in_ops = sum(e.self_cpu_time_total for e in evs) / 1e6 / calls
    lines = [
        f"per call {1e3 * wall:.2f} ms (profiled); inside aten ops {1e3 * in_ops:.2f} ms "
        f"({100 * in_ops / wall:.0f}%), outside (Python, hooks, dispatch) "
        f"{1e3 * (wall - in_ops):.2f} ms",
        "",
        "| op | calls / call | self ms / call | share of the call |",
        "|---|---:|---:|---:|",
    ]
    for e in evs[:rows]:
        ms = e.self_cpu_time_total / 1e3 / calls
        lines.append(
            f"| {e.key} | {e.count / calls:.0f} | {ms:.3f} | {100 * ms / 1e3 / wall:.0f}% |"
        )
    return "\n".join(lines)


def _cprofile(fn, calls: int, prepare, rows: int) -> tuple[float, str]:
    """(CPU seconds per call, the top functions by own CPU time) of ``calls`` calls of ``fn``."""
    states = [prepare() if prepare else None for _ in range(calls)]
    prof = cProfile.Profile(time.process_time)
    c = time.process_time()
    prof.enable()
    for s in states:
        fn(s)
    prof.disable()
    cpu = (time.process_time() - c) / calls
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(rows)
    body = buf.getvalue().split("ncalls", 1)[-1]
    return cpu, "ncalls" + body


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--case", default="mlp/diag")
    p.add_argument("--quantity", default="build")
    p.add_argument("--lib", default="nngeo_ops")
    p.add_argument("--calls", type=int, default=10)
    p.add_argument("--rows", type=int, default=15)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--suite", default="benchmarks.bench_curvature")
    p.add_argument("--timer", choices=["torch", "cpu"], default="torch")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    case = importlib.import_module(args.suite).setup(args.case, args.lib, torch.device("cpu"))
    w = case.quantities[args.quantity]
    for _ in range(3):
        case.reference()
        w.run(w.prepare() if w.prepare else None)
    if args.timer == "cpu":
        c_ref, _ = _cprofile(lambda _: case.reference(), args.calls, None, 1)
        c_q, top = _cprofile(w.run, args.calls, w.prepare, args.rows)
        print(f"## {args.lib} · {args.case} · {args.quantity}: {c_q / c_ref:.2f}× forward+backward")
        print(f"(CPU time per call {1e3 * c_q:.2f} ms; forward+backward {1e3 * c_ref:.2f} ms)\n")
        print(top)
        return
    ref, t_ref = _profile(lambda _: case.reference(), args.calls)
    prof, t_q = _profile(w.run, args.calls, w.prepare)
    print(f"## {args.lib} · {args.case} · {args.quantity}: {t_q / t_ref:.2f}× forward+backward\n")
    print("forward+backward: " + _table(ref, t_ref, args.calls, 6) + "\n")
    print(f"{args.quantity}: " + _table(prof, t_q, args.calls, args.rows))


if __name__ == "__main__":
    main()
