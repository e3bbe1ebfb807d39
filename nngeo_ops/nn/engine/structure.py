"""One walk of a model's module tree per build, and what the engine derives from it, kept per model.

A build used to walk the module tree about ten times (``check_trainable``, the default
:class:`~nngeo_ops.nn.params.LayerCollection`, ``parameters`` twice, the train-mode warning, the
capture's owning modules and its batched-backward test): ~110 µs of a one-example build of the
benchmark MLP. :func:`walk` walks it once and returns the modules with a *key*, which holds
everything those derivations read:

* per module, in ``named_modules()`` order: its name, identity and type;
* per direct parameter slot, in registration order: its name and, unless it is None, the
  parameter's identity, ``requires_grad`` and shape (``p.data = ...`` keeps the identity and may
  change the shape);
* for a module with parameters, its layer rule (:func:`~nngeo_ops.nn.layers.registry.rule_for`,
  which reads the registry and the module's configuration) and the parameters that rule computes.

:func:`cached` keeps the derived values of the last key per model (weakly: the model, and the
modules the values name, are never kept alive by it) and computes them again when the key
differs: a module added, removed, replaced or retyped, a parameter replaced, frozen, unfrozen or
reshaped, a rule registered. What the key leaves out (training flags, devices, dtypes) is read
from the walk at every build.
"""

from __future__ import annotations

import weakref

from torch import nn

from ...errors import DataError
from ..layers.base import Rule
from ..layers.registry import rule_for

# (id(model), rules) -> [weak reference to the model, key of its last walk, {what: derived value}]
_CACHE: dict[tuple[int, bool], list] = {}
_MAX_ENTRIES = 8  # derived values per key (one per layer collection a capture was built for)


def walk(model: nn.Module, rules: bool = True) -> tuple[list[tuple[str, nn.Module]], tuple]:
    """``(named modules, key)`` of one walk of ``model`` (see the module docstring); ``rules=False``
    leaves the layer rules out of the key (what the default layer collection needs)."""
    modules = list(model.named_modules())
    key = [rules]
    for name, mod in modules:
        slots = mod._parameters
        if not slots:
            key.append((name, id(mod), type(mod)))
            continue
        params = tuple(
            [
                (a, None) if p is None else (a, id(p), p.requires_grad, p.shape)
                for a, p in slots.items()
            ]
        )
        if not rules:
            key.append((name, id(mod), type(mod), params))
            continue
        rule = None if all(len(s) == 2 for s in params) else rule_for(mod)
        key.append((name, id(mod), type(mod), params, rule, rule and _rule_attrs(rule, mod)))
    return modules, tuple(key)


def _rule_attrs(rule: Rule, mod: nn.Module) -> tuple[str, ...]:
    """``rule.attrs(mod)``. The default :meth:`Rule.attrs` reads ``getattr(mod, a, None)``, which
    for a name in ``mod._parameters`` that neither the instance dict nor the class holds is
    ``mod._parameters[a]`` (``nn.Module.__getattr__``): read there, it costs a fifth (2 µs a
    module otherwise)."""
    if type(rule).attrs is not Rule.attrs:
        return rule.attrs(mod)
    slots, own, cls = mod._parameters, mod.__dict__, type(mod)
    out = []
    for a in ("weight", "bias"):
        if a in slots and a not in own and not hasattr(cls, a):
            value = slots[a]
        else:
            value = getattr(mod, a, None)
        if value is not None:
            out.append(a)
    return tuple(out)


def cached(model: nn.Module, key: tuple, what, compute):
    """The value of ``compute()`` for ``model`` in the state ``key`` (of :func:`walk`), computed
    once per key and ``what`` (hashable; the value must not hold ``model`` or its modules
    strongly: use weak references)."""
    slot = (id(model), key[0])
    entry = _CACHE.get(slot)
    if entry is None or entry[0]() is not model or (entry[1] is not key and entry[1] != key):
        ref = weakref.ref(model, lambda _, slot=slot: _drop(slot))
        entry = [ref, key, {}]
        _CACHE[slot] = entry
    entry[1] = key  # the same walk's later lookups compare by identity
    values = entry[2]
    if what in values:
        return values[what]
    if len(values) >= _MAX_ENTRIES:
        values.clear()
    value = values[what] = compute()
    return value


def _drop(slot) -> None:
    entry = _CACHE.get(slot)
    if entry is not None and entry[0]() is None:
        del _CACHE[slot]


def frozen_state(key: tuple) -> tuple[bool, bool]:
    """``(any parameter, any trainable parameter)`` of the model whose walk gave ``key``."""
    slots = [s for entry in key[1:] if len(entry) > 3 for s in entry[3] if len(s) > 2]
    return bool(slots), any(s[2] for s in slots)


def first_parameter(model: nn.Module, modules, key: tuple, lc):
    """The first covered parameter of ``lc`` (flat order) in ``model``, whose device and dtype are
    those of the statistics; ``lc`` is checked against the model (its modules exist, its
    parameters have its shapes: :meth:`LayerCollection.parameters`) once per key. Raises
    DataError when ``lc`` covers no parameter."""

    def locate():
        if not lc.parameters(model):  # raises for a collection that does not fit the model
            return None
        entry = next(iter(lc.layers.values()))
        index = next(i for i, (name, _) in enumerate(modules) if name == entry.module_name)
        return index, entry.attrs[0]

    where = cached(model, key, ("first", lc), locate)
    if where is None:
        raise DataError("the layer collection covers no parameter")
    return getattr(modules[where[0]][1], where[1])
