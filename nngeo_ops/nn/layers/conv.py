"""Convolutions (Conv1d, Conv2d: KFC of Grosse & Martens, 2016; ConvTranspose2d): their geometry,
patches, Kronecker rows and factors, and the diagonal without per-example tensors."""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as Fn
from torch import nn

from .base import KronRule
from .moments import _PATCH_CHUNK, second_moment


def _pairs(v, n):
    return tuple(v) if isinstance(v, tuple | list) else (v,) * n


def _conv_padding(module, n):
    pad = module.padding
    if isinstance(pad, str):
        if pad == "valid":
            return (0,) * n
        total = [
            d * (k - 1) for d, k in zip(_pairs(module.dilation, n), _pairs(module.kernel_size, n))
        ]
        return tuple(t // 2 for t in total)
    return _pairs(pad, n)


def conv_geometry(module, a):
    """``(a, kernel, stride, dilation, padding)`` of a Conv1d/Conv2d call as a 2-d convolution:
    a 1-d convolution is a 2-d one over a height-1 image (``a`` gains that axis)."""
    n = 1 if isinstance(module, nn.Conv1d) else 2
    ks, st = _pairs(module.kernel_size, n), _pairs(module.stride, n)
    dl, pd = _pairs(module.dilation, n), _conv_padding(module, n)
    if n == 1:
        return a.unsqueeze(2), (1, *ks), (1, *st), (1, *dl), (0, *pd)
    return a, ks, st, dl, pd


class ConvRule(KronRule):
    """KFC (Grosse & Martens, 2016): A = unfolded input patches, G = output cotangents per pixel."""

    kinds = (nn.Conv1d, nn.Conv2d)

    def supports(self, module):
        if module.groups != 1 or module.padding_mode != "zeros":
            return False
        if isinstance(module.padding, str) and module.padding == "same":
            n = 1 if isinstance(module, nn.Conv1d) else 2
            ks, ds = _pairs(module.kernel_size, n), _pairs(module.dilation, n)
            return all(d * (k - 1) % 2 == 0 for d, k in zip(ds, ks))
        return True

    def diag(self, module, a, g, out=None) -> dict[str, torch.Tensor]:
        """Σ_{k,n} (∇θ)² over the pixels, per-example gradients chunked (:func:`conv_squared_grads`)."""
        return conv_squared_grads(module, a, g)

    def per_example_weight(self, module, a, g):
        """(K, B, C_out, C_in·kh·kw) by :class:`ExampleGrads` (grouped kernel or patches), a chunk
        of examples at a time (the patches of all B examples would outweigh the result)."""
        out = None
        for kk, rows, w in ExampleGrads(module, a).each(g):
            if out is None:
                out = w.new_empty(g.shape[0], a.shape[0], *w.shape[1:])
            out[kk, rows] = w
        return out

    def kfac_rows(self, module, a, g):
        """The rows of :meth:`KronRule.kfac_rows`, the patches from :func:`conv_patches` (a
        transposed view of a feature-major matrix, which the matrix products read as it is)."""
        p = conv_patches(module, a)
        b = a.shape[0]
        return p.T, b, p.shape[1] // b, self.kfac_grad_rows(module, a, g)

    def kfac_grad_rows(self, module, a, g):
        """(K, B, R, C) rows of the output cotangents (K, B, C, *spatial): a view, no patches."""
        return g.reshape(*g.shape[:3], -1).transpose(2, 3)

    def input_moment(self, module, a, g, ones):
        """A's sum over the patches without the patch matrix (:func:`conv_patch_gram`)."""
        m, n_rows = conv_patch_gram(module, a, ones)
        return m, n_rows, self.kfac_grad_rows(module, a, g)

    def rows(self, module, a, g):
        a, ks, st, dl, pd = conv_geometry(module, a)
        patches = Fn.unfold(a, ks, dilation=dl, padding=pd, stride=st)  # (B, dA, R)
        k, b, c = g.shape[:3]
        return patches.transpose(1, 2), g.reshape(k, b, c, -1).transpose(2, 3)


class ConvTranspose2dRule(KronRule):
    """W has shape (C_in, C_out, kh, kw); ∇W = Σ_l x_l ⊗ unfold(g)_l over the input pixels l.

    The bias does not share this structure; its KFAC block is kept separate (exact, dense).
    """

    kinds = (nn.ConvTranspose2d,)
    order = "ag"
    bias_in_kron = False

    def supports(self, module):
        return module.groups == 1 and module.padding_mode == "zeros"

    def rows(self, module, a, g):
        k, b = g.shape[:2]
        gu = Fn.unfold(
            g.reshape(k * b, *g.shape[2:]),
            module.kernel_size,
            dilation=module.dilation,
            padding=module.padding,
            stride=module.stride,
        )  # (K·B, C_out·kh·kw, L_in)
        arow = a.reshape(b, a.shape[1], -1).transpose(1, 2)
        return arow, gu.reshape(k, b, gu.shape[1], -1).transpose(2, 3)

    def bias_grad(self, module, g, grow):
        return g.reshape(*g.shape[:3], -1).sum(-1)


def conv_patches(module: nn.Module, a: torch.Tensor) -> torch.Tensor:
    """The patches of a Conv1d/Conv2d input as a (C·kh·kw, B·R) matrix, feature-major.

    The same numbers as ``unfold`` (rows in its order, columns example-major then position), built
    from kh·kw strided slices of the padded input with the batch moved behind the channels: several
    times faster than ``unfold`` on CPU, and the layout a Gram matrix P Pᵀ wants.
    """
    a, ks, st, dl, pd = conv_geometry(module, a)
    b, c, h, w = a.shape
    ho = (h + 2 * pd[0] - dl[0] * (ks[0] - 1) - 1) // st[0] + 1
    wo = (w + 2 * pd[1] - dl[1] * (ks[1] - 1) - 1) // st[1] + 1
    at = a.transpose(0, 1)
    if pd[0] or pd[1]:
        at = Fn.pad(at, (pd[1], pd[1], pd[0], pd[0]))
    out = a.new_empty(c, ks[0], ks[1], b, ho, wo)
    for i in range(ks[0]):
        for j in range(ks[1]):
            hs, ws = i * dl[0], j * dl[1]
            out[:, i, j] = at[
                :,
                :,
                hs : hs + st[0] * (ho - 1) + 1 : st[0],
                ws : ws + st[1] * (wo - 1) + 1 : st[1],
            ]
    return out.reshape(c * ks[0] * ks[1], b * ho * wo)


def conv_example_grads(module: nn.Module, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """(B, C_out, C_in·kh·kw) per-example weight gradients of a Conv1d/Conv2d call for one column of
    output cotangents g (B, C_out, ...): the weight gradient of one convolution with the examples as
    groups — input (1, B·C_in, H, W), cotangent (1, B·C_out, H', W'), groups B — whose weight
    gradient (B·C_out, C_in, kh, kw) stacks the B per-example gradients
    (``torch.nn.grad.conv2d_weight``). The same arithmetic as g_n P_nᵀ with the patches P_n, without
    building the patches: on CPU the library's grouped kernel takes about half the time of patches
    and a batched product for the benchmark CNN.
    """
    a2, ks, st, dl, pd = conv_geometry(module, a)
    b, c_in = a2.shape[:2]
    c_out = g.shape[1]
    x = a2.reshape(1, b * c_in, *a2.shape[2:])
    spatial = g.shape[2:] if a2.dim() == a.dim() else (1, *g.shape[2:])
    gk = g.reshape(1, b * c_out, *spatial)
    w = torch.nn.grad.conv2d_weight(x, (b * c_out, c_in, *ks), gk, st, pd, dl, groups=b)
    return w.view(b, c_out, -1)


def conv_squared_grads(module: nn.Module, a: torch.Tensor, g: torch.Tensor) -> dict:
    """{attr: Σ_{k,n} (∇θ_{k,n})²} of a Conv1d/Conv2d call, output cotangents g (K, B, C_out, ...).

    The per-example weight gradients of a chunk of examples at a time, column after column
    (:func:`ExampleGrads`), squared and summed: chunks bound the buffers, and the K·B·P tensor never
    exists. The patches of a chunk, where that route is taken, serve every column.
    """
    w2 = None
    for _, _, w in ExampleGrads(module, a).each(g):
        part = w.view(w.shape[0], -1).square_().sum(0)
        w2 = part if w2 is None else w2.add_(part)
    out = {"weight": w2.reshape(module.weight.shape)}
    if getattr(module, "bias", None) is not None:
        out["bias"] = g.flatten(3).sum(-1).square().sum((0, 1))
    return out


class ExampleGrads:
    """Per-example weight gradients ``(B_c, C_out, C_in·kh·kw)`` of one Conv1d/Conv2d call, a chunk
    of examples and a column of cotangents at a time, by the faster of two exact routes:

    * the grouped weight-gradient kernel (:func:`conv_example_grads`), no patches;
    * the patches P_n of the chunk (``(R, C_in·kh·kw)`` per example, strided slices of the input,
      :func:`conv_patches`) and one batched product g_n P_n per column, the patches built once per
      chunk and reused by every column.

    CPU timings (one thread, float32, 3×3 kernels) put the grouped kernel ahead once the patch is
    wide (C_in = 8–64: 1.2–2.6× faster), and the patches ahead for narrow inputs (C_in ≤ 4, the
    first layer of an image model: 0.3–0.8 of the kernel's time for C_out ≥ 16; the benchmark
    CNN's first layer, 3 → 16 on 32×32, 5.1 against 10.1 ms per column of 128 examples): the
    grouped kernel is slow for few input channels per group. Hence the patches for
    C_in·kh·kw ≤ ``_NARROW_PATCH``.
    """

    def __init__(self, module: nn.Module, a: torch.Tensor):
        self.module, self.a = module, a
        self.width = a.shape[1] * math.prod(conv_geometry(module, a)[1])
        self.patches = self.width <= _NARROW_PATCH

    def chunk(self, positions: int, c_out: int) -> int:
        """Examples per chunk: the chunk's input (or patches) and cotangents ~``_CONV_CHUNK``."""
        if self.patches:
            per = positions * (self.width + c_out) + c_out * self.width
        else:
            per = self.a[0].numel() + c_out * positions
        return max(1, _CONV_CHUNK // per)

    def each(self, g: torch.Tensor):
        """Yield ``(k, rows, grads)`` for every chunk of examples ``rows`` (a slice) and column k of
        the output cotangents ``g`` (K, B, C_out, …): ``grads`` (B_c, C_out, C_in·kh·kw), the chunk's
        patches (where that route is taken) shared by its columns."""
        b = self.a.shape[0]
        step = self.chunk(g[0, 0, 0].numel(), g.shape[2])
        for i in range(0, b, step):
            grads = self.of_chunk(i, i + step)
            for kk in range(g.shape[0]):
                yield kk, slice(i, i + step), grads(g[kk, i : i + step])
            del grads  # this chunk's patches go before the next chunk's are built

    def of_chunk(self, lo: int, hi: int):
        """A function of one column's cotangents ``g[lo:hi]`` (B_c, C_out, …) for examples lo:hi."""
        a = self.a[lo:hi]
        if not self.patches:
            return functools.partial(conv_example_grads, self.module, a)
        bc = a.shape[0]
        p = conv_patches(self.module, a)  # (C_in·kh·kw, B_c·R), feature-major
        p = p.view(p.shape[0], bc, -1).permute(1, 2, 0)  # (B_c, R, C_in·kh·kw), a view

        def grads(g):
            return torch.bmm(g.reshape(bc, g.shape[1], -1), p)

        return grads


# input channels × kernel positions up to which ExampleGrads takes the patches route
_NARROW_PATCH = 40


# elements of the inputs and cotangents of one chunk of examples in conv_squared_grads (8 MB in
# float32): the grouped weight-gradient kernel's buffers stay of that order
_CONV_CHUNK = 2 * _PATCH_CHUNK


def conv_patch_gram(module: nn.Module, a: torch.Tensor, ones: bool) -> tuple[torch.Tensor, int]:
    """(Σ p pᵀ over every patch p of the call, with the bias's 1 when ``ones``; the patch count).

    The patches are built a chunk of examples at a time (4 MB), so the whole (C·kh·kw, B·R) patch
    matrix — tens of MB of fresh memory even for a small CNN, whose first touch costs as much as
    the copies into it — never exists.
    """
    b = a.shape[0]
    first = conv_patches(module, a[:1])
    d, r = first.shape
    step = max(1, _PATCH_CHUNK // (d * r))
    acc, s = None, None
    for i in range(0, b, step):
        p = first if i == 0 and step == 1 else conv_patches(module, a[i : i + step])
        part = second_moment(p.T)
        acc = part if acc is None else acc.add_(part)
        if ones:
            ps = p.sum(1)
            s = ps if s is None else s.add_(ps)
        del p  # before the next chunk's patches are built: one chunk alive at a time
    if ones:
        full = acc.new_empty(d + 1, d + 1)
        full[:d, :d] = acc
        full[:d, d] = s
        full[d, :d] = s
        full[d, d] = b * r
        acc = full
    return acc, b * r
