"""Compilation: rewrite a tree once, pick a routine per node and quantity, cache factorisations.

``Compiled(expr, policy)`` simplifies ``expr`` with the ``"rewrite"`` rules, then computes
quantities (solve, slogdet, diag, trace, eigh, Frobenius norm) by dispatching the matching
routines on the simplified tree. Each routine's result (a solve closure holding its factorisations,
a log-determinant, ...) is memoised on the compiled object; factorisations of leaves are also cached
on the leaves themselves (see :mod:`nngeo_ops.ops.cache`) so that a re-compile with a new damping
reuses them. ``explain()`` shows the rewrite log, the routine chosen per node and what is cached.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from ..errors import NotPSDError, ShapeError, UnsupportedError
from .base import LinearOperator
from .cache import cached_on
from .leaf_checks import _checksum
from .registry import rules_for

T = TypeVar("T")
_MISSING = object()


@dataclass(frozen=True)
class CompilePolicy:
    """How compiled routines choose between exact and approximate methods.

    Attributes:
        dense_limit: where a node has no closed-form routine and ``n ≤ dense_limit``, it is
            materialised and factorised densely; above it an iterative method runs.
        cg_tol, cg_maxiter: relative residual tolerance and iteration cap of the CG fallback.
        num_matvecs: matvec budget of the stochastic fallbacks (Hutch++ trace, diagonal
            estimation, stochastic Lanczos quadrature probes × steps).
        lanczos_steps: Lanczos steps per probe for the SLQ log-determinant fallback.
        seed: seed of the generator used by stochastic fallbacks (results are reproducible).
        exact: never estimate. A quantity with no exact routine raises
            :class:`~nngeo_ops.errors.InexactError` instead of running a stochastic fallback
            (which otherwise warns with :class:`~nngeo_ops.errors.StochasticFallbackWarning` and
            records its :class:`~nngeo_ops.linalg.Estimate` in ``Compiled.estimates``).
    """

    dense_limit: int = 3000
    cg_tol: float = 1e-10
    cg_maxiter: int | None = None
    num_matvecs: int = 300
    lanczos_steps: int = 40
    seed: int = 0
    exact: bool = False

    def rng(self, device: torch.device) -> torch.Generator:
        """A fresh ``torch.Generator`` on ``device`` seeded with ``seed``, for the stochastic fallbacks."""
        g = torch.Generator(device=device)
        g.manual_seed(self.seed)
        return g

    def generator(self, device: torch.device) -> torch.Generator:
        """Deprecated alias of :meth:`rng` (to be removed in the next release): "generator" names the
        curvature generators of :mod:`nngeo_ops.nn`; a random-number generator is an ``rng``.
        """
        warnings.warn(
            "CompilePolicy.generator(device) is deprecated; use CompilePolicy.rng(device)",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.rng(device)


_DEFAULT_POLICY = CompilePolicy()  # frozen: one instance serves every compile without a policy


class Compiled:
    """A simplified expression with memoised routines; see the module docstring.

    ``fingerprint``: optionally ``expr.fingerprint()`` computed by the caller just before (as
    :meth:`LinearOperator.compiled <nngeo_ops.ops.LinearOperator.compiled>` does for its cache
    key); rules that check a leaf against the state its node was built from read its checksum
    there (:meth:`checksum`) while the tree is rewritten, instead of computing it again.

    Attributes:
        expr: the expression as given.
        policy: the :class:`CompilePolicy` (the default one when None was given).
        simplified: ``expr`` after the rewrite rules; every quantity is computed on it.
        estimates: ``{(quantity, node formula): Estimate}`` of every stochastic fallback that ran.
    """

    def __init__(
        self,
        expr: LinearOperator,
        policy: CompilePolicy | None = None,
        *,
        fingerprint: tuple | None = None,
    ) -> None:
        self.expr = expr
        self.policy = policy or _DEFAULT_POLICY
        self._rewrites: list[tuple[str, LinearOperator, LinearOperator]] = []
        self._routines: list[tuple[str, LinearOperator, str]] = []
        self._memo: dict[tuple[str, int], Any] = {}
        self._rule_memo: dict[tuple[Hashable, int], Any] = {}
        self._alive: list[LinearOperator] = []  # keeps memo keys (ids) from being reused
        # (quantity, node formula) -> Estimate of every stochastic fallback that ran
        self.estimates: dict[tuple[str, str], Any] = {}
        # read by checksum() during the rewrite only: a leaf may change after it
        self._fingerprint = fingerprint
        try:
            self.simplified = self.simplify(expr)
        finally:
            self._fingerprint = None

    # ------------------------------------------------------------------ rewriting
    def simplify(self, node: LinearOperator) -> LinearOperator:
        """``node`` after the ``"rewrite"`` rules, applied bottom-up until none fires (memoised per node;
        each rewrite is logged for :meth:`explain`).
        """
        key = ("rewrite", id(node))
        if key in self._memo:
            return self._memo[key]
        kids = node.children()
        cur = node.with_children(tuple([self.simplify(k) for k in kids])) if kids else node
        for r in rules_for("rewrite", type(cur)):
            out = r.fn(cur, self)
            if out is not None and out is not cur:
                self._rewrites.append((r.name, cur, out))  # formatted only by explain()
                _inherit_tags(cur, out)
                cur = self.simplify(out)
                break
        self._alive += [node, cur]
        self._memo[key] = cur
        return cur

    @property
    def rewrites(self) -> list[tuple[str, str, str]]:
        """The rewrite log: (rule, before, after) as formulas."""
        return [(name, str(a), str(b)) for name, a, b in self._rewrites]

    def checksum(self, t: torch.Tensor) -> Any:
        """:func:`~nngeo_ops.ops.leaf_checks._checksum` of a leaf tensor ``t``, for rules that check that a
        leaf is unchanged since its node was built: read from the fingerprint given to the
        constructor while the tree is rewritten (``t`` at the version it records), computed
        otherwise."""
        fp = self._fingerprint
        if fp:
            key, version = id(t), t._version
            for i, v, c in fp:
                if i == key and v == version:
                    return c
        return _checksum(t)

    # ------------------------------------------------------------------ memo for rules
    def memo(self, key: Hashable, node: LinearOperator, factory: Callable[[], T]) -> T:
        """``factory()`` computed once per ``(key, node)`` in this compilation, for rules.

        Rules that share an intermediate result (Woodbury's capacitance matrix serves the solve and
        the log-determinant; the Gram matrix of a congruence serves trace, norm, spectrum, solve and
        log-determinant) compute it through ``ctx.memo("what", node, lambda: ...)``. ``key`` names
        the result (any hashable; include whatever else it depends on, e.g. ``("gram", flag)``);
        ``node`` is identified by object identity and kept alive with the compiled object, so the
        entry cannot be confused with a later node. ``None`` is memoised like any other result
        ("this pattern does not match"); an exception is not, so the next call retries.
        """
        k = (key, id(node))
        out = self._rule_memo.get(k, _MISSING)
        if out is not _MISSING:
            return out
        out = factory()
        self._rule_memo[k] = out
        self._alive.append(node)
        return out

    # ------------------------------------------------------------------ dispatch
    def dispatch(self, op: str, node: LinearOperator, structured_only: bool = False) -> Any:
        """The result of the first ``op`` rule (``"solve"``, ``"slogdet"``, ``"diag"``, ...) that handles
        ``node``, memoised and logged.

        Rules are tried along ``type(node).__mro__``. With ``structured_only`` the fallback rules are
        skipped and ``None`` is returned when no structured rule applies; otherwise no applicable rule
        raises :class:`~nngeo_ops.errors.UnsupportedError`.
        """
        key = (op, id(node))
        if key in self._memo:
            return self._memo[key]
        for r in rules_for(op, type(node)):
            if structured_only and r.fallback:
                continue
            out = r.fn(node, self)
            if out is not None:
                self._routines.append((op, node, r.name))
                self._alive.append(node)
                self._memo[key] = out
                return out
        if structured_only:
            return None
        raise UnsupportedError(f"no routine computes {op} of {type(node).__name__} {node._str()}")

    @property
    def routines(self) -> list[tuple[str, str, str]]:
        """The routine log: (quantity, node formula, routine name)."""
        return [(op, str(node), name) for op, node, name in self._routines]

    def solver(self, node: LinearOperator, structured_only: bool = False) -> Callable | None:
        """A function ``B ↦ node⁻¹ B`` for ``B`` of shape ``(n, k)``; raises
        :class:`~nngeo_ops.errors.ShapeError` for a non-square node. See :meth:`dispatch`.
        """
        if node.shape[0] != node.shape[1]:
            raise ShapeError(f"cannot solve with {node._str()} of non-square shape {node.shape}")
        return self.dispatch("solve", node, structured_only)

    def slogdet_of(self, node: LinearOperator, structured_only: bool = False) -> Any:
        """``(sign, log|det node|)`` of a square node. See :meth:`dispatch`."""
        if node.shape[0] != node.shape[1]:
            raise ShapeError(f"logdet of {node._str()} needs a square shape, got {node.shape}")
        return self.dispatch("slogdet", node, structured_only)

    def diag_of(self, node: LinearOperator, structured_only: bool = False) -> Any:
        """The diagonal of ``node``. See :meth:`dispatch`."""
        return self.dispatch("diag", node, structured_only)

    def trace_of(self, node: LinearOperator, structured_only: bool = False) -> Any:
        """``tr node`` of a square node. See :meth:`dispatch`."""
        if node.shape[0] != node.shape[1]:
            raise ShapeError(f"trace of {node._str()} needs a square shape, got {node.shape}")
        return self.dispatch("trace", node, structured_only)

    def eigh_of(self, node: LinearOperator, structured_only: bool = False) -> Any:
        """The eigendecomposition of a symmetric ``node`` as an :class:`~nngeo_ops.ops.Eigen` node. See
        :meth:`dispatch`.
        """
        node.require_symmetric("eigh")
        return self.dispatch("eigh", node, structured_only)

    def frobenius_of(self, node: LinearOperator) -> torch.Tensor:
        """``‖node‖_F``. See :meth:`dispatch`."""
        return self.dispatch("frobenius", node)

    # ------------------------------------------------------------------ public quantities
    def matvec(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``A @ x`` on the original tree (its lazy products are the cheapest); ``out``: a buffer
        to write it into (see :meth:`LinearOperator.matvec`)."""
        return self.expr.matvec(x, out=out)

    def solve(self, b: torch.Tensor) -> torch.Tensor:
        """``A⁻¹ b`` for ``b`` of shape ``(n,)`` or ``(n, k)``."""
        A = self.simplified
        self.expr._check_operand(b, A.shape[0], "solve")
        f = self.solver(A)
        if b.dim() == 2:
            return f(b)
        vector = getattr(f, "vector", None)  # a routine's own vector form, if it has one
        return vector(b) if vector is not None else f(b.unsqueeze(1)).squeeze(1)

    def slogdet(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sign, log|det A|)`` of the simplified expression."""
        return self.slogdet_of(self.simplified)

    def logdet(self) -> torch.Tensor:
        """``log det A``; raises NotPSDError when the determinant is negative."""
        sign, logabs = self.slogdet()
        if float(sign) < 0:
            raise NotPSDError(
                f"logdet of {self.expr._str()}: the determinant is negative, so the matrix is "
                "not positive definite; use slogdet() for (sign, log|det|)"
            )
        return logabs if float(sign) > 0 else torch.full_like(logabs, -torch.inf)

    def diag(self) -> torch.Tensor:
        """The diagonal of the simplified expression, shape ``(n,)``."""
        return self.diag_of(self.simplified)

    def trace(self) -> torch.Tensor:
        """``tr A`` of the simplified expression, a 0-dim tensor."""
        return self.trace_of(self.simplified)

    def eigh(self) -> Any:
        """The eigendecomposition of the simplified expression as an :class:`~nngeo_ops.ops.Eigen` node."""
        return self.eigh_of(self.simplified)

    def frobenius_norm(self) -> torch.Tensor:
        """``‖A‖_F`` of the simplified expression, a 0-dim tensor."""
        return self.frobenius_of(self.simplified)

    # ------------------------------------------------------------------ explain
    def explain(self) -> str:
        """A readable report: the expression and its simplified form, the rewrite log, the routine that
        computed each quantity so far, every stochastic estimate (marked as not exact) and the
        factorisations cached on the leaves.
        """
        lines = [f"expression: {self.expr}", f"simplified: {self.simplified}", "rewrites:"]
        lines += [f"  [{n}] {a}  →  {b}" for n, a, b in self.rewrites] or ["  (none)"]
        lines.append("routines:")
        lines += [f"  {op:<9} {node}  ⇒  {name}" for op, node, name in self.routines] or [
            "  (none computed yet)"
        ]
        if self.estimates:
            lines.append("estimated (stochastic, not exact):")
            lines += [
                f"  {op:<9} {node}  ≈ {_fmt_estimate(est)}"
                for (op, node), est in self.estimates.items()
            ]
        lines.append("cached factorisations:")
        seen, cached = set(), []
        for root in (self.simplified, self.expr):
            for leaf in _walk(root):
                if id(leaf) not in seen:
                    seen.add(id(leaf))
                    kinds = cached_on(leaf) if "_factors" in leaf.__dict__ else []
                    if kinds:
                        cached.append(
                            f"  {leaf} ({leaf.shape[0]}×{leaf.shape[1]}): {', '.join(kinds)}"
                        )
        lines += cached or ["  (none)"]
        return "\n".join(lines)

    def routine(self, op: str, node: LinearOperator | None = None) -> str | None:
        """The name of the routine that computed ``op`` (of the simplified root by default)."""
        target = node or self.simplified
        for o, n, name in reversed(self._routines):
            if o == op and n is target:
                return name
        return None


def _fmt_estimate(est: Any) -> str:
    v, e = est.value.detach(), est.stderr.detach()
    if v.dim() == 0:
        return f"{float(v):.6g} ± {float(e):.2g} (stderr)"
    return f"vector of {v.numel()}, stderr up to {float(e.max()):.2g}"


def _inherit_tags(src: LinearOperator, dst: LinearOperator) -> None:
    """A rewrite is the same matrix, so it keeps what was known of it (e.g. Jᵀ·(H·J) stays PSD)."""
    for tag in ("symmetric", "psd"):
        if getattr(src, tag) and not getattr(dst, tag):
            setattr(dst, tag, True)


def _walk(node: LinearOperator):
    yield node
    for c in node.children():
        yield from _walk(c)
