"""Paired-ratio benchmark harness: timings of nngeo_ops and its peers that survive a rerun.

Every timed quantity (a build, a product, a solve) is reported as a ratio to one plain
forward+backward of the same model on the same batch, and ours is compared with each peer by a
*paired* ratio:

* **one fresh worker process per library and case** (``python -m benchmarks.worker --worker``,
  :mod:`benchmarks.worker`):
  no allocator state, cache or lazily imported module is carried from one library to another. A
  worker sets the case up (the workers of a case at once), warms it up (one worker at a time, so
  that no call it times overlaps another worker's: 3 forward+backwards, then for each quantity its
  ``init`` and one call against an adjacent forward+backward), then answers the coordinator's
  commands over a pipe, one JSON line each.
* **rounds**: in each round the workers of one case run back to back, ours and each peer, the order
  reversed every other round. In a round a worker times every quantity against *its own adjacent*
  forward+backward (reference, then the call, repeated a few times; the per-round ratio is the median
  of these pairs). The per-round ratio ours / peer divides two measurements taken seconds apart, so
  that a change of load between rounds weighs on both; over at least 7 rounds (``--rounds``) the
  report gives the **median of the per-round ratios ours / peer and their interquartile range**
  (IQR). A lead is real when the upper quartile is below 1.
* **wall and CPU clocks**: each timed call records its wall time and the CPU time of its process
  (``time.process_time``, all threads); each gives its ratio. On a quiet machine the two agree and
  the wall ratio is the figure; on a shared machine the CPU-time ratio is the one a preempted
  process cannot inflate (it still feels the caches and memory bandwidth others take), so a
  report can be rendered with either (``clock``).
* **pinned threads**: every worker calls ``torch.set_num_threads(threads)`` (1 by default: a
  multi-threaded CPU op waits for its slowest thread, so a busy neighbour inflates it unevenly).
* **load of the machine**: over each case, the CPU time the whole machine spent busy (from
  ``/proc/stat``, steal time included) minus the CPU time of the coordinator and its workers (their
  ``getrusage``), as a share of the machine's capacity. :func:`check_load` refuses to write the
  committed table when it was above ``max_load`` (5 % by default) unless told to write an
  exploratory one.
* **peak memory** per case and library, in a *fresh* worker process started after the timing
  rounds (those of a case at once: nothing is timed then, and a peak resident set is the
  process's own) with glibc's mmap threshold fixed at 128 KiB from its first instruction (so that
  large blocks are mmapped and go back to the system when freed, whatever the heap held before):
  each quantity runs once unmeasured, then once with the peak resident set reset
  (``/proc/self/clear_refs``); the figure is the peak resident set minus the resident set before the
  call (on a GPU, ``torch.cuda.max_memory_allocated`` minus the allocated memory). Measured in the
  timing worker instead, after its rounds, the figure depended on the heap's history (glibc reuses
  large free chunks before it mmaps; ±10-20 MiB between runs of the same code).
* **few calls** (``call_cap_s``, ``--call-cap``, 10 s of CPU by default): a quantity whose warm-up
  call took longer is not run again: that call, timed against the forward+backward just before
  it, is its one measurement, marked ``few`` (the report gives it no IQR and marks it ‡). The
  warm-up call of such a quantity is a representative call: its ``init`` has already built the
  state it assumes (the operator, a cached factorisation), and what a first call adds besides —
  lazy imports, the allocator's first pages — is milliseconds against calls of tens of seconds
  (the CNN's block-diagonal: builds of 10-30 s, dense solves of 60-150 s; a first and a second
  call of each, timed apart, differed by less than 7 %, the first not the slower). Seven rounds of
  such calls would take tens of minutes per library. Its peak memory, and that of a quantity whose ``init`` is over the cap,
  is taken on that warm-up call in the timing worker (marked in the report): a fresh worker would
  repeat minutes of work, and the heap's history (±10-20 MiB) is small against their GB peaks.
  The ratio ours / peer of a row where either side is *few* is the ratio of the two medians.

A *suite* is a module (e.g. ``benchmarks.bench_curvature``) with

* ``setup(case_id: str, lib: str, device: torch.device) -> Case`` (called in the worker), and
* a list of :class:`CaseSpec` it hands to :func:`run_suite` in the coordinator.

Instruction counts of one case (a noise-free second figure) are in ``benchmarks/instructions.py``;
the header, charts and README tables of a run in ``benchmarks/report.py``.
"""

