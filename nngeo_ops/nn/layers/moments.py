"""Sums of outer products of rows (second moments): the kernel of every Kronecker factor.

``second_moment(t)`` is Σ over every leading index of t tᵀ along the last axis, with the memory layouts the
layer kinds produce (feature-major patches, cotangents per pixel) read in place.
"""

from __future__ import annotations

import torch

_CHUNK = 1 << 24  # elements of an intermediate per-example tensor, for the chunked paths
_PATCH_CHUNK = 1 << 20  # elements of a chunk of convolution patches (4 MB in float32)
_SQUARE_LOOP = 1 << 14  # elements of one column from which its squares are added column by column


def column_square_sum(g: torch.Tensor) -> torch.Tensor:
    """Σ_k g[k]² over the leading axis (the K output columns), a new tensor of ``g[0]``'s shape.

    For large columns the squares are added one column at a time (``addcmul_``): no (K, …) tensor
    of squares is allocated (2.6 MB for the benchmark MLP's first layer), and on a CPU it runs in
    ~0.8 of the time of ``g.square().sum(0)``; small columns take the two whole-tensor passes,
    which are cheaper than K Python-level calls.
    """
    if g.shape[0] == 1:
        return g[0].square()
    if g[0].numel() < _SQUARE_LOOP:
        return g.square().sum(0)
    s = g[0].square()
    for gk in g[1:]:
        s.addcmul_(gk, gk)
    return s


def second_moment(t: torch.Tensor, pad: int = 0) -> torch.Tensor:
    """Σ over every leading index of the outer products along the last axis: (…, d) -> (d, d).

    One matrix product when the feature axis is innermost in memory (the reshape is free), or the
    transposed view of a feature-major matrix (BLAS reads it as it is); for large compute-bound
    products only the block rows of the upper triangle are computed and mirrored (5/8 of the flops).
    When ``t`` is a transposed view of a (…, d, R) block with many positions R (output cotangents
    per pixel), the per-block products ``u uᵀ`` are batched and summed, in chunks bounded in memory,
    instead of copying the transpose. With ``pad`` the result is copied into the top-left block of
    a (d + pad)² tensor whose last rows and columns are left for the caller to fill (products into
    a buffer of odd leading dimension run much slower than into a contiguous one).
    """
    d = t.shape[-1]
    out = None
    if t.dim() >= 3 and t.shape[-2] >= 16 and not t.is_contiguous():
        u = t.transpose(-1, -2)
        if u.is_contiguous():
            u = u.reshape(-1, d, u.shape[-1])
            step = max(1, _CHUNK // (d * d))
            for i in range(0, u.shape[0], step):
                c = u[i : i + step]
                part = torch.bmm(c, c.transpose(1, 2)).sum(0)
                out = part if out is None else out.add_(part)
    if out is None:
        m = t.reshape(-1, d)
        n = m.shape[0]
        if n < 256 or d < 128 or n * d < 1 << 17:
            out = m.T @ m
        else:
            out = _upper_second_moment(m, _BLOCK_ROWS)
    if not pad:
        return out
    full = out.new_empty(d + pad, d + pad)
    full[:d, :d] = out
    return full


_BLOCK_ROWS = 4  # 4 block rows: (4 + 1) / 8 of the flops; more blocks lose to smaller products


def _upper_second_moment(m: torch.Tensor, k: int) -> torch.Tensor:
    """mᵀm from the k block rows of its upper triangle, mirrored: (k + 1) / (2k) of the flops."""
    d = m.shape[1]
    out = m.new_empty(d, d)
    cuts = [round(i * d / k) for i in range(k + 1)]
    for a, b in zip(cuts, cuts[1:]):
        torch.mm(m[:, a:b].T, m[:, a:], out=out[a:b, a:])
    for a, b in zip(cuts, cuts[1:]):
        out[b:, a:b] = out[a:b, b:].T
    return out
