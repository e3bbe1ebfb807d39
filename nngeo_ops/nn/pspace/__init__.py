"""Parameter space: the curvature representations (dense, diagonal, block-diagonal, KFAC, EKFAC,
quasi-diagonal, low-rank, implicit, mixed), all behind one representation protocol
(:class:`~nngeo_ops.nn.pspace.base.PMatAbstract`)."""
