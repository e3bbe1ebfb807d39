"""The base class of every lazy linear operator, and the operator syntax shared by all nodes.

A node is an immutable description of an ``m × n`` matrix. It knows how to multiply itself with a
block of columns (``_matmat``) and, when it can, with its transpose (``_rmatmat``). Everything else
(solve, logdet, diag, trace, eigh, powers) is computed by :mod:`nngeo_ops.ops.compile`, which
rewrites the tree with the rules of :mod:`nngeo_ops.ops.rules` and picks a routine per node.

Convenience methods such as ``A.solve(b)`` compile the node once and keep the compiled object on the
node, keyed by the identity and version counter of every leaf tensor, so a second call reuses the
factorisations and an in-place update of a leaf invalidates them.
"""

from __future__ import annotations

import contextvars
import numbers
from collections.abc import Iterator
from typing import Any

import torch

from ..errors import (
    ArgumentTypeError,
    DTypeDeviceError,
    InvalidArgumentError,
    NotSymmetricError,
    ShapeError,
)
from .leaf_checks import _checksum, _may_overlap, records_grad

_TO_MEMO: contextvars.ContextVar[dict | None] = contextvars.ContextVar("_to_memo", default=None)

Scalar = Any  # a Python number or a 0-dim tensor (kept as a tensor so gradients flow through it)


def is_scalar(c: Any) -> bool:
    if type(c) is float or type(c) is int:  # before the ABC check, which costs ~10 µs run cold
        return True
    return isinstance(c, numbers.Number) or (isinstance(c, torch.Tensor) and c.dim() == 0)


def scalar_float(c: Scalar) -> float:
    return float(c.detach()) if isinstance(c, torch.Tensor) else float(c)


def fmt_scalar(c: Scalar) -> str:
    return f"{scalar_float(c):.4g}"


