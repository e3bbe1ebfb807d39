"""NNGeometry's ``nngeometry.object.pspace``: our representations with NNGeometry's signatures.

Every class here *is* one of ours (:mod:`nngeo_ops.nn.pspace.base`, :mod:`~nngeo_ops.nn.pspace.kfac`,
:mod:`~nngeo_ops.nn.pspace.mixed`) with a mixin adding NNGeometry's methods on top of the ops node ``.op``.
Constructors take NNGeometry's ``(layer_collection, generator, data=None, examples=None)``, where
``generator`` is a compat backend (``TorchHooksJacobianBackend``, ``TorchFuncHessianBackend``), one of
our generators (as our ``FIM`` passes it) or None with ``data``.

Where NNGeometry's convention differs from ours, the classes here follow NNGeometry's:

* KFAC ``inv`` / ``pow`` / ``solve`` use the factored π-damping (A + π√λ I) ⊗ (G + √λ/π I) unless
  ``use_pi=False`` (plain (A + √λ I) ⊗ (G + √λ I) is then NNGeometry's; we keep our exact
  damping F + λI for ``use_pi=False`` only through ``nngeo_ops.nn`` directly), and ``pow`` damps
  with ``regul=1e-8`` by default;
* EKFAC built from examples keeps the KFAC eigenvalues until :meth:`update_diag` (ours refits at
  construction);
* ``to_torch(split_weight_bias=False)`` / ``get_diag(split_weight_bias=False)`` use NNGeometry's
  Kronecker-interleaved layout inside Linear / Conv layers with a bias (row o of [W | b], i.e.
  W[o, :] then b[o]); the default ``True`` is the parameter order (all of W, then b);
* ``solve(..., solve="lstsq")`` and ``pinv(atol)`` zero the eigenvalues ≤ the threshold;
* ``inverse()`` is NNGeometry's deprecated alias of ``inv()`` (a DeprecationWarning), kept where
  NNGeometry had it;
* pickling keeps the data and drops the generator (a ``DummyGenerator`` on loading), as
  NNGeometry's ``__getstate__`` does: its function is usually a local closure;
* ``PMatMixed`` takes NNGeometry's constructor and ``from_mapping``, and inverts / solves part by
  part when a part is KFAC (π-damped there) or the solve is chosen per part.
"""

from __future__ import annotations

import functools
import warnings

import torch

from .... import ops as _ops
from ....errors import UnsupportedError
from ....linalg import cg as _cg
from ....nn.fspace.fmat import mapTMmap as _mapTMmap
from ....nn.fspace.pfmap import PFMap
from ....nn.params import PVector as _PVector
from ....nn.pspace import base as _pm
from ....nn.pspace import kfac as _kf
from ....nn.pspace import mixed as _mx
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
            "__module__": __name__,
            "__doc__": doc
            or f"Our :class:`{ours.__module__}.{ours.__name__}` with NNGeometry's API.",
        },
    )
    return cls


PMatDense = _compat_class(_pm.PMatDense, "dense")
PMatDiag = _compat_class(_pm.PMatDiag, "diag")
PMatBlockDiag = _compat_class(_pm.PMatBlockDiag, "blockdiag")
PMatLowRank = _compat_class(_pm.PMatLowRank, "lowrank")


class PMatExpr(_Compat, _pm.PMatExpr):
    """The result of arithmetic, inverses and powers: any ops expression over the parameters."""

    def __init__(self, layer_collection, op, generator=None):
        _pm.PMatExpr.__init__(self, layer_collection, op, generator)


PMatQuasiDiag = _compat_class(_kf.PMatQuasiDiag)


def _no_inverse(self, *args, **kwargs):
    raise UnsupportedCompatError(
        f"{type(self).__name__} has no deprecated inverse() (nor had it in NNGeometry); use inv()"
    )


PMatQuasiDiag.inverse = _no_inverse


