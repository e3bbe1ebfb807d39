"""Batches of examples: one batch or a loader, their parts, sizes, chunks and fingerprints.

A batch is a tuple (what a loader yields, moved to the device); its parts may be tensors with the
batch size as first dimension, dicts of them (tokeniser output), or anything else passed unchanged.

**One batch or a loader** — the one rule of every entry point that takes examples (``FIM``,
``GGN``, ``Hessian``, ``Jacobian``, ``GramMatrix``, the representations...), applied by
:func:`as_loader`:

* a tensor, a dict, or a tuple / list of tensors (and dicts of tensors) whose first dimensions all
  agree is **one minibatch** — ``(x, y)``, ``[x, y]`` as a ``DataLoader`` yields it, or ``x``;
* anything else iterable is a **loader** of such batches — ``[(x1, y1), (x2, y2)]``, a
  ``DataLoader``, a generator;
* a tuple / list holding tensors that is not one batch (first dimensions that disagree, tensors
  mixed with other things) is ambiguous and raises :class:`~nngeo_ops.errors.ArgumentTypeError`:
  wrap one batch in a list (``[batch]``), or make each batch of a loader a tuple (``[(x1,), (x2,)]``).

So ``[x1, x2]`` with equal first dimensions is one batch (inputs ``x1``, targets ``x2``); a loader of
input-only batches is written ``[(x1,), (x2,)]``.
"""

from __future__ import annotations

import functools
import itertools
import time
import warnings
import weakref
from collections.abc import Iterable, Iterator, Mapping

import torch
from tqdm.auto import tqdm

from ..errors import (
    ArgumentTypeError,
    DataError,
    InvalidArgumentError,
    ShapeError,
    UnsupportedError,
)


# ---------------------------------------------------------------------- one batch or a loader
def _first_dims(part) -> list | None:
    """The first dimensions of a batch part's tensors, or None if it is not a batch part."""
    if torch.is_tensor(part):
        return [part.shape[0]] if part.dim() > 0 else None
    if isinstance(part, Mapping):
        dims = [v.shape[0] for v in part.values() if torch.is_tensor(v) and v.dim() > 0]
        return dims or None
    return None


def is_single_batch(examples) -> bool:
    """Whether ``examples`` is one minibatch under the rule of the module docstring.

    Raises :class:`ArgumentTypeError` for a tuple / list that holds tensors but is not one batch.
    """
    if torch.is_tensor(examples) or isinstance(examples, Mapping):
        return True
    if not isinstance(examples, tuple | list) or not examples:
        return False
    if not any(torch.is_tensor(x) for x in examples):
        return False  # a list of batches (tuples, dicts, ...)
    dims = [_first_dims(x) for x in examples]
    sizes = {d for ds in dims if ds is not None for d in ds}
    if all(ds is not None for ds in dims) and len(sizes) == 1:
        return True
    kinds = ", ".join(
        f"tensor{tuple(x.shape)}" if torch.is_tensor(x) else type(x).__name__ for x in examples
    )
    raise ArgumentTypeError(
        f"ambiguous examples: a {type(examples).__name__} of ({kinds}) is neither one batch (a tuple "
        "or list of tensors whose first dimensions agree) nor a loader (an iterable of batches). "
        "Pass one batch as [batch], or a loader of input-only batches as [(x1,), (x2,), ...]"
    )


class LimitedLoader:
    """The first ``max_batches`` batches of ``loader`` at each pass (re-iterable if it is)."""

    def __init__(self, loader, max_batches: int):
        self.loader, self.max_batches = loader, max_batches

    def __iter__(self):
        return itertools.islice(iter(self.loader), self.max_batches)

    def __len__(self) -> int:
        try:
            return min(len(self.loader), self.max_batches)
        except TypeError:
            return self.max_batches


def as_loader(examples, *, reiterable: bool = False, max_batches: int | None = None):
    """``examples`` as a loader: one batch becomes ``[batch]``, a loader is kept (see the rule in
    the module docstring). Idempotent.

    ``reiterable=True`` where the examples are read at every product (implicit operators, the
    Jacobian node): a one-shot iterator (a generator, ``iter(loader)``) is refused, since its second
    pass would be empty. ``max_batches`` stops every pass after that many batches (a streaming or
    infinite loader without ``__len__``).
    """
    if examples is None:
        raise ArgumentTypeError("no examples given: pass a loader (or one batch)")
    if max_batches is not None and (
        isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1
    ):
        raise InvalidArgumentError(
            f"max_batches must be a positive integer or None, got {max_batches!r}"
        )
    if is_single_batch(examples):
        return [examples]
    if not isinstance(examples, Iterable):
        raise ArgumentTypeError(
            f"examples of type {type(examples).__name__} are neither one batch (a tensor, or a tuple "
            "of tensors with the batch first) nor a loader (an iterable of batches)"
        )
    if reiterable and isinstance(examples, Iterator):
        raise ArgumentTypeError(
            f"a one-shot iterator ({type(examples).__name__}) was given where the examples are read "
            "again at every product; pass a re-iterable loader (the DataLoader itself, or "
            "list(iterator))"
        )
    if max_batches is not None and not (
        isinstance(examples, LimitedLoader) and examples.max_batches <= max_batches
    ):
        examples = LimitedLoader(examples, max_batches)
    return examples


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

LOADER_CHANGED = (
    "the loader yielded different examples than when the operator was built; it must yield the "
    "same examples in the same order at every pass (use shuffle=False, and a sampler without "
    "replacement, or pass list(loader) to fix one draw)"
)


