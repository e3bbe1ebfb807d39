"""The single registry of rewrite rules and routines, keyed by (operation, node class).

A rule is a plain function ``fn(node, ctx)`` returning a result, or ``None`` when its pattern does
not match. Dispatch walks the root node's class MRO (most specific class first) and, within one class,
tries rules in registration order. Operations:

- ``"rewrite"``: returns an equivalent, simpler node (run bottom-up to a fixpoint by ``simplify``).
- ``"solve"``: returns a closure ``B -> A⁻¹B`` over the factorisations it computed once.
- ``"slogdet"``: returns ``(sign, log|det|)``.
- ``"diag"``, ``"trace"``, ``"frobenius"``: return tensors.
- ``"eigh"``: returns an :class:`~nngeo_ops.ops.eigen.Eigen` node.

``fallback=True`` marks a generic routine (dense factorisation or an iterative method) so that rules
such as Woodbury can ask whether a *structured* routine exists.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Rule:
    op: str
    cls: type
    fn: Callable
    name: str
    fallback: bool = False


_RULES: dict[tuple[str, type], list[Rule]] = defaultdict(list)


def rule(op: str, *classes: type, name: str | None = None, fallback: bool = False) -> Callable:
    """Register ``fn`` for ``op`` on each of ``classes``."""

    def deco(fn: Callable) -> Callable:
        for cls in classes:
            _RULES[(op, cls)].append(Rule(op, cls, fn, name or fn.__name__, fallback))
        return fn

    return deco


def rules_for(op: str, cls: type) -> Iterator[Rule]:
    for klass in cls.__mro__:
        yield from _RULES.get((op, klass), ())


def all_rules() -> list[Rule]:
    """Every registered rule, grouped by (quantity, node class) in registration order."""
    return [r for rules in _RULES.values() for r in rules]