class PMatImplicit(_Compat, _pm.PMatImplicit):
    """Products only; ``solve`` is NNGeometry's preconditioned CG (``M``: a representation used as
    preconditioner through its own damped solve, ``x0``, ``max_iter``, ``rtol``, ``atol``)."""

    _ours = _pm.PMatImplicit

    def __init__(self, layer_collection=None, generator=None, data=None, examples=None, **kw):
        self._compat_init(layer_collection, generator, data, examples, **kw)

    def solve(self, x, regul=1e-8, solve="cg", M=None, x0=None, max_iter=None, rtol=1e-5, atol=0.0):
        if solve not in ("cg", "default"):
            raise UnsupportedCompatError(f"PMatImplicit solves by CG, not {solve!r}")
        if isinstance(x, PFMap):
            raise UnsupportedCompatError("PMatImplicit solves PVectors; solve each row instead")
        b = self._flat(x)
        a = self._damped(regul)
        pre = None
        if M is not None:
            mop = M._damped(regul)
            pre = lambda r: mop.solve(r)  # noqa: E731
        x0t = self._flat(x0) if x0 is not None else None
        maxiter = max_iter if max_iter is not None else 10 * b.shape[0]
        with warnings.catch_warnings():
            warnings.simplefilter(
                "ignore"
            )  # NNGeometry returns the iterate after max_iter silently
            sol, _ = _cg(a, b, M=pre, x0=x0t, tol=rtol, atol=atol, maxiter=maxiter)
        return PVector(self.layer_collection, vector_repr=sol) if isinstance(x, _PVector) else sol

    solvePVec = solve

    def __getstate__(self):
        raise UnsupportedCompatError(
            "a PMatImplicit holds its model and data only through its generator and cannot be "
            "pickled; pickle a PMatDense (or another representation with data) instead"
        )


class PMatKFAC(_Compat, _kf.PMatKFAC):
    """KFAC with NNGeometry's π-damped ``inv`` / ``pow`` / ``solve`` (``use_pi=True`` default)."""

    _ours = _kf.PMatKFAC

    def __init__(self, layer_collection=None, generator=None, data=None, examples=None, **kw):
        self._compat_init(layer_collection, generator, data, examples, **kw)

    def _factored(self, regul, use_pi):
        if use_pi:
            return self._pi_damped(regul)
        # NNGeometry's use_pi=False: (A + √λ I) ⊗ (G + √λ I), i.e. π = 1
        return self._pi_damped(regul, pi=1.0)

    def inv(self, regul=1e-8, use_pi=True):
        return self._expr(self._factored(regul, use_pi).inv())

    def pow(self, p, regul=1e-8, use_pi=True):
        return self._expr(self._factored(regul, use_pi).pow(p))

    def _solve_op(self, regul, solve, use_pi=True, **kw):
        if solve == "lstsq":
            return self._pinv_op(regul)
        if solve in SOLVES:
            return self._factored(regul, use_pi).inv()
        raise UnsupportedCompatError(f"solve={solve!r} is not available for PMatKFAC")

    def _eigenvalues(self):
        return _factor_eigenvalues(self)

    def compute_eigendecomposition(self, impl: str = "eigh") -> None:
        """Per layer: ``evals[lid] = (λ_A, λ_G)``, ``evecs[lid] = (Q_A, Q_G)`` of the factors."""
        if impl != "eigh":
            raise UnsupportedCompatError(f"impl must be 'eigh', got {impl!r}")
        self.evals, self.evecs = {}, {}
        for lid in self.layer_collection.layers:
            a, g = self.get_factors(lid)
            if a.dim() == 1:
                a = torch.diag(a)
            ea, qa = torch.linalg.eigh(a)
            eg, qg = torch.linalg.eigh(g)
            self.evals[lid], self.evecs[lid] = (ea, eg), (qa, qg)


class PMatEKFAC(_Compat, _kf.PMatEKFAC):
    """EKFAC as NNGeometry builds it: equal to KFAC until :meth:`update_diag` refits the diagonal."""

    _ours = _kf.PMatEKFAC

    def __init__(self, layer_collection=None, generator=None, data=None, examples=None, **kw):
        kw.setdefault("fit_diag", False)
        self._compat_init(layer_collection, generator, data, examples, **kw)

    def pow(self, p, regul=1e-8):
        return self._expr(self._damped(regul).pow(p))

    def _eigenvalues(self):
        return _factor_eigenvalues(self)

    def update_diag(self, examples):
        _check_generator(self, "update_diag")
        super().update_diag(examples)
        self.__dict__.pop("_damped_nodes", None)
        return self


