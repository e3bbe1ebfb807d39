"""Layer kinds: one module per kind of layer, holding everything the engine needs to know about it.

A layer kind is described by a :class:`~nngeo_ops.nn.layers.base.Rule` (which modules it matches,
their KFAC factors and per-position rows, their diagonal, their per-example gradients). The engine
asks the rule of a module for what it needs and never branches on the kind itself, so a new kind is
added with :func:`~nngeo_ops.nn.layers.registry.register_layer_rule` without editing the engine.
Modules without a rule take the generic per-example path (:mod:`.generic`).
"""
