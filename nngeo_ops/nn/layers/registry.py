"""The registry of layer kinds: which rule handles a module, and how a user adds a kind."""

from __future__ import annotations

from torch import nn

from .base import Rule
from .conv import ConvRule, ConvTranspose2dRule
from .embedding import EmbeddingRule
from .linear import LinearRule
from .norms import NormRule

RULES: list[Rule] = [LinearRule(), ConvRule(), ConvTranspose2dRule(), EmbeddingRule(), NormRule()]


def register_layer_rule(rule: Rule, first: bool = True) -> Rule:
    """Add a layer kind: ``rule`` (an instance of a :class:`KronRule` or :class:`Rule` subclass
    whose ``kinds`` names the module classes it handles) is used for those modules by every
    representation from then on. ``first=True`` puts it before the built-in rules, so that it
    overrides them for a subclass of a built-in module. Returns ``rule``.

    A :class:`KronRule` gives ``rows(module, a, g) -> (arow (B, R, dA), grow (K, B, R, dG))`` with
    the per-example weight gradient ``∇W = Σ_r grow_r ⊗ arow_r`` (order ``"ga"``: W of shape
    (dG, dA), flattened row-major; a bias is folded into A by a trailing 1); the per-example
    gradients, diagonal and KFAC factors of the layer all follow from it.
    """
    if not isinstance(rule, Rule) or not rule.kinds:
        raise TypeError(
            "register_layer_rule expects an instance of a Rule subclass with `kinds` set to the "
            f"module classes it handles, got {rule!r}"
        )
    RULES.insert(0, rule) if first else RULES.append(rule)
    return rule


def rule_for(module: nn.Module) -> Rule | None:
    """The rule of a module, or None when the module needs the generic (torch.func) path.

    A module whose instance has a ``forward`` of its own (``lin.forward = lambda t: ...``) takes the
    generic path: its output is no longer what its kind's closed form assumes (a Linear's ``W a +
    b``), and the rule would read the cotangent of that output as the cotangent of ``W a + b``."""
    if "forward" in module.__dict__:
        return None
    for rule in RULES:
        if type(module) in rule.kinds and rule.supports(module):
            return rule
    return None
