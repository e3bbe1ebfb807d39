"""Function space: the Jacobian node, maps between parameter and function space (PFMaps,
``mapTMmap``), matrices in function space (FMats), NTK kernel matrices and kernel regression."""
