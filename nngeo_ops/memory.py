"""Memory checks made before a dense object is formed.

:func:`check_memory` compares the size of an object about to be allocated with a limit (by default a
quarter of the memory available on its device: ``MemAvailable`` of ``/proc/meminfo`` on CPU,
``torch.cuda.mem_get_info`` on CUDA) and raises :class:`~nngeo_ops.errors.MemoryLimitError` naming
the size and what to do instead, rather than letting the allocation fail deep inside torch or push
the machine into swap.
"""

from __future__ import annotations

import torch

from .errors import MemoryLimitError


def available_memory(device=None) -> int | None:
    """Bytes available for new tensors on ``device`` (None when it cannot be read)."""
    device = torch.device(device) if device is not None else torch.get_default_device()
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def default_limit(device=None) -> int | None:
    """A quarter of :func:`available_memory` (None when unknown: no check)."""
    free = available_memory(device)
    return None if free is None else free // 4


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def check_memory(nbytes: int, what: str, fix: str, limit: int | None = None, device=None) -> None:
    """Raise :class:`MemoryLimitError` when ``nbytes`` exceeds ``limit``.

    Args:
        nbytes: the estimated size of the object about to be formed.
        what: the object, e.g. ``"the dense 20000×20000 GGN"``.
        fix: a structure or setting that fits, e.g. ``"use representation=PMatKFAC"``.
        limit: bytes allowed (None: :func:`default_limit` of ``device``; no check if unknown).
    """
    lim = default_limit(device) if limit is None else int(limit)
    if lim is not None and nbytes > lim:
        raise MemoryLimitError(
            f"{what} would take {format_bytes(nbytes)}, more than the memory limit of "
            f"{format_bytes(lim)}; {fix}"
        )