class LinearOperator:
    """An ``m × n`` matrix known through its products, with algebraic structure in its type.

    Attributes:
        shape: ``(m, n)``.
        dtype, device: of every tensor the node holds and returns.
        symmetric, psd, orthogonal: tags set by a leaf's builder and inferred upward by composites;
            ``orthogonal`` means orthonormal columns (``QᵀQ = I``).
    """

    # Names of the attributes that hold child nodes (a node, or a tuple of nodes) and leaf tensors;
    # used generically by to(), fingerprints and tree rewriting.
    _node_fields: tuple[str, ...] = ()
    _tensor_fields: tuple[str, ...] = ()
    __array_priority__ = 1000  # so that `tensor @ A` is handled by our __rmatmul__

    def __init__(
        self,
        shape: tuple[int, int],
        dtype: torch.dtype,
        device: torch.device,
        *,
        symmetric: bool = False,
        psd: bool = False,
        orthogonal: bool = False,
    ) -> None:
        self.shape = (int(shape[0]), int(shape[1]))
        self.dtype = dtype
        self.device = device if type(device) is torch.device else torch.device(device)
        square = self.shape[0] == self.shape[1]
        self.symmetric = bool(symmetric) and square
        self.psd = bool(psd) and self.symmetric
        self.orthogonal = bool(orthogonal)

    # ------------------------------------------------------------------ to be provided by nodes
    def _matmat(self, X: torch.Tensor) -> torch.Tensor:
        """``A @ X`` for ``X`` of shape ``(n, k)``; returns ``(m, k)``."""
        raise NotImplementedError

    def _rmatmat(self, X: torch.Tensor) -> torch.Tensor:
        """``Aᵀ @ X`` for ``X`` of shape ``(m, k)``; returns ``(n, k)``."""
        if self.symmetric:
            return self._matmat(X)
        raise NotImplementedError(f"{type(self).__name__} has no transpose product")

    def _str(self) -> str:
        return type(self).__name__

    def _rebuild(self, **fields: Any) -> LinearOperator:
        """A copy of this node with some node or tensor fields replaced (tags recomputed)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ pickling
    def __getstate__(self) -> dict:
        """Nodes pickle without their caches: the compiled form of convenience calls holds
        closures, and cached factorisations are keyed by tensor identities that do not survive a
        round trip; both are rebuilt on first use. A ``MatFree`` pickles only if its functions do
        (module-level functions, not lambdas)."""
        state = self.__dict__.copy()
        for key in ("_auto_cache", "_factors"):
            state.pop(key, None)
        return state

    # ------------------------------------------------------------------ tree walking
    def children(self) -> tuple[LinearOperator, ...]:
        """The child nodes of this node, in the order of its node fields (a tuple field contributes all of
        its items); a leaf has none.
        """
        out: list[LinearOperator] = []
        for name in self._node_fields:
            value = getattr(self, name)
            out.extend(value if isinstance(value, tuple) else (value,))
        return tuple(out)

    def with_children(self, new: tuple[LinearOperator, ...]) -> LinearOperator:
        """The same node over new children, in the order of :meth:`children`."""
        for a, b in zip(new, self.children()):
            if a is not b:
                break
        else:
            return self
        fields, i = {}, 0
        for name in self._node_fields:
            value = getattr(self, name)
            if isinstance(value, tuple):
                fields[name] = tuple(new[i : i + len(value)])
                i += len(value)
            else:
                fields[name] = new[i]
                i += 1
        return self._rebuild(**fields)

    def leaf_tensors(self) -> Iterator[torch.Tensor]:
        """Every tensor the node depends on: its own tensor fields, then those of its children, depth first.

        A subtree shared in the tree yields its tensors once per occurrence.
        """
        for name in self._tensor_fields:
            t = getattr(self, name)
            if isinstance(t, torch.Tensor):
                yield t
        for child in self.children():
            yield from child.leaf_tensors()

    def fingerprint(self) -> tuple:
        """Identity, in-place version and a content checksum of every leaf tensor.

        This keys every cache of compiled forms and factorisations (see :mod:`.cache`). The
        version counter moves with in-place operations on the tensor; a change through ``.data``
        does not move it, so floating leaves also carry a checksum of their entries (a weighted
        sum over all entries up to ``CHECKSUM_ENTRIES`` = 65536, over an evenly spaced sample of
        65536 entries beyond, in contiguous blocks of 64, and the last entry). What invalidates a cache: a new tensor, any in-place operation, a
        ``.data`` write to a leaf of at most 65536 entries, or one that changes a sampled entry of
        a larger leaf (a rescaling, a copy of new values); after a ``.data`` write to a few
        entries of a large leaf call :meth:`invalidate`.
        """
        return _fingerprint(tuple(self.leaf_tensors()))

    def invalidate(self) -> None:
        """Drop the compiled forms and cached factorisations held by this node and its subtree
        (for a ``.data`` write that the fingerprint's sample may miss, see :meth:`fingerprint`)."""
        for key in ("_auto_cache", "_factors"):
            self.__dict__.pop(key, None)
        for child in self.children():
            child.invalidate()

    def needs_grad(self) -> bool:
        """Whether grad mode is on and some leaf tensor requires grad (compiled forms are then not cached)."""
        return records_grad(*self.leaf_tensors())

    def to(self, dtype: torch.dtype | None = None, device: Any = None) -> LinearOperator:
        """The same operator with every leaf tensor moved to ``dtype`` / ``device``.

        A subtree shared in the tree (the ``X`` of ``Xᵀ·M·X``) is converted once and stays shared,
        so that patterns recognised by identity (congruences, hence symmetry) survive the move.
        """
        memo = _TO_MEMO.get()
        token = _TO_MEMO.set({}) if memo is None else None
        memo = _TO_MEMO.get()
        try:
            hit = memo.get(id(self))
            if hit is None:
                hit = memo[id(self)] = (self, self._to(dtype, device))
            return hit[1]
        finally:
            if token is not None:
                _TO_MEMO.reset(token)

    def _to(self, dtype: torch.dtype | None = None, device: Any = None) -> LinearOperator:
        """:meth:`to` of this node alone (children through their own :meth:`to`)."""
        fields: dict[str, Any] = {}
        for name in self._tensor_fields:
            t = getattr(self, name)
            if isinstance(t, torch.Tensor):
                fields[name] = t.to(
                    dtype=dtype if t.is_floating_point() else None,
                    device=device,
                )
        for name in self._node_fields:
            value = getattr(self, name)
            if isinstance(value, tuple):
                fields[name] = tuple(v.to(dtype, device) for v in value)
            else:
                fields[name] = value.to(dtype, device)
        return self._rebuild(**fields)

    # ------------------------------------------------------------------ products with tensors
    def _check_operand(self, X: torch.Tensor, rows: int, what: str) -> None:
        if not isinstance(X, torch.Tensor):
            raise ArgumentTypeError(f"{what}: expected a torch.Tensor, got {type(X).__name__}")
        if X.dim() not in (1, 2) or X.shape[0] != rows:
            raise ShapeError(
                f"{what}: operator of shape {self.shape} cannot take an operand of shape "
                f"{tuple(X.shape)}; pass a vector of length {rows} or a matrix with {rows} rows"
            )
        if X.dtype != self.dtype or X.device != self.device:
            raise DTypeDeviceError(
                f"{what}: operator is {self.dtype} on {self.device} but the operand is {X.dtype} "
                f"on {X.device}; convert one of them with .to(dtype=..., device=...)"
            )

    def matvec(self, X: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``A @ X`` for a vector ``(n,)`` or a matrix of columns ``(n, k)``.

        ``out``: a tensor of the result's shape (``(m,)`` or ``(m, k)``), dtype and device to write
        ``A @ X`` into; it is returned. This is for callers that assemble several products into one
        buffer (a block-diagonal writes each block's product into its rows of its result): nodes
        whose last step is a matrix product (Dense, Kronecker, a product of nodes, a block-diagonal,
        permutations) write it there directly, without a temporary of the result's size; any other
        node computes ``A @ X`` and copies it (:meth:`_matmat_into`). ``out`` must not overlap
        ``X``. Under autograd (grad mode on and ``X`` or a leaf requiring grad) the products are
        recorded as usual and ``out`` receives them by a differentiable copy.
        """
        self._check_operand(X, self.shape[1], "A @ x")
        if out is None:
            return self._mv(X) if X.dim() == 1 else self._matmat(X)
        self._check_out(X, out)
        if X.dim() == 1:
            self._matmat_into(X.unsqueeze(1), out.unsqueeze(1))
        else:
            self._matmat_into(X, out)
        return out

    def _check_out(self, X: torch.Tensor, out: Any) -> None:
        if not isinstance(out, torch.Tensor):
            raise ArgumentTypeError(
                f"A @ x (out=): expected a torch.Tensor for out, got {type(out).__name__}"
            )
        want = (self.shape[0],) if X.dim() == 1 else (self.shape[0], X.shape[1])
        if tuple(out.shape) != want:
            raise ShapeError(
                f"A @ x (out=): operator of shape {self.shape} times an operand of shape "
                f"{tuple(X.shape)} gives shape {want}, but out has shape {tuple(out.shape)}"
            )
        if out.dtype != self.dtype or out.device != self.device:
            raise DTypeDeviceError(
                f"A @ x (out=): operator is {self.dtype} on {self.device} but out is {out.dtype} "
                f"on {out.device}; allocate out with the operator's dtype and device"
            )
        if _may_overlap(out, X):
            # the products would read entries of x already overwritten (torch does not check)
            raise InvalidArgumentError(
                "A @ x (out=): out overlaps the operand x in memory; pass a separate buffer "
                "(or out=None)"
            )

    def _matmat_into(self, X: torch.Tensor, out: torch.Tensor) -> None:
        """``out ← A @ X`` for ``X`` of shape ``(n, k)`` and ``out`` of shape ``(m, k)`` (any strides).

        The default computes the product and copies it (a differentiable copy); nodes whose last
        step is a matrix product override it to write that product into ``out`` directly.
        """
        out.copy_(self._matmat(X))

    def _mv(self, x: torch.Tensor) -> torch.Tensor:
        """``A @ x`` for one vector; leaves override it where that saves the reshapes."""
        return self._matmat(x.unsqueeze(1)).squeeze(1)

    def rmatvec(self, X: torch.Tensor) -> torch.Tensor:
        """``Aᵀ @ X`` for a vector ``(m,)`` or a matrix ``(m, k)``."""
        self._check_operand(X, self.shape[0], "A.T @ x")
        if X.dim() == 1:
            return self._rmatmat(X.unsqueeze(1)).squeeze(1)
        return self._rmatmat(X)

    def __matmul__(self, other: Any) -> Any:
        if (
            isinstance(other, torch.Tensor)
            and other.dtype is self.dtype
            and other.dim() == 1
            and other.shape[0] == self.shape[1]
            and other.device == self.device
        ):
            return self._mv(other)  # the common case, checked inline: per-call overhead matters
        carried = getattr(other, "op", None)
        if isinstance(carried, LinearOperator) and not isinstance(other, LinearOperator):
            other = carried  # an object carrying an operator (PMat*/FMat* of nngeo_ops.nn)
        if isinstance(other, LinearOperator):
            from .composites import Product

            # a @ b @ c is one flat product, so that patterns like Jᵀ·H·J are seen whole
            left = self.factors if isinstance(self, Product) else (self,)
            right = other.factors if isinstance(other, Product) else (other,)
            return Product(*left, *right)
        return self.matvec(other)

    def __rmatmul__(self, other: Any) -> Any:
        if isinstance(other, torch.Tensor):  # x @ A = (Aᵀ xᵀ)ᵀ
            return self.rmatvec(other.mT if other.dim() == 2 else other).mT
        carried = getattr(other, "op", None)
        if isinstance(carried, LinearOperator):
            return carried @ self
        return NotImplemented

    # ------------------------------------------------------------------ algebra (lazy)
    def __add__(self, other: Any) -> LinearOperator:
        if not isinstance(other, LinearOperator):
            return NotImplemented if not is_scalar(other) else _scalar_add_error(self)
        return _late("Sum")(self, other)

    def __radd__(self, other: Any) -> LinearOperator:
        if is_scalar(other) and not isinstance(other, LinearOperator):
            if scalar_float(other) == 0 and isinstance(other, numbers.Number):
                return self  # sum([...]) starts from 0
            _scalar_add_error(self)
        return NotImplemented

    def __sub__(self, other: Any) -> LinearOperator:
        if not isinstance(other, LinearOperator):
            return NotImplemented
        return self + (-1.0) * other

    def __neg__(self) -> LinearOperator:
        return (-1.0) * self

    def __mul__(self, c: Any) -> LinearOperator:
        if not is_scalar(c):
            return NotImplemented
        from .composites import Scale

        return Scale(c, self)

    __rmul__ = __mul__

    def __truediv__(self, c: Any) -> LinearOperator:
        if not is_scalar(c):
            return NotImplemented
        return (1.0 / c) * self

    @property
    def T(self) -> LinearOperator:
        """``Aᵀ`` as a lazy :class:`~nngeo_ops.ops.Transpose` node of shape ``(n, m)``."""
        from .composites import Transpose

        return Transpose(self)

    def inv(self) -> LinearOperator:
        """``A⁻¹`` as a lazy node; ``simplify()`` resolves it structurally where a rule exists."""
        from .symbolic import Inverse

        return Inverse(self)

    def pow(self, p: float) -> LinearOperator:
        """``A^p`` of a symmetric (PSD for non-integer ``p``) node, as a lazy node."""
        from .symbolic import Power

        return Power(self, p)

    def sqrt(self) -> LinearOperator:
        """``A^{1/2}`` of a symmetric PSD node, as a lazy node; same as ``pow(0.5)``."""
        return self.pow(0.5)

    def require_symmetric(self, what: str) -> None:
        """Raise :class:`~nngeo_ops.errors.NotSymmetricError` naming ``what`` unless the node is tagged
        symmetric.
        """
        if not self.symmetric:
            raise NotSymmetricError(
                f"{what} needs a symmetric operator, got {self._str()} of shape {self.shape} that is "
                "not tagged symmetric; build leaves with symmetric=True (or psd=True) if they are"
            )

    # ------------------------------------------------------------------ quantities (compiled)
    def compile(self, policy: Any = None) -> Any:
        """Rewrite the tree and return a :class:`~nngeo_ops.ops.compile.Compiled` object."""
        from .compile import Compiled

        return Compiled(self, policy)

    def compiled(self) -> Any:
        """The :class:`~nngeo_ops.ops.Compiled` form that the convenience calls (``solve``,
        ``logdet``, ``diag``, ``trace``, ...) of this node use, cached on the node against the
        versions of its leaves (an in-place update of a leaf gives a fresh one).

        ``node.compiled().explain()`` shows the routes those calls took. When a leaf requires grad
        (and grad mode is on) nothing is cached, so every call builds a fresh autograd graph and
        ``backward`` can be called after each one. :meth:`compile` always builds a new one (and
        takes a policy).
        """
        Compiled = _late("Compiled")
        # one walk of the tree for both questions (this runs cold at every solve)
        leaves = tuple(self.leaf_tensors())
        if records_grad(*leaves):
            return Compiled(self)
        fp = _fingerprint(leaves)
        cached = self.__dict__.get("_auto_cache")
        if cached is None or cached[0] != fp:
            cached = (fp, Compiled(self, fingerprint=fp))  # its checksums are read, not redone
            self._auto_cache = cached
        return cached[1]

    _auto = compiled  # the former private name

    def simplify(self) -> LinearOperator:
        """The tree after the ``"rewrite"`` rules (structural simplifications), cached against the leaves."""
        return self.compiled().simplified

    def to_dense(self) -> torch.Tensor:
        """The operator as a dense ``(m, n)`` tensor (here ``A @ I``; structured nodes override this)."""
        eye = torch.eye(self.shape[1], dtype=self.dtype, device=self.device)
        return self._matmat(eye)

    def solve(self, b: torch.Tensor) -> torch.Tensor:
        """``A⁻¹ b`` for a vector ``(n,)`` or matrix ``(n, k)`` right-hand side."""
        return self.compiled().solve(b)

    def logdet(self) -> torch.Tensor:
        """``log det A`` of a square node via the compiled routines; raises
        :class:`~nngeo_ops.errors.NotPSDError` when the determinant is negative.
        """
        return self.compiled().logdet()

    def slogdet(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sign, log|det A|)`` of a square node via the compiled routines."""
        return self.compiled().slogdet()

    def diag(self) -> torch.Tensor:
        """The diagonal ``(A_ii)`` via the compiled routines (estimated, with a
        warning, where no exact routine exists and the policy allows it).
        """
        return self.compiled().diag()

    def trace(self) -> torch.Tensor:
        """``tr A = Σᵢ A_ii`` of a square node, a 0-dim tensor, via the compiled routines."""
        return self.compiled().trace()

    def eigh(self) -> Any:
        """The eigendecomposition of a symmetric node as an :class:`~nngeo_ops.ops.Eigen` node
        ``Q·diag(λ)·Qᵀ`` (eigenvalues in the order of ``Q``'s columns, not sorted).
        """
        return self.compiled().eigh()

    def frobenius_norm(self) -> torch.Tensor:
        """``‖A‖_F = (Σᵢⱼ A_ij²)^{1/2}``, a 0-dim tensor, via the compiled routines."""
        return self.compiled().frobenius_norm()

    def to_scipy(self) -> Any:
        """A ``scipy.sparse.linalg.LinearOperator`` over this node (matvec, rmatvec, matmat)."""
        from ..linalg.scipy_adapter import to_scipy

        return to_scipy(self)

    def to_scipy_inverse(self, sigma: float = 0.0) -> Any:
        """A scipy operator applying ``(A − σI)⁻¹``, for shift-invert ``eigsh(..., OPinv=...)``."""
        from ..linalg.scipy_adapter import inverse_to_scipy
        from .diagonal import Identity

        shifted = self if sigma == 0 else self - sigma * Identity(self.shape[0])
        return inverse_to_scipy(self, sigma=sigma, solve=shifted.solve, symmetric=self.symmetric)

    # ------------------------------------------------------------------ printing
    def __str__(self) -> str:
        return self._str()

    def tags(self) -> list[str]:
        """The structural tags that hold, among ``"symmetric"``, ``"psd"`` and ``"orthogonal"``."""
        return [t for t in ("symmetric", "psd", "orthogonal") if getattr(self, t)]

    def __repr__(self) -> str:
        m, n = self.shape
        dt = str(self.dtype).replace("torch.", "")
        return (
            f"<{type(self).__name__} {m}×{n} {dt} {self.device} [{', '.join(self.tags())}]: {self}>"
        )


def _fingerprint(leaves: tuple[torch.Tensor, ...]) -> tuple:
    """:meth:`LinearOperator.fingerprint` of a node whose leaf tensors are ``leaves``."""
    return tuple([(id(t), t._version, _checksum(t)) for t in leaves])


_LATE: dict[str, Any] = {}


def _late(name: str) -> Any:
    """The class ``name`` of a module that imports this one (``Sum``, ``Compiled``), looked up once:
    an import statement in a method costs ~10 µs run cold (after a forward+backward), where the
    first damped solve of a diagonal runs."""
    hit = _LATE.get(name)
    if hit is None:
        from . import compile, composites

        hit = _LATE[name] = getattr(compile if name == "Compiled" else composites, name)
    return hit


def _scalar_add_error(A: LinearOperator) -> LinearOperator:
    raise ArgumentTypeError(
        f"adding a scalar to an operator is ambiguous; write A + c * Identity({A.shape[0]}) "
        "to add c times the identity"
    )


def as_operator(x: Any) -> LinearOperator:
    """Wrap a tensor as :class:`Dense`; pass nodes through."""
    if isinstance(x, LinearOperator):
        return x
    if isinstance(x, torch.Tensor):
        from .dense import Dense

        return Dense(x)
    carried = getattr(x, "op", None)
    if isinstance(carried, LinearOperator):
        return carried  # a representation carrying its operator (PMat*/FMat* of nngeo_ops.nn)
    raise ArgumentTypeError(
        f"expected a LinearOperator or a torch.Tensor, got {type(x).__name__}; wrap a matrix "
        "with Dense(M), a function with MatFree(f, shape), and pass F.op for a representation F"
    )


def harmonise(nodes: tuple[LinearOperator, ...]) -> tuple[LinearOperator, ...]:
    """Give identities built without a dtype the dtype/device of the other operands, then check.

    ``Identity(n)`` without a dtype is 'flexible' so that ``F + 1e-3 * Identity(n)`` works for an
    ``F`` of any dtype; every other mismatch is an error.
    """
    first = nodes[0]
    for x in nodes:
        if x.dtype != first.dtype or x.device != first.device:
            break
    else:
        return nodes  # one dtype and device already: nothing to convert or refuse
    fixed = [x for x in nodes if not getattr(x, "flexible", False)]
    if fixed:
        dtype, device = fixed[0].dtype, fixed[0].device
        nodes = tuple(
            x.to(dtype, device)
            if getattr(x, "flexible", False) and (x.dtype, x.device) != (dtype, device)
            else x
            for x in nodes
        )
    for x in nodes[1:]:
        if x.dtype != nodes[0].dtype or x.device != nodes[0].device:
            raise DTypeDeviceError(
                f"cannot combine {nodes[0]._str()} ({nodes[0].dtype}, {nodes[0].device}) with "
                f"{x._str()} ({x.dtype}, {x.device}); convert one with .to(dtype=..., device=...)"
            )
    return nodes
