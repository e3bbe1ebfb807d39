"""The single registry of rewrite rules and routines, keyed by (operation, node class).

A rule is a plain function ``fn(node, ctx)`` returning a result, or ``None`` when its pattern does
not match (``ctx`` is the :class:`~nngeo_ops.ops.Compiled` being built). Operations:

- ``"rewrite"``: returns an equivalent, simpler node (run bottom-up to a fixpoint by ``simplify``).
- ``"power"``: rewrites of ``Power(X, p)`` keyed by the class of the *base* ``X`` (the ``"rewrite"``
  rule of :class:`~nngeo_ops.ops.Power` dispatches them); ``fn(power_node, ctx)`` returns the
  rewritten node, ``None`` to let the next rule try, or ``power_node`` itself for "leave as is".
- ``"solve"``: returns a closure ``B -> A⁻¹B`` over the factorisations it computed once, for ``B``
  of shape ``(n, k)``; a callable with a ``vector`` method (``b -> A⁻¹b`` for ``b`` of shape
  ``(n,)``) also serves vectors without the reshapes to and from one column.
- ``"slogdet"``: returns ``(sign, log|det|)``.
- ``"diag"``, ``"trace"``, ``"frobenius"``: return tensors.
- ``"eigh"``: returns an :class:`~nngeo_ops.ops.eigen.Eigen` node.

Order of dispatch (documented, and independent of the order in which modules are imported or rules
defined): the classes of ``type(node).__mro__`` are visited most specific first; within one class,
rules run by **descending** ``priority``, ties broken by ascending ``name`` (plain string order).
The first result that is not ``None`` wins. Priorities are plain integers, 0 by default; where
several rules share an (operation, class), the library leaves gaps of 10 between them so that a new
rule slots in between with one keyword, e.g. ``@rule("solve", Sum, name="...", priority=25)``.
:func:`all_rules` lists every rule in dispatch order.

A rule's ``name`` identifies it within its (operation, class): registering the same name again
replaces the earlier rule (so re-importing a module is idempotent, and a user can override a
library routine by reusing its name).

``fallback=True`` marks a generic routine (dense factorisation or an iterative method) so that rules
such as Woodbury can ask whether a *structured* routine exists.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Rule:
    """One registered rule.

    Attributes:
        op: the operation (``"rewrite"``, ``"solve"``, ...; see the module docstring).
        cls: the node class it is registered on (subclasses inherit it).
        fn: ``fn(node, ctx) -> result | None``.
        name: shown by ``explain()``; unique within (op, cls).
        fallback: a generic dense / iterative routine, skipped by ``structured_only`` dispatch.
        priority: higher runs first within (op, cls); ties by ``name``.
    """

    op: str
    cls: type
    fn: Callable
    name: str
    fallback: bool = False
    priority: int = 0

    def sort_key(self) -> tuple[int, str]:
        """``(-priority, name)``: the order of rules registered on one class."""
        return (-self.priority, self.name)


class RuleRegistry:
    """Rules keyed by (operation, class), with the dispatch order of the module docstring.

    The library uses one instance (the module-level :func:`rule` / :func:`rules_for` act on it); a
    separate instance is only useful in tests.
    """

    def __init__(self) -> None:
        self._rules: dict[tuple[str, type], dict[str, Rule]] = {}
        self._resolved: dict[tuple[str, type], tuple[Rule, ...]] = {}

    def add(self, r: Rule) -> Rule:
        """Register ``r`` (replacing a rule of the same name on the same (op, cls))."""
        if not isinstance(r.priority, int) or isinstance(r.priority, bool):
            raise TypeError(f"rule {r.name!r}: priority must be an int, got {r.priority!r}")
        self._rules.setdefault((r.op, r.cls), {})[r.name] = r
        self._resolved.clear()  # dispatch lists are rebuilt lazily
        return r

    def on_class(self, op: str, cls: type) -> list[Rule]:
        """The rules registered on ``cls`` itself for ``op``, in dispatch order."""
        return sorted(self._rules.get((op, cls), {}).values(), key=Rule.sort_key)

    def rules_for(self, op: str, cls: type) -> tuple[Rule, ...]:
        """Every rule that applies to a node of class ``cls`` for ``op``, in dispatch order."""
        key = (op, cls)
        out = self._resolved.get(key)
        if out is None:
            out = tuple(r for klass in cls.__mro__ for r in self.on_class(op, klass))
            self._resolved[key] = out
        return out

    def all_rules(self) -> list[Rule]:
        """Every rule, grouped by (op, class name) and in dispatch order within a class."""
        keys = sorted(self._rules, key=lambda k: (k[0], k[1].__module__, k[1].__qualname__))
        return [r for op, cls in keys for r in self.on_class(op, cls)]

    def remove(self, op: str, cls: type, name: str) -> Rule:
        """Unregister the rule ``name`` of (op, cls) and return it; KeyError if there is none."""
        r = self._rules[(op, cls)].pop(name)
        self._resolved.clear()
        return r

    def copy(self) -> RuleRegistry:
        """An independent registry holding the same rules."""
        out = RuleRegistry()
        for r in self.all_rules():
            out.add(r)
        return out

    def clear(self) -> None:
        """Forget every rule (tests only)."""
        self._rules.clear()
        self._resolved.clear()


_REGISTRY = RuleRegistry()


def rule(
    op: str,
    *classes: type,
    name: str | None = None,
    priority: int = 0,
    fallback: bool = False,
) -> Callable:
    """Decorator: register ``fn(node, ctx)`` for ``op`` on each of ``classes``.

    Args:
        op: ``"rewrite"``, ``"power"``, ``"solve"``, ``"slogdet"``, ``"diag"``, ``"trace"``,
            ``"frobenius"`` or ``"eigh"`` (see :mod:`nngeo_ops.ops.registry`).
        classes: node classes; the rule also applies to their subclasses (after the subclasses'
            own rules).
        name: shown by ``explain()`` (default: the function's name); registering an existing name
            on the same (op, class) replaces that rule.
        priority: within one (op, class), higher runs first; equal priorities run in the order of
            their names. Default 0.
        fallback: a generic dense / iterative routine (skipped when a rule asks for a structured
            routine only).

    Without the decorator syntax, one line registers an existing function:
    ``rule("solve", Sum, name="my route", priority=25)(my_solve)``.
    """

    def deco(fn: Callable) -> Callable:
        for cls in classes:
            _REGISTRY.add(Rule(op, cls, fn, name or fn.__name__, fallback, priority))
        return fn

    return deco


def rules_for(op: str, cls: type) -> tuple[Rule, ...]:
    """The rules tried for ``op`` on a node of class ``cls``, in dispatch order."""
    return _REGISTRY.rules_for(op, cls)


def all_rules() -> list[Rule]:
    """Every registered rule, grouped by (operation, node class) and in dispatch order within each."""
    return _REGISTRY.all_rules()
