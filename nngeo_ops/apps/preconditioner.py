"""The gradient preconditioner of natural-gradient training: :class:`Preconditioner` and its
settings (conventions: :mod:`nngeo_ops.apps.optim`)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import (
    ArgumentTypeError,
    DataError,
    InvalidArgumentError,
    NonFiniteError,
    ShapeError,
    SingularError,
    UnsupportedError,
)
from ..nn import (
    CurvatureGenerator,
    LayerCollection,
    PMatBlockDiag,
    PMatDense,
    PMatDiag,
    PMatEKFAC,
    PMatImplicit,
    PMatKFAC,
    PVector,
    StepStatistics,
)
from ..nn.losses import output_model_for_variant
from .curvature_state import (
    BlockDiagRoute,
    DenseRoute,
    DiagRoute,
    EKFACRoute,
    ImplicitRoute,
    KFACRoute,
)
from .damping import as_damping

ROUTES = {
    PMatKFAC: KFACRoute,
    PMatEKFAC: EKFACRoute,
    PMatDiag: DiagRoute,
    PMatDense: DenseRoute,
    PMatBlockDiag: BlockDiagRoute,
    PMatImplicit: ImplicitRoute,
}
FISHER_KINDS = {"exact": "exact", "mc": "sample", "empirical": "empirical"}


@dataclass
class PreconditionerSettings:
    """Settings of :class:`Preconditioner` (and of :class:`NaturalGradient`'s curvature).

    Attributes:
        representation: ``PMatKFAC``, ``PMatEKFAC``, ``PMatDiag``, ``PMatBlockDiag``, ``PMatDense``
            or ``PMatImplicit``.
        fisher: ``"exact"``, ``"mc"`` (Monte-Carlo, ``trials`` labels per example) or
            ``"empirical"``.
        variant: the output model, as in ``FIM`` (``classif_logits``, ``regression``, ...).
        update_every: refresh the statistics every this many steps.
        inverse_every: rebuild and refactorise the operator every this many steps (a multiple of
            ``update_every``; None: at every refresh).
        ema_decay: β of the moving average of the statistics, in [0, 1).
        kl_clip: κ, or None (see the module docstring).
        pi_damping: the factored π-damping of Martens & Grosse instead of exact damping (KFAC).
        trials: Monte-Carlo labels per example.
        cg_iters, cg_tol, cg_precond: the truncated CG of the implicit route (``cg_precond``
            ``None``, ``"diag"`` or ``"kfac"``).
        refresh: ``"auto"`` (the training step's statistics when recorded, else a pass over the
            batch), ``"step"`` (only the former) or ``"batch"`` (only the latter).
        loss_reduction: how the training loss reduces over the batch, ``"mean"`` or ``"sum"``
            (read by the empirical Fisher from the training step's backward).
    """

    representation: type = PMatKFAC
    fisher: str = "mc"
    variant: str = "classif_logits"
    update_every: int = 1
    inverse_every: int | None = None
    ema_decay: float = 0.0
    kl_clip: float | None = None
    pi_damping: bool = False
    trials: int = 1
    cg_iters: int = 10
    cg_tol: float = 1e-10
    cg_precond: str | None = None
    refresh: str = "auto"
    loss_reduction: str = "mean"
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        rep = self.representation
        if rep not in ROUTES:
            name = getattr(rep, "__name__", repr(rep))
            raise UnsupportedError(
                f"{name} cannot be refreshed per batch during training; use one of "
                f"{[r.__name__ for r in ROUTES]}"
            )
        if self.fisher not in FISHER_KINDS:
            raise InvalidArgumentError(
                f"fisher must be one of {list(FISHER_KINDS)}, got {self.fisher!r}"
            )
        for name in ("update_every", "trials", "cg_iters"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise InvalidArgumentError(f"{name} must be an int >= 1, got {v!r}")
        if self.inverse_every is None:
            self.inverse_every = self.update_every
        if (
            not isinstance(self.inverse_every, int)
            or self.inverse_every < 1
            or self.inverse_every % self.update_every
        ):
            raise InvalidArgumentError(
                f"inverse_every must be a multiple of update_every={self.update_every}, got "
                f"{self.inverse_every!r}"
            )
        if not 0 <= self.ema_decay < 1:
            raise InvalidArgumentError(f"ema_decay must be in [0, 1), got {self.ema_decay!r}")
        if self.kl_clip is not None and not self.kl_clip > 0:
            raise InvalidArgumentError(f"kl_clip must be > 0 or None, got {self.kl_clip!r}")
        if self.pi_damping and rep is not PMatKFAC:
            raise UnsupportedError(
                f"π-damping is defined for KFAC factors, not {rep.__name__}; use exact damping"
            )
        if rep is PMatImplicit and self.ema_decay:
            raise InvalidArgumentError(
                "the implicit route keeps no statistics to average: use ema_decay=0"
            )
        if self.cg_precond not in (None, "diag", "kfac"):
            raise InvalidArgumentError(
                f"cg_precond must be None, 'diag' or 'kfac', got {self.cg_precond!r}"
            )
        if self.refresh not in ("auto", "step", "batch"):
            raise InvalidArgumentError(
                f"refresh must be 'auto', 'step' or 'batch', got {self.refresh!r}"
            )
        if self.loss_reduction not in ("mean", "sum"):
            raise InvalidArgumentError(
                f"loss_reduction must be 'mean' or 'sum', got {self.loss_reduction!r}"
            )


@dataclass
class _Plan:
    """What a step would commit: statistics, operator, and where they came from."""

    stats: object
    pmat: object
    refreshed: bool
    rebuilt: bool
    source: str | None


def _as_batch(batch):
    if batch is None or isinstance(batch, tuple):
        return batch
    if isinstance(batch, list):
        return tuple(batch)
    return (batch,)


class Preconditioner:
    """Replaces the ``.grad`` of the covered parameters by the natural gradient (F + λI)⁻¹ g.

    Usage, with any optimiser::

        pre = Preconditioner(model, representation=PMatKFAC, damping=1e-3, fisher="mc",
                             update_every=10, ema_decay=0.95)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            pre.step(batch=(x, y))         # refreshes F when due, preconditions .grad
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()

    Args:
        model: the ``nn.Module`` trained.
        settings: a :class:`PreconditionerSettings`. Without it, one is built from the keyword
            arguments ``representation``, ``fisher``, ``variant``, ``update_every``,
            ``inverse_every``, ``ema_decay``, ``kl_clip``, ``pi_damping``, ``trials``,
            ``cg_iters``, ``cg_tol``, ``cg_precond``, ``refresh`` and ``loss_reduction`` (its
            fields, documented there); with it, those keyword arguments are ignored.
        damping: λ ≥ 0, a callable of the step, ``"adaptive"`` or an
            :class:`~nngeo_ops.apps.AdaptiveDamping` (adaptive needs
            :class:`NaturalGradient` with a closure).
        generator: the ``torch.Generator`` of the Monte-Carlo labels (one is created, seeded from
            torch's global generator, if None); saved in :meth:`state_dict`.
        layer_collection: the covered parameters (default: every trainable parameter, restricted
            for KFAC/EKFAC to the layers with a Kronecker rule). The others are left to the optimiser
            (their ``.grad`` untouched) and a warning names them once.
        lr: the learning rate assumed by ``kl_clip`` (or pass ``lr=`` to :meth:`step`).
        n_output, function, covariance, kfac_mode: as in ``FIM``.
    """

    def __init__(
        self,
        model: nn.Module,
        representation=PMatKFAC,
        damping=1e-3,
        fisher: str = "mc",
        variant: str = "classif_logits",
        update_every: int = 1,
        inverse_every: int | None = None,
        ema_decay: float = 0.0,
        kl_clip: float | None = None,
        pi_damping: bool = False,
        generator: torch.Generator | None = None,
        layer_collection: LayerCollection | None = None,
        lr: float | None = None,
        trials: int = 1,
        cg_iters: int = 10,
        cg_tol: float = 1e-10,
        cg_precond: str | None = None,
        refresh: str = "auto",
        loss_reduction: str = "mean",
        n_output: int | None = None,
        function=None,
        covariance=None,
        kfac_mode: str = "expand",
        settings: PreconditionerSettings | None = None,
    ):
        if not isinstance(model, nn.Module):
            raise ArgumentTypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if settings is None:
            settings = PreconditionerSettings(
                representation=representation,
                fisher=fisher,
                variant=variant,
                update_every=update_every,
                inverse_every=inverse_every,
                ema_decay=ema_decay,
                kl_clip=kl_clip,
                pi_damping=pi_damping,
                trials=trials,
                cg_iters=cg_iters,
                cg_tol=cg_tol,
                cg_precond=cg_precond,
                refresh=refresh,
                loss_reduction=loss_reduction,
            )
        self.settings = s = settings
        self.model = model
        self.damping = as_damping(damping)
        self.lr = lr
        if generator is None:
            generator = torch.Generator(device=_device_of(model))
            generator.manual_seed(int(torch.randint(0, 2**62, (1,)).item()))
        self.rng = generator
        if layer_collection is None:
            layer_collection = _default_collection(model, s)
        self.layer_collection = lc = layer_collection
        self.generator = CurvatureGenerator(
            model,
            output_model_for_variant(s.variant, covariance),
            FISHER_KINDS[s.fisher],
            layer_collection=lc,
            function=function,
            trials=s.trials,
            generator=generator,
            n_output=n_output,
            progress=False,
            kfac_mode=kfac_mode,
        )
        rep = s.representation
        if rep is PMatImplicit:
            self.route = ImplicitRoute(self.generator, s.cg_iters, s.cg_tol, s.cg_precond)
        else:
            self.route = ROUTES[rep](self.generator)
            if rep in (PMatKFAC, PMatEKFAC):
                self.generator.capture().require_structured(rep.__name__)
        covered = {id(p) for p in lc.parameters(model)}
        self.uncovered = [
            n for n, p in model.named_parameters() if p.requires_grad and id(p) not in covered
        ]
        if self.uncovered:
            warnings.warn(
                f"{rep.__name__} does not cover the parameters {self.uncovered}: they get the "
                "plain gradient (SGD steps)",
                stacklevel=2,
            )
        self.steps = 0
        self.stats = None  # the averaged statistics
        self.frozen = None  # the statistics the current operator was built from
        self.curvature = None  # the current representation (a PMat*)
        self.last_source = None
        self._warned: set = set()
        self.step_statistics = None
        if s.refresh != "batch" and not self.route.needs_batch:
            try:
                self.step_statistics = StepStatistics(self.generator, s.loss_reduction)
            except UnsupportedError:
                if s.refresh == "step":
                    raise
        self._arm_if_due()

    # ------------------------------------------------------------------ schedule
    def refresh_due(self, step: int | None = None) -> bool:
        """Whether the curvature is refreshed at step ``step`` (default: the next one)."""
        k = self.steps if step is None else step
        return self.curvature is None or k % self.settings.update_every == 0

    def _inverse_due(self) -> bool:
        return self.curvature is None or self.steps % self.settings.inverse_every == 0

    def _arm_if_due(self) -> None:
        st = self.step_statistics
        if st is None:
            return
        if self.refresh_due():
            if not st.armed:
                st.arm()
        else:
            st.release()

    def close(self) -> None:
        """Remove the hooks on the model (they are only installed before a refresh step)."""
        if self.step_statistics is not None:
            self.step_statistics.release()

    # ------------------------------------------------------------------ refresh
    def _source(self, batch, announce: bool = True):
        st = self.step_statistics
        if st is not None and st.error is not None:
            err = st.error
            st.arm()  # the next forward is recorded afresh
            raise err
        if st is not None and st.ready:
            st.check_batch(batch)
            return st.feed, "the training step's forward/backward"
        if self.settings.refresh == "step" or batch is None:
            why = st.why_not if st is not None else "this route needs the batch itself"
            if batch is None:
                raise DataError(
                    f"cannot refresh the curvature: {why}; pass the step's batch, "
                    "step(batch=(inputs, labels))"
                )
            raise DataError(f"refresh='step' but the training step was not recorded: {why}")
        if st is not None:
            if announce and st.why_not not in self._warned:
                self._warned.add(st.why_not)
                warnings.warn(
                    f"curvature refreshed by a separate pass over the batch: {st.why_not}",
                    stacklevel=4,
                )
            st.release()  # its hooks must not see the separate pass

        def run(accs):
            try:
                return self.generator.run([batch], accs)
            except RuntimeError as err:
                if isinstance(err, NotImplementedError):
                    raise
                raise ShapeError(
                    f"the curvature pass over the batch failed ({err}); the batch must be "
                    "(inputs, labels) as the model and the loss take them"
                ) from err

        return run, "a separate pass over the batch"

    def _plan(self, batch) -> _Plan:
        batch = _as_batch(batch)
        if not self.refresh_due():
            return _Plan(self.stats, self.curvature, False, False, None)
        source, where = self._source(batch)
        s = self.settings
        rebasis = self._inverse_due()
        if isinstance(self.route, ImplicitRoute):
            stats = self.route.refresh(source, None, 0.0, True, batch=batch)
        else:
            stats = self.route.refresh(source, self.stats, s.ema_decay, rebasis)
        pmat = self.route.build(stats) if (rebasis or s.representation is PMatEKFAC) else None
        if self.step_statistics is not None:
            self.step_statistics.release()
        return _Plan(stats, pmat if pmat is not None else self.curvature, True, rebasis, where)

    def _commit(self, plan: _Plan) -> None:
        if plan.refreshed:
            self.stats = plan.stats
            self.last_source = plan.source
            if plan.rebuilt or plan.pmat is not self.curvature:
                self.frozen = plan.stats
        self.curvature = plan.pmat
        if isinstance(self.route, ImplicitRoute):
            self.route.x0 = getattr(self.route, "pending_x0", self.route.x0)
        self.steps += 1
        self._arm_if_due()

    def update_curvature(self, batch=None) -> None:
        """Refresh the curvature now (from the recorded step, else from ``batch``), whatever the
        schedule; the step count is unchanged."""
        batch = _as_batch(batch)
        source, where = self._source(batch, announce=False)
        if isinstance(self.route, ImplicitRoute):
            stats = self.route.refresh(source, None, 0.0, True, batch=batch)
        else:
            stats = self.route.refresh(source, self.stats, self.settings.ema_decay, True)
        self.curvature = self.route.build(stats)
        self.stats = self.frozen = stats
        self.last_source = where
        if self.step_statistics is not None:
            self.step_statistics.release()
        self._arm_if_due()

    # ------------------------------------------------------------------ solves
    def current_damping(self) -> float:
        """λ at the next step."""
        return self.damping(self.steps)

    def _solve(self, pmat, g: torch.Tensor, lam: float) -> torch.Tensor:
        try:
            return self.route.solve(pmat, g, lam, pi=self.settings.pi_damping)
        except torch.linalg.LinAlgError as err:
            raise SingularError(
                f"the damped curvature could not be factorised ({err}); the parameters are left "
                f"unchanged. Raise the damping (λ = {lam:g}) or check the statistics"
            ) from err

    def _direction(self, pmat, g: torch.Tensor, lam: float, lr_flat) -> torch.Tensor:
        """(F + λI)⁻¹ g with the kl_clip rescaling (a tensor factor: no host synchronisation)."""
        d = self._solve(pmat, g, lam)
        kl = self.settings.kl_clip
        if kl is not None:
            if lr_flat is None:
                raise InvalidArgumentError(
                    "kl_clip needs the learning rate: Preconditioner(..., lr=...) or step(lr=...)"
                )
            s = (
                (lr_flat.square() * g * d).sum()
                if torch.is_tensor(lr_flat)
                else (lr_flat**2 * torch.dot(g, d))
            )
            nu = torch.clamp(torch.sqrt(kl / s.abs().clamp_min(1e-30)), max=1.0)
            d = d * nu
        return d

    def precondition(self, g, lr=None):
        """(F + λI)⁻¹ g (with the kl_clip factor) for a :class:`PVector` or flat tensor ``g`` over
        the layer collection, with the current curvature; nothing is refreshed or counted."""
        if self.curvature is None:
            raise DataError("no curvature yet: call step() or update_curvature(batch) first")
        flat = g.to_torch() if isinstance(g, PVector) else g
        lam = self.current_damping()
        d = self._direction(self.curvature, flat, lam, lr if lr is not None else self.lr)
        return PVector(self.layer_collection, vector_repr=d) if isinstance(g, PVector) else d

    def _grad_vector(self) -> torch.Tensor:
        params = self.layer_collection.parameters(self.model)
        if all(p.grad is None for p in params):
            raise DataError(
                "no gradient on the covered parameters: call loss.backward() before step()"
            )
        return PVector.from_model_grad(self.model, self.layer_collection).to_torch()

    def step(self, batch=None, lr=None) -> PVector:
        """Refresh the curvature if due, then replace the covered ``.grad`` by (F + λI)⁻¹ g.

        ``batch`` is the training step's ``(inputs, labels)``: checked against the recorded
        forward, or used for a separate pass when the step was not recorded. Returns the
        preconditioned gradient as a :class:`PVector`. On error nothing is changed.
        """
        lam = self.current_damping()
        if self.damping.adaptive:
            raise InvalidArgumentError(
                "damping='adaptive' needs the loss after the step: use NaturalGradient with "
                "step(closure)"
            )
        g = self._grad_vector()
        plan = self._plan(batch)
        d = self._direction(plan.pmat, g, lam, lr if lr is not None else self.lr)
        _check_finite(d)
        PVector(self.layer_collection, vector_repr=d).copy_to_model_grad(self.model)
        self._commit(plan)
        return PVector(self.layer_collection, vector_repr=d)

    # ------------------------------------------------------------------ inspection
    def factors(self, layer_id: str):
        """(A, G) of a KFAC/EKFAC layer in the averaged statistics (A formed from its rows)."""
        f = (self.stats or {}).get(layer_id)
        if f is None or "G" not in f:
            raise InvalidArgumentError(f"no Kronecker factors for layer {layer_id!r}")
        a = f["A"] if "A" in f else f["A_rows"].T @ f["A_rows"]
        return a, f["G"]

    def explain(self) -> str:
        """Which routes ran: the representation, the refresh source, damping, CG residuals and
        the compiled damped operator (rewrites, routines, cached factorisations)."""
        s = self.settings
        lines = [
            f"Preconditioner: {s.representation.__name__}, fisher={s.fisher!r}, "
            f"variant={s.variant!r}, {self.layer_collection.numel()} covered parameters",
            f"  steps: {self.steps}; refresh every {s.update_every}, refactorise every "
            f"{s.inverse_every}, ema_decay={s.ema_decay}",
            f"  last refresh from: {self.last_source}",
            f"  damping: {self.damping!r} (λ = {self.current_damping():g}, "
            f"{'π-damping (factored)' if s.pi_damping else 'exact: (F + λI)⁻¹'})",
        ]
        if self.uncovered:
            lines.append(f"  plain gradient (not covered): {self.uncovered}")
        if isinstance(self.route, ImplicitRoute) and self.route.last_info is not None:
            info = self.route.last_info
            lines.append(
                f"  truncated CG (an approximate solve): {info.iterations} iterations, residual "
                f"{float(info.residual_norms.max()):.3e}, converged={info.all_converged}"
            )
        elif self.curvature is not None and not s.pi_damping:
            lam = self.current_damping()
            if isinstance(self.route, KFACRoute) and lam != 0:
                compiled = self.route.compiled(self.curvature, float(lam))  # what the steps use
            else:
                node = self.curvature.damped(lam)  # the node solve() compiles
                compiled = node.compiled()
            lines.append("  damped operator:")
            lines += ["    " + ln for ln in compiled.explain().splitlines()]
        return "\n".join(lines)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """Counters, statistics (averaged and those of the current operator), damping, the
        Monte-Carlo generator's state and the CG warm start: enough to resume the same trajectory."""
        return {
            "steps": self.steps,
            "stats": self.stats,
            "frozen": self.frozen,
            "damping": self.damping.state_dict(),
            "rng": self.rng.get_state() if self.rng is not None else None,
            "x0": getattr(self.route, "x0", None),
            "last_source": self.last_source,
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume from :meth:`state_dict`: counters, statistics, damping, the Monte-Carlo generator's state
        and the CG warm start; the curvature operator is rebuilt from the restored frozen statistics (if
        any) and the training-step hooks are re-armed when a refresh is due.
        """
        self.steps = int(state["steps"])
        self.stats = state["stats"]
        self.frozen = state["frozen"]
        self.damping.load_state_dict(state["damping"])
        if state.get("rng") is not None:
            self.rng.set_state(state["rng"])
        if isinstance(self.route, ImplicitRoute):
            self.route.x0 = state.get("x0")
        self.last_source = state.get("last_source")
        self.curvature = self.route.build(self.frozen) if self.frozen is not None else None
        if self.step_statistics is not None:
            self.step_statistics.release()
        self._arm_if_due()


def _default_collection(model, s) -> LayerCollection:
    """Every trainable parameter; for KFAC/EKFAC the layers with a Kronecker rule, less the
    submodules of ``nn.MultiheadAttention`` (it applies ``out_proj``'s weights itself, without
    calling the module, so no per-layer hook sees them)."""
    if s.representation not in (PMatKFAC, PMatEKFAC) and s.cg_precond != "kfac":
        return LayerCollection.from_model(model)
    lc = LayerCollection.from_model(model, ignore_unsupported_layers=True)
    inside = [
        f"{n}." for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention) and n
    ]
    keep = [e.module_name for e in lc.layers.values()]
    kept = [n for n in keep if not any(n.startswith(p) for p in inside)]
    return lc if len(kept) == len(keep) else LayerCollection.from_modules(model, kept)


def _device_of(model):
    for p in model.parameters():
        return p.device
    return torch.get_default_device()


def _check_finite(d: torch.Tensor) -> None:
    # one host synchronisation per step (not per layer)
    if not bool(torch.isfinite(d).all()):
        raise NonFiniteError(
            "the natural-gradient step contains NaN or inf (a non-finite gradient or curvature); "
            "the parameters are left unchanged. Check the loss, lower the learning rate or raise "
            "the damping"
        )
