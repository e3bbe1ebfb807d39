"""Compatibility layers that let code written for other libraries run on nngeo_ops.

* :mod:`nngeo_ops.compat.nngeometry`: NNGeometry's package layout and conventions (replace
  ``nngeometry`` by ``nngeo_ops.compat.nngeometry`` in the imports); see docs/compat_nngeometry.md.
"""
