"""Spectral densities by stochastic Lanczos quadrature, with their spread across probes.

For probes z_i and the Lanczos tridiagonals T_i = S_i Θ_i S_iᵀ started from z_i/‖z_i‖, the density
of eigenvalues φ(t) = (1/n) Σ_l δ(t − λ_l), broadened by a kernel K_σ, is estimated by

    φ̂(t) = (1/p) Σ_i φ̂_i(t),    φ̂_i(t) = Σ_j τ_ij K_σ(t − θ_ij),    τ_ij = (S_i)_{1j}²

(Lin, Saad & Yang, 2016; Ghorbani, Krishnan & Xiao, 2019). Each φ̂_i integrates to 1 and has mean
Σ_j τ_ij θ_ij = z_iᵀ A z_i / ‖z_i‖², so the estimated density's mean is a Hutchinson estimate of
tr(A)/n. The standard error of φ̂(t) is the spread of the φ̂_i(t) over √p.

On a logarithmic grid (``scale="log"``, for PSD spectra spanning decades) the broadening acts on
u = log10 λ: the density returned is per unit of log10 λ, φ̂(u) = (1/p) Σ_i Σ_{θ_ij > 0}
τ_ij K_σ(u − log10 θ_ij), and the weight of the Ritz values θ ≤ 0 (zero and negative
eigenvalues, which have no logarithm) is reported as ``mass_below`` instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from nngeo_ops.errors import InvalidArgumentError

from ._common import check_positive_int, sample_stderr
from .slq import KERNELS, SLQResult, SLQSettings, broadening_kernel, slq

__all__ = ["DensitySettings", "SpectralDensity", "estimate_density", "density_from_rules"]

SCALES = ("linear", "log")


@dataclass(frozen=True)
class DensitySettings:
    """How :func:`estimate_density` broadens and samples the density.

    Attributes:
        kernel: ``"gaussian"`` or ``"lorentzian"`` broadening.
        sigma: kernel width, in units of λ on a linear grid and of decades (log10 λ) on a log
            grid; ``None``: 1/200 of the range the Ritz values span (linear), or 0.02 decades
            (log).
        scale: ``"linear"`` or ``"log"`` grid (see the module docstring).
        num_points: grid size when no grid is given.
        margin: the default grid extends this many σ beyond the extreme Ritz values.
        floor: on a log grid, Ritz values ≤ floor·max|θ| count as zero (``mass_below``), and
            the grid starts at the smallest Ritz value above that.
    """

    kernel: str = "gaussian"
    sigma: float | None = None
    scale: str = "linear"
    num_points: int = 1000
    margin: float = 5.0
    floor: float = 1e-8

    def __post_init__(self) -> None:
        if self.kernel not in KERNELS:
            raise InvalidArgumentError(f"kernel must be one of {KERNELS}, got {self.kernel!r}")
        if self.scale not in SCALES:
            raise InvalidArgumentError(f"scale must be one of {SCALES}, got {self.scale!r}")
        if self.sigma is not None and not (math.isfinite(self.sigma) and self.sigma > 0):
            raise InvalidArgumentError(f"sigma must be a finite number > 0, got {self.sigma!r}")
        check_positive_int(self.num_points, "num_points", minimum=2)
        if not (self.margin >= 0 and 0 < self.floor < 1):
            raise InvalidArgumentError(
                f"margin must be >= 0 and floor in (0, 1), got {self.margin}, {self.floor}"
            )


@dataclass
class SpectralDensity:
    """An estimated spectral density (see the module docstring for the formulas).

    Attributes:
        grid: (g,) the points t (values of λ, also on a log grid).
        values: (g,) φ̂ on the grid: per unit λ (linear) or per unit log10 λ (log).
        stderr: (g,) standard error of ``values`` across probes (NaN for a single probe).
        kernel, sigma, scale: the broadening used (σ in decades on a log grid).
        mass_below: on a log grid, the estimated fraction of eigenvalues ≤ floor·max|λ| (zero,
            negative or negligible), left out of the density; 0 on a linear grid.
        rules: the SLQ quadrature rules (nodes θ, weights τ) the density was built from, or
            ``None`` when it came from exact eigenvalues.
        exact: True when built from the exact eigenvalues (``stderr`` is then 0).
    """

    grid: torch.Tensor
    values: torch.Tensor
    stderr: torch.Tensor
    kernel: str
    sigma: float
    scale: str
    mass_below: float = 0.0
    rules: SLQResult | None = field(default=None, repr=False)
    exact: bool = False

    def integral(self) -> float:
        """∫ φ̂ over the grid (trapezoid; in log10 λ on a log grid): ≈ 1 − ``mass_below``
        when the grid covers the spectrum with a margin."""
        x = self.grid.log10() if self.scale == "log" else self.grid
        return float(torch.trapezoid(self.values, x))

    def mean(self) -> float:
        """The mean eigenvalue ∫ t φ̂(t) dt of the quadrature rules, Σ τ θ averaged over probes,
        i.e. a Hutchinson estimate of tr(A)/n (exact for a density from exact eigenvalues)."""
        if self.rules is None:
            raise InvalidArgumentError("mean() needs the quadrature rules of an SLQ density")
        return float((self.rules.weights * self.rules.nodes).sum(-1).mean())

    def mean_stderr(self) -> float:
        """Standard error of :meth:`mean` across probes (0 for exact eigenvalues)."""
        if self.rules is None:
            return 0.0
        per = (self.rules.weights * self.rules.nodes).sum(-1)
        return float(sample_stderr(per))

    def as_tuple(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(grid, values)``."""
        return self.grid, self.values

    def __iter__(self):
        """Unpacks as ``grid, values = density``."""
        return iter((self.grid, self.values))


