"""The engine: from a model and data to statistics and products, below every representation.

Hooks (:mod:`.capture`), the layer-agnostic accumulators (:mod:`.accumulators`), functional calls
(:mod:`.functional`), the curvature and Jacobian generators, the NTK engine (:mod:`.ntk`),
torch.distributed reductions (:mod:`.distributed`), precision and finiteness checks. The engine
asks layer kinds (:mod:`nngeo_ops.nn.layers`) for what it needs and never constructs the
representations (:mod:`nngeo_ops.nn.pspace`) or function-space objects (:mod:`nngeo_ops.nn.fspace`)
built on top of it.
"""
