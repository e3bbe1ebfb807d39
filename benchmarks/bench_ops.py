"""Benchmark of the nngeo_ops operator core against dense torch and, where installed, its peers.

Run from the repository root::

    python benchmarks/bench_ops.py            # full run (about a minute on 2 CPU cores)
    python benchmarks/bench_ops.py --quick    # fewer repetitions (well under 30 s)
    python benchmarks/bench_ops.py --out DIR  # also DIR/bench_ops.md and DIR/bench_ops.png

What is measured, all in float64 on the CPU (see ``benchmarks/README.md`` for the reading):

1. Damped Kronecker ``(A ⊗ G) + 1e-3·I`` with two 64×64 SPD factors (P = 4096): ``solve`` and
   ``logdet`` against ``torch.linalg.solve`` / ``torch.linalg.cholesky`` + logdet of the dense
   4096×4096 matrix ``torch.kron(A, G) + 1e-3·I``.
2. ``Diagonal(d) + LowRank(U)``, n = 4000, rank 10: ``solve`` and ``logdet`` against the dense
   4000×4000 matrix.
3. The per-call overhead of a tiny matvec: ``Dense(M) @ x`` (M 16×16) and ``Diagonal(d) @ x``
   (d of length 16) against the bare torch ops ``M @ x`` and ``d * x``.
4. The same cases through GPyTorch's ``linear_operator`` and ``cola`` (cola-ml) when they can be
   imported; otherwise their rows read "not installed".

"First call" is the first ``solve`` / ``logdet`` on a freshly built operator (fresh leaves, so every
factorisation and the compile are redone; building the node itself is not timed). "Repeated call"
is a later call on the same operator (cached factorisations). Every figure is a median.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import timeit
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
DTYPE = torch.float64
DAMPING = 1e-3
NOT_INSTALLED = "not installed"


# ---------------------------------------------------------------------------------------- setup
def import_ours() -> Any:
    """``nngeo_ops.ops`` from the checkout this script lives in (even if another is installed)."""
    sys.path.insert(0, str(ROOT))
    return importlib.import_module("nngeo_ops.ops")


def import_peer(name: str) -> tuple[Any, str]:
    """``(module, version)`` of an optional peer library, or ``(None, reason)``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mod = importlib.import_module(name)
            if name == "linear_operator":
                importlib.import_module("linear_operator.operators")
    except ImportError:
        return None, NOT_INSTALLED
    except Exception as e:  # a peer that is installed but broken must not stop the benchmark
        return None, f"import failed ({type(e).__name__})"
    return mod, str(getattr(mod, "__version__", "?"))


