"""NNGeometry's ``nngeometry.layers``: our :mod:`nngeo_ops.nn.layers.custom`."""

from ...nn.layers.custom import Affine1d, Cosine1d, WeightNorm1d, WeightNorm2d

__all__ = ["Affine1d", "Cosine1d", "WeightNorm1d", "WeightNorm2d"]