from __future__ import annotations

import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
OURS = "nngeo_ops"
DEFAULT_PEERS_PYTHON = os.environ.get("BENCH_PYTHON_PEERS", "/work/venv-peers/bin/python")


# ---------------------------------------------------------------------- what a suite provides
@dataclass
class Workload:
    """One timed quantity of a case.

    ``run(state)`` is timed; ``prepare()`` (untimed) runs before each timed call and its result is
    passed to ``run`` (e.g. a freshly built operator for a *first* solve); without ``prepare``
    ``run(None)`` is called. ``init()`` (untimed, once per worker process, before the quantity's
    first call, where it is measured) brings the state ``run`` assumes, e.g. the operator whose
    *cached* solve is timed and its first solve, which factorises it: the warm-up call that follows
    is then already a representative call (the cap, :class:`HarnessConfig`, may keep it as the
    measurement). ``max_rounds`` caps the rounds of a quantity. ``comparable=False`` marks a peer's
    quantity that computes a different matrix (shown, but never the "best peer" a row is judged
    against); ``note`` says how.
    """

    run: Callable[[Any], Any]
    prepare: Callable[[], Any] | None = None
    init: Callable[[], Any] | None = None
    max_rounds: int | None = None
    note: str = ""
    comparable: bool = True


class SameFailure(Exception):
    """Raised by a quantity that needs another quantity of its case which failed (and is reported
    under its own name): the worker drops it without a second note."""


def _is_same_failure(e: BaseException) -> bool:
    """Whether ``e`` is a :class:`SameFailure`; by name, so that a suite run as ``__main__`` (whose
    own ``SameFailure`` would be another class object) is recognised too."""
    return any(c.__name__ == "SameFailure" for c in type(e).__mro__)


@dataclass
class Case:
    """What a worker measures: the reference (one forward+backward) and the named quantities."""

    reference: Callable[[], Any]
    quantities: dict[str, Workload]
    note: str = ""
    version: str = ""


@dataclass
class CaseSpec:
    """A case as the coordinator sees it: its id, title and the libraries that compute it.

    ``peers`` maps a peer's label to the module that must import for it to run.
    """

    case_id: str
    title: str
    peers: dict[str, str] = field(default_factory=dict)


@dataclass
class HarnessConfig:
    """Settings of a run of the harness.

    rounds: rounds per case (≥ 7 for a committed table); threads: torch threads of every worker;
    budget_s: time a worker spends on one quantity in one round (sets the pairs per round, between
    1 and ``max_pairs``); python_peers: interpreter of the peer workers (``None``: this one);
    peers: False times nngeo_ops alone; device: ``"cpu"`` or ``"cuda"``; max_load: the share of
    the machine other processes may use during a committed run; call_cap_s: a quantity whose
    warm-up call took more CPU seconds than this is measured by that call alone (*few calls*,
    module docstring).
    """

    rounds: int = 7
    threads: int = 1
    budget_s: float = 0.3
    max_pairs: int = 5
    python_peers: str | None = None
    peers: bool = True
    device: str = "cpu"
    max_load: float = 0.05
    call_cap_s: float = 10.0


# ---------------------------------------------------------------------- statistics
def quartiles(xs: Sequence[float]) -> tuple[float, float, float]:
    """(lower quartile, median, upper quartile) by linear interpolation (one value: all three)."""
    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q1, q2, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q1, q2, q3


def paired_ratios(ours: Sequence[float], peer: Sequence[float]) -> list[float]:
    """Per-round ratios ours / peer of two equally long series of per-round measurements."""
    if len(ours) != len(peer):
        raise ValueError(f"paired series differ in length: {len(ours)} vs {len(peer)} rounds")
    return [a / b for a, b in zip(ours, peer) if b > 0]


# ---------------------------------------------------------------------- load of the machine
def cpu_jiffies() -> tuple[int, int] | None:
    """(busy, total) jiffies of the whole machine from /proc/stat (None where unavailable).

    busy = user + nice + system + irq + softirq + steal (steal: time the hypervisor gave to others).
    """
    try:
        with open("/proc/stat") as fh:
            f = [int(x) for x in fh.readline().split()[1:]]
    except OSError:
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = (f + [0] * 8)[:8]
    busy = user + nice + system + irq + softirq + steal
    return busy, busy + idle + iowait


