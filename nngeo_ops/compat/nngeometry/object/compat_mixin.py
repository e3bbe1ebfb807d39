"""The mixin behind every NNGeometry-compatible representation of :mod:`.pspace`: NNGeometry's
methods (``inv``, ``pow``, ``solve`` with its ``solve=`` choices, ``pinv``, ``vTMv``, ``norm``,
``to_torch(split_weight_bias=...)``, pickling without the generator) on top of the ops node
``.op`` of one of our representations, and the helpers they share. The conventions are listed in
:mod:`.pspace`."""

from __future__ import annotations

import warnings

import torch

from ....errors import UnsupportedError
from ....nn.fspace.fmat import mapTMmap as _mapTMmap
from ....nn.fspace.pfmap import PFMap
from ....nn.params import PVector as _PVector
from ....nn.pspace import base as _pm
from ....ops import Eigen
from .._errors import NoGeneratorError, NormOrderError, UnsupportedCompatError
from ..backend.dummy import DummyGenerator
from ..backend.torch_hooks.torch_hooks import TorchHooksJacobianBackend
from ..layercollection import LayerCollection
from .map import PFMapDense
from .vector import PVector

SOLVES = ("default", "solve", "eigh", "cholesky", "inv")


class _DataGenerator:
    """What our representations read from a generator when built from ``data`` alone."""

    def __init__(self, layer_collection, dtype=None, device=None):
        self.layer_collection = layer_collection
        self.is_hessian = False
        self.kind = "exact"
        self.dtype = dtype
        self.device = device


def kron_order(layer_collection) -> torch.Tensor | None:
    """The permutation from parameter order to NNGeometry's Kronecker-interleaved order.

    ``perm[k]`` is the parameter index at interleaved position k; layers of kind Linear / Conv1d /
    Conv2d with a bias interleave: position o·(n_in + 1) + i is W[o, i] for i < n_in, b[o] for
    i = n_in. None when no layer interleaves.
    """
    parts, moved = [], False
    for lid, entry in layer_collection.items():
        start = layer_collection.p_pos[lid]
        n = entry.numel()
        if entry.kind in ("Linear", "Conv1d", "Conv2d") and entry.attrs == ("weight", "bias"):
            n_out = entry.shapes[1][0]
            n_in = entry.numels[0] // n_out
            w = torch.arange(n_out * n_in).view(n_out, n_in)
            b = n_out * n_in + torch.arange(n_out).view(n_out, 1)
            parts.append(start + torch.cat([w, b], dim=1).reshape(-1))
            moved = True
        else:
            parts.append(start + torch.arange(n))
    return torch.cat(parts) if moved else None


def as_loader(examples):
    """NNGeometry accepts one batch (a tensor, or a list / tuple of tensors as a DataLoader yields
    it) where a loader is expected: wrap it as a loader of one batch."""
    if torch.is_tensor(examples):
        return [(examples,)]
    if isinstance(examples, list | tuple) and examples and torch.is_tensor(examples[0]):
        return [tuple(examples)]
    return examples


def _detached(pmat):
    """A shallow copy of one of our representations whose generator is a ``DummyGenerator``."""
    state = dict(pmat.__dict__)
    state.pop("_damped_nodes", None)  # caches, rebuilt on first use
    state["generator"] = DummyGenerator(pmat.op.device)
    if "compat_backend" in state:
        state["compat_backend"] = None
    if "sub_pmats" in state:
        state["sub_pmats"] = type(state["sub_pmats"])(
            (k, _detached(v)) for k, v in state["sub_pmats"].items()
        )
    clone = object.__new__(type(pmat))
    clone.__dict__.update(state)
    return clone


def _check_generator(pmat, what):
    if isinstance(pmat.generator, DummyGenerator):
        raise NoGeneratorError(
            f"{what} needs the model and a function, but this {type(pmat).__name__} was restored "
            "from a pickle, which keeps the data and not the generator; build a new one with a "
            "backend to refit it"
        )


