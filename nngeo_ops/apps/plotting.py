"""Pictures of spectra: the eigenvalue density on a log scale with the top eigenvalues marked.

matplotlib is optional (the ``demo`` extra) and imported only inside the plotting functions; the
figures are built with ``matplotlib.figure.Figure`` (no pyplot state, no display needed) and
written with ``savefig`` when a path is given.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import InvalidArgumentError, MissingDependencyError

__all__ = ["MissingDependencyError", "plot_spectrum", "plot_spectra", "plot_tracker"]


def _figure(ncols: int = 1, nrows: int = 1, size: tuple[float, float] = (6.0, 4.0)):
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:  # the message names the fix
        raise MissingDependencyError(
            "plotting needs matplotlib, which is not installed: pip install matplotlib "
            "(or the demo extra: pip install 'nngeo_ops[demo]')"
        ) from exc
    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, [ax for row in axes for ax in row]


def _save(fig: Any, path: str | Path | None) -> None:
    if path is not None:
        fig.savefig(Path(path), dpi=120)


def _check_spectrum(s: object) -> None:
    if not all(hasattr(s, a) for a in ("eigenvalues", "density", "exact")):
        raise InvalidArgumentError(
            f"expected a Spectrum from nngeo_ops.apps.spectrum(...), got {type(s).__name__}"
        )


def _draw(ax: Any, s: Any, label: str | None, color: Any, mark_top: bool, band: bool) -> None:
    d = s.density
    if d is not None:
        x = d.grid.detach().cpu().double()
        y = d.values.detach().cpu().double()
        top = float(y.max()) if y.numel() else 1.0
        floor = max(top, 1e-300) * 1e-10  # a log axis cannot show 0
        ax.plot(x.numpy(), y.clamp_min(floor).numpy(), color=color, label=label, lw=1.4)
        if band and not d.exact:
            err = 2 * d.stderr.detach().cpu().double().nan_to_num(0.0)
            lo = (y - err).clamp_min(floor).numpy()
            hi = (y + err).clamp_min(floor).numpy()
            ax.fill_between(x.numpy(), lo, hi, color=color, alpha=0.25, lw=0)
        ax.set_yscale("log")
        ax.set_ylim(bottom=floor * 10)
        if d.scale == "log":
            ax.set_xscale("log")
        ax.set_ylabel("density" + (" per decade" if d.scale == "log" else ""))
    if mark_top and s.eigenvalues is not None and s.eigenvalues.numel():
        ev = s.eigenvalues.detach().cpu().double()
        if d is not None and d.scale == "log":
            ev = ev[ev > 0]
        for i, v in enumerate(ev.tolist()):
            ax.axvline(
                v,
                color=color,
                ls=":",
                lw=0.9,
                label=(f"{label + ': ' if label else ''}computed eigenvalues" if i == 0 else None),
            )
        if d is None:
            ax.set_yticks([])
    ax.set_xlabel("eigenvalue")


def plot_spectrum(
    s: Any,
    path: str | Path | None = None,
    *,
    title: str | None = None,
    mark_top: bool = True,
    band: bool = True,
):
    """Plot one :class:`~nngeo_ops.apps.Spectrum`: its density on a log y-axis (log x-axis too
    for a log-grid density), a ±2 stderr band for an estimated density, and its eigenvalues as
    dotted vertical lines.

    Args:
        s: the spectrum (computed with ``density=True`` for the curve).
        path: write the figure there (the format follows the suffix, e.g. ``.png``).
        title: figure title; by default the route of the eigenpairs.
        mark_top: draw the eigenvalues of ``s``.
        band: draw the error band of an estimated density.

    Returns:
        The ``matplotlib.figure.Figure``.

    Raises:
        MissingDependencyError: matplotlib is not installed.
    """
    _check_spectrum(s)
    fig, (ax,) = _figure()
    _draw(ax, s, None, "C0", mark_top, band)
    route = getattr(s, "routes", {}).get("eigenpairs", "")
    ax.set_title(title if title is not None else (route.split(":")[0] if route else "spectrum"))
    if mark_top:
        ax.legend(loc="upper right", fontsize="small")
    _save(fig, path)
    return fig


def plot_spectra(
    spectra: Mapping[str, Any],
    path: str | Path | None = None,
    *,
    overlay: bool = False,
    title: str | None = None,
    mark_top: bool = True,
    band: bool = True,
):
    """Plot several spectra: side by side (``overlay=False``, e.g. ``s.per_layer``) or on one
    axis (``overlay=True``, e.g. ``{"GGN": s1, "KFAC": s2, "Hessian": s3}``).

    Returns the ``matplotlib.figure.Figure``; writes it to ``path`` when given.
    """
    if not isinstance(spectra, Mapping) or not spectra:
        raise InvalidArgumentError(
            "plot_spectra takes a non-empty mapping {name: Spectrum}, e.g. s.per_layer"
        )
    for sp in spectra.values():
        _check_spectrum(sp)
    if overlay:
        fig, (ax,) = _figure()
        for i, (name, sp) in enumerate(spectra.items()):
            _draw(ax, sp, name, f"C{i % 10}", mark_top, band)
        ax.legend(loc="upper right", fontsize="small")
        if title:
            ax.set_title(title)
    else:
        ncols = min(len(spectra), 3)
        nrows = math.ceil(len(spectra) / ncols)
        fig, axes = _figure(ncols, nrows, size=(4.5, 3.4))
        for ax, (name, sp) in zip(axes, spectra.items()):
            _draw(ax, sp, None, "C0", mark_top, band)
            ax.set_title(str(name))
        for ax in axes[len(spectra) :]:
            ax.set_visible(False)
        if title:
            fig.suptitle(title)
    _save(fig, path)
    return fig


def plot_tracker(tracker: Any, path: str | Path | None = None, *, title: str | None = None):
    """Plot the eigenvalues recorded by a :class:`~nngeo_ops.apps.SpectrumTracker` against its
    steps (a sharpness curve for the top Hessian eigenvalue)."""
    values = tracker.values()
    if values.numel() == 0:
        raise InvalidArgumentError("the tracker has no updates yet: call tracker.update(F) first")
    fig, (ax,) = _figure()
    steps = torch.as_tensor(tracker.steps, dtype=torch.float64).numpy()
    for i in range(values.shape[1]):
        ax.plot(steps, values[:, i].detach().cpu().double().numpy(), marker="o", ms=3)
    ax.set_xlabel("step")
    ax.set_ylabel("eigenvalue")
    ax.set_title(title or f"top {values.shape[1]} eigenvalue(s) over training")
    _save(fig, path)
    return fig