def _leaf_identities(batch: tuple) -> list:
    """``[(weak reference, version)]`` of a batch's tensors: weak, so that the check keeps no
    batch of the loader alive."""
    return [(weakref.ref(t), t._version) for t in batch_leaves(batch) if torch.is_tensor(t)]


def _same_leaves(leaves: list, batch: tuple) -> bool:
    """Whether ``batch`` holds the very tensors of ``leaves``, unchanged by in-place operations (a
    list loader yields the same objects at every pass): then its fingerprint is the recorded one,
    and computing it again (a product with the inputs, ~3 % of an implicit product on the benchmark
    MLP) is skipped. A ``.data`` write to an input is not a different batch of the loader and is
    not looked for."""
    ts = [t for t in batch_leaves(batch) if torch.is_tensor(t)]
    return len(ts) == len(leaves) and all(
        r() is t and t._version == v for (r, v), t in zip(leaves, ts)
    )


class ReplayCheck:
    """The batches of an operator's first pass (sizes and :func:`fingerprint`), that every later pass
    must reproduce: :meth:`check` wraps a pass and raises :class:`DataError` (``LOADER_CHANGED``) on
    the first batch that differs, instead of letting a reshuffling or resampling loader give a
    different matrix at every product.

    ``check(batches, held=True)``: the caller keeps every batch of the first pass (a cache built
    from them) until it calls :meth:`settle`, which takes the fingerprints then, of the batches
    still as they were (their tensors at the versions of the first pass), before the caller drops
    them. A later pass can only follow a :meth:`settle`; a cached operator that is never cleared
    never pays for them (a product with the inputs, ~3 % of its first product on the benchmark
    MLP). A batch changed in place while held has no fingerprint: a later pass refuses any batch
    but the same tensors unchanged since."""

    def __init__(self):
        self.sizes: list[int] | None = None
        self.prints: list = []  # a fingerprint, None (pending: held), or _CHANGED
        self.leaves: list[list] = []
        self._held: list[tuple] = []

    def __getstate__(self) -> dict:
        # weak references do not pickle; an unpickled check fingerprints every batch again
        self.settle()
        return {**self.__dict__, "leaves": [], "_held": []}

    def settle(self) -> None:
        """Take the fingerprints of the held batches of the first pass (see the class docstring)."""
        for i, batch in enumerate(self._held):
            if self.prints[i] is None:
                same = _same_leaves(self.leaves[i], batch)
                self.prints[i] = fingerprint(batch, batch_size_of(batch)) if same else _CHANGED
        self._held = []

    def check(self, batches, held: bool = False):
        first = self.sizes is None
        if first:
            self.prints, self.leaves, self._held = [], [], []
        else:
            self.settle()
        sizes = []
        try:
            yield from self._check(batches, first, held, sizes)
        except BaseException:  # an unfinished first pass: none of it is kept
            if first:
                self.prints, self.leaves, self._held = [], [], []
            raise

    def _check(self, batches, first, held, sizes):
        i = -1
        for i, batch in enumerate(batches):
            b = batch_size_of(batch)
            if first:
                sizes.append(b)
                self.prints.append(None if held else fingerprint(batch, b))
                self.leaves.append(_leaf_identities(batch))
                if held:
                    self._held.append(batch)
            elif i >= len(self.sizes) or b != self.sizes[i]:
                raise DataError(LOADER_CHANGED)
            elif not (i < len(self.leaves) and _same_leaves(self.leaves[i], batch)) and (
                self.prints[i] is _CHANGED
                or not torch.allclose(
                    fingerprint(batch, b),
                    self.prints[i],
                    rtol=FINGERPRINT_RTOL,
                    atol=1e-6,
                    equal_nan=True,
                )
            ):
                raise DataError(LOADER_CHANGED)
            yield batch
        if first:
            self.sizes = sizes
        elif i + 1 != len(self.sizes):
            raise DataError(LOADER_CHANGED)


# the fingerprint of a held batch changed in place before it was taken
_CHANGED = object()


# A pass over a loader without ``__len__`` that has run this long warns once that it may not end.
LONG_PASS_SECONDS = 120.0


def _watch_long_pass(it, desc):
    start, warned = time.monotonic(), False
    for n, batch in enumerate(it, 1):
        yield batch
        if not warned and time.monotonic() - start > LONG_PASS_SECONDS:
            warned = True
            warnings.warn(
                f"{desc}: the loader has no __len__ and this pass has read {n} batches in "
                f"{time.monotonic() - start:.0f} s; if it does not end (a streaming or infinite "
                "loader), pass max_batches=... to read that many batches per pass",
                stacklevel=2,
            )


def progress_bar(iterable, progress, desc):
    """``iterable`` behind a tqdm bar: shown when ``progress`` is True, hidden when False, and with
    None only on a terminal. The loader is iterated exactly once per pass (``tqdm.auto`` would call
    ``iter()`` on it twice: a DataLoader with workers would start them twice). A loader without
    ``__len__`` warns when a pass runs longer than :data:`LONG_PASS_SECONDS` (see ``max_batches``)."""
    disable = None if progress is None else not progress
    it = iter(iterable)
    try:
        total = len(iterable)
    except TypeError:
        total = None
        it = _watch_long_pass(it, desc)
    if disable:  # no bar object at all (its construction is ~2 % of a small model's build)
        return it
    return tqdm(it, total=total, desc=desc, disable=disable, leave=False)


def check_same_outputs(cs):
    if any(c != cs[0] for c in cs):
        raise ShapeError(
            f"the function returned different numbers of outputs per batch: {sorted(set(cs))}"
        )
