"""The curvature kept during training: per-representation statistics, their moving average, and the
damped operator built from them.

One *route* per representation knows which accumulators of :mod:`nngeo_ops.nn` gather its
statistics from one batch, how to average them (``ema_decay`` β: s ← β·s_old + (1 − β)·s_batch, the
first refresh taking s_batch as it is), and how to build the representation from the averaged
statistics through the public constructors of :mod:`nngeo_ops.nn`:

* KFAC: the factors A and G (and the exact bias / elementwise blocks) are averaged separately, as
  every KFAC optimiser does; an input factor still held as its rows (A = RᵀR, fewer rows than half
  its size) is averaged exactly as the stacked rows [√β·R_old; √(1−β)·R_new] until they stop being
  the cheaper form (more than ``THIN_ROWS`` of its width): its damped solves then use the thin eigen
  form of :mod:`nngeo_ops.ops.rules.thin_shift` (no complete basis), past it a dense eigh. The operator is :meth:`PMatKFAC.from_factors`.
* EKFAC: the KFAC factors as above; the eigenbases Q_A, Q_G are recomputed from the averaged factors
  only when the factorisation is due (``inverse_every``) and kept between; at every refresh the
  diagonal is refit in the current eigenbasis from the batch and averaged (restarting from the
  batch when the basis changed, since a diagonal in another basis cannot be carried over).
* Diag, Dense, BlockDiag: the diagonal, the matrix, the blocks.
* Implicit: nothing is averaged (``ema_decay`` must be 0): the operator is Jᵀ·H·J of the refresh
  batch at the current parameters, and solves are truncated CG (see :class:`ImplicitRoute`).

``source(accumulators)`` runs accumulators over the refresh batch, either from the training step
(:class:`~nngeo_ops.nn.StepStatistics`) or by a pass over it.
"""

from __future__ import annotations

import math
import warnings

import torch

from ..errors import ConvergenceWarning, DataError, NonFiniteError
from ..linalg import cg
from ..nn import PMatBlockDiag, PMatDense, PMatDiag, PMatEKFAC, PMatImplicit, PMatKFAC
from ..nn.engine.accumulators import EKFACDiagAcc
from ..ops import Identity

# An averaged input factor stays as its stacked rows (A = RᵀR, rank ≤ rows) while the rows are at
# most this fraction of its width: the damped solve then factorises it through a thin QR of the rows
# (ops: the shifted thin eigen form), O(width·rows²), and products cost O(width·rows). Measured on a
# 2049-wide factor (CPU time, one thread, float32): thin 0.32 s / dense eigh 0.79 s at 1024 rows,
# 0.50 / 0.81 at 1280, 0.78 / 0.90 at 1536, so the thin form pays up to about two thirds.
THIN_ROWS = 2 / 3


def _finite(tensors, what: str) -> None:
    tensors = list(tensors)
    if not tensors:
        return
    # one host synchronisation for all the statistics; the culprit is looked up only on failure
    flags = torch.stack([torch.isfinite(t).all() for _, t in tensors])
    if bool(flags.all()):
        return
    name = next(n for (n, _), ok in zip(tensors, flags.tolist()) if not ok)
    raise NonFiniteError(
        f"{what}: NaN or inf in the curvature statistics ({name}); the parameters are "
        "left unchanged. Lower the learning rate or check the batch"
    )


def _ema(old, new, beta):
    """β·old + (1 − β)·new, one pass (a new tensor: ``old`` may back the current operator)."""
    return torch.lerp(new, old, beta)


def _plain(stats):
    """Nested dicts of tensors, detached from nn's lazy containers (for averaging and checkpoints)."""
    return {lid: dict(f) if isinstance(f, dict) else f for lid, f in stats.items()}


class Route:
    """Statistics, averaging and solves of one representation (subclasses below)."""

    rep = None
    needs_batch = False  # True when a refresh needs the batch itself (no step statistics)
    ema_ok = True

    def __init__(self, generator):
        self.gen = generator
        self._pi_cache: dict = {}
        self._compiled = None  # (operator, λ, its compiled damped form), see KFACRoute

    def refresh(self, source, old, beta, rebasis):
        """The averaged statistics after one batch (a new dict; ``old`` is not modified)."""
        accs = self.rep.accumulators(self.gen)
        source(accs)
        new = self._new_stats(accs)
        _finite(self._tensors(new), type(self).__name__)
        if old is None or beta == 0:
            return new
        return self._blend(old, new, beta)

    def build(self, stats):
        """The representation (a ``PMat*``) of the statistics; factorised lazily at the first solve."""
        return self.rep(self.gen, data=stats)

    def solve(self, pmat, g, lam, pi=False):
        """(F + λI)⁻¹ g for a flat g (n,) or a block (n, k); the compiled damped node is cached on
        ``pmat`` per λ, so repeated solves reuse its factorisation."""
        return pmat.solve(g, regul=lam)

    def mv(self, pmat, v):
        return pmat.mv(v)

    def _tensors(self, stats):
        return [(k, v) for k, v in stats.items()]

    # state
    def state(self, stats):
        return stats

    def load(self, state):
        return state