class PMatMixed(_Compat, _mx.PMatMixed):
    """Our mixed representation: per-layer blocks of several representations in one ``BlockDiag``.

    Three ways to build one:

    * NNGeometry's constructor, from representations already built over disjoint parts of the
      collection: ``PMatMixed(layer_collection, generator, layer_collection_each, layer_map,
      sub_pmats)`` with ``sub_pmats = {representation class: matrix over its layers}``,
      ``layer_map = {layer_id: representation class}`` (``layer_collection_each`` is accepted and
      kept, as NNGeometry keeps it);
    * NNGeometry's :meth:`from_mapping` (layer classes such as ``LinearLayer`` as keys);
    * ours: ``PMatMixed(layer_collection, generator, examples=..., default=PMatBlockDiag,
      by_kind={"Linear": PMatEKFAC, ...})`` (module class names as keys).
    """

    _ours = _mx.PMatMixed

    def __init__(self, layer_collection=None, generator=None, *args, **kw):
        if len(args) == 3 or "sub_pmats" in kw:
            names = ("layer_collection_each", "layer_map", "sub_pmats")
            kw.update(zip(names, args))
            self._join_built(layer_collection, generator, **kw)
            return
        data, examples = (list(args) + [None, None])[:2]
        data, examples = kw.pop("data", data), kw.pop("examples", examples)
        self._compat_init(layer_collection, generator, data, examples, **kw)

    def _join_built(self, layer_collection, generator, layer_collection_each, layer_map, sub_pmats):
        """NNGeometry's constructor: join representations built beforehand (no pass over data)."""
        covered = [lid for pmat in sub_pmats.values() for lid in pmat.layer_collection.layers]
        if sorted(covered) != sorted(layer_collection.layers):
            raise UnsupportedCompatError(
                "the sub-representations must cover the layers of layer_collection exactly once; "
                f"they cover {sorted(covered)}, the collection has {sorted(layer_collection.layers)}"
            )
        self.layer_collection_each = layer_collection_each
        self.layer_map = dict(layer_map)
        self.sub_pmats = dict(sub_pmats)
        self.compat_backend = generator if hasattr(generator, "curvature_generator") else None
        _pm.PMatAbstract.__init__(self, layer_collection, self._join(layer_collection), generator)

    @classmethod
    def from_mapping(
        cls,
        layer_collection,
        generator,
        default_representation,
        map_layers_to,
        data=None,
        examples=None,
        **kwargs,
    ):
        """NNGeometry's builder: layers whose class (``LinearLayer``, ``Conv2dLayer``, ...) is a
        key of ``map_layers_to`` get that representation, the others ``default_representation``;
        each representation is built over its layers (one pass over ``examples`` each)."""
        each, layer_map = {}, {}
        for lid, layer in layer_collection.layers.items():
            rep = map_layers_to.get(type(layer), default_representation)
            each.setdefault(rep, LayerCollection()).add_layer(lid, layer)
            layer_map[lid] = rep
        sub_pmats = {}
        for rep, lc in each.items():
            gen = generator
            if not hasattr(generator, "curvature_generator"):  # one of our generators
                gen = _mx.restricted_generator(generator, lc)
            sub_pmats[rep] = rep(
                layer_collection=lc, generator=gen, data=data, examples=examples, **kwargs
            )
        return cls(layer_collection, generator, each, layer_map, sub_pmats)

    def update_diag(self, examples):
        _check_generator(self, "update_diag")
        super().update_diag(examples)
        return self

    # NNGeometry inverts, solves and pseudo-inverts a mixed matrix part by part, each part with its
    # own convention: a KFAC part is π-damped (every other part is damped exactly, which for a
    # block-diagonal matrix is the same as damping the whole). Parts that are KFAC, or a ``solve``
    # chosen per part (a dict), take that route: Pᵀ·BlockDiag(part inverses)·P, with P the
    # permutation from the collection's flat order to the parts' concatenated orders.
    def _by_part(self, solve) -> bool:
        return isinstance(solve, dict) or any(
            isinstance(p, _kf.PMatKFAC) and not isinstance(p, _kf.PMatEKFAC)
            for p in self.sub_pmats.values()
        )

    def _join_parts(self, part_op):
        lc = self.layer_collection
        idx = []
        for pmat in self.sub_pmats.values():
            for lid, entry in pmat.layer_collection.layers.items():
                idx.append(lc.p_pos[lid] + torch.arange(entry.numel()))
        perm = _ops.Permutation(torch.cat(idx), dtype=self.op.dtype, device=self.op.device)
        blocks = [part_op(key, pmat) for key, pmat in self.sub_pmats.items()]
        return perm.T @ _ops.BlockDiag(blocks) @ perm

    @staticmethod
    def _part_inverse(pmat, regul, solve):
        if solve == "lstsq":
            return _pinv_node(pmat.op, regul)
        if isinstance(pmat, _Compat):
            return pmat._solve_op(regul, solve)
        if isinstance(pmat, _kf.PMatKFAC) and not isinstance(pmat, _kf.PMatEKFAC):
            return pmat._pi_damped(regul).inv()
        return pmat._damped(regul).inv()

    def _solve_op(self, regul, solve, **kw):
        if not self._by_part(solve):
            return super()._solve_op(regul, solve, **kw)
        pick = solve.get if isinstance(solve, dict) else (lambda key, default: solve)
        return self._join_parts(
            lambda key, pmat: self._part_inverse(pmat, regul, pick(key, "default"))
        )

    def inv(self, regul: float = 1e-8):
        """(M + regul·I)⁻¹ part by part (a KFAC part π-damped, as NNGeometry's)."""
        if not self._by_part("default"):
            return super().inv(regul)
        return self._expr(self._solve_op(regul, "default"))

    def _eigenvalues(self):
        parts = []
        for pmat in self.sub_pmats.values():
            if isinstance(pmat, _kf.PMatKFAC):
                parts.append(_factor_eigenvalues(pmat))
            else:
                parts.append(pmat.op.eigh().evals)
        return torch.cat(parts)