def available_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_ticks() -> tuple[int, int] | None:
    """``(busy, total)`` jiffies of the whole machine from ``/proc/stat`` (None off Linux)."""
    try:
        first = Path("/proc/stat").read_text().split("\n", 1)[0]
        fields = [int(v) for v in first.split()[1:9]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def busy_share(seconds: float) -> float | None:
    """Share of the machine's CPU that is busy while this process sleeps (None off Linux)."""
    start = cpu_ticks()
    time.sleep(seconds)
    end = cpu_ticks()
    if start is None or end is None or end[1] == start[1]:
        return None
    return (end[0] - start[0]) / (end[1] - start[1])


def others_cpu_share(start: tuple[int, int] | None, own_start: float) -> str:
    """Share of the machine's CPU time used by *other* processes since ``start``."""
    end = cpu_ticks()
    if start is None or end is None or end[1] == start[1]:
        return "?"
    hz = os.sysconf("SC_CLK_TCK")
    busy, total = (end[0] - start[0]) / hz, (end[1] - start[1]) / hz
    own = sum(os.times()[:2]) - own_start
    return f"{max(busy - own, 0.0) / total:.0%}"


def git_revision() -> str:
    """Short commit of the checkout, with ``+changes`` when ``nngeo_ops/ops`` has local edits."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "nngeo_ops/ops"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return "?"
    return (head or "?") + (" +changes in nngeo_ops/ops" if dirty else "")


def machine_info(peers: dict[str, tuple[Any, str]]) -> list[str]:
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    return [
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}, "
        f"nngeo_ops commit: {git_revision()}",
        f"- CPU: {cpu_name()} ({os.cpu_count()} logical cores visible)",
        f"- torch {torch.__version__}, threads: {torch.get_num_threads()}, dtype: float64",
        f"- python {platform.python_version()}, {platform.system()} {platform.release()}",
        f"- load average (1/5/15 min) at start: {load}",
        *(f"- {name}: {version}" for name, (_, version) in peers.items()),
    ]


# ---------------------------------------------------------------------------------------- timing
def median_time(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    gc.collect()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def first_and_repeated(
    make: Callable[[], Any],
    call: Callable[[Any], Any],
    n_first: int,
    n_repeated: int,
    warm_repeated: bool = True,
) -> tuple[float, float, Any]:
    """``(first, repeated, result)``: median first call on fresh operators, median later call.

    One fresh operator is used (and thrown away) before timing, so that one-time costs of the
    process (loading LAPACK kernels, a dispatcher's caches) are not counted as "first call".
    """
    call(make())
    gc.collect()
    firsts = []
    for _ in range(n_first):
        op = make()
        t0 = time.perf_counter()
        result = call(op)
        firsts.append(time.perf_counter() - t0)
    repeated = median_time(lambda: call(op), n_repeated, warmup=int(warm_repeated))
    return statistics.median(firsts), repeated, result


def per_call_times(
    stmts: dict[str, tuple[str, dict[str, Any]]], number: int, rounds: int
) -> dict[str, list[float]]:
    """Seconds per call of each statement, one sample per round, statements interleaved per round.

    Interleaving makes every round see the same machine state, so per-round ratios stay meaningful
    on a busy machine; the caller takes medians.
    """
    timers = {k: timeit.Timer(stmt, globals=g) for k, (stmt, g) in stmts.items()}
    for t in timers.values():  # warm-up
        t.timeit(number=max(number // 10, 10))
    out: dict[str, list[float]] = {k: [] for k in timers}
    for _ in range(rounds):
        for k, t in timers.items():
            out[k].append(t.timeit(number=number) / number)
    return out


def fmt_time(s: float | None) -> str:
    if s is None or math.isnan(s):
        return "–"
    if s < 1e-3:
        return f"{s * 1e6:.1f} µs"
    if s < 1.0:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


def fmt_ratio(r: float | None) -> str:
    if r is None or math.isnan(r):
        return "–"
    if r >= 100:
        return f"{r:,.0f}×"
    return f"{r:.2f}×" if r < 10 else f"{r:.1f}×"


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.detach().to(ref.dtype), ref.detach()
    return float((x - ref).norm() / ref.norm().clamp_min(1e-300))


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- problems
def spd(n: int, gen: torch.Generator) -> torch.Tensor:
    """A well-conditioned random SPD matrix (eigenvalues roughly in [0.01, 3])."""
    X = torch.randn(n, 2 * n, dtype=DTYPE, generator=gen)
    return X @ X.mT / (2 * n) + 1e-2 * torch.eye(n, dtype=DTYPE)


class Row:
    """One implementation of one quantity of one case."""

    def __init__(self, case: str, op: str, impl: str) -> None:
        self.case, self.op, self.impl = case, op, impl
        self.first: float | None = None
        self.repeated: float | None = None
        self.dense: float | None = None
        self.err: float | None = None
        self.note = ""

    def cells(self) -> list[str]:
        def ratio(t: float | None) -> str:
            return fmt_ratio(self.dense / t) if (self.dense and t) else "–"

        err = "–" if self.err is None else f"{self.err:.1e}"
        return [
            self.case,
            self.op,
            self.impl + (f" ({self.note})" if self.note else ""),
            fmt_time(self.first),
            fmt_time(self.repeated),
            fmt_time(self.dense),
            ratio(self.first),
            ratio(self.repeated),
            err,
        ]


STRUCT_HEADER = [
    "case",
    "op",
    "implementation",
    "first call",
    "repeated call",
    "dense torch",
    "dense / first",
    "dense / repeated",
    "rel. error",
]


def dense_baselines(
    Kd: torch.Tensor, b: torch.Tensor, repeats: int
) -> tuple[dict[str, float], torch.Tensor, torch.Tensor, float]:
    """Times of dense LU solve, Cholesky + logdet, and a solve reusing the Cholesky factor.

    Returns the times, the reference solution (LU) and log-determinant (Cholesky), and the relative
    error of the Cholesky-factor solve against the LU one.
    """

    def chol_logdet() -> torch.Tensor:
        L = torch.linalg.cholesky(Kd)
        return 2.0 * L.diagonal().log().sum()

    t_solve = median_time(lambda: torch.linalg.solve(Kd, b), repeats, warmup=0)
    t_logdet = median_time(chol_logdet, repeats, warmup=0)
    L = torch.linalg.cholesky(Kd)
    b2 = b.unsqueeze(1)
    t_reuse = median_time(lambda: torch.cholesky_solve(b2, L), max(3, repeats), warmup=1)
    x_ref = torch.linalg.solve(Kd, b)
    ld_ref = 2.0 * L.diagonal().log().sum()
    err_reuse = rel_err(torch.cholesky_solve(b2, L).squeeze(1), x_ref)
    times = {"solve": t_solve, "logdet": t_logdet, "solve_reuse": t_reuse}
    return times, x_ref, ld_ref, err_reuse


def run_structured(
    case: str,
    impls: list[tuple[str, Any, Callable | None, Callable | None, Callable | None]],
    Kd: torch.Tensor,
    b: torch.Tensor,
    cfg: argparse.Namespace,
) -> list[Row]:
    """Time every implementation of one case.

    ``impls``: ``(name, status, make, solve, logdet)``; ``status`` is ``None`` when the
    implementation can run, else a note printed in its row. ``solve(op, b)``, ``logdet(op)``.
    """
    dense, x_ref, ld_ref, err_reuse = dense_baselines(Kd, b, cfg.dense_repeats)
    rows = []
    for op_name in ("solve", "logdet"):
        r = Row(case, op_name, "dense torch (factor reused: cholesky_solve)")
        if op_name == "solve":
            r.repeated, r.dense = dense["solve_reuse"], dense["solve"]
            r.err = err_reuse
            rows.append(r)
        for name, status, make, solve, logdet in impls:
            r = Row(case, op_name, name)
            r.dense = dense[op_name]
            fn = solve if op_name == "solve" else logdet
            if status is not None or fn is None:
                r.note = status or "no such routine"
                rows.append(r)
                continue
            call = (lambda op, fn=fn: fn(op, b)) if op_name == "solve" else fn
            slow = name.startswith("cola")  # a densifying route: seconds per call, nothing cached
            n_first, n_rep = (
                (cfg.slow_repeats, cfg.slow_repeats)
                if slow
                else (cfg.first_repeats, cfg.rep_repeats)
            )
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    r.first, r.repeated, out = first_and_repeated(
                        make, call, n_first, n_rep, warm_repeated=not slow
                    )
            except Exception as e:  # a peer failing must not stop the benchmark
                r.note = f"failed: {type(e).__name__}: {str(e)[:60]}"
                rows.append(r)
                continue
            if op_name == "solve":
                r.err = rel_err(out, x_ref)
            else:
                r.err = abs(float(out) - float(ld_ref)) / abs(float(ld_ref))
            rows.append(r)
    return rows


def kronecker_case(ops: Any, lo: Any, cola: Any, peers: dict, cfg: argparse.Namespace) -> list[Row]:
    gen = torch.Generator().manual_seed(0)
    A, G = spd(64, gen), spd(64, gen)
    P = A.shape[0] * G.shape[0]
    b = torch.randn(P, dtype=DTYPE, generator=gen)
    Kd = torch.kron(A, G) + DAMPING * torch.eye(P, dtype=DTYPE)

    impls: list = [
        (
            "nngeo_ops",
            None,
            lambda: (
                ops.Kronecker(ops.Dense(A, psd=True), ops.Dense(G, psd=True))
                + DAMPING * ops.Identity(P)
            ),
            lambda K, b: K.solve(b),
            lambda K: K.logdet(),
        )
    ]
    if lo is not None:
        from linear_operator.operators import DenseLinearOperator, KroneckerProductLinearOperator

        damp = torch.tensor(DAMPING, dtype=DTYPE)
        impls.append(
            (
                "linear_operator",
                None,
                lambda: KroneckerProductLinearOperator(
                    DenseLinearOperator(A), DenseLinearOperator(G)
                ).add_diagonal(damp),
                lambda K, b: K.solve(b),
                lambda K: K.inv_quad_logdet(logdet=True)[1],
            )
        )
    else:
        impls.append(("linear_operator", peers["linear_operator"][1], None, None, None))
    if cola is not None:
        # cola has no rule for Kronecker + c·I: its default (Auto) takes CG / stochastic Lanczos
        # here (seconds to minutes); the exact route it offers is Cholesky of the densified matrix.
        def make_cola() -> Any:
            K = cola.ops.Kronecker(cola.ops.Dense(A), cola.ops.Dense(G))
            return cola.PSD(K + DAMPING * cola.ops.I_like(K))

        impls.append(
            (
                "cola, alg=Cholesky (densifies)",
                None,
                make_cola,
                lambda K, b: cola.linalg.inv(K, alg=cola.Cholesky()) @ b,
                lambda K: cola.linalg.logdet(K, cola.Cholesky(), cola.Exact()),
            )
        )
    else:
        impls.append(("cola", peers["cola"][1], None, None, None))
    return run_structured(f"(A⊗G)+1e-3·I, P={P}", impls, Kd, b, cfg)


def lowrank_case(ops: Any, lo: Any, cola: Any, peers: dict, cfg: argparse.Namespace) -> list[Row]:
    gen = torch.Generator().manual_seed(1)
    n, k = 4000, 10
    d = torch.rand(n, dtype=DTYPE, generator=gen) + 0.5
    U = torch.randn(n, k, dtype=DTYPE, generator=gen)
    b = torch.randn(n, dtype=DTYPE, generator=gen)
    Kd = torch.diag(d) + U @ U.mT

    impls: list = [
        (
            "nngeo_ops",
            None,
            lambda: ops.Diagonal(d) + ops.LowRank(U),
            lambda K, b: K.solve(b),
            lambda K: K.logdet(),
        )
    ]
    if lo is not None:
        from linear_operator.operators import (
            DiagLinearOperator,
            LowRankRootAddedDiagLinearOperator,
            LowRankRootLinearOperator,
        )

        impls.append(
            (
                "linear_operator",
                None,
                lambda: LowRankRootAddedDiagLinearOperator(
                    LowRankRootLinearOperator(U), DiagLinearOperator(d)
                ),
                lambda K, b: K.solve(b),
                lambda K: K.inv_quad_logdet(logdet=True)[1],
            )
        )
    else:
        impls.append(("linear_operator", peers["linear_operator"][1], None, None, None))
    impls.append(
        ("cola", "no low-rank node" if cola is not None else peers["cola"][1], *[None] * 3)
    )
    return run_structured(f"diag+UUᵀ, n={n}, rank {k}", impls, Kd, b, cfg)


# ---------------------------------------------------------------------------------------- overhead
def overhead_section(ops: Any, lo: Any, cola: Any, peers: dict, cfg: argparse.Namespace) -> tuple:
    gen = torch.Generator().manual_seed(2)
    n = 16
    M = torch.randn(n, n, dtype=DTYPE, generator=gen)
    d = torch.rand(n, dtype=DTYPE, generator=gen) + 0.5
    x = torch.randn(n, dtype=DTYPE, generator=gen)

    # label: (bare statement, its globals, its value, {implementation: operator})
    cases = {
        "Dense(M) @ x, M 16×16": ("M @ x", {"M": M, "x": x}, M @ x, {"nngeo_ops": ops.Dense(M)}),
        "Diagonal(d) @ x, n=16": (
            "d * x",
            {"d": d, "x": x},
            d * x,
            {"nngeo_ops": ops.Diagonal(d)},
        ),
    }
    if lo is not None:
        from linear_operator.operators import DenseLinearOperator, DiagLinearOperator

        cases["Dense(M) @ x, M 16×16"][3]["linear_operator"] = DenseLinearOperator(M)
        cases["Diagonal(d) @ x, n=16"][3]["linear_operator"] = DiagLinearOperator(d)
    if cola is not None:
        cases["Dense(M) @ x, M 16×16"][3]["cola"] = cola.ops.Dense(M)
        cases["Diagonal(d) @ x, n=16"][3]["cola"] = cola.ops.Diagonal(d)

    header = [
        "matvec",
        "bare torch",
        "nngeo_ops",
        "ours / bare",
        "linear_operator",
        "LO / bare",
        "cola",
        "cola / bare",
        "ours / LO",
        "ours − bare vs LO − bare",
    ]
    rows, summary = [], {}
    for label, (bare, g, ref, nodes) in cases.items():
        stmts = {"bare": (bare, g)}
        stmts.update({k: ("A @ x", {"A": A, "x": x}) for k, A in nodes.items()})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for k, A in nodes.items():  # every implementation must agree with the bare op
                if not torch.allclose(A @ x, ref):
                    raise AssertionError(f"{k}: wrong matvec")
            samples = per_call_times(stmts, cfg.number, cfg.rounds)
        med = {k: statistics.median(v) for k, v in samples.items()}

        def vs_bare(k: str, med=med, samples=samples) -> float | None:
            if k not in samples:
                return None
            return statistics.median(a / b for a, b in zip(samples[k], samples["bare"]))

        def cell(k: str, med=med) -> str:
            if k in med:
                return fmt_time(med[k])
            return peers[k][1] if k in peers and peers[k][0] is None else "–"

        ours_lo = excess = None
        if "linear_operator" in samples:
            ours_lo = statistics.median(
                a / b for a, b in zip(samples["nngeo_ops"], samples["linear_operator"])
            )
            ex_ours = med["nngeo_ops"] - med["bare"]
            ex_lo = med["linear_operator"] - med["bare"]
            excess = f"{ex_ours * 1e9:+.0f} ns vs {ex_lo * 1e9:+.0f} ns" + (
                f" ({ex_ours / ex_lo:.1f}×)" if ex_lo > 50e-9 else ""
            )
        summary[label] = {"ours/bare": vs_bare("nngeo_ops"), "ours/LO": ours_lo}
        rows.append(
            [
                label,
                fmt_time(med["bare"]),
                cell("nngeo_ops"),
                fmt_ratio(vs_bare("nngeo_ops")),
                cell("linear_operator"),
                fmt_ratio(vs_bare("linear_operator")),
                cell("cola"),
                fmt_ratio(vs_bare("cola")),
                fmt_ratio(ours_lo),
                excess or "–",
            ]
        )
    return header, rows, summary


# ---------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (< 30 s)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--out", default=None, help="write bench_ops.md and bench_ops.png here")
    cfg = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from benchmarks.contract import Tee, write_report

    with Tee() as tee:
        rows = run(cfg)
    if cfg.out:
        write_report(cfg.out, "bench_ops", tee.text)
        chart(rows, Path(cfg.out) / "bench_ops.png")


def chart(rows: list[Row], path: Path) -> bool:
    """Speed-up over dense torch of the first and repeated calls (log bars); False if no plot."""
    from benchmarks.report import bar_chart

    labels, stats = [], []
    for r in rows:
        for kind, t in (("first", r.first), ("repeated", r.repeated)):
            if t and r.dense and not r.impl.startswith("dense"):
                labels.append(f"{r.case} {r.op} {r.impl} ({kind})")
                s = r.dense / t
                stats.append((s, s, s))
    if not labels:
        return False
    return bar_chart(
        path,
        labels,
        stats,
        "operator core: speed-up over dense torch",
        "dense / ours",
        (1.0, 1000.0),
        lower_is_better=False,
    )


def run(cfg: argparse.Namespace) -> list[Row]:
    """The whole benchmark (prints as it goes); returns the rows of the structured table."""
    if cfg.quick:
        cfg.dense_repeats, cfg.first_repeats, cfg.rep_repeats, cfg.slow_repeats = 1, 3, 10, 1
        cfg.number, cfg.rounds = 1000, 7
    else:
        cfg.dense_repeats, cfg.first_repeats, cfg.rep_repeats, cfg.slow_repeats = 3, 7, 40, 2
        cfg.number, cfg.rounds = 4000, 21

    torch.set_num_threads(cfg.threads or available_threads())
    t_start = time.perf_counter()
    ticks0, own0 = cpu_ticks(), sum(os.times()[:2])
    ops = import_ours()
    peers = {name: import_peer(name) for name in ("linear_operator", "cola")}
    lo, cola = peers["linear_operator"][0], peers["cola"][0]

    print("# nngeo_ops operator benchmark" + (" (--quick)" if cfg.quick else ""))
    print()
    print("\n".join(machine_info(peers)))
    busy = busy_share(0.5)
    if busy is not None:
        print(f"- CPU busy (other processes) while this one slept for 0.5 s: {busy:.0%}")
    if busy is not None and busy > 0.2:
        print(
            "- WARNING: other processes are using the CPU; multi-threaded sub-millisecond calls "
            "stall (by milliseconds) when the cores are shared, so rerun on an idle machine (or "
            "with --threads 1) before trusting the small timings"
        )
    print()

    with torch.no_grad():
        rows = kronecker_case(ops, lo, cola, peers, cfg)
        rows += lowrank_case(ops, lo, cola, peers, cfg)
    print("## Structured solve and logdet (medians; dense = same matrix materialised)")
    print()
    print(markdown_table(STRUCT_HEADER, [r.cells() for r in rows]))
    print()

    header, orows, osummary = overhead_section(ops, lo, cola, peers, cfg)
    print(f"## Per-call matvec overhead (timeit, {cfg.number} calls × {cfg.rounds} rounds, median)")
    print()
    print(markdown_table(header, orows))
    print()

    print("## Against the targets")
    print()
    ours = [r for r in rows if r.impl == "nngeo_ops" and r.first and r.repeated and r.dense]
    for r in ours:
        print(
            f"- {r.case} {r.op}: dense/ours = {fmt_ratio(r.dense / r.repeated)} repeated, "
            f"{fmt_ratio(r.dense / r.first)} first call (target > 1,000×: "
            f"{'met' if r.dense / r.repeated > 1000 else 'NOT met'} repeated, "
            f"{'met' if r.dense / r.first > 1000 else 'NOT met'} first call)"
        )
        peer = next(
            (
                p
                for p in rows
                if p.case == r.case and p.op == r.op and p.impl == "linear_operator" and p.repeated
            ),
            None,
        )
        if peer is not None:
            print(
                f"  - vs linear_operator: ours/theirs = {r.first / peer.first:.2f} first call, "
                f"{r.repeated / peer.repeated:.2f} repeated"
            )
    for label, s in osummary.items():
        line = f"- {label}: ours / bare torch = {fmt_ratio(s['ours/bare'])}"
        if s["ours/LO"] is not None:
            verdict = "met" if s["ours/LO"] <= 2 else "NOT met"
            line += f"; ours / linear_operator = {s['ours/LO']:.2f}× (target ≤ 2×: {verdict})"
        else:
            line += "; linear_operator not available"
        print(line)
    print()
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    print(
        f"total benchmark time: {time.perf_counter() - t_start:.1f} s; load average at end: "
        f"{load}; CPU share used by other processes during the run: {others_cpu_share(ticks0, own0)}"
        " (small timings are trustworthy only when this is near 0%)"
    )
    return rows


if __name__ == "__main__":
    main()