def _pinv_node(op, atol):
    """The pseudo-inverse of a symmetric node with the eigenvalues ≤ ``atol`` set to zero."""
    e = op.eigh()
    ev = e.evals
    inv = torch.where(ev <= atol, torch.zeros_like(ev), 1.0 / torch.where(ev <= atol, 1, ev))
    return Eigen(e.Q, inv)


def _zeros_like(data):
    if torch.is_tensor(data):
        return torch.zeros_like(data)
    if isinstance(data, dict):
        return {k: _zeros_like(v) for k, v in data.items()}
    return data


def _factor_eigenvalues(pmat) -> torch.Tensor:
    """All eigenvalues of one of our KFAC / EKFAC matrices from its factors, per layer: λ_G ⊗ λ_A
    (the parameter-order permutation does not change them), the fitted diagonal for EKFAC, the
    dense blocks' own eigenvalues."""
    out = []
    for lid in pmat.layer_collection.layers:
        f = pmat.data[lid]
        if "block" in f:
            out.append(torch.linalg.eigvalsh(f["block"]))
            continue
        if "diag" in f:
            out.append(f["diag"])
        else:
            a, g = pmat.get_factors(lid)
            ea = a if a.dim() == 1 else torch.linalg.eigvalsh(a)
            out.append(torch.kron(torch.linalg.eigvalsh(g), ea))
        if "bias" in f:
            out.append(torch.linalg.eigvalsh(f["bias"]))
    return torch.cat(out)