class PMatEKFACBlockDiag(PMatMixed):
    """EKFAC on Linear / Conv1d / Conv2d / Embedding layers (not refitted until
    :meth:`update_diag`, as NNGeometry's), a dense block on every other layer."""

    def __init__(self, layer_collection=None, generator=None, data=None, examples=None):
        ekfac = functools.partial(_kf.PMatEKFAC, fit_diag=False)
        super().__init__(
            layer_collection,
            generator,
            data=data,
            examples=examples,
            default=_pm.PMatBlockDiag,
            by_kind={k: ekfac for k in _mx.EKFAC_KINDS},
        )


_ONE = torch.tensor(1.0)  # NNGeometry's default scaling, created at import (default dtype then)


class PMatEye(_Compat, _pm.PMatEye):
    """scaling · I. Products keep the dtype of the vector (as NNGeometry's ``scaling * v``)."""

    def __init__(self, layer_collection=None, scaling=_ONE, generator=None, **kw):
        if layer_collection is None:
            layer_collection = generator.layer_collection
        if not torch.is_tensor(scaling):
            scaling = torch.tensor(scaling, dtype=torch.get_default_dtype())
        _pm.PMatEye.__init__(self, layer_collection=layer_collection, scaling=scaling)
        self.generator = generator

    def _like(self, scaling):
        return PMatEye(self.layer_collection, scaling=scaling, generator=self.generator)

    def mv(self, v):
        flat = self._flat(v)
        res = self.scaling * flat
        return PVector(self.layer_collection, vector_repr=res) if isinstance(v, _PVector) else res

    def vTMv(self, v):
        flat = self._flat(v)
        return self.scaling * torch.dot(flat, flat)

    def trace(self):
        return self.scaling * self.layer_collection.numel()

    def norm(self, ord=None):
        if ord is None or ord == "fro":
            n = torch.tensor(float(self.layer_collection.numel()), dtype=self.scaling.dtype)
            return self.scaling.abs() * n.sqrt()
        if ord in (2, -2):
            return self.scaling.abs()
        raise NormOrderError(f"norm order {ord!r} is not supported; use None, 'fro', 2 or -2")

    def solve(self, x, regul=1e-8, solve="default", **kw):
        if isinstance(x, PFMap):
            return PFMapDense(
                x.layer_collection, self.generator, data=x.to_torch() / (self.scaling + regul)
            )
        flat = self._flat(x)
        res = flat / (self.scaling + regul)
        return PVector(self.layer_collection, vector_repr=res) if isinstance(x, _PVector) else res

    def __mul__(self, x):
        return self._like(x * self.scaling)

    __rmul__ = __mul__

    def __neg__(self):
        return self._like(-self.scaling)

    def inv(self, regul=1e-8):
        return self._like((self.scaling + regul) ** -1)

    def pinv(self, atol=1e-8):
        return self._like(self.scaling**-1 if self.scaling > atol else torch.tensor(0.0))

    def get_diag(self, split_weight_bias=True):
        return self.scaling * torch.ones(self.layer_collection.numel(), dtype=self.scaling.dtype)

    def to_torch(self, split_weight_bias=True):
        return self.scaling * torch.eye(self.layer_collection.numel(), dtype=self.scaling.dtype)