def _default_sigma(nodes: torch.Tensor, scale: str) -> float:
    if scale == "log":
        return 0.02
    lo, hi = float(nodes.min()), float(nodes.max())
    span = hi - lo
    return span / 200 if span > 0 else max(abs(hi), 1.0) * 1e-3


def _default_grid(nodes: torch.Tensor, s: DensitySettings, sigma: float) -> torch.Tensor:
    if s.scale == "log":
        pos = nodes[nodes > s.floor * nodes.abs().max()]
        if pos.numel() == 0:
            raise InvalidArgumentError(
                "a log-scale density needs positive eigenvalues, but every Ritz value is <= 0; "
                "use scale='linear'"
            )
        hi, lo = float(pos.max()), float(pos.min())
        u_lo, u_hi = math.log10(lo) - s.margin * sigma, math.log10(hi) + s.margin * sigma
        return torch.logspace(u_lo, u_hi, s.num_points, dtype=nodes.dtype, device=nodes.device)
    lo, hi = float(nodes.min()), float(nodes.max())
    return torch.linspace(
        lo - s.margin * sigma,
        hi + s.margin * sigma,
        s.num_points,
        dtype=nodes.dtype,
        device=nodes.device,
    )


def density_from_rules(
    nodes: torch.Tensor,
    weights: torch.Tensor,
    *,
    grid: torch.Tensor | None = None,
    settings: DensitySettings | None = None,
    rules: SLQResult | None = None,
    exact: bool = False,
) -> SpectralDensity:
    """A :class:`SpectralDensity` from quadrature rules ``nodes``/``weights`` of shape (p, m)
    (each row's weights summing to 1): SLQ rules, or exact eigenvalues as one row with weights
    1/n (then ``exact=True`` and the error is 0)."""
    s = settings or DensitySettings()
    nodes = nodes.detach()
    weights = weights.detach()
    sigma = s.sigma if s.sigma is not None else _default_sigma(nodes, s.scale)
    g = (
        _default_grid(nodes, s, sigma)
        if grid is None
        else torch.as_tensor(grid, dtype=nodes.dtype, device=nodes.device).reshape(-1)
    )
    mass_np = 0.0
    if s.scale == "log":
        if bool((g <= 0).any()):
            raise InvalidArgumentError("a log-scale grid must hold positive values only")
        pos = nodes > s.floor * nodes.abs().max()
        mass_np = float((weights * ~pos).sum(-1).mean())
        x = g.log10().reshape(-1, 1, 1) - torch.where(pos, nodes, 1.0).log10()
        kern = broadening_kernel(x, sigma, s.kernel) * pos
    else:
        kern = broadening_kernel(g.reshape(-1, 1, 1) - nodes, sigma, s.kernel)
    per = (kern * weights).sum(-1)  # (g, p)
    values = per.mean(-1)
    stderr = torch.zeros_like(values) if exact else sample_stderr(per, dim=1)
    return SpectralDensity(
        grid=g,
        values=values,
        stderr=stderr,
        kernel=s.kernel,
        sigma=float(sigma),
        scale=s.scale,
        mass_below=mass_np,
        rules=rules,
        exact=exact,
    )


def estimate_density(
    A: object,
    *,
    grid: torch.Tensor | None = None,
    kernel: str | None = None,
    sigma: float | None = None,
    scale: str | None = None,
    num_points: int | None = None,
    num_probes: int | None = None,
    num_iter: int | None = None,
    distribution: str | None = None,
    generator: torch.Generator | None = None,
    settings: DensitySettings | None = None,
    slq_settings: SLQSettings | None = None,
) -> SpectralDensity:
    """Estimate the broadened spectral density of a symmetric operator by SLQ, with its error.

    Runs :func:`~nngeo_ops.linalg.slq` (p = ``num_probes`` probes, m = ``num_iter`` Lanczos
    steps each, p·m products) and broadens the quadrature rules as in the module docstring.

    Args:
        A: symmetric operator (n, n).
        grid: the points t; default ``num_points`` points over the Ritz values ± ``margin``·σ,
            linear or log-spaced by ``scale``.
        kernel, sigma, scale, num_points: override the fields of ``settings``
            (:class:`DensitySettings`).
        num_probes, num_iter, distribution: override the fields of ``slq_settings``.
        generator: the source of the probes; the same seed gives bit-identical results.

    Returns:
        A :class:`SpectralDensity` (``values`` and ``stderr`` on ``grid``).
    """
    s = settings or DensitySettings()
    given = {"kernel": kernel, "sigma": sigma, "scale": scale, "num_points": num_points}
    s = DensitySettings(**{**s.__dict__, **{k: v for k, v in given.items() if v is not None}})
    res = slq(
        A,
        num_probes=num_probes,
        num_iter=num_iter,
        distribution=distribution,
        generator=generator,
        settings=slq_settings,
    )
    return density_from_rules(res.nodes, res.weights, grid=grid, settings=s, rules=res)
