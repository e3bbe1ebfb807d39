"""NNGeometry's ``nngeometry.object.map``: dense and implicit Jacobians (maps from parameter space to
function space), our :mod:`nngeo_ops.nn.fspace.pfmap` classes with NNGeometry's signatures."""

from __future__ import annotations

import torch

from ....nn.fspace import pfmap as _pf
from ..layercollection import LayerCollection


def _jacobian_generator(generator, layer_collection):
    """Our JacobianGenerator for a compat backend (or ours, passed through)."""
    if hasattr(generator, "jacobian_generator"):
        lc = layer_collection or LayerCollection.from_model(generator.model)
        return generator.jacobian_generator(lc), lc
    return generator, layer_collection or generator.layer_collection


class PFMapDense(_pf.PFMapDense):
    """The Jacobian [C, N, P] as a dense tensor. ``PFMapDense(layer_collection, generator, data,
    examples)``; with a backend built with ``centering=True`` the rows are centred over examples."""

    def __init__(self, layer_collection=None, generator=None, data=None, examples=None):
        if data is None:
            from .pspace import as_loader  # pspace builds on this module

            examples = as_loader(examples)
            if generator is None:
                raise ValueError("PFMapDense needs a generator (and examples) or data")
            gen, layer_collection = _jacobian_generator(generator, layer_collection)
            data = (
                generator.get_jacobian(examples, layer_collection)
                if hasattr(generator, "jacobian_generator")
                else gen.get_jacobian(examples)
            )
        super().__init__(generator, data=data, layer_collection=layer_collection)

    def _like(self, data):
        return PFMapDense(self.layer_collection, self.generator, data=data)

    def __add__(self, other):
        return self._like(self.data + other.to_torch())

    def __sub__(self, other):
        return self._like(self.data - other.to_torch())

    def __rmul__(self, x):
        return self._like(x * self.data)

    __mul__ = __rmul__

    def __neg__(self):
        return self._like(-self.data)

    def to_torch_layer(self, layer_id):
        """The slice of one layer, shaped [C, N, *parameter shape] for each of its parameters."""
        lc = self.layer_collection
        start, out = lc.p_pos[layer_id], []
        c, n = self.data.shape[:2]
        for numel, shape in zip(lc.layers[layer_id].numels, lc.layers[layer_id].shapes):
            out.append(self.data[:, :, start : start + numel].reshape(c, n, *shape))
            start += numel
        return tuple(out)

    def iter_by_layer(self):
        for lid, layer in self.layer_collection.layers.items():
            yield lid, layer, self.to_torch_layer(lid)

    @staticmethod
    def from_dict(layer_collection, generator, data_dict):
        parts = []
        for lid in layer_collection.layers:
            for t in data_dict[lid]:
                parts.append(t.reshape(t.shape[0], t.shape[1], -1))
        return PFMapDense(layer_collection, generator, data=torch.cat(parts, dim=2))

    def to(self, **kwargs):
        return self._like(self.data.to(**kwargs))


class PFMapImplicit(_pf.PFMapImplicit):
    """The Jacobian known by its products (JVP / VJP), never stored."""

    def __init__(self, layer_collection=None, generator=None, data=None, examples=None):
        gen, _ = _jacobian_generator(generator, layer_collection)
        super().__init__(gen, data=data, examples=examples)


def random_pfmap(layer_collection, output_size, device=None, dtype=torch.float64) -> PFMapDense:
    """A PFMapDense [output_size[0], output_size[1], P] with N(0, 1) entries."""
    c, n = output_size
    data = torch.normal(0, 1, (c, n, layer_collection.numel()), device=device, dtype=dtype)
    return PFMapDense(layer_collection, data=data)
