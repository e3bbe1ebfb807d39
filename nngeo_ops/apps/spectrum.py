"""Spectrum of a curvature matrix: extreme eigenpairs, trace and eigenvalue density, per layer.

:func:`spectrum` takes any representation (``PMatDense``, ``PMatKFAC``, ``PMatImplicit``, ... from
:mod:`nngeo_ops.nn`, including the Hessian), any :mod:`nngeo_ops.ops` node, a dense symmetric
tensor or a :class:`~nngeo_ops.linalg.MatmatOperator`, and picks the cheapest exact route the
structure allows, saying which in :meth:`Spectrum.explain`:

- **exact eigendecomposition from the structure** (``ops`` compile, ``eigh`` quantity, no
  iteration): the diagonal; KFAC ``A⊗G`` from the factors' eigenpairs (every eigenvalue
  αᵢγⱼ); EKFAC's eigenbasis; block-diagonal matrices block by block; low rank; and the implicit
  Fisher/GGN ``Jᵀ·H·J`` from the (C·N) × (C·N) Gram matrix (its exact nonzero spectrum, the
  other P − C·N eigenvalues being 0);
- **thick-restart block Lanczos** otherwise (the implicit Hessian, sums, damped operators),
  converged to ``tol`` with residuals reported.

The trace is exact where the structure gives it (the sum of an exact spectrum, a Gram-matrix or
diagonal trace) and a Hutch++ estimate with its standard error otherwise; the density comes from
the exact eigenvalues when they are all known, else from stochastic Lanczos quadrature with its
spread across probes (:func:`~nngeo_ops.linalg.estimate_density`).

Conventions: eigenvalues in **descending** order whatever ``which``; eigenvectors as
:class:`~nngeo_ops.nn.PVector` (flat order of the representation's layer collection) when the
input carries one, else as the columns of an (n, k) tensor. The matrix is whatever the input
is (Fisher/GGN means over examples by default, see :mod:`nngeo_ops.nn.metrics`).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import (
    ArgumentTypeError,
    InvalidArgumentError,
    NotSymmetricError,
    ShapeError,
    UnsupportedError,
)
from ..linalg import (
    DensitySettings,
    Estimate,
    MatmatOperator,
    SpectralDensity,
    block_lanczos,
    density_from_rules,
    estimate_density,
    hutchpp,
)
from ..nn import LayerCollection, PVector
from ..ops import BlockDiag, Compiled, CompilePolicy, Dense, LinearOperator, MatFree

__all__ = ["Spectrum", "SpectrumSettings", "SpectrumTracker", "spectrum"]

WHICH = ("LA", "SA", "BE")
METHODS = ("auto", "exact", "lanczos")
TRACES = ("auto", "exact", "estimate", "none")


@dataclass(frozen=True)
class SpectrumSettings:
    """Settings of :func:`spectrum`.

    Attributes:
        method: ``"auto"`` (exact from the structure when possible, else Lanczos), ``"exact"``
            (raise :class:`UnsupportedError` when the structure gives no exact spectrum) or
            ``"lanczos"`` (always iterate, e.g. to compare).
        tol, block_size, num_iter, max_restarts: of the Lanczos route
            (:func:`~nngeo_ops.linalg.block_lanczos`; ``None`` keeps its defaults:
            tol = eps^(3/4) relative to max|λ|, basis size ≈ max(2k + 20, k + 2b)), except the
            block size, min(k, 8) by default: a product with b columns costs about one pass
            over the data, like a product with one.
        trace: ``"auto"`` (exact if the structure gives it, else Hutch++), ``"exact"`` (raise
            otherwise), ``"estimate"`` (always Hutch++) or ``"none"``.
        trace_matvecs: products spent by Hutch++.
        num_probes, num_iter_slq: probes and Lanczos steps of the SLQ density.
        density: broadening and grid (:class:`~nngeo_ops.linalg.DensitySettings`).
        policy: the ``ops`` compile policy of the structured route.
    """

    method: str = "auto"
    tol: float | None = None
    block_size: int | None = None
    num_iter: int | None = None
    max_restarts: int | None = None
    trace: str = "auto"
    trace_matvecs: int = 300
    num_probes: int = 16
    num_iter_slq: int = 64
    density: DensitySettings = field(default_factory=DensitySettings)
    policy: CompilePolicy = field(default_factory=CompilePolicy)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InvalidArgumentError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.trace not in TRACES:
            raise InvalidArgumentError(f"trace must be one of {TRACES}, got {self.trace!r}")
        for name in ("trace_matvecs", "num_probes", "num_iter_slq"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InvalidArgumentError(f"{name} must be an integer >= 1, got {v!r}")


@dataclass
class Spectrum:
    """The result of :func:`spectrum`.

    Attributes:
        eigenvalues: (k,) descending.
        eigenvectors: k :class:`PVector` (input with a layer collection), an (n, k) tensor, or
            ``None`` where they are not available (eigenvalue 0 of a truncated exact spectrum).
        residuals: (k,) ‖A y − λ y‖ of the Lanczos route; zeros on an exact route.
        exact: True when the eigenvalues come from an exact factorisation.
        trace: ``Estimate(value, stderr)`` (stderr 0 when exact) or ``None``.
        density: a :class:`~nngeo_ops.linalg.SpectralDensity` (``grid, values = s.density``)
            or ``None``.
        per_layer: ``{layer_id: Spectrum}`` with ``per_layer=True``, else ``None``.
        size: n, the dimension of the matrix.
        which: the ends asked for.
        num_matvecs: operator products spent (eigenpairs, trace and density together).
    """

    eigenvalues: torch.Tensor
    eigenvectors: Any
    residuals: torch.Tensor
    exact: bool
    trace: Estimate | None
    density: SpectralDensity | None
    per_layer: dict[str, Spectrum] | None
    size: int
    which: str
    num_matvecs: int = 0
    routes: dict[str, str] = field(default_factory=dict, repr=False)
    plan: str = field(default="", repr=False)

    def explain(self) -> str:
        """Which route computed each quantity (and the ``ops`` plan of a structured route)."""
        lines = [f"spectrum of a {self.size} × {self.size} matrix, which={self.which!r}"]
        lines += [f"  {q:<12} {r}" for q, r in self.routes.items()]
        if self.plan:
            lines += ["ops plan:", *("  " + ln for ln in self.plan.splitlines())]
        if self.per_layer:
            for lid, sub in self.per_layer.items():
                lines.append(f"layer {lid}:")
                lines += [f"  {q:<12} {r}" for q, r in sub.routes.items()]
        return "\n".join(lines)

    def flat_eigenvectors(self) -> torch.Tensor | None:
        """The eigenvectors as the columns of an (n, k) tensor."""
        if self.eigenvectors is None or isinstance(self.eigenvectors, torch.Tensor):
            return self.eigenvectors
        return torch.stack([v.to_torch() for v in self.eigenvectors], 1)


# ---------------------------------------------------------------------- inputs


def _as_target(F: object) -> tuple[object, LayerCollection | None]:
    """(node or operator, layer collection or None); representations give ``F.op``."""
    lc = getattr(F, "layer_collection", None)
    op = getattr(F, "op", None)
    if isinstance(lc, LayerCollection) and isinstance(op, LinearOperator):
        return op, lc
    if isinstance(F, LinearOperator):
        return F, None
    if isinstance(F, torch.Tensor):
        if F.ndim != 2 or F.shape[0] != F.shape[1]:
            raise ShapeError(f"spectrum needs a square matrix, got shape {tuple(F.shape)}")
        if not F.dtype.is_floating_point:
            raise ArgumentTypeError(f"spectrum needs a floating matrix, got {F.dtype}")
        err = float((F - F.mT).abs().max()) if F.numel() else 0.0
        if err > torch.finfo(F.dtype).eps ** 0.5 * max(float(F.abs().max()), 1e-300):
            raise NotSymmetricError(
                f"spectrum needs a symmetric matrix, but max|A − Aᵀ| = {err:.3g}; pass the "
                "symmetric part (A + A.T) / 2 if that is what is meant"
            )
        return Dense(F, symmetric=True), None
    if isinstance(F, MatmatOperator):
        return F, None
    raise ArgumentTypeError(
        f"spectrum takes a representation (FIM/GGN/Hessian(...)), an ops node, a symmetric "
        f"tensor or a linalg.MatmatOperator, got {type(F).__name__}; wrap a matvec with "
        "nngeo_ops.linalg.as_matmat(f, shape=(n, n), symmetric=True)"
    )


def _apply(target: object, X: torch.Tensor) -> torch.Tensor:
    return target.matmat(X) if isinstance(target, MatmatOperator) else target @ X


def _shape_dtype(target: object) -> tuple[int, torch.dtype, torch.device]:
    return int(target.shape[0]), target.dtype, torch.device(target.device)


# ---------------------------------------------------------------------- routes


def _structured_eigen(target: object, policy: CompilePolicy):
    """(Eigen node or None, Compiled or None, routine name)."""
    if not isinstance(target, LinearOperator):
        return None, None, None
    if not target.symmetric:
        raise NotSymmetricError(
            f"spectrum needs a symmetric operator, but {target} is not tagged symmetric; "
            "build its leaves with symmetric=True / psd=True if it is"
        )
    c = Compiled(target, policy)
    E = c.eigh_of(c.simplified, structured_only=True)
    return E, c, (c.routine("eigh") if E is not None else None)


def _select(vals: torch.Tensor, k: int, which: str) -> torch.Tensor:
    """Indices of the wanted values of ``vals`` (any order), returned by descending value."""
    order = torch.argsort(vals, descending=True, stable=True)
    n = vals.shape[0]
    if which == "LA":
        pick = order[:k]
    elif which == "SA":
        pick = order[n - k :]
    else:
        hi = (k + 1) // 2
        pick = torch.cat([order[:hi], order[n - (k - hi) :]]) if k - hi else order[:hi]
    return pick[torch.argsort(vals[pick], descending=True, stable=True)]


def _exact_route(E, target, k, which, want_vectors):
    n, dtype, device = _shape_dtype(target)
    r = E.evals.shape[0]
    # a truncated eigen form (implicit Fisher from its Gram matrix) leaves n − r zero eigenvalues
    vals = torch.cat([E.evals.detach(), torch.zeros(n - r, dtype=E.evals.dtype, device=device)])
    pick = _select(vals, k, which)
    evals = vals[pick]
    vecs, note = None, ""
    if want_vectors:
        if bool((pick >= r).any()):
            note = (
                "; eigenvectors of the eigenvalue 0 outside the Gram range are not formed "
                "(eigenvectors=None): use method='lanczos' for them"
            )
        else:
            onehot = torch.zeros(r, k, dtype=dtype, device=device)
            onehot[pick, torch.arange(k, device=device)] = 1
            vecs = E.Q @ onehot
    return evals, vecs, vals, note


def _lanczos_route(target, k, which, s, generator, progress, v0):
    res = block_lanczos(
        target,
        k,
        which=which,
        # one (n, b) product costs little more than one (n, 1) product for the nn operators
        # (a pass over the data each), so the k wanted pairs are sought as a block by default
        block_size=(s.block_size or min(k, 8)) if v0 is None else None,
        num_iter=s.num_iter,
        v0=v0,
        tol=s.tol,
        max_restarts=s.max_restarts,
        generator=generator,
        progress=progress,
    )
    order = torch.argsort(res.eigenvalues, descending=True)
    return res, order


def _trace(target, E, c, s, generator):
    """(Estimate, route, products)."""
    if E is not None:
        n = target.shape[0]
        return (
            Estimate(E.evals.sum(), torch.zeros((), dtype=E.evals.dtype)),
            (
                f"exact: sum of the exact eigenvalues ({E.evals.shape[0]} of {n} nonzero)"
                if not E.full
                else "exact: sum of the exact eigenvalues"
            ),
            0,
        )
    if s.trace != "estimate" and c is not None:
        t = c.trace_of(c.simplified, structured_only=True)
        if t is not None:
            return (
                Estimate(t, torch.zeros((), dtype=t.dtype)),
                f"exact: {c.routine('trace')}",
                0,
            )
    if s.trace == "exact":
        raise UnsupportedError(
            "spectrum(trace='exact'): the structure of this operator gives no exact trace; use "
            "trace='auto' for a Hutch++ estimate with its standard error"
        )
    n = target.shape[0]
    if n <= s.trace_matvecs:  # as cheap as the estimate, and exact
        eye = torch.eye(n, dtype=target.dtype, device=torch.device(target.device))
        diag = torch.cat(
            [_apply(target, eye[:, i : i + 64])[i : i + 64].diagonal() for i in range(0, n, 64)]
        )
        return (
            Estimate(diag.sum(), torch.zeros((), dtype=diag.dtype)),
            f"exact: diagonal from {n} unit-vector products",
            n,
        )
    est = hutchpp(target, s.trace_matvecs, generator=generator)
    route = (
        f"Hutch++ estimate ({s.trace_matvecs} products): "
        f"{float(est.value):.6g} ± {float(est.stderr):.2g} (stderr)"
    )
    return est, route, s.trace_matvecs


def _density(target, all_vals, s, generator, density_settings):
    """(SpectralDensity, route, products)."""
    ds = density_settings or s.density
    if all_vals is not None:
        n = all_vals.shape[0]
        w = torch.full((1, n), 1.0 / n, dtype=all_vals.dtype, device=all_vals.device)
        d = density_from_rules(all_vals[None], w, settings=ds, exact=True)
        return d, f"exact: every eigenvalue, {ds.kernel} broadening σ={d.sigma:.3g}", 0
    d = estimate_density(
        target,
        settings=ds,
        num_probes=s.num_probes,
        num_iter=min(s.num_iter_slq, target.shape[0]),
        generator=generator,
    )
    route = (
        f"SLQ estimate ({s.num_probes} probes × {min(s.num_iter_slq, target.shape[0])} Lanczos "
        f"steps), {ds.kernel} broadening σ={d.sigma:.3g}; error bar = spread across probes"
    )
    return d, route, s.num_probes * min(s.num_iter_slq, target.shape[0])


def _restrict(target: object, lo: int, hi: int) -> LinearOperator:
    """The diagonal block [lo:hi, lo:hi] of a symmetric operator, through its products."""
    n, dtype, device = _shape_dtype(target)

    def mm(X: torch.Tensor) -> torch.Tensor:
        Z = torch.zeros(n, X.shape[1], dtype=X.dtype, device=X.device)
        Z = torch.cat([Z[:lo], X, Z[hi:]], 0)
        return _apply(target, Z)[lo:hi]

    return MatFree(
        mm, (hi - lo, hi - lo), dtype, device, symmetric=True, batched=True, name="block"
    )


def _layer_targets(target, lc: LayerCollection) -> list[tuple[str, object, LayerCollection]]:
    ids = list(lc.layers)
    sub = [LayerCollection(OrderedDict([(lid, lc.layers[lid])])) for lid in ids]
    if isinstance(target, BlockDiag) and len(target.blocks) == len(ids):
        sizes = [b.shape[0] for b in target.blocks]
        if sizes == [lc.layers[lid].numel() for lid in ids]:
            return list(zip(ids, target.blocks, sub))
    out = []
    for lid, sc in zip(ids, sub):
        lo = lc.p_pos[lid]
        out.append((lid, _restrict(target, lo, lo + lc.layers[lid].numel()), sc))
    return out


# ---------------------------------------------------------------------- public


def spectrum(
    F: object,
    k: int = 10,
    *,
    which: str = "LA",
    density: bool | DensitySettings = False,
    trace: bool = True,
    per_layer: bool = False,
    eigenvectors: bool = True,
    generator: torch.Generator | None = None,
    settings: SpectrumSettings | None = None,
    progress: bool | None = None,
    v0: torch.Tensor | None = None,
) -> Spectrum:
    """Extreme eigenvalues (and eigenvectors), trace and density of a symmetric curvature matrix.

    Args:
        F: a representation from :mod:`nngeo_ops.nn` (``FIM``, ``GGN``, ``Hessian`` ...; its
            ``F.op`` is used), an ``ops`` node tagged symmetric, a symmetric tensor, or a
            :class:`~nngeo_ops.linalg.MatmatOperator` declared symmetric.
        k: number of eigenvalues (capped at n).
        which: ``"LA"`` largest, ``"SA"`` smallest (the Hessian's negative outliers), ``"BE"``
            ⌈k/2⌉ largest and ⌊k/2⌋ smallest.
        density: True (or a :class:`~nngeo_ops.linalg.DensitySettings`, e.g. ``scale="log"``)
            to compute the eigenvalue density.
        trace: compute tr(F) (exact or Hutch++, see ``settings.trace``).
        per_layer: also the spectrum of each layer's diagonal block (needs a representation).
        eigenvectors: form the eigenvectors.
        generator: for Lanczos start vectors and probes: a fixed seed gives identical results.
        settings: :class:`SpectrumSettings`.
        progress: tqdm bars of the iterative parts (None: on a terminal only).
        v0: warm start of the Lanczos route, (n,) or (n, b) (e.g. the previous eigenvectors).

    Returns:
        A :class:`Spectrum`; ``explain()`` names the route of each quantity.
    """
    s = settings or SpectrumSettings()
    if not isinstance(s, SpectrumSettings):
        raise ArgumentTypeError(f"settings must be a SpectrumSettings, got {type(s).__name__}")
    if which not in WHICH:
        raise InvalidArgumentError(f"which must be one of {WHICH}, got {which!r}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InvalidArgumentError(f"k must be an integer >= 1, got {k!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ArgumentTypeError(
            f"generator must be a torch.Generator, got {type(generator).__name__}; "
            "use torch.Generator().manual_seed(seed)"
        )
    target, lc = _as_target(F)
    if per_layer and lc is None:
        raise InvalidArgumentError(
            "per_layer=True needs a representation with a layer collection (FIM/GGN/Hessian "
            "output), not a bare operator"
        )
    n, dtype, device = _shape_dtype(target)
    k = min(k, n)
    routes: dict[str, str] = {}
    E = c = None
    if s.method != "lanczos":
        E, c, name = _structured_eigen(target, s.policy)
        if E is None and s.method == "exact":
            raise UnsupportedError(
                f"spectrum(method='exact'): no exact eigendecomposition of {target} from its "
                "structure; use method='auto' (Lanczos)"
            )
    matvecs = 0
    all_vals = None
    if E is not None:
        evals, vecs, all_vals, note = _exact_route(E, target, k, which, eigenvectors)
        resid = torch.zeros_like(evals)
        routes["eigenpairs"] = f"exact from the structure: {name}{note}"
        exact = True
    else:
        res, order = _lanczos_route(target, k, which, s, generator, progress, v0)
        evals, resid = res.eigenvalues[order], res.residuals[order]
        vecs = res.eigenvectors[:, order] if eigenvectors else None
        exact = False
        matvecs += res.num_matvecs
        routes["eigenpairs"] = (
            f"thick-restart block Lanczos: {res.num_matvecs} products, {res.restarts} restarts, "
            f"max residual {float(res.residuals.max()):.2g} (tol·max|λ| = "
            f"{(s.tol if s.tol is not None else torch.finfo(dtype).eps ** 0.75) * res.scale:.2g})"
            + ("" if bool(res.converged.all()) else ", NOT CONVERGED")
        )
    tr = None
    if trace and s.trace != "none":
        tr, routes["trace"], mv = _trace(target, E, c, s, generator)
        matvecs += mv
    dens = None
    if density is not False:
        ds = density if isinstance(density, DensitySettings) else None
        dens, routes["density"], mv = _density(target, all_vals, s, generator, ds)
        matvecs += mv
    if vecs is not None and lc is not None:
        vecs = [PVector.from_flat(lc, vecs[:, i].detach()) for i in range(vecs.shape[1])]
    layers = None
    if per_layer:
        layers = {}
        for lid, block, sub_lc in _layer_targets(target, lc):
            sub = _Sub(block, sub_lc)
            layers[lid] = spectrum(
                sub,
                k,
                which=which,
                density=density,
                trace=trace,
                eigenvectors=eigenvectors,
                generator=generator,
                settings=s,
                progress=progress,
            )
            matvecs += layers[lid].num_matvecs
    return Spectrum(
        eigenvalues=evals.detach() if exact else evals,
        eigenvectors=vecs,
        residuals=resid,
        exact=exact,
        trace=tr,
        density=dens,
        per_layer=layers,
        size=n,
        which=which,
        num_matvecs=matvecs,
        routes=routes,
        plan=c.explain() if (c is not None and E is not None) else "",
    )


@dataclass
class _Sub:
    """A layer's block with its own layer collection (what :func:`_as_target` reads)."""

    op: LinearOperator
    layer_collection: LayerCollection


class SpectrumTracker:
    """Follow the top (or bottom) eigenvalues of a changing curvature over training.

    Each :meth:`update` computes ``spectrum(F, k, which=...)``; on the Lanczos route it starts
    from the previous eigenvectors (a warm start: when the matrix moved little, a few products
    suffice), which is how sharpness curves (the top Hessian eigenvalue per step) are drawn.

    Attributes:
        steps: the step labels given to :meth:`update`.
        history: list of (k,) descending eigenvalue tensors, one per update.
    """

    def __init__(
        self,
        k: int = 1,
        *,
        which: str = "LA",
        settings: SpectrumSettings | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        self.k, self.which, self.settings, self.generator = k, which, settings, generator
        self.steps: list[float] = []
        self.history: list[torch.Tensor] = []
        self.matvecs: list[int] = []
        self._prev: torch.Tensor | None = None

    def update(self, F: object, step: float | None = None) -> Spectrum:
        """Compute the spectrum of ``F`` now, warm-started, and record it."""
        v0 = self._prev
        if v0 is not None:
            n = _shape_dtype(_as_target(F)[0])[0]
            if v0.shape[0] != n:
                raise ShapeError(
                    f"SpectrumTracker: the matrix changed size ({v0.shape[0]} → {n}); "
                    "use a new tracker"
                )
        s = spectrum(
            F,
            self.k,
            which=self.which,
            trace=False,
            generator=self.generator,
            settings=self.settings,
            progress=False,
            v0=v0,
        )
        flat = s.flat_eigenvectors()
        self._prev = flat.detach() if flat is not None else None
        self.steps.append(len(self.steps) if step is None else step)
        self.history.append(s.eigenvalues.detach())
        self.matvecs.append(s.num_matvecs)
        return s

    def values(self) -> torch.Tensor:
        """(updates, k) eigenvalues, descending per row."""
        return torch.stack(self.history) if self.history else torch.empty(0, self.k)