class _Compat:
    """NNGeometry's methods on one of our representations (``self.op`` over ``self.layer_collection``)."""

    _jacobian_kind = (
        None  # the kind computed from the materialised Jacobian (centering, conv switch)
    )
    _ours = None  # our class, whose constructor this one wraps

    def _compat_init(self, layer_collection, generator, data, examples, **kw):
        examples = as_loader(examples)
        backend = generator if hasattr(generator, "curvature_generator") else None
        self.compat_backend = backend
        if backend is not None:
            lc = layer_collection
            if lc is None:
                lc = LayerCollection.from_model(backend.model)
            if data is None and backend.uses_jacobian_route:
                data = self._jacobian_data(backend, examples, lc)
                examples = None
            gen = backend.curvature_generator(lc)
        elif generator is None:
            if data is None or layer_collection is None:
                raise UnsupportedCompatError(
                    f"{type(self).__name__} needs a generator and examples, or data and a "
                    "layer_collection"
                )
            gen = _DataGenerator(layer_collection)
        else:
            gen = generator
        try:
            self._ours.__init__(self, gen, data=data, examples=examples, **kw)
        except UnsupportedError as err:
            # a covered module the function never calls (the backend's model is not the one its
            # function runs): the Jacobian route (torch.func on the whole function) still applies
            if backend is None or data is not None or "never called" not in str(err):
                raise
            if self._jacobian_kind is not None:
                data = self._jacobian_data(backend, examples, lc)
            else:
                data = self._zero_data(backend, lc, examples, **kw)
            self._ours.__init__(self, gen, data=data, **kw)

    def _zero_data(self, backend, lc, examples, **kw):
        """The data of the zero matrix, shaped by one build with the model's own forward.

        When the backend's function never calls the covered modules, the function does not depend
        on their parameters and every curvature matrix over them is exactly zero; Kronecker-factored
        representations get zero factors of the right sizes."""
        own = TorchHooksJacobianBackend(backend.model, verbose=backend.verbose)
        probe = self._ours(own.curvature_generator(lc), examples=examples, **kw)
        return _zeros_like(probe.data)

    def _jacobian_data(self, backend, examples, lc):
        if self._jacobian_kind is None or not hasattr(backend, "stats_from_jacobian"):
            raise UnsupportedCompatError(
                f"{type(self).__name__} cannot be formed from the materialised Jacobian (needed "
                "for centering=True, use_conv_impl_for_convs, or a model whose covered modules are "
                "called only through another model's forward); use PMatDense, PMatDiag, "
                "PMatBlockDiag or PMatLowRank"
            )
        return backend.stats_from_jacobian(self._jacobian_kind, examples, lc)

    # ------------------------------------------------------------------ pickling
    def __getstate__(self):
        """NNGeometry's pickling: the data without the generator (its function is often a local
        closure), replaced on loading by a ``DummyGenerator`` that knows the device only; all
        products, solves and spectra work on the restored object, refits (``update_diag``) raise
        :class:`NoGeneratorError` (an AttributeError, as in NNGeometry)."""
        return _detached(self).__dict__

    # ------------------------------------------------------------------ results as compat objects
    def _wrap(self, like, flat):
        if isinstance(like, _PVector):
            return PVector(self.layer_collection, vector_repr=flat)
        return flat

    def _expr(self, op):
        from .pspace import PMatExpr  # the class is built on this mixin: imported at call time

        return PMatExpr(self.layer_collection, op, self.generator)

    def _wrap_ours(self, res):
        if isinstance(res, _pm.PMatAbstract) and not isinstance(res, _Compat):
            return self._expr(res.op)
        return res

    def __add__(self, other):
        return self._wrap_ours(super().__add__(other))

    __radd__ = __add__

    def __sub__(self, other):
        return self._wrap_ours(super().__sub__(other))

    def __mul__(self, c):
        return self._wrap_ours(super().__mul__(c))

    __rmul__ = __mul__

    def __neg__(self):
        return self._wrap_ours(super().__neg__())

    def __truediv__(self, c):
        return self._wrap_ours(super().__truediv__(c))

    def mm(self, other):
        """The product with another matrix over the same parameters (lazy)."""
        return self._wrap_ours(super().__matmul__(other))

    def __matmul__(self, x):
        if isinstance(x, PFMap):
            return self.mmap(x)
        return self._wrap_ours(super().__matmul__(x))

    def mmap(self, pfmap) -> PFMapDense:
        """M applied to every row of a Jacobian: [C, N, P] -> [C, N, P]."""
        data = pfmap.to_torch()
        c, n, p = data.shape
        rows = data.reshape(c * n, p)
        out = (self.op @ rows.to(self.op.dtype).T).T
        return PFMapDense(pfmap.layer_collection, self.generator, data=out.reshape(c, n, p))

    def get_device(self):
        return self.op.device

    # ------------------------------------------------------------------ norms, spectra
    def _eigenvalues(self) -> torch.Tensor:
        e = self.op.eigh()
        ev = e.evals
        if not e.full:  # a truncated spectrum: the rest of the eigenvalues are zero
            ev = torch.cat([ev, ev.new_zeros(1)])
        return ev

    def norm(self, ord=None):
        """Frobenius (None, "fro"), spectral (2: largest |λ|) or smallest |λ| (-2) norm of the
        symmetric matrix; any other ``ord`` raises (RuntimeError, as in NNGeometry)."""
        if ord is None or ord == "fro":
            return self.op.frobenius_norm()
        if ord in (2, -2):
            ev = self._eigenvalues().abs()
            return ev.max() if ord == 2 else ev.min()
        raise NormOrderError(f"norm order {ord!r} is not supported; use None, 'fro', 2 or -2")

    def frobenius_norm(self):
        warnings.warn(
            "frobenius_norm() is deprecated: use norm()", DeprecationWarning, stacklevel=2
        )
        return self.norm("fro")

    def compute_eigendecomposition(self, impl: str = "eigh") -> None:
        """Sets ``evals`` (ascending) and ``evecs`` (columns); ``impl`` is "eigh" or "svd" (the
        same symmetric eigendecomposition; the node picks its structured route)."""
        if impl not in ("eigh", "svd"):
            raise UnsupportedCompatError(f"impl must be 'eigh' or 'svd', got {impl!r}")
        self.evals, self.evecs = _pm.PMatAbstract.get_eigendecomposition(self)

    def get_eigendecomposition(self):
        if not hasattr(self, "evals"):
            self.compute_eigendecomposition()
        return self.evals, self.evecs

    # ------------------------------------------------------------------ inverses and solves
    def inv(self, regul: float = 1e-8):
        """(M + regul·I)⁻¹, lazily."""
        return self._expr(self._damped(regul).inv())

    def inverse(self, regul: float = 1e-8, *args, **kwargs):
        """Deprecated alias of :meth:`inv` (NNGeometry's), with a DeprecationWarning."""
        warnings.warn("inverse() is deprecated: use inv()", DeprecationWarning, stacklevel=2)
        return self.inv(regul, *args, **kwargs)

    def pow(self, p: float, regul: float = 0.0):
        return self._expr(self._damped(regul).pow(p))

    def __pow__(self, p):
        return self.pow(p)

    def _pinv_op(self, atol):
        return _pinv_node(self.op, atol)

    def pinv(self, atol: float = 1e-8):
        """The pseudo-inverse with the eigenvalues ≤ ``atol`` set to zero."""
        return self._expr(self._pinv_op(atol))

    def _solve_op(self, regul, solve, **kw):
        if solve == "lstsq":
            return self._pinv_op(regul)
        if solve in SOLVES:
            return self._damped(regul).inv()
        raise UnsupportedCompatError(
            f"solve={solve!r} is not available for {type(self).__name__}; use 'default' or 'lstsq'"
        )

    def solve(self, x, regul: float = 1e-8, solve: str = "default", **kw):
        """(M + regul·I)⁻¹ x for a PVector or each row of a PFMap (``solve="lstsq"``: the
        pseudo-inverse with eigenvalues ≤ regul dropped)."""
        op = self._solve_op(regul, solve, **kw)
        if isinstance(x, PFMap):
            data = x.to_torch()
            c, n, p = data.shape
            out = (op @ data.reshape(c * n, p).T).T.reshape(c, n, p)
            return PFMapDense(x.layer_collection, self.generator, data=out)
        flat = self._flat(x)
        res = op @ flat
        return PVector(self.layer_collection, vector_repr=res) if isinstance(x, _PVector) else res

    def solvePVec(self, x, regul: float = 1e-8, solve: str = "default", **kw):
        return self.solve(x, regul=regul, solve=solve, **kw)

    def solvePFMap(self, x, regul: float = 1e-8, solve: str = "default", **kw):
        return self.solve(x, regul=regul, solve=solve, **kw)

    # ------------------------------------------------------------------ layouts
    def to_torch(self, split_weight_bias: bool = True) -> torch.Tensor:
        """The dense matrix; ``split_weight_bias=False``: NNGeometry's interleaved layout."""
        m = self.op.to_dense()
        if not split_weight_bias:
            perm = kron_order(self.layer_collection)
            if perm is not None:
                m = m[perm][:, perm]
        return m

    get_dense_tensor = to_torch

    def get_diag(self, split_weight_bias: bool = True) -> torch.Tensor:
        d = self.op.diag()
        if not split_weight_bias:
            perm = kron_order(self.layer_collection)
            if perm is not None:
                d = d[perm]
        return d

    def mapTMmap(self, pfmap, reduction: str = "sum"):
        """Per-example J M Jᵀ: ``"diag"`` (C, N), ``"sum"`` (N,) (NNGeometry's default)."""
        return _mapTMmap(self, pfmap, reduction)


def _compat_class(ours, jacobian_kind=None, doc=None):
    def __init__(self, layer_collection=None, generator=None, data=None, examples=None, **kw):
        self._compat_init(layer_collection, generator, data, examples, **kw)

    cls = type(
        ours.__name__,
        (_Compat, ours),
        {
            "__init__": __init__,
            "_ours": ours,
            "_jacobian_kind": jacobian_kind,
            # pickled by reference to where users import it (NNGeometry's module path)
            "__module__": __name__.rsplit(".", 1)[0] + ".pspace",
            "__doc__": doc
            or f"Our :class:`{ours.__module__}.{ours.__name__}` with NNGeometry's API.",
        },
    )
    return cls
