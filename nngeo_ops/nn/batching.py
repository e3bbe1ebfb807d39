"""Batches of examples: their parts, sizes, chunks and fingerprints.

A batch is a tuple (what a loader yields, moved to the device); its parts may be tensors with the
batch size as first dimension, dicts of them (tokeniser output), or anything else passed unchanged.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import torch
from tqdm.auto import tqdm

from ..errors import ArgumentTypeError, ShapeError, UnsupportedError


# ---------------------------------------------------------------------- small helpers
class ModelOnFirst:
    """The default ``function=``: the model applied to the first part of a batch,
    ``model(batch[0])``. A class, not a lambda, so that generators and the representations holding
    them pickle."""

    def __init__(self, model) -> None:
        self.model = model

    def __call__(self, *parts):
        return self.model(parts[0])


def flatten_outputs(out) -> torch.Tensor:
    """Model outputs ``(B, *S)`` as ``(B, C)`` with C = prod(S) (C = 1 for per-example scalars)."""
    if not torch.is_tensor(out):
        raise UnsupportedError(
            f"the function returned {type(out).__name__}; it must return a tensor of outputs "
            "(batch first): pass function=lambda *batch: ... selecting it"
        )
    if out.dim() == 0:
        raise ShapeError(
            "the function returned a scalar; it must return per-example outputs of shape "
            "(batch, ...) — e.g. a loss with reduction='none'"
        )
    return out.reshape(out.shape[0], -1)


def batch_leaves(batch: tuple) -> list:
    """The parts of a batch, with dict batches (tokeniser output) opened in key order."""
    out = []
    for x in batch:
        if isinstance(x, Mapping):
            out.extend(x[k] for k in sorted(x))
        else:
            out.append(x)
    return out


def batch_size_of(batch: tuple) -> int:
    for x in batch_leaves(batch):
        if torch.is_tensor(x) and x.dim() > 0:
            return x.shape[0]
    raise ArgumentTypeError("a batch must contain at least one tensor with a batch dimension")


def _slice(x, b: int, i: int, size: int):
    if isinstance(x, Mapping):
        return {k: _slice(v, b, i, size) for k, v in x.items()}
    return x[i : i + size] if torch.is_tensor(x) and x.dim() > 0 and x.shape[0] == b else x


def split_batch(batch: tuple, chunk_size: int | None) -> list[tuple]:
    """Cut a batch into chunks of at most ``chunk_size`` examples (tensors sliced along dim 0).

    Parts that are not tensors with the batch size as first dimension are passed unchanged.
    """
    b = batch_size_of(batch)
    if chunk_size is None or b <= chunk_size:
        return [batch]
    cuts = []
    for i in range(0, b, chunk_size):
        cuts.append(tuple(_slice(x, b, i, chunk_size) for x in batch))
    return cuts


@functools.lru_cache(maxsize=64)
def _weights(k: int, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + k)
    return (torch.rand(n, generator=g, dtype=torch.float64) + 0.5).to(device=device, dtype=dtype)


def fingerprint(batch: tuple, b: int) -> torch.Tensor:
    """A cheap per-example signature of a chunk's tensors (to detect a loader that reshuffles).

    Floating parts are weighed in their own precision (a float64 copy of the inputs cost more than
    the product); compare signatures with :data:`FINGERPRINT_RTOL`, which allows for the rounding
    of a float32 product and is far below what a different example changes.
    """
    sig = None
    for k, x in enumerate(batch_leaves(batch)):
        if torch.is_tensor(x) and x.dim() > 0 and x.shape[0] == b and not x.is_complex():
            flat = x.detach().reshape(b, -1)
            if not flat.is_floating_point() or flat.dtype in (torch.float16, torch.bfloat16):
                flat = flat.to(torch.float64)
            part = (flat @ _weights(k, flat.shape[1], flat.dtype, flat.device)).to(torch.float64)
            sig = part if sig is None else sig + part
    return sig


FINGERPRINT_RTOL = 1e-5


def progress_bar(iterable, progress, desc):
    """``iterable`` behind a tqdm bar: shown when ``progress`` is True, hidden when False, and with
    None only on a terminal. The loader is iterated exactly once per pass (``tqdm.auto`` would call
    ``iter()`` on it twice: a DataLoader with workers would start them twice)."""
    disable = None if progress is None else not progress
    try:
        total = len(iterable)
    except TypeError:
        total = None
    return tqdm(iter(iterable), total=total, desc=desc, disable=disable, leave=False)


def check_same_outputs(cs):
    if any(c != cs[0] for c in cs):
        raise ShapeError(
            f"the function returned different numbers of outputs per batch: {sorted(set(cs))}"
        )