def own_cpu_s() -> float:
    """CPU seconds of this process and of its reaped children (workers)."""
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


class LoadMeter:
    """Share of the machine's CPU capacity that *other* processes used between start and stop."""

    def __init__(self) -> None:
        self.hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.ncpu = os.cpu_count() or 1

    def start(self) -> None:
        self.j0, self.c0, self.t0 = cpu_jiffies(), own_cpu_s(), time.perf_counter()

    def stop(self) -> float | None:
        """Others' share in [0, 1] (None without /proc/stat); call after the workers are reaped."""
        j1, c1, t1 = cpu_jiffies(), own_cpu_s(), time.perf_counter()
        if self.j0 is None or j1 is None:
            return None
        busy = (j1[0] - self.j0[0]) / self.hz
        capacity = (j1[1] - self.j0[1]) / self.hz or (t1 - self.t0) * self.ncpu
        return min(1.0, max(0.0, (busy - (c1 - self.c0)) / capacity))


def check_load(load: float | None, cfg: HarnessConfig, allow: bool) -> str | None:
    """None if a table measured under ``load`` may be committed; else the reason it may not.

    With ``allow`` the table may still be written, marked exploratory (the caller prints the reason).
    """
    if load is None:
        return "the load of the machine could not be read (/proc/stat missing)"
    if load > cfg.max_load:
        return (
            f"other processes used {100 * load:.0f}% of the CPU during the run (limit "
            f"{100 * cfg.max_load:.0f}%); rerun on a quiet machine, or pass --allow-load to write "
            "a table marked exploratory"
        )
    return None


