"""The NTK engine: the kernel matrix K = J Jᵀ in blocks from per-chunk features, without a loop over
examples.

See :mod:`nngeo_ops.nn.fspace.ntk` for the layout and the cost model: each chunk's features (per-example
gradients, or Kronecker rows for dense layers where cheaper) come from one forward and one backward
with the C cotangents batched; blocks between two chunks are products of their features.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ...errors import DataError, ShapeError
from ..data import batch_size_of, check_same_outputs, progress_bar
from .distributed import gather_rows, reduce_counts

if TYPE_CHECKING:  # the generator calls this engine (get_gram_matrix); only its type is needed
    from .jacobian_generator import JacobianGenerator


@dataclass
class Features:
    """What the kernel matrix needs from one chunk of B examples, for C outputs.

    ``grads``: per-example gradients (C, B, P_d) of the layers taken densely, concatenated (their
    order inside the row does not matter for inner products). ``krons``: for each layer taken in
    Kronecker form, ``(A, G)`` with A (B, R, dA) and G (C, B, R, dG) such that the per-example
    gradient is Σ_r G[c, n, r] ⊗ A[n, r] (see :mod:`nngeo_ops.nn.layers.base`).
    """

    b: int
    c: int
    grads: torch.Tensor | None = None
    krons: list = field(default_factory=list)


# ---------------------------------------------------------------------- the kernel engine
def _block(fi: Features, fj: Features) -> torch.Tensor:
    """K between two chunks, (C·B_i, C·B_j), rows and columns output-major inside each chunk."""
    c, bi, bj = fi.c, fi.b, fj.b
    if fi.grads is not None:
        out = fi.grads.reshape(c * bi, -1) @ fj.grads.reshape(c * bj, -1).T
    else:
        ref = fi.krons[0][0]
        out = torch.zeros(c * bi, c * bj, dtype=ref.dtype, device=ref.device)
    o4 = out.view(c, bi, c, bj)
    for (ai, gi), (aj, gj) in zip(fi.krons, fj.krons):
        ri, rj = ai.shape[1], aj.shape[1]
        if ri == 1 and rj == 1:  # one position: (G Gᵀ) ⊙ (A Aᵀ), the A factor shared by outputs
            gg = gi.reshape(c * bi, -1) @ gj.reshape(c * bj, -1).T
            aa = ai[:, 0] @ aj[:, 0].T
            o4.addcmul_(gg.view(c, bi, c, bj), aa[None, :, None, :])
        else:
            gg = gi.reshape(c * bi * ri, -1) @ gj.reshape(c * bj * rj, -1).T
            aa = ai.reshape(bi * ri, -1) @ aj.reshape(bj * rj, -1).T
            o4 += torch.einsum(
                "cnrdms,nrms->cndm", gg.view(c, bi, ri, c, bj, rj), aa.view(bi, ri, bj, rj)
            )
    return out


def _features_diag(f: Features) -> torch.Tensor:
    """diag(K) of one chunk, (C, B): the squared norms of the per-example Jacobian rows."""
    d = f.grads.square().sum(-1) if f.grads is not None else 0.0
    for a, g in f.krons:
        if a.shape[1] == 1:
            d = d + g[:, :, 0].square().sum(-1) * a[:, 0].square().sum(-1)
        else:
            gg = torch.einsum("cbrg,cbsg->cbrs", g, g)
            aa = torch.einsum("bra,bsa->brs", a, a)
            d = d + (gg * aa).sum((-1, -2))
    return d


def _chunk_list(gen: JacobianGenerator, examples, desc):
    chunks = list(gen.chunks(examples, desc))
    if not chunks or sum(batch_size_of(ch) for ch in chunks) == 0:
        raise DataError("the loader yielded no examples")
    return chunks


def _kernel(gen: JacobianGenerator, examples_a, examples_b=None) -> torch.Tensor:
    """K(A, B) as a [C, N_a, C, N_b] tensor (K(A, A) when ``examples_b`` is None)."""
    sym = examples_b is None
    run = gen.start()
    chunks_a = _chunk_list(gen, examples_a, "kernel (data)")
    chunks_b = chunks_a if sym else _chunk_list(gen, examples_b, "kernel (data)")
    sizes_a = [batch_size_of(ch) for ch in chunks_a]
    sizes_b = [batch_size_of(ch) for ch in chunks_b]
    offs_a = [sum(sizes_a[:i]) for i in range(len(sizes_a))]
    offs_b = [sum(sizes_b[:i]) for i in range(len(sizes_b))]
    keep = gen.chunk_size is None
    memo: dict = {}

    def feat(side, i):
        key = ("a" if sym else side, i)
        if key in memo:
            return memo[key]
        f = gen.features((chunks_a if key[0] == "a" else chunks_b)[i], run)
        want = (sizes_a if key[0] == "a" else sizes_b)[i]
        if f.b != want:
            raise ShapeError(
                f"the function returned {f.b} outputs for a chunk of {want} examples; it must "
                "return one row per example (batch first)"
            )
        if keep:
            memo[key] = f
        return f

    k4 = None
    pairs = [(i, j) for i in range(len(chunks_a)) for j in range(i if sym else 0, len(chunks_b))]
    for i, j in progress_bar(pairs, gen.progress, "kernel"):
        fi = feat("a", i)
        fj = fi if (sym and i == j) else feat("b", j)
        if fi.c != fj.c:
            raise ShapeError(
                f"the two loaders give {fi.c} and {fj.c} outputs per example; a cross-kernel "
                "needs the same outputs on both (same model, function and output shape)"
            )
        if k4 is None:
            c = fi.c
            ref = fi.grads if fi.grads is not None else fi.krons[0][0]
            k4 = torch.zeros(c, sum(sizes_a), c, sum(sizes_b), dtype=ref.dtype, device=ref.device)
        blk = _block(fi, fj)
        if sym and i == j:
            blk = 0.5 * (blk + blk.T)  # exact symmetry of the diagonal blocks (rounding)
        blk4 = blk.view(c, fi.b, c, fj.b)
        k4[:, offs_a[i] : offs_a[i] + fi.b, :, offs_b[j] : offs_b[j] + fj.b] = blk4
        if sym and i != j:
            k4[:, offs_b[j] : offs_b[j] + fj.b, :, offs_a[i] : offs_a[i] + fi.b] = blk4.permute(
                2, 3, 0, 1
            )
    return k4


def kernel_tensor(gen: JacobianGenerator, examples) -> torch.Tensor:
    """The NTK of ``examples`` as a [C, N, C, N] tensor (gathered over a process group)."""
    if gen.process_group is not None:
        return sharded_kernel(gen, examples)
    return _kernel(gen, examples)


def cross_kernel_tensor(gen: JacobianGenerator, examples_a, examples_b) -> torch.Tensor:
    """The cross-kernel K(A, B) as a [C, N_a, C, N_b] tensor (gathered over a process group)."""
    if gen.process_group is not None:
        return sharded_kernel(gen, examples_a, examples_b)
    return _kernel(gen, examples_a, examples_b)


def _local_jacobian(gen: JacobianGenerator, examples) -> torch.Tensor:
    run = gen.start()
    parts = [gen.jacobian_chunk(ch, run) for ch in gen.chunks(examples, "kernel (shard)")]
    if not parts:
        raise DataError("the loader of this rank yielded no examples")
    check_same_outputs([p.shape[0] for p in parts])
    return torch.cat(parts, dim=1)  # (C, N_r, P)


def sharded_kernel(gen: JacobianGenerator, examples_a, examples_b=None) -> torch.Tensor:
    """K over the union of the ranks' shards, [C, N, C, M], the same on every rank.

    Each rank forms the per-example Jacobian of its shard (C, N_r, P), gathers those of every rank
    (``all_gather``, rank order: example n of the union is example n − Σ_{q<r} N_q of rank r),
    computes its block row K[:, shard_r, :, :] and the block rows are gathered. Memory: the
    Jacobians of all examples, C·N·P numbers, on each rank.
    """
    group = gen.process_group
    ja = _local_jacobian(gen, examples_a)
    jb = ja if examples_b is None else _local_jacobian(gen, examples_b)
    n_a = reduce_counts(group, [ja.shape[1]], ja.device)[0]
    if ja.shape[0] != jb.shape[0]:
        raise ShapeError(
            f"the two loaders give {ja.shape[0]} and {jb.shape[0]} outputs per example; a "
            "cross-kernel needs the same outputs on both (same model, function and output shape)"
        )
    j_all = gather_rows(group, jb.transpose(0, 1).contiguous()).transpose(0, 1)  # (C, M, P)
    row = torch.einsum("cnp,dmp->ncdm", ja, j_all)  # this rank's block row, examples first
    k = gather_rows(group, row.contiguous()).permute(1, 0, 2, 3)  # (C, N, C, M)
    if k.shape[1] != n_a:
        raise ShapeError(f"gathered {k.shape[1]} examples, expected {n_a}")
    if examples_b is None:
        c, n = k.shape[0], k.shape[1]
        flat = k.reshape(c * n, c * n)
        k = (0.5 * (flat + flat.T)).reshape(c, n, c, n)  # exact symmetry (rounding)
    return k.contiguous()


def kernel_diag(gen: JacobianGenerator, examples) -> torch.Tensor:
    """diag(K) as a (C, N) tensor, from one pass and without forming K."""
    run = gen.start()
    parts = [_features_diag(gen.features(ch, run)) for ch in gen.chunks(examples, "ntk diag")]
    if not parts:
        raise DataError("the loader yielded no examples")
    if any(p.shape[0] != parts[0].shape[0] for p in parts):
        raise ShapeError("the function returned different numbers of outputs per batch")
    return torch.cat(parts, dim=1)
