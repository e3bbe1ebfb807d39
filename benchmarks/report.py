"""Reporting of benchmark runs: the header of a table, bar charts, the README's generated sections,
and the combination of several runs of the same cases.

**Several runs of a case** (``--repeat K``, or ``--from-json`` of saved runs that measured the same
cases). The paired median of a row moves between whole runs by more than its interquartile range
shows (±10 % seen, e.g. 0.82 → 1.05 → 0.73 over three runs with IQRs of ±5 %): the rounds of one
run share its worker processes (their memory layout, the allocator's state, the core and the
neighbours of the moment), so they are not independent samples of what a rerun would give; the
*run* is the independent unit. For a row measured in several runs, :func:`combine` gives

* the **median of the per-run medians** (the row's figure; for one run, its median as before);
* the **pooled interquartile range** of every round of every run (shown next to it), and
* the **spread across runs**, min–max of the run medians;

and :func:`judge`'s verdict asks every run to show the lead by its own IQR: **target** = median of
run medians ≤ 0.8 and every run's upper quartile < 1; **lead** = every run's upper quartile < 1;
**peer wins** = every run's lower quartile > 1; **tie** otherwise. With one run this is the
single-run verdict. Pooling the rounds instead would count a run's correlated rounds as
independent evidence and narrow the interval exactly where the runs disagree; requiring each run
to clear the bar on its own is conservative, and a row stays a lead only while no run contradicts
it.

**Few calls** (‡). A quantity whose warm-up call took more CPU time than the cap
(``--call-cap``, ``HarnessConfig.call_cap_s``) is measured by that one call against its own
adjacent forward+backward, and its paired ratio is ours' median over one peer call (or the other
way round): there is no IQR. Its verdict stands a band of ×/÷ ``FEW_BAND`` = 1.35 in for the
missing IQR, in every run: the largest move of a few-calls ratio seen between two runs of the CNN's
block-diagonal (CPU clock, 61 % and 71 % of the machine taken by others: ours / peer 0.37 → 0.50
for the build, 0.80 → 0.55 for the first solve; a 7-round median moves by ±10 %). A one-call
figure shows nothing of its own noise, so its verdict assumes the largest move seen; a row far from
the thresholds (the cached solve, 0.01) is unaffected, a close one reads "tie" until a quiet
machine's runs narrow it.

**Memory of several runs**: the largest of the runs' peaks (a peak is what must be available; the
fresh-worker figure moves by a few MiB between runs, so the choice rarely matters).
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks.harness import REPO, CaseResult, HarnessConfig, quartiles

FEW = "‡"
FEW_BAND = 1.35


def machine_info(cfg: HarnessConfig) -> dict[str, str]:
    """Date, commit, machine, torch and thread settings of a run (for the table's header)."""
    import torch

    def git(*a):
        try:
            return subprocess.run(
                ["git", *a], cwd=REPO, capture_output=True, text=True, timeout=10
            ).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    dirty = " (uncommitted changes)" if git("status", "--porcelain", "--untracked-files=no") else ""
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        # BENCH_COMMIT: the commit of a snapshot measured outside its git checkout
        "commit": os.environ.get("BENCH_COMMIT")
        or (git("rev-parse", "--short", "HEAD") or "?") + dirty,
        "machine": f"{os.cpu_count()} CPUs ({cpu}), {platform.system()} {platform.machine()}",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": str(cfg.threads),
        "device": cfg.device,
        "rounds": str(cfg.rounds),
        "call_cap": f"{cfg.call_cap_s:g}",
    }


def fmt_q(qs: tuple[float, float, float], digits: int = 2) -> str:
    q1, m, q3 = qs
    return f"{m:.{digits}f} [{q1:.{digits}f}–{q3:.{digits}f}]"


# ---------------------------------------------------------------------- several runs of a case
@dataclass(frozen=True)
class Combined:
    """The ratios of one row over one or several runs (module docstring).

    ``runs``: each run's (lower quartile, median, upper quartile); ``few_runs``: which runs
    measured the row by one call over the cap; ``pooled``: the quartiles of every value of every
    run; ``median``: the median of the run medians.
    """

    median: float
    pooled: tuple[float, float, float]
    runs: tuple[tuple[float, float, float], ...]
    few_runs: tuple[bool, ...]

    @property
    def few(self) -> bool:
        return any(self.few_runs)

    @property
    def spread(self) -> tuple[float, float]:
        """(smallest, largest) run median."""
        ms = [m for _, m, _ in self.runs]
        return min(ms), max(ms)

    def bounds(self) -> tuple[float, float]:
        """(lowest lower quartile, highest upper quartile) over the runs; a few-calls run's
        quartiles are its value divided and multiplied by ``FEW_BAND``."""
        qs = [
            (m / FEW_BAND, m * FEW_BAND) if few else (q1, q3)
            for (q1, m, q3), few in zip(self.runs, self.few_runs)
        ]
        return min(q[0] for q in qs), max(q[1] for q in qs)

    def whiskers(self) -> tuple[float, float, float]:
        """(low, median, high) for a chart: the hull of the pooled IQR and the runs' spread."""
        lo, hi = self.spread
        return min(self.pooled[0], lo), self.median, max(self.pooled[2], hi)