class DiagRoute(Route):
    rep = PMatDiag

    def _new_stats(self, accs):
        return {"diag": PMatDiag.data_from(self.gen, accs)}

    def _blend(self, old, new, beta):
        return {"diag": _ema(old["diag"], new["diag"], beta)}

    def build(self, stats):
        return PMatDiag(self.gen, data=stats["diag"])


class DenseRoute(Route):
    rep = PMatDense

    def _new_stats(self, accs):
        return {"matrix": PMatDense.data_from(self.gen, accs)}

    def _blend(self, old, new, beta):
        return {"matrix": _ema(old["matrix"], new["matrix"], beta)}

    def build(self, stats):
        return PMatDense(self.gen, data=stats["matrix"])


class BlockDiagRoute(Route):
    rep = PMatBlockDiag

    def _new_stats(self, accs):
        return dict(PMatBlockDiag.data_from(self.gen, accs))

    def _blend(self, old, new, beta):
        return {lid: _ema(old[lid], new[lid], beta) for lid in new}


class KFACRoute(Route):
    rep = PMatKFAC

    def _new_stats(self, accs):
        return _plain(PMatKFAC.data_from(self.gen, accs))

    def _tensors(self, stats):
        return [(f"{k} of layer {lid}", t) for lid, f in stats.items() for k, t in f.items()]

    @staticmethod
    def _blend_layer(o, n, beta):
        out = {}
        for key in n:
            if key in ("A_rows", "A"):
                continue
            if key in o:
                out[key] = _ema(o[key], n[key], beta)
        if "A_rows" in o and "A_rows" in n:
            rows = torch.cat([o["A_rows"] * math.sqrt(beta), n["A_rows"] * math.sqrt(1 - beta)])
            if rows.shape[0] <= THIN_ROWS * rows.shape[1]:  # still the cheaper form: exact, as rows
                out["A_rows"] = rows
                return out
            out["A"] = rows.T @ rows
            return out
        a_old = o["A"] if "A" in o else o["A_rows"].T @ o["A_rows"]
        a_new = n["A"] if "A" in n else n["A_rows"].T @ n["A_rows"]
        out["A"] = _ema(a_old, a_new, beta)
        return out

    def _blend(self, old, new, beta):
        out = {}
        for lid, n in new.items():
            o = old[lid]
            if "block" in n:
                out[lid] = {"block": _ema(o["block"], n["block"], beta)}
            else:
                out[lid] = self._blend_layer(o, n, beta)
        return out

    def build(self, stats):
        self._pi_cache = {}
        return PMatKFAC.from_factors(self.gen, stats)

    def compiled(self, pmat, lam):
        """The compiled F + λI of ``pmat`` (``ops`` ``Compiled``), held for the operator's life.

        The statistics behind ``pmat`` are never modified in place (a refresh makes new tensors and
        a new operator), so the compiled form is reused without the per-call fingerprint of its
        leaves that ``pmat.solve`` checks (a checksum, hence a host synchronisation, per leaf);
        a new operator or a new λ compiles anew, reusing the factorisations cached on the leaves.
        """
        hit = self._compiled
        if hit is None or hit[0] is not pmat or hit[1] != lam:
            op = pmat.op
            node = op + lam * Identity(op.shape[0], dtype=op.dtype, device=op.device)
            hit = self._compiled = (pmat, lam, node.compile())
        return hit[2]

    def solve(self, pmat, g, lam, pi=False):
        if not pi:
            if lam == 0:
                return pmat.solve(g, regul=lam)
            c = self.compiled(pmat, float(lam))
            dt = c.expr.dtype
            return c.solve(g.to(dt)).to(g.dtype) if g.dtype != dt else c.solve(g)
        # π-damping: one lazy inverse per (operator, λ), compiled once and reused between refreshes
        key = (id(pmat), float(lam))
        inv = self._pi_cache.get(key)
        if inv is None:
            inv = pmat.inverse(regul=lam, damping="pi")
            self._pi_cache = {key: inv}
        return inv.op @ g

    def mv(self, pmat, v):
        return pmat.mv(v)