class WorkerProc:
    """A worker process seen from the coordinator."""

    def __init__(
        self,
        python: str,
        suite: str,
        spec: CaseSpec,
        lib: str,
        cfg: HarnessConfig,
        memory_only: bool = False,
    ):
        self.lib = lib
        self.err = tempfile.TemporaryFile(mode="w+")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(
            os.pathsep
        )
        env["OMP_NUM_THREADS"] = str(cfg.threads)
        cmd = [
            python, "-m", "benchmarks.worker", "--worker", "--suite", suite,
            "--case", spec.case_id, "--lib", lib, "--threads", str(cfg.threads),
            "--device", cfg.device, "--budget", str(cfg.budget_s),
            "--max-pairs", str(cfg.max_pairs), "--call-cap", str(cfg.call_cap_s),
        ] + (["--memory-only"] if memory_only else [])  # fmt: skip
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.err,
            text=True,
            cwd=str(REPO),
            env=env,
        )

    def recv(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self.err.seek(0)
            tail = [s for s in self.err.read().strip().splitlines() if s.strip()][-1:] or ["?"]
            return {"error": f"worker died (exit {self.proc.returncode}): {tail[0][:200]}"}
        return json.loads(line)

    def send(self, cmd: dict) -> bool:
        """Sends a command; False where the worker is gone."""
        try:
            self.proc.stdin.write(json.dumps(cmd) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            return False
        return True

    def ask(self, cmd: dict) -> dict:
        self.send(cmd)
        return self.recv()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.ask({"cmd": "exit"})
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.err.close()


def available_modules(python: str, modules: Sequence[str]) -> dict[str, bool]:
    """Which of ``modules`` import in the interpreter ``python`` (found by ``find_spec``)."""
    if not modules:
        return {}
    code = (
        "import importlib.util, json, sys\n"
        "print(json.dumps({m: importlib.util.find_spec(m) is not None for m in sys.argv[1:]}))"
    )
    try:
        out = subprocess.run(
            [python, "-c", code, *modules], capture_output=True, text=True, timeout=60
        )
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return {m: False for m in modules}


def peers_python(cfg: HarnessConfig) -> str:
    """The interpreter of the peer workers: ``cfg.python_peers`` if it exists, else this one."""
    if cfg.python_peers and os.path.exists(cfg.python_peers):
        return cfg.python_peers
    return sys.executable


@dataclass
class CaseResult:
    """Per-round measurements of one case: ``rounds[lib][quantity]`` is a list of dicts."""

    spec: CaseSpec
    libs: list[str]
    rounds: dict[str, dict[str, list[dict]]]
    memory: dict[str, dict[str, float]]
    notes: dict[str, str]
    versions: dict[str, str]
    load: float | None
    seconds: float
    info: dict[str, dict[str, dict]] = field(default_factory=dict)
    t_ref: dict[str, float] = field(default_factory=dict)
    pass_no: int = 0

    def ratios(self, lib: str, q: str, clock: str = "wall") -> list[float]:
        """Per-round ratios to one forward+backward; ``clock``: "wall" or "cpu" (process time)."""
        key = "ratio" if clock == "wall" else "ratio_cpu"
        return [r[key] for r in self.rounds.get(lib, {}).get(q, []) if key in r]

    def few(self, lib: str, q: str) -> bool:
        """Whether ``lib``'s ``q`` was measured by one call over the cap (no rounds)."""
        return bool(self.info.get(lib, {}).get(q, {}).get("few", False))

    def memory_from_timing(self, lib: str, q: str) -> bool:
        """Whether ``lib``'s peak memory of ``q`` came from the timing worker (not a fresh one)."""
        return bool(self.info.get(lib, {}).get(q, {}).get("memory_from_timing", False))

    def paired(self, peer: str, q: str, clock: str = "wall") -> list[float]:
        """Per-round ratios ours / peer; where either side is *few calls*, the one ratio of
        ours' median to the peer's (nothing to pair round by round)."""
        a, b = self.ratios(OURS, q, clock), self.ratios(peer, q, clock)
        if a and b and (self.few(OURS, q) or self.few(peer, q)):
            return paired_ratios([statistics.median(a)], [statistics.median(b)])
        n = min(len(a), len(b))
        return paired_ratios(a[:n], b[:n])

    @classmethod
    def from_json(cls, d: dict) -> CaseResult:
        """The inverse of :meth:`to_json` (re-render a saved run without measuring again)."""
        spec = CaseSpec(d["case"], d["title"])
        return cls(
            spec, d["libs"], d["rounds"], d["memory"], d["notes"], d["versions"], d["load"],
            d["seconds"], d.get("info", {}), d.get("t_ref", {}), d.get("pass", 0),
        )  # fmt: skip

    def to_json(self) -> dict:
        return {
            "case": self.spec.case_id,
            "title": self.spec.title,
            "libs": self.libs,
            "rounds": self.rounds,
            "memory": self.memory,
            "notes": self.notes,
            "versions": self.versions,
            "load": self.load,
            "seconds": self.seconds,
            "info": self.info,
            "t_ref": self.t_ref,
            "pass": self.pass_no,
        }


def run_case(
    suite: str, spec: CaseSpec, cfg: HarnessConfig, log: Callable[[str], None] = print
) -> CaseResult:
    """Measure one case: a worker per library, ``cfg.rounds`` alternating rounds, then memory."""
    meter = LoadMeter()
    meter.start()
    t0 = time.perf_counter()
    libs = [OURS]
    notes: dict[str, str] = {}
    if cfg.peers and spec.peers:
        py = peers_python(cfg)
        avail = available_modules(py, sorted(set(spec.peers.values())))
        for label, module in spec.peers.items():
            if avail.get(module):
                libs.append(label)
            else:
                notes[label] = f"not installed ({module} does not import in {py})"
    workers = {
        lib: WorkerProc(sys.executable if lib == OURS else peers_python(cfg), suite, spec, lib, cfg)
        for lib in libs
    }
    rounds: dict[str, dict[str, list[dict]]] = {}
    memory: dict[str, dict[str, float]] = {}
    versions: dict[str, str] = {}
    info: dict[str, dict[str, dict]] = {}
    t_ref: dict[str, float] = {}
    warm_mem: dict[str, dict[str, float]] = {}
    try:
        for lib, w in list(workers.items()):  # set-ups in parallel (nothing timed yet)
            msg = w.recv()
            if "error" in msg:
                notes[lib] = msg["error"]
                w.close()
                del workers[lib]
        for lib, w in list(workers.items()):  # warm-ups one at a time: their calls may be timed
            msg = w.ask({"cmd": "warm"})
            if "error" in msg:
                notes[lib] = msg["error"]
                w.close()
                del workers[lib]
                continue
            versions[lib] = msg.get("version", "")
            info[lib] = msg.get("quantities", {})
            t_ref[lib] = msg.get("t_ref", math.nan)
            warm_mem[lib] = msg.get("memory_warm", {})
            if msg.get("note"):
                notes[lib] = msg["note"]
            for q, why in msg.get("failed", {}).items():
                notes[f"{lib}:{q}"] = why
            rounds[lib] = {q: [m] for q, m in msg.get("few", {}).items()}
        live = [lib for lib in libs if lib in workers]
        for r in range(cfg.rounds):
            order = live if r % 2 == 0 else live[::-1]
            for lib in order:
                msg = workers[lib].ask({"cmd": "round", "round": r})
                if "error" in msg:
                    notes[lib] = msg["error"]
                    live = [x for x in live if x != lib]
                    continue
                for q, m in msg.items():
                    rounds[lib].setdefault(q, []).append(m)
        for w in workers.values():  # timing done: a fresh process per library measures memory
            w.close()
        workers.clear()
        skips: dict[str, list[str]] = {}
        for lib in live:
            # a quantity over the cap, or whose init is, would cost minutes again in a fresh
            # worker: its figure is the timing worker's warm-up call's (module docstring)
            skip = [
                q
                for q, d in info[lib].items()
                if d.get("few") or d.get("init_s", 0.0) > cfg.call_cap_s
            ]
            memory[lib] = {}
            for q in skip:
                if q in warm_mem[lib]:
                    memory[lib][q] = warm_mem[lib][q]
                    info[lib][q]["memory_from_timing"] = True
            if len(skip) < len(info[lib]):
                skips[lib] = skip
        # the memory workers run at once: nothing is timed, and a process's peak resident set is
        # its own (no swap); they are started and asked together, then read in turn
        for lib in skips:
            py = sys.executable if lib == OURS else peers_python(cfg)
            workers[lib] = WorkerProc(py, suite, spec, lib, cfg, memory_only=True)
        asked = []
        for lib, mw in workers.items():
            if "error" not in mw.recv() and mw.send(
                {"cmd": "memory", "warm": True, "skip": skips[lib]}
            ):
                asked.append(lib)
        for lib in asked:
            msg = workers[lib].recv()
            if "error" not in msg:
                memory[lib].update(msg)
    finally:
        for w in workers.values():
            w.close()
    load = meter.stop()
    res = CaseResult(
        spec, libs, rounds, memory, notes, versions, load, time.perf_counter() - t0, info, t_ref
    )
    share = "?" if load is None else f"{100 * load:.0f}%"
    log(f"  {spec.case_id}: {res.seconds:.0f} s, others' CPU share {share}")
    return res


def run_suite(
    suite: str,
    specs: Sequence[CaseSpec],
    cfg: HarnessConfig,
    log: Callable[[str], None] = print,
    on_case: Callable[[list[CaseResult]], None] | None = None,
    repeat: int = 1,
) -> list[CaseResult]:
    """Run every case of a suite (each with its own workers) and return the per-round results.

    ``repeat``: the whole list of cases is run that many times, one pass after the other (so that
    the runs of a case are minutes apart, under whatever the machine did meanwhile); each result
    carries its ``pass_no``, and the report combines the runs of a case (``benchmarks/report.py``).
    ``on_case(results so far)`` is called after each case (e.g. to save a long run as it goes).
    """
    results: list[CaseResult] = []
    for k in range(repeat):
        if repeat > 1:
            log(f"pass {k + 1}/{repeat}")
        for spec in specs:
            res = run_case(suite, spec, cfg, log)
            res.pass_no = k
            results.append(res)
            if on_case is not None:
                on_case(results)
    return results


def overall_load(results: Sequence[CaseResult]) -> float | None:
    """Others' CPU share over the whole run (cases weighted by their duration)."""
    known = [(r.load, r.seconds) for r in results if r.load is not None]
    total = sum(s for _, s in known)
    if not known or total == 0:
        return None
    return sum(load * s for load, s in known) / total


__all__ = [
    "Case",
    "CaseResult",
    "CaseSpec",
    "HarnessConfig",
    "LoadMeter",
    "SameFailure",
    "Workload",
    "check_load",
    "overall_load",
    "paired_ratios",
    "quartiles",
    "run_case",
    "run_suite",
]