def combine(
    per_run: Sequence[Sequence[float]], few_runs: Sequence[bool] | None = None
) -> Combined | None:
    """The :class:`Combined` of a row's values in each run (runs without values are left out;
    None when no run has any). ``few_runs[i]``: run i is a few-calls measurement."""
    few_runs = list(few_runs) if few_runs is not None else [False] * len(per_run)
    kept = [(list(v), f) for v, f in zip(per_run, few_runs, strict=True) if len(v)]
    if not kept:
        return None
    runs = tuple(quartiles(v) for v, _ in kept)
    pooled = quartiles([x for v, _ in kept for x in v])
    return Combined(
        statistics.median(m for _, m, _ in runs), pooled, runs, tuple(f for _, f in kept)
    )


def judge(c: Combined, target: float = 0.8) -> str:
    """The verdict on a ratio ours / peer: "target", "lead", "peer wins" or "tie" (module
    docstring)."""
    lo, hi = c.bounds()
    if hi < 1.0:
        return "target" if c.median <= target else "lead"
    if lo > 1.0:
        return "peer wins"
    return "tie"


def fmt_combined(c: Combined, digits: int = 2) -> str:
    """``m [q1–q3]`` (one run), ``m ‡`` (few calls: no IQR), then ``(K runs lo–hi)`` for K > 1:
    m the median of the run medians, [q1–q3] the pooled IQR, lo–hi the run medians' spread."""
    f = f".{digits}f"
    if c.few:
        text = f"{c.median:{f}} {FEW}"
    else:
        text = f"{c.median:{f}} [{c.pooled[0]:{f}}–{c.pooled[2]:{f}}]"
    if len(c.runs) > 1:
        lo, hi = c.spread
        text += f" ({len(c.runs)} runs {lo:{f}}–{hi:{f}})"
    return text


def group_runs(results: Sequence[CaseResult]) -> list[list[CaseResult]]:
    """The results grouped by case, in the order each case first appears: a case measured in
    several runs (passes of ``--repeat``, or saved runs given together) is one group."""
    groups: dict[str, list[CaseResult]] = {}
    for r in results:
        groups.setdefault(r.spec.case_id, []).append(r)
    return list(groups.values())


def bar_chart(
    path: str | Path,
    labels: Sequence[str],
    stats: Sequence[tuple[float, float, float]],
    title: str,
    xlabel: str = "ours / peer (median, IQR)",
    lines: Sequence[float] = (0.8, 1.0),
    lower_is_better: bool = True,
) -> bool:
    """Horizontal bars of medians with IQR whiskers on a log axis; False if matplotlib is missing.

    ``stats`` are (lower quartile, median, upper quartile); a bar is green when its whole IQR is on
    the better side of 1, red when on the worse side, grey otherwise.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    n = len(labels)
    fig, ax = plt.subplots(figsize=(8, 0.28 * n + 1.2))
    med = [m for _, m, _ in stats]
    lo = [m - q1 for q1, m, _ in stats]
    hi = [q3 - m for _, m, q3 in stats]
    good, bad = ("tab:green", "tab:red") if lower_is_better else ("tab:red", "tab:green")
    colors = [good if q3 < 1 else bad if q1 > 1 else "tab:gray" for q1, _, q3 in stats]
    ax.barh(range(n), med, xerr=[lo, hi], color=colors, capsize=2)
    ax.set_yticks(range(n), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    for x in lines:
        ax.axvline(x, color="k", lw=0.6, ls="--")
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def replace_section(path: str | Path, name: str, text: str) -> None:
    """Replace the text between ``<!-- harness:NAME:start -->`` and its end marker in a file."""
    path = Path(path)
    start, end = f"<!-- harness:{name}:start -->", f"<!-- harness:{name}:end -->"
    doc = path.read_text()
    if start not in doc or end not in doc:
        raise ValueError(f"{path} has no markers {start} … {end}; add them where the table goes")
    head, rest = doc.split(start, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{start}\n{text.rstrip()}\n{end}{tail}")
