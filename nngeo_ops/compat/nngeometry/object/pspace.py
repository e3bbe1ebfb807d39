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
from ....linalg import cg as _cg
from ....nn.fspace.pfmap import PFMap
from ....nn.params import PVector as _PVector
from ....nn.pspace import base as _pm
from ....nn.pspace import kfac as _kf
from ....nn.pspace import mixed as _mx
from .._errors import NormOrderError, UnsupportedCompatError
from ..layercollection import LayerCollection
from .compat_mixin import (  # noqa: F401  (re-exported: NNGeometry's pspace names)
    SOLVES,
    _check_generator,
    _Compat,
    _compat_class,
    _DataGenerator,
    _detached,
    _factor_eigenvalues,
    _pinv_node,
    _zeros_like,
    as_loader,
    kron_order,
)
from .map import PFMapDense
from .vector import PVector

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
