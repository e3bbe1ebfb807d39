"""NNGeometry's ``nngeometry.layers``: our :mod:`nngeo_ops.nn.custom_layers`."""

from ...nn.custom_layers import Affine1d, Cosine1d, WeightNorm1d, WeightNorm2d

__all__ = ["Affine1d", "Cosine1d", "WeightNorm1d", "WeightNorm2d"]
