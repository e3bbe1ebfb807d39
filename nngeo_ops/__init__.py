"""nngeo_ops: curvature of neural networks as lazy linear operators."""
