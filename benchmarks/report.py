"""Reporting of benchmark runs: the header of a table, bar charts, the README's generated sections."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from benchmarks.harness import REPO, HarnessConfig


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
    }


def fmt_q(qs: tuple[float, float, float], digits: int = 2) -> str:
    q1, m, q3 = qs
    return f"{m:.{digits}f} [{q1:.{digits}f}–{q3:.{digits}f}]"


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
