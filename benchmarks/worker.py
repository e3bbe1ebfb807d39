"""The worker process of the benchmark harness (``python -m benchmarks.worker --worker``).

One worker per library and case (see :mod:`benchmarks.harness`): it sets the case up, warms it up
when told, times rounds of each quantity against its own adjacent forward+backward, and measures
peak memory, answering the coordinator's commands on stdin with one JSON line each on stdout.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import importlib
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from benchmarks.harness import Case, HarnessConfig, Workload, _is_same_failure


def _rss_kib(field_name: str) -> int:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field_name):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _fix_mmap_threshold():
    """glibc (or None where it is not there), its mmap threshold fixed at 128 KiB."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD: large blocks mmapped, freed at once
    return libc


class _Worker:
    """Runs inside the worker process: sets one case up and answers the coordinator."""

    def __init__(
        self, suite: str, case_id: str, lib: str, threads: int, device: str, budget: float
    ):
        import torch

        torch.set_num_threads(threads)
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:  # already set
            pass
        self.torch = torch
        self.device = torch.device(device)
        self.budget = budget
        mod = importlib.import_module(suite)
        self.case: Case = mod.setup(case_id, lib, self.device)
        self.pairs: dict[str, int] = {}
        self.failed: dict[str, str] = {}
        self.few: set[str] = set()
        self.inited: set[str] = set()
        self.libc = None

    def _sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def _time(self, fn: Callable[[Any], Any], arg: Any) -> tuple[float, float]:
        """(wall, CPU) seconds of one call; CPU time of this process, all its threads."""
        self._sync()
        c, t = time.process_time(), time.perf_counter()
        fn(arg)
        self._sync()
        return time.perf_counter() - t, time.process_time() - c

    def _peak(self, fn: Callable[[Any], Any], arg: Any) -> tuple[float, float, float]:
        """(wall, CPU, peak extra MiB) of one call: the peak resident set (on a GPU the peak
        allocated memory) during the call minus the one before it (module docstring)."""
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()
            base = self.torch.cuda.memory_allocated()
            t, c = self._time(fn, arg)
            peak = self.torch.cuda.max_memory_allocated() - base
        else:
            if self.libc is not None:
                self.libc.malloc_trim(0)
            try:
                with open("/proc/self/clear_refs", "w") as fh:
                    fh.write("5")  # resets VmHWM to the current resident set
            except OSError:
                pass
            base = _rss_kib("VmRSS:") * 1024
            t, c = self._time(fn, arg)
            peak = _rss_kib("VmHWM:") * 1024 - base
        return t, c, max(0.0, peak / 2**20)

    def _init(self, name: str, w: Workload) -> float:
        """Runs ``w.init`` once in this process: its CPU seconds (0: none, or it ran before)."""
        if name in self.inited or w.init is None:
            return 0.0
        self.inited.add(name)
        c = time.process_time()
        w.init()
        return time.process_time() - c

    def warm_up(self, max_pairs: int, cap: float) -> dict:
        """3 forward+backwards, then for each quantity its ``init`` and one call timed against an
        adjacent forward+backward (and its peak memory). A call over ``cap`` CPU seconds is kept as
        the quantity's one measurement (*few calls*); otherwise it sets the pairs per round."""
        ref = lambda _: self.case.reference()  # noqa: E731
        for _ in range(3):
            self._time(ref, None)
        t_ref = min(self._time(ref, None)[1] for _ in range(3))
        few, mem, init_s = {}, {}, {}
        for name, w in list(self.case.quantities.items()):
            try:
                init_s[name] = self._init(name, w)
                if init_s[name] > 0:
                    self.case.reference()  # the init may have evicted the caches: not timed
                state = w.prepare() if w.prepare else None
                gc.collect()
                tb, cb = self._time(ref, None)
                t, c, mem[name] = self._peak(w.run, state)  # CPU time: the cap holds under load
            except Exception as e:  # the library cannot compute this quantity here
                if not _is_same_failure(e):
                    self.failed[name] = f"fails: {type(e).__name__}: {str(e)[:80]}"
                del self.case.quantities[name]
                mem.pop(name, None)
                continue
            del state
            if c > cap:
                self.few.add(name)
                few[name] = {
                    "ratio": t / tb,
                    "ratio_cpu": c / cb if cb > 0 else math.nan,
                    "t": t,
                    "tb": tb,
                    "n": 1,
                    "few": True,
                }
            self.pairs[name] = max(1, min(max_pairs, int(self.budget / (c + t_ref))))
        info = {
            q: {
                "note": w.note,
                "comparable": w.comparable,
                "max_rounds": w.max_rounds,
                "init_s": init_s.get(q, 0.0),
                "few": q in self.few,
            }
            for q, w in self.case.quantities.items()
        }
        return {
            "failed": self.failed,
            "t_ref": t_ref,
            "version": self.case.version,
            "note": self.case.note,
            "quantities": info,
            "few": few,
            "memory_warm": mem,
        }

    def round(self, r: int) -> dict:
        ref = lambda _: self.case.reference()  # noqa: E731
        out = {}
        for name, w in self.case.quantities.items():
            if name in self.few or (w.max_rounds is not None and r >= w.max_rounds):
                continue
            walls, cpus, ts, tbs = [], [], [], []
            for _ in range(self.pairs[name]):
                state = w.prepare() if w.prepare else None
                gc.collect()
                tb, cb = self._time(ref, None)
                t, c = self._time(w.run, state)
                del state
                walls.append(t / tb)
                cpus.append(c / cb if cb > 0 else math.nan)
                ts.append(t)
                tbs.append(tb)
            out[name] = {
                "ratio": statistics.median(walls),
                "ratio_cpu": statistics.median(cpus),
                "t": statistics.median(ts),
                "tb": statistics.median(tbs),
                "n": len(walls),
            }
        return out

    def memory(self, warm: bool = False, skip: Sequence[str] = ()) -> dict:
        """Peak extra MiB of one call of each quantity but ``skip`` (see the module docstring);
        ``warm``: one unmeasured call of each first (a fresh worker's lazy initialisations)."""
        self.libc = _fix_mmap_threshold()
        out = {}
        for name, w in self.case.quantities.items():
            if name in skip:
                continue
            try:
                self._init(name, w)
                if warm:
                    w.run(w.prepare() if w.prepare else None)
            except Exception:  # reported by the timing worker, which failed on it too
                continue
            state = w.prepare() if w.prepare else None
            gc.collect()
            out[name] = self._peak(w.run, state)[2]
            del state
        return out


