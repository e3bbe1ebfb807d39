"""NNGeometry's ``nngeometry.backend.torch_hooks``."""

from . import torch_hooks
from .torch_hooks import (
    TorchHooksJacobianBackend,
    use_conv_impl_for_convs,
    use_unfold_impl_for_convs,
)

__all__ = [
    "TorchHooksJacobianBackend",
    "torch_hooks",
    "use_conv_impl_for_convs",
    "use_unfold_impl_for_convs",
]
