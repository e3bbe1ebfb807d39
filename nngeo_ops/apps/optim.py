"""Natural-gradient training: a gradient preconditioner and a ``torch.optim`` optimiser.

:class:`Preconditioner` keeps an estimate F of the Fisher of the model in any representation of
:mod:`nngeo_ops.nn` (KFAC, EKFAC, diagonal, block-diagonal, dense, implicit), refreshes it during
training and replaces each covered ``.grad`` by (F + λI)⁻¹ g, so that it composes with any optimiser
(SGD with momentum, Adam, schedulers, gradient clipping). :class:`NaturalGradient` is the optimiser
built on it:

    g_p ← ∇_p L + wd·θ_p                                  (weight decay as an L2 term)
    d   ← (F + λI)⁻¹ g      on the covered parameters,    d_p = g_p elsewhere (plain SGD)
    d   ← ν·d on the covered parameters, ν = min(1, √(κ / Σ_p lr_p²·g_pᵀd_p))   (only with kl_clip κ)
    b_p ← μ·b_p + d_p       (b_p = d_p at the first step, as torch.optim.SGD)
    θ_p ← θ_p − lr_p·b_p

Conventions (documented and tested):

* F is the chosen representation of the Fisher of the refresh batch at the current parameters, a
  mean over its examples (as ``FIM``, ``FIM_MonteCarlo``, ``EmpiricalFisher`` with ``variant``), and
  damping is exact: (F + λI)⁻¹, for KFAC and EKFAC too (their eigen forms). With ``update_every=1``
  and ``ema_decay=0`` one step is exactly θ ← θ − lr·(F_batch + λI)⁻¹∇L. ``pi_damping=True`` uses
  the factored damping (A + π√λ I) ⊗ (G + √λ/π I) of Martens & Grosse instead (KFAC only).
* The curvature is refreshed at the steps k with k mod ``update_every`` = 0 (the first step
  included); its statistics are averaged with ``ema_decay`` β (see
  :mod:`nngeo_ops.apps.curvature_state`: KFAC averages A and G separately, EKFAC its diagonal, Diag
  its diagonal); the operator is rebuilt and refactorised at the refreshes with
  k mod ``inverse_every`` = 0 (default: every refresh) and reused in between, with its cached
  factorisation (a new λ is a shift of the same eigenvalues).
* The refresh reads the statistics from the training step's own forward and backward where the
  Fisher kind allows it (:class:`~nngeo_ops.nn.StepStatistics`: ``"mc"`` costs one extra partial
  backward of sampled labels through the step's graph, ``"empirical"`` reads the loss's own
  backward), else (``refresh="batch"``, the implicit route, or when the step was not recorded) it
  makes a pass over the ``batch`` given to ``step``. ``explain()`` says which ran.
* A step that fails (bad batch, NaN in the curvature or in the step, negative damping) raises an
  :class:`~nngeo_ops.errors.NNGeoError` and leaves the parameters, the gradients, the momentum and
  the curvature unchanged.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from ..errors import DataError, InvalidArgumentError
from ..nn import PMatKFAC
from .preconditioner import Preconditioner, PreconditionerSettings, _check_finite

__all__ = ["NaturalGradient", "Preconditioner", "PreconditionerSettings"]


class NaturalGradient(torch.optim.Optimizer):
    """Natural-gradient descent as a ``torch.optim.Optimizer`` (update rule: module docstring).

    Usage::

        opt = NaturalGradient(model, lr=0.1, representation=PMatKFAC, damping=1e-3, fisher="mc",
                              update_every=10, ema_decay=0.95, momentum=0.9, weight_decay=0.0)
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step(batch=(x, y))        # refreshes the curvature from this step when due

    ``param_groups`` hold ``lr``, ``momentum`` and ``weight_decay`` per group (default: one group
    with every trainable parameter of ``model``; pass ``params=`` for groups). Parameters outside
    the preconditioner's layer collection get plain SGD (with momentum) steps. ``step(closure)``
    evaluates the closure for the loss (needed by ``damping="adaptive"``, which re-evaluates it after
    the step to measure the reduction ratio). Every other keyword is the :class:`Preconditioner`'s.
    ``state_dict()`` adds the preconditioner's state to the optimiser's.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 0.1,
        representation=PMatKFAC,
        damping=1e-3,
        fisher: str = "mc",
        update_every: int = 1,
        ema_decay: float = 0.0,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        params=None,
        **kwargs,
    ):
        for name, v in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay)):
            if not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
                raise InvalidArgumentError(f"{name} must be a finite number >= 0, got {v!r}")
        if params is None:
            params = [p for p in model.parameters() if p.requires_grad]
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay}
        super().__init__(params, defaults)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            self.preconditioner = Preconditioner(
                model,
                representation=representation,
                damping=damping,
                fisher=fisher,
                update_every=update_every,
                ema_decay=ema_decay,
                **kwargs,
            )
        for w in caught:  # re-emitted here, so that the warning points at the user's line
            warnings.warn(w.message, w.category, stacklevel=2)
        self.model = model
        # the covered parameters, looked up once (the layer collection's lookup walks the modules)
        self._covered_params = list(self.preconditioner.layer_collection.parameters(model))
        self._covered = [id(p) for p in self._covered_params]

    def _lr_flat(self, grads):
        """The learning rate of each covered scalar (for kl_clip), as one flat tensor."""
        lr_of = {id(p): g["lr"] for g in self.param_groups for p in g["params"]}
        params = self._covered_params
        lrs = {lr_of.get(id(p), 0.0) for p in params}
        if len(lrs) == 1:
            return lrs.pop()
        return torch.cat([torch.full((p.numel(),), lr_of.get(id(p), 0.0)) for p in params]).to(
            grads
        )

    @torch.no_grad()
    def step(self, closure=None, batch=None):
        """One update (see the class docstring). Returns the closure's loss, if any."""
        pre = self.preconditioner
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        lam = pre.current_damping()
        check_rho = pre.damping.adaptive and pre.damping.due(pre.steps)
        if check_rho and closure is None:
            raise InvalidArgumentError(
                "damping='adaptive' needs the loss before and after the step: call "
                "step(closure) with a closure that recomputes the loss and its gradient"
            )
        covered = self._covered_params
        cov_ids = set(self._covered)
        # the gradient with weight decay, per parameter (the .grad fields are left as they are)
        gdict = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if group["weight_decay"]:
                    g = g.add(p, alpha=group["weight_decay"])
                gdict[id(p)] = g
        if not any(id(p) in gdict for p in covered) and not gdict:
            raise DataError("no gradient: call loss.backward() before step()")
        gflat = torch.cat([gdict.get(id(p), torch.zeros_like(p)).reshape(-1) for p in covered])
        plan = pre._plan(batch)  # noqa: SLF001  (same package: the step's transaction)
        dflat = pre._direction(plan.pmat, gflat, lam, self._lr_flat(gflat))  # noqa: SLF001
        _check_finite(
            torch.cat([dflat, *[g.reshape(-1) for i, g in gdict.items() if i not in cov_ids]])
        )
        dirs, i = {}, 0
        for p in covered:
            n = p.numel()
            dirs[id(p)] = dflat[i : i + n].view_as(p)
            i += n
        # nothing has changed so far: apply momentum and the update, then commit the curvature
        deltas = {}
        for group in self.param_groups:
            lr, mu = group["lr"], group["momentum"]
            for p in group["params"]:
                d = dirs.get(id(p), gdict.get(id(p)))
                if d is None or (id(p) not in gdict and id(p) not in cov_ids):
                    continue
                if mu:
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = d.detach().clone()
                    else:
                        buf.mul_(mu).add_(d)
                    d = buf
                p.add_(d, alpha=-lr)
                if check_rho:
                    deltas[id(p)] = -lr * d
        pre._commit(plan)  # noqa: SLF001
        if check_rho:
            self._adapt_damping(plan.pmat, closure, loss, gdict, deltas, lam, covered)
        return loss

    def _adapt_damping(self, pmat, closure, loss, gdict, deltas, lam, covered):
        """Levenberg–Marquardt: ρ = (h(θ+δ) − h(θ)) / (gᵀδ + ½δᵀ(F + λI)δ), F on the covered part."""
        pre = self.preconditioner
        with torch.enable_grad():
            st = pre.step_statistics
            armed = st is not None and st.armed
            if armed:
                st.release()  # the re-evaluation is not a training step
            new_loss = closure()
            if armed:
                st.arm()
        dc = torch.cat([deltas.get(id(p), torch.zeros_like(p)).reshape(-1) for p in covered])
        lin = sum(float((gdict[k] * v).sum()) for k, v in deltas.items() if k in gdict)
        quad = float(torch.dot(dc, pre.route.mv(pmat, dc))) + lam * sum(
            float(v.square().sum()) for v in deltas.values()
        )
        predicted = lin + 0.5 * quad
        actual = float(new_loss) - float(loss)
        rho = actual / predicted if predicted < 0 else float("nan")
        pre.damping.update(rho)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["natural_gradient"] = self.preconditioner.state_dict()
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        pre_state = state_dict.pop("natural_gradient", None)
        if pre_state is None:
            raise InvalidArgumentError(
                "this state_dict has no 'natural_gradient' entry: it was not saved by "
                "NaturalGradient.state_dict()"
            )
        super().load_state_dict(state_dict)
        self.preconditioner.load_state_dict(pre_state)
