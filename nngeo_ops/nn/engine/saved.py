"""What the graph of u ↦ Jᵀu of a cached linearisation saves: only what its J V pass reads.

:class:`~nngeo_ops.nn.engine.functional.Linearised` keeps, per batch, the forward graph (for Jᵀ U)
and the graph of u ↦ Jᵀu built by a backward with ``create_graph`` (for J V: a backward through it
to the leaf u). torch records that backward as if every second derivative might be asked for: a
node of it saves each operand that another operand's derivative reads. The J V pass differentiates
with respect to u alone, and Jᵀu is linear in u. So a tensor that the backward saves and that
depends on u (a cotangent) is read only by the derivative with respect to an operand that does not
depend on u — were both u-dependent, the node's output would be quadratic in u — and the J V pass
never asks for that derivative. :func:`unread_saves` keeps such a tensor's shape alone. On the
benchmark CNN these are the ReLU-masked output cotangents of the two convolutions, 8 + 4 MiB
(``convolution_backward``'s double-backward node saves the output cotangent for the derivatives
with respect to the input and the weight), which the cache held next to the forward graph's 21 MiB.

This rests on the backward being made of torch's own derivative formulas (linear in the
cotangents, every operand saved through ``SavedVariable``): the caller applies it to such graphs
only (:meth:`~nngeo_ops.nn.engine.functional.Linearised._trusted_graph`). The values computed are
those without the hooks; only what is stored changes.
"""

from __future__ import annotations

import math
import mmap

import torch
from torch.autograd.graph import saved_tensors_hooks


class _Unread:
    """What stands in for a saved cotangent the J V pass does not read: its metadata."""

    __slots__ = ("shape", "dtype", "device")

    def __init__(self, t):
        self.shape, self.dtype, self.device = t.shape, t.dtype, t.device


class _ZeroPages:
    """Zeros of any shape read from one buffer that takes no resident memory: on a CPU a private
    anonymous mapping never written, whose pages all read as the kernel's zero page (mapped once,
    at the first read; a fresh ``torch.empty`` per unpack would fault its pages in at every
    product: +12 % CPU for the benchmark CNN's warm product). Elsewhere ``torch.zeros``."""

    def __init__(self):
        self.nbytes, self.buf = 0, None

    def reserve(self, meta: _Unread) -> _Unread:
        if meta.device.type == "cpu":
            self.nbytes = max(self.nbytes, math.prod(meta.shape) * meta.dtype.itemsize)
        return meta

    def __call__(self, meta: _Unread) -> torch.Tensor:
        if meta.device.type != "cpu" or not hasattr(mmap, "MAP_ANONYMOUS"):  # (Windows)
            return torch.zeros(meta.shape, dtype=meta.dtype, device=meta.device)
        nbytes = math.prod(meta.shape) * meta.dtype.itemsize
        if self.buf is None or self.buf.numel() < nbytes:
            self.nbytes = max(self.nbytes, nbytes, 1)
            pages = mmap.mmap(-1, self.nbytes, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            self.buf = torch.frombuffer(pages, dtype=torch.uint8)
        return self.buf[:nbytes].view(meta.dtype).view(meta.shape)

    def unpack(self, packed):
        """The saved tensor, or zeros for a dropped one."""
        return self(packed) if isinstance(packed, _Unread) else packed


class unread_saves(saved_tensors_hooks):  # noqa: N801 (a context manager, named as torch's)
    """Saved-tensor hooks of the backward building u ↦ Jᵀu (``u`` the leaf): a saved tensor whose
    history reaches ``u`` is replaced by its metadata, and unpacked as zeros of its shape that
    take no memory (:class:`_ZeroPages`), which only derivatives that the J V pass does not ask
    for read (torch's ``convolution`` double backward computes its input and weight terms whether
    asked or not; they go nowhere).

    ``unreached``: autograd nodes known not to reach ``u`` (the forward graph's, recorded before
    ``u`` existed), where the walk stops at once instead of descending the whole forward graph
    again from every saved activation.

    The memo of the walk (autograd nodes) and ``u`` are dropped on exit: the graph's saved
    variables keep the hooks, and a hook holding the graph's nodes would make a reference cycle
    through C++ that Python's collector does not see (the cached graphs would never be freed).
    """

    def __init__(self, u: torch.Tensor, unreached=()):
        self._u, self._reaches, self._zeros = u, dict.fromkeys(unreached, False), _ZeroPages()
        super().__init__(self._pack, self._zeros.unpack)

    def __exit__(self, *exc):
        self._u, self._reaches = None, None
        return super().__exit__(*exc)

    def _depends_on_u(self, fn) -> bool:
        # an iterative walk over the history, memoised over every tensor saved by this backward
        reaches, u = self._reaches, self._u
        stack = [fn]
        while stack:
            node = stack[-1]
            if node in reaches:
                stack.pop()
                continue
            if getattr(node, "variable", None) is u:
                reaches[node] = True
                stack.pop()
                continue
            nxt = [f for f, _ in node.next_functions if f is not None]
            todo = [f for f in nxt if f not in reaches]
            if todo:
                stack.extend(todo)
                continue
            reaches[node] = any(reaches[f] for f in nxt)
            stack.pop()
        return reaches[fn]

    def _pack(self, t):
        if t is self._u or (t.grad_fn is not None and self._depends_on_u(t.grad_fn)):
            return self._zeros.reserve(_Unread(t))
        return t
