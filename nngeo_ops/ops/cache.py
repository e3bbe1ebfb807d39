"""Factorisations cached on leaf nodes, shared by every compile of every tree that holds the leaf.

A damped KFAC block compiled with a new damping must reuse its factors' eigendecompositions; keeping
them on the leaf (not on one compiled object) is what makes that true. Entries are keyed by the
leaf's fingerprint (identity and version counter of its tensors), so an in-place update of a factor
invalidates them. Nothing is cached while autograd records through the leaf: a cached graph could
be back-propagated only once.

``FACTORIZATIONS`` counts every factorisation actually computed, by kind; tests use it to prove that
a second call reused the cache.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

FACTORIZATIONS: Counter = Counter()


def cached_factor(owner: Any, kind: str, compute: Callable[[], Any]) -> Any:
    """``compute()`` memoised on ``owner`` under ``kind`` until a leaf tensor of ``owner`` changes."""
    if owner.needs_grad():
        FACTORIZATIONS[kind] += 1
        return compute()
    fp = owner.fingerprint()
    store = owner.__dict__.setdefault("_factors", {})
    hit = store.get(kind)
    if hit is not None and hit[0] == fp:
        return hit[1]
    FACTORIZATIONS[kind] += 1
    value = compute()
    store[kind] = (fp, value)
    return value


def cached_on(owner: Any) -> list[str]:
    """The kinds of factorisation currently cached on ``owner`` (for ``explain()``)."""
    fp = owner.fingerprint()
    return [k for k, (f, _) in owner.__dict__.get("_factors", {}).items() if f == fp]
