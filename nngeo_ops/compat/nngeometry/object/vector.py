"""NNGeometry's ``nngeometry.object.vector``: our :class:`~nngeo_ops.nn.PVector` / ``FVector`` with
NNGeometry's in-place operators and random constructors."""

from __future__ import annotations

import torch

from ....nn import params as _v
from ..layercollection import LayerCollection


class PVector(_v.PVector):
    """Our PVector, plus NNGeometry's in-place ``+=``, ``-=``, ``*=`` (which, as in NNGeometry,
    modify the stored tensors and need both operands stored alike: both flat or both per layer)."""

    @staticmethod
    def from_model(model, layer_collection=None) -> PVector:
        lc = layer_collection or LayerCollection.from_model(model)
        v = _v.PVector.from_model(model, lc)
        return PVector(v.layer_collection, dict_repr=v.dict_repr)

    @staticmethod
    def from_model_grad(model, layer_collection=None) -> PVector:
        lc = layer_collection or LayerCollection.from_model(model)
        v = _v.PVector.from_model_grad(model, lc)
        return PVector(v.layer_collection, dict_repr=v.dict_repr)

    def _inplace(self, other, op):
        if self.dict_repr is not None and getattr(other, "dict_repr", None) is not None:
            for lid, parts in self.dict_repr.items():
                for t, o in zip(parts, other.dict_repr[lid]):
                    op(t, o)
            return self
        if self.vector_repr is not None and getattr(other, "vector_repr", None) is not None:
            op(self.vector_repr, other.vector_repr)
            return self
        raise NotImplementedError(
            "in-place arithmetic needs both PVectors stored alike (both flat or both per layer); "
            "use a + b, which accepts any storage"
        )

    def __iadd__(self, other):
        return self._inplace(other, lambda t, o: t.add_(o))

    def __isub__(self, other):
        return self._inplace(other, lambda t, o: t.sub_(o))

    def __imul__(self, x):
        for t in (
            [self.vector_repr]
            if self.vector_repr is not None
            else [t for parts in self.dict_repr.values() for t in parts]
        ):
            t.mul_(x)
        return self


FVector = _v.FVector


def random_pvector_dict(layer_collection, device=None, dtype=None) -> PVector:
    """A PVector stored per layer with N(0, 1) entries."""
    d = {}
    for lid, entry in layer_collection.items():
        d[lid] = tuple(
            torch.normal(0, 1, tuple(s), device=device, dtype=dtype) for s in entry.shapes
        )
    return PVector(layer_collection, dict_repr=d)


def random_pvector(layer_collection, device=None, dtype=torch.float64) -> PVector:
    """A flat PVector with N(0, 1) entries (float64 by default, as in NNGeometry)."""
    n = layer_collection.numel()
    return PVector(
        layer_collection, vector_repr=torch.normal(0, 1, (n,), device=device, dtype=dtype)
    )


def random_fvector(n_samples, n_output=1, device=None) -> FVector:
    """An FVector (n_output, n_samples) with N(0, 1) entries."""
    return FVector(torch.normal(0, 1, (n_output, n_samples), device=device))
