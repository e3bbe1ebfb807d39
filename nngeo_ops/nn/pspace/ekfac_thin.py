"""EKFAC over a *thin* input basis: the data of a layer whose input factor A is kept as its rows.

A KFAC input factor gathered from n rows (examples × positions) is ``A = Rᵀ R`` (R: n × dA), of
rank ≤ n; it is kept as its rows when n < dA / 2 (:class:`~nngeo_ops.nn.engine.accumulators.
KroneckerFactors`). Its thin eigenbasis ``Q₁`` (dA × r, r = min(n, dA), from a thin QR of Rᵀ and an
r × r eigendecomposition, O(dA r²)) spans range(Rᵀ). Every per-example gradient of the layer on
those rows is ``g aᵀ`` with a a row of R, so it lies in ``range(Q_G ⊗ Q₁)``; both EKFAC diagonals —
λ_G ⊗ λ_A (eigh only) and the refit E[(Q_Gᵀ g aᵀ Q)²] on the same examples — are exactly 0 on the
complement. The block is therefore, exactly,

    F = (Q_G ⊗ Q₁) diag(s₁) (Q_G ⊗ Q₁)ᵀ,      s₁ of length dG·r (order Q_G ⊗ Q₁; "ag": Q₁ ⊗ Q_G),

an ``Eigen`` node with a thin Kronecker basis: products cost 2·(dG² dA + dG dA r) instead of
2·(dG² dA + dG dA²), and ``F + λI`` is solved by the shifted thin eigen form of
:mod:`nngeo_ops.ops.rules.thin_shift`, ``v/λ + (Q_G⊗Q₁)[(s₁ + λ)⁻¹ − λ⁻¹](Q_G⊗Q₁)ᵀ v``, without the
complete dA × dA basis (its complete QR is O(dA² n) and its products O(dA²) per row of Q_G).

:class:`EKFACFactors` holds that layer's data. Its public keys are those of every EKFAC layer:
``"QA"`` is the complete dA × dA basis ``[Q₁ | B]`` (B an orthonormal basis of the complement, from
the complete QR of Q₁) and ``"diag"`` the diagonal over ``Q_G ⊗ QA`` (s₁ padded with the zeros on
B) — both formed on first read only (``f["QA"]``, ``dict(f)``, iterating the items, pickling does
not). Writing ``"QA"`` or ``"diag"`` replaces the thin form by what was written.
"""

from __future__ import annotations

import torch

from ..engine.accumulators import KroneckerFactors, pad_thin_diag

_VIRTUAL = ("QA", "diag")


class EKFACFactors(KroneckerFactors):
    """An EKFAC layer's data with a thin input basis: ``thin = (Q₁ (dA × r), s₁ (dG·r), order)``.

    Keys as in :class:`~nngeo_ops.nn.pspace.kfac.PMatEKFAC` (``"A_rows"``, ``"G"``, ``"QG"``,
    ``"QA"``, ``"diag"``[, ``"bias"``]); ``"QA"`` and ``"diag"`` are complete and formed on first
    read (module docstring). ``thin`` is what the operator uses.
    """

    thin: tuple[torch.Tensor, torch.Tensor, str] | None = None

    def __init__(self, factors, qa1: torch.Tensor, diag1: torch.Tensor, order: str) -> None:
        super().__init__({k: v for k, v in dict.items(factors) if k not in _VIRTUAL})
        self.thin = (qa1, diag1, order)

    # ------------------------------------------------------------------ the complete form
    def complete_basis(self) -> torch.Tensor:
        """``[Q₁ | B]`` (dA × dA), B an orthonormal basis of the complement of range(Q₁)."""
        return self["QA"]

    def _form(self, key: str) -> torch.Tensor:
        qa1, d1, order = self.thin
        n_a, r = qa1.shape
        if key == "diag":
            return pad_thin_diag(d1, self["QG"].shape[1], n_a, order)
        with torch.no_grad():  # the complete QR has no backward
            b = torch.linalg.qr(qa1.detach(), mode="complete").Q[:, r:]
        if torch.is_grad_enabled() and qa1.requires_grad:
            b = b - qa1 @ (qa1.mT @ b)  # the same value, varying with range(Q₁) as its complement
        return torch.cat([qa1, b], dim=1).contiguous()

    def __missing__(self, key):
        if self.thin is not None and key in _VIRTUAL:
            v = self._form(key)
            dict.__setitem__(self, key, v)
            return v
        return super().__missing__(key)

    def _drop_thin(self) -> None:
        """Form the complete keys and forget the thin form (before a write to one of them)."""
        if self.thin is not None:
            for k in _VIRTUAL:
                self[k]  # noqa: B018 (formed by __missing__)
            self.thin = None

    # ------------------------------------------------------------------ a mapping with the lazy keys
    def keys(self):
        stored = list(dict.keys(self))
        return stored + [k for k in _VIRTUAL if self.thin is not None and k not in stored]

    def __iter__(self):
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())

    def __contains__(self, key) -> bool:
        return dict.__contains__(self, key) or (self.thin is not None and key in _VIRTUAL)

    def items(self):
        return [(k, self[k]) for k in self.keys()]

    def values(self):
        return [self[k] for k in self.keys()]

    def get(self, key, default=None):
        return self[key] if key in self else default

    def copy(self) -> EKFACFactors:
        if self.thin is None:
            return KroneckerFactors(dict.items(self))
        qa1, d1, order = self.thin
        return EKFACFactors(self, qa1, d1, order)

    def __setitem__(self, key, value) -> None:
        if key in _VIRTUAL:
            self._drop_thin()
        dict.__setitem__(self, key, value)

    def __delitem__(self, key) -> None:
        if key in _VIRTUAL:
            self._drop_thin()
        dict.__delitem__(self, key)

    def pop(self, key, *default):
        if key in _VIRTUAL:
            self._drop_thin()
        return dict.pop(self, key, *default)

    def popitem(self):
        self._drop_thin()
        return dict.popitem(self)

    def setdefault(self, key, default=None):
        if key in self:
            return self[key]
        self[key] = default
        return default

    def update(self, *args, **kw) -> None:
        for k, v in dict(*args, **kw).items():
            self[k] = v

    def clear(self) -> None:
        self.thin = None
        dict.clear(self)

    def __eq__(self, other) -> bool:
        return NotImplemented if not isinstance(other, dict) else dict(self.items()) == other

    __hash__ = None

    def __repr__(self) -> str:
        r = "×".join(map(str, self.thin[0].shape)) if self.thin is not None else "complete"
        return f"EKFACFactors(keys={list(dict.keys(self))}, thin basis {r})"

    def __reduce__(self):
        # the thin form and the stored keys, not the complete ones (formed again on first read)
        raw = {k: v for k, v in dict.items(self) if k not in _VIRTUAL or self.thin is None}
        if self.thin is None:
            return (KroneckerFactors, (raw,))
        return (EKFACFactors, (raw, *self.thin))


def thin_of(f) -> tuple[torch.Tensor, torch.Tensor, str] | None:
    """``(Q₁, s₁, order)`` of a layer's data kept over a thin basis, else None."""
    return getattr(f, "thin", None) if isinstance(f, EKFACFactors) else None