def worker_main(args: argparse.Namespace) -> None:
    """Entry of ``python -m benchmarks.worker --worker``: a JSON line per command on stdin.

    The worker sets its case up and says ``ready``; then ``warm`` (the warm-up, sent to one worker
    at a time so that no timed call overlaps another worker's), ``round``, ``memory``, ``exit``.
    """
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # whatever the libraries print goes to stderr, not into the protocol
    sys.stdout = sys.stderr

    def send(obj):
        proto.write(json.dumps(obj) + "\n")
        proto.flush()

    if args.memory_only:  # before torch or the case allocate anything
        _fix_mmap_threshold()
    try:
        w = _Worker(args.suite, args.case, args.lib, args.threads, args.device, args.budget)
    except Exception as e:
        send({"error": f"{type(e).__name__}: {str(e)[:200]}"})
        return
    send({"ready": True})
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            if cmd["cmd"] == "warm":
                send(w.warm_up(args.max_pairs, args.call_cap))
            elif cmd["cmd"] == "round":
                send(w.round(cmd["round"]))
            elif cmd["cmd"] == "memory":
                send(w.memory(warm=cmd.get("warm", False), skip=cmd.get("skip", ())))
            elif cmd["cmd"] == "exit":
                send({"bye": True})
                return
        except Exception as e:
            send({"error": f"{type(e).__name__}: {str(e)[:200]}"})
            return


# ---------------------------------------------------------------------- the coordinator


def _cli() -> None:
    p = argparse.ArgumentParser(description="worker of the benchmark harness (internal)")
    p.add_argument("--worker", action="store_true")
    p.add_argument("--suite", required=True)
    p.add_argument("--case", required=True)
    p.add_argument("--lib", required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--budget", type=float, default=0.3)
    p.add_argument("--max-pairs", type=int, default=5)
    p.add_argument("--call-cap", type=float, default=HarnessConfig.call_cap_s)
    p.add_argument("--memory-only", action="store_true", help="a fresh worker measuring memory")
    args = p.parse_args()
    if not args.worker:
        p.error("this module is the harness; run `python -m benchmarks` for the benchmarks")
    worker_main(args)


if __name__ == "__main__":
    _cli()