class EKFACRoute(KFACRoute):
    rep = PMatEKFAC

    def refresh(self, source, old, beta, rebasis):
        kacc = PMatKFAC.accumulators(self.gen)
        # the diagonal is refit on the same batch: in the step's statistics that is a second read
        # of what was recorded; in a pass over the batch, a second pass (the basis comes first)
        new = _plain(PMatKFAC.data_from(self.gen, self._feed(source, kacc)))
        _finite(self._tensors(new), "EKFAC")
        fac = {
            lid: {k: v for k, v in f.items() if k not in ("QA", "QG", "diag")}
            for lid, f in (old or {}).items()
        }
        factors = new if old is None or beta == 0 else self._blend(fac, new, beta)
        if rebasis or old is None:
            eig = PMatEKFAC.from_factors(self.gen, factors).data
            bases = {lid: (f["QA"], f["QG"]) for lid, f in eig.items() if "diag" in f}
            carried = False
        else:
            bases = {lid: (f["QA"], f["QG"]) for lid, f in old.items() if "diag" in f}
            carried = True
        dacc = EKFACDiagAcc(self.gen.capture(), bases)
        self._feed(source, [dacc])
        out = {}
        for lid, f in factors.items():
            if lid not in bases:
                out[lid] = f
                continue
            d = dacc.value[lid]
            if carried and beta > 0:
                d = _ema(old[lid]["diag"], d, beta)
            out[lid] = {**f, "QA": bases[lid][0], "QG": bases[lid][1], "diag": d}
        _finite(self._tensors(out), "EKFAC")
        return out

    @staticmethod
    def _feed(source, accs):
        source(accs)
        return accs

    def build(self, stats):
        return PMatEKFAC.from_factors(self.gen, stats)


class ImplicitRoute(Route):
    """Hessian-free (Martens 2010): Jᵀ·H·J of the refresh batch, solved by truncated CG.

    (F + λI) d = g is solved with at most ``cg_iters`` iterations (to ``cg_tol``), started from the
    previous solution (warm start), preconditioned by ``(P + λI)⁻¹`` of a diagonal or KFAC estimate
    P refreshed from the same batch when ``precond`` is given. A truncated solve is an approximation:
    ``last_info`` keeps CG's residual and :meth:`Preconditioner.explain` shows it.
    """

    rep = PMatImplicit
    needs_batch = True
    ema_ok = False

    def __init__(self, generator, cg_iters, cg_tol, precond=None):
        super().__init__(generator)
        self.cg_iters, self.cg_tol = cg_iters, cg_tol
        self.precond = {"diag": DiagRoute, "kfac": KFACRoute, None: None}[precond]
        self.precond = self.precond(generator) if self.precond is not None else None
        self.x0 = None
        self.last_info = None

    def refresh(self, source, old, beta, rebasis, batch=None):
        if batch is None:
            raise DataError(
                "the implicit (Hessian-free) route needs the batch: call step(batch=(inputs, labels))"
            )
        out = {"batch": batch}
        if self.precond is not None:
            out["pre"] = self.precond.refresh(source, None, 0.0, True)
        return out

    def build(self, stats):
        pm = PMatImplicit(self.gen, examples=[stats["batch"]])
        pm.pre = self.precond.build(stats["pre"]) if self.precond is not None else None
        return pm

    def solve(self, pmat, g, lam, pi=False):
        op = pmat.op + lam * Identity(pmat.op.shape[0], dtype=pmat.op.dtype, device=pmat.op.device)
        m = None
        if pmat.pre is not None:
            pre, route = pmat.pre, self.precond
            m = lambda r: route.solve(pre, r, lam)  # noqa: E731
        x0 = self.x0 if self.x0 is not None and self.x0.shape == g.shape else None
        with warnings.catch_warnings():
            # truncation is the method here; the residual is kept in last_info and explain()
            warnings.simplefilter("ignore", ConvergenceWarning)
            d, info = cg(lambda v: op @ v, g, M=m, x0=x0, maxiter=self.cg_iters, tol=self.cg_tol)
        self.last_info = info
        self.pending_x0 = d.detach()
        return d
