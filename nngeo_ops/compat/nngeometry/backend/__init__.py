"""NNGeometry's ``nngeometry.backend``."""

from . import torch_hooks
from .dummy import DummyGenerator
from .torch_func_hessian import TorchFuncHessianBackend
from .torch_hooks.torch_hooks import TorchHooksJacobianBackend

__all__ = ["DummyGenerator", "TorchFuncHessianBackend", "TorchHooksJacobianBackend", "torch_hooks"]
