"""Kronecker-factored representations: KFAC, EKFAC, and the quasi-diagonal.

KFAC (``PMatKFAC``) is ``BlockDiag`` over layers of:

* Linear / Conv1d / Conv2d (order "ga", W of shape (dG, dA)): ``G ⊗ A`` with A over the inputs
  (patches), G over the outputs. Without bias this *is* the block in parameter order (vec W row-major
  = g ⊗ a). With a bias, A gets a trailing constant input, so the Kronecker order interleaves each
  bias after its row of weights, while the parameter order is all weights then all biases; the block
  is ``Pᵀ (G ⊗ A) P`` with the permutation P from parameter to Kronecker order
  (:class:`~nngeo_ops.ops.AppendColumn`: Kronecker index o·(n_in + 1) + i, i = n_in the bias of
  row o);
* Embedding (order "ag", W (V, d)): ``diag(token frequencies) ⊗ G``;
* ConvTranspose2d (order "ag", W (C_in, C_out·kh·kw)): ``A ⊗ G``, and its bias as a separate exact
  dense block (the bias gradient has no Kronecker form there);
* normalisation layers: the exact block, which couples γ_e only with β_e (a dense node).

``F + λI``, its inverse and powers go through the eigen form of the factors (ops rules), so damping is
exact. The factored π-damping of Martens & Grosse, (A + π√λ I) ⊗ (G + √λ/π I), is available with
``damping="pi"`` and is never the default.

An input factor A gathered from fewer rows (examples × positions) than half its size, typically the
first layer of a wide network on one batch, has rank at most that number; it is kept as its rows
(``data[lid]["A_rows"]``, A = rowsᵀ·rows) and enters the block as a ``LowRank`` node. The statistics
pass then skips the Gram product of A, its products cost O(dA·n) instead of O(dA²), and damped solves
need a QR of the rows (a completed basis) instead of an eigendecomposition of A. ``data[lid]["A"]``
is formed on first access, for π-damping, EKFAC or :meth:`PMatKFAC.get_factors`.

EKFAC (George et al. 2018) replaces the eigenvalues λ_G ⊗ λ_A of each Kronecker block by the second
moments of the gradients in the eigenbasis Q_G ⊗ Q_A (:meth:`PMatEKFAC.update_diag`); before a
refit it equals KFAC.
"""

from __future__ import annotations

import functools
import math

import torch

from ...errors import UnsupportedError
from ...ops import (
    AppendColumn,
    BlockDiag,
    Dense,
    Diagonal,
    Eigen,
    Identity,
    Kronecker,
    LowRank,
)
from ..engine.accumulators import EKFACDiagAcc, KFACAcc, KroneckerFactors
from .base import PMatAbstract, PMatExpr, _data_from_examples, _from_generator, check_regul
from .ekfac_thin import EKFACFactors, thin_of


@functools.lru_cache(maxsize=64)
def _permutation_node(n_out: int, n_in: int, dtype: torch.dtype) -> AppendColumn:
    # nodes are immutable, and building one validates and inverts the permutation (costly for big
    # layers), so one node per layer shape is shared across builds
    return AppendColumn(n_out, n_in, dtype=dtype)


def _layer_info(generator, lid):
    user = generator.capture().structured[lid]
    return user.module, user.rule


def _eigh(m):
    """The eigenbasis of a factor (row-major, in the factor's own precision; see
    :meth:`~nngeo_ops.ops.Dense.eigh_factors`), eigenvalues clamped at 0 (the factor is PSD)."""
    e, q = Dense(m, psd=True).eigh_factors()
    return e.clamp_min(0), q


def _a_low_rank(rows: torch.Tensor) -> LowRank:
    """A = rowsᵀ·rows as a node (U = rowsᵀ, stored row-major for its products)."""
    return LowRank(rows.mT.contiguous(), psd=True, name="A")


def _a_size(f) -> int:
    rows = f.get("A_rows")
    return rows.shape[1] if rows is not None else f["A"].shape[0]


class PMatKFAC(PMatAbstract):
    """KFAC. ``data[lid]`` = {"A", "G"[, "bias"]} or {"block"} (see the module docstring).

    ``generator.kfac_mode`` chooses the expand or reduce form for weight sharing.
    """

    def __init__(self, generator, data=None, examples=None):
        if data is None:
            data = _data_from_examples(type(self), generator, examples)
        self.data = data
        lc = generator.layer_collection
        blocks = [self._block(generator, lid, data[lid]) for lid in lc.layers]
        super().__init__(lc, BlockDiag(blocks, names=list(lc.layers)), generator)

    @staticmethod
    def accumulators(generator):
        """The statistics this representation gathers in a pass over the data (a list of accumulators fed
        by :meth:`CurvatureGenerator.run`; :func:`build_many` shares one pass among several classes).

        Raises :class:`~nngeo_ops.errors.UnsupportedError` naming every layer that has no
        structured (Kronecker) rule.
        """
        cap = generator.capture()
        cap.require_structured("KFAC")
        return [KFACAcc(cap, generator.layer_collection.layers, generator.kfac_mode)]

    @staticmethod
    def data_from(generator, accs):
        """The ``data`` of this representation from its accumulators after the pass (see
        :meth:`accumulators`): ``{layer id: {"A", "G"[, "bias"]} or {"block"}}``.
        """
        return accs[0].value

    def _layout(self, generator, lid) -> tuple[str, bool]:
        """(Kronecker order of the layer's rule, whether the module has a bias) of a Kronecker layer.

        Read from the generator once, at construction, and kept: the algebra of a built
        representation (π-damping, the blocks of a refit) then never needs the generator again, so
        a representation whose generator was dropped (a pickle without the model) still works.
        """
        layouts = self.__dict__.setdefault("_layouts", {})
        if lid not in layouts:
            module, rule = _layer_info(generator, lid)
            layouts[lid] = (rule.order, getattr(module, "bias", None) is not None)
        return layouts[lid]

    def _kron(self, generator, lid, f):
        """The Kronecker block, in Kronecker order."""
        order, _ = self._layout(generator, lid)
        rows = f.get("A_rows")
        if rows is not None:  # A = rowsᵀ rows, of rank ≤ the number of rows (see KroneckerFactors)
            a_node = _a_low_rank(rows)
        elif f["A"].dim() == 1:
            a_node = Diagonal(f["A"], name="A")
        else:
            a_node = Dense(f["A"], symmetric=True, psd=True, name="A")
        g_node = Dense(f["G"], symmetric=True, psd=True, name="G")
        return Kronecker(g_node, a_node) if order == "ga" else Kronecker(a_node, g_node)

    def _to_param_order(self, generator, lid, kron, f):
        """From Kronecker order to parameter order (and the separate bias block)."""
        order, has_bias = self._layout(generator, lid)
        if order == "ga" and has_bias:
            n_out, n_in = f["G"].shape[0], _a_size(f) - 1
            p = _permutation_node(n_out, n_in, f["G"].dtype)
            return p.T @ kron @ p
        if "bias" in f:
            return BlockDiag([kron, Dense(f["bias"], symmetric=True, psd=True, name="B")])
        return kron

    def _block(self, generator, lid, f):
        if "block" in f:
            return Dense(f["block"], symmetric=True, psd=True, name=f"F[{lid}]")
        return self._to_param_order(generator, lid, self._kron(generator, lid, f), f)

    @classmethod
    def from_factors(cls, generator, factors):
        """The representation built from given Kronecker factors (a moving average of them, factors
        read from a checkpoint...), instead of a pass over data.

        ``factors[layer_id]`` for every layer of ``generator.layer_collection``, in the layout of
        ``data`` (module docstring): ``{"A": (dA, dA)`` (1-D ``(V,)`` for Embedding, a diagonal) or
        ``"A_rows": (n, dA)`` with A = A_rowsᵀ·A_rows, ``"G": (dG, dG)[, "bias": (C, C)]}``, or
        ``{"block": (P_l, P_l)}`` for elementwise layers. A carries the bias's constant input as its
        last row and column for "ga" layers with a bias; the block is A ⊗ G in that Kronecker order,
        so the factors' normalisation is the caller's (the means over examples of a pass over data
        put it in G). :class:`PMatEKFAC` also takes ``"QA", "QG", "diag"`` (kept as given; without
        them the eigenbases are computed and diag = λ_G ⊗ λ_A).

        Raises ShapeError when a layer is missing or a factor's size does not fit its layer, and
        NonFiniteError for NaN or inf in a factor.
        """
        from ...errors import NonFiniteError, ShapeError
        from ..engine.accumulators import KroneckerFactors

        lc = generator.layer_collection
        missing = [lid for lid in lc.layers if lid not in factors]
        if missing:
            raise ShapeError(f"from_factors: no factors for layers {missing}; give every layer")
        data = {}
        checks = []
        for lid in lc.layers:
            for key, t in factors[lid].items():
                if not torch.is_tensor(t):
                    raise ShapeError(f"from_factors: layer {lid!r} factor {key!r} is not a tensor")
                checks.append((lid, key, torch.isfinite(t).all()))
        ok = torch.stack([c[2] for c in checks]).tolist() if checks else []  # one synchronisation
        for (lid, key, _), good in zip(checks, ok):
            if not good:
                raise NonFiniteError(
                    f"from_factors: factor {key!r} of layer {lid!r} contains NaN or inf; "
                    "check the statistics (learning rate, data) it was averaged from"
                )
        for lid, entry in lc.items():
            f = factors[lid]
            if "block" in f:
                size = f["block"].shape[0]
            else:
                if "G" not in f or ("A" not in f and "A_rows" not in f):
                    raise ShapeError(
                        f"from_factors: layer {lid!r} needs 'G' and 'A' (or 'A_rows'), got "
                        f"{sorted(f)}"
                    )
                d_a = f["A_rows"].shape[1] if "A_rows" in f else f["A"].shape[0]
                if "A" in f and f["A"].dim() == 2 and f["A"].shape[0] != f["A"].shape[1]:
                    raise ShapeError(f"from_factors: A of layer {lid!r} is not square")
                if f["G"].dim() != 2 or f["G"].shape[0] != f["G"].shape[1]:
                    raise ShapeError(f"from_factors: G of layer {lid!r} is not square")
                size = d_a * f["G"].shape[0] + (f["bias"].shape[0] if "bias" in f else 0)
            if size != entry.numel():
                raise ShapeError(
                    f"from_factors: the factors of layer {lid!r} describe {size} parameters, the "
                    f"layer has {entry.numel()}; pass the factors of this model's layers"
                )
            data[lid] = dict(f) if "block" in f else KroneckerFactors(f)
        return cls(generator, data=data)

    def get_factors(self, layer_id):
        """(A, G) of a Kronecker layer (A is 1-D, a diagonal, for Embedding)."""
        f = self.data[layer_id]
        return f["A"], f["G"]

    # ------------------------------------------------------------------ π-damping
    def _pi_damped(self, regul, pi=None):
        """(A + π√λ I) ⊗ (G + √λ/π I) per layer; ``pi=None`` computes π from the factors'
        traces, a number fixes it (π = 1 is plain factor damping)."""
        fixed_pi = pi
        lc, gen = self.layer_collection, self.generator
        blocks = []
        for lid in lc.layers:
            f = self.data[lid]
            if "block" in f:
                blk = Dense(f["block"], symmetric=True, psd=True, name=f"F[{lid}]")
                blocks.append(
                    blk + regul * Identity(blk.shape[0], dtype=blk.dtype, device=blk.device)
                )
                continue
            a, g = f["A"], f["G"]
            ta = (a.sum() if a.dim() == 1 else a.trace()) / a.shape[0]
            tg = g.trace() / g.shape[0]
            pi = math.sqrt(max(float(ta), 1e-30) / max(float(tg), 1e-30))
            if fixed_pi is not None:
                pi = float(fixed_pi)
            sq = math.sqrt(regul)
            eye_g = torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
            damped = {
                "A": a
                + pi
                * sq
                * (1 if a.dim() == 1 else torch.eye(a.shape[0], dtype=a.dtype, device=a.device)),
                "G": g + sq / pi * eye_g,
            }
            if "bias" in f:
                damped["bias"] = f["bias"] + regul * torch.eye(
                    f["bias"].shape[0], dtype=g.dtype, device=g.device
                )
            blocks.append(self._to_param_order(gen, lid, self._kron(gen, lid, damped), damped))
        return BlockDiag(blocks, names=list(lc.layers))

    def _damped_op(self, regul, damping):
        check_regul(regul)
        if damping == "exact":
            return self._damped(regul)
        if damping == "pi":
            return self._pi_damped(regul)
        raise ValueError(f"damping must be 'exact' or 'pi', not {damping!r}")

    def solve(self, v, regul: float = 1e-8, damping: str = "exact"):
        """(M + regul·I)⁻¹ v; ``damping="pi"`` uses the factored π-damping instead."""
        return self._wrap(v, self._damped_op(regul, damping).solve(self._flat(v)))

    def inverse(self, regul: float = 1e-8, damping: str = "exact"):
        return PMatExpr(
            self.layer_collection, self._damped_op(regul, damping).inv(), self.generator
        )

    def pow(self, p: float, regul: float = 0.0, damping: str = "exact"):
        return PMatExpr(
            self.layer_collection, self._damped_op(regul, damping).pow(p), self.generator
        )


class PMatEKFAC(PMatKFAC):
    """EKFAC: Kronecker eigenbasis of the KFAC factors with a refittable diagonal.

    ``data[lid]`` adds to the KFAC factors ``"QA", "QG"`` (eigenbases) and ``"diag"`` (the eigenvalues
    in the order of Q_G ⊗ Q_A, resp. Q_A ⊗ Q_G for order "ag").

    Built from ``examples`` (as ``FIM(..., PMatEKFAC)`` does), the diagonal is fitted in the
    eigenbasis on those same examples — a second pass, since the basis is known only after the
    first — which is EKFAC as defined by George et al. and as NNGeometry builds it. With
    ``fit_diag=False`` (or when built from ``data``) it keeps diag = λ_G ⊗ λ_A, i.e. equals KFAC;
    :meth:`update_diag` refits the diagonal on any data.
    """

    def __init__(self, generator, data=None, examples=None, fit_diag: bool = True):
        if data is not None and any("diag" not in f for f in data.values() if "block" not in f):
            data = self._eigen_data(generator, data)
        fit = fit_diag and data is None
        super().__init__(generator, data=data, examples=examples)
        if fit:
            self.update_diag(examples)

    @classmethod
    def data_from(cls, generator, accs):
        """The ``data`` of this representation from its accumulators after the pass (see
        :meth:`accumulators`): the KFAC factors turned into Kronecker eigenbases and eigenvalues.
        """
        return cls._eigen_data(generator, accs[0].value)

    @staticmethod
    def _eigen_data(generator, kfac):
        out = {}
        for lid, f in kfac.items():
            if "block" in f:
                out[lid] = f
                continue
            module, rule = _layer_info(generator, lid)
            rows, g = f.get("A_rows"), f["G"]
            eg, qg = _eigh(g)
            if rows is not None:
                # kept as rows (n < dA/2): the thin basis of range(rowsᵀ), O(dA n²); the diagonal is
                # 0 off it (see ekfac_thin), so the complete basis is formed only when read
                ea, qa = _a_low_rank(rows).eigh_factors()
                ea = ea.clamp_min(0)
                d = torch.kron(eg, ea) if rule.order == "ga" else torch.kron(ea, eg)
                out[lid] = EKFACFactors({**f, "QG": qg}, qa, d, rule.order)
                continue
            if f["A"].dim() == 1:
                a = f["A"]
                ea, qa = a, torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
            else:
                ea, qa = _eigh(f["A"])
            d = torch.kron(eg, ea) if rule.order == "ga" else torch.kron(ea, eg)
            out[lid] = {**f, "QA": qa, "QG": qg, "diag": d}
        return out

    def _kron(self, generator, lid, f):
        if "diag" not in f:  # π-damped factors, see PMatKFAC
            return super()._kron(generator, lid, f)
        order, _ = self._layout(generator, lid)
        thin = thin_of(f)
        if thin is not None:  # Q_A thin (dA × r): not a square orthogonal matrix
            qa = Dense(thin[0], symmetric=False, orthogonal=False, name="Q₁_A")
            d = thin[1]
        else:
            qa = Dense(f["QA"], symmetric=False, orthogonal=True, name="Q_A")
            d = f["diag"]
        qg = Dense(f["QG"], symmetric=False, orthogonal=True, name="Q_G")
        q = Kronecker(qg, qa) if order == "ga" else Kronecker(qa, qg)
        return Eigen(q, d)

    def _pi_damped(self, regul, pi=None):
        raise UnsupportedError("π-damping is defined for KFAC factors, not for EKFAC")

    def update_diag(self, examples) -> PMatEKFAC:
        """Refit the diagonal in the fixed eigenbases on ``examples`` (in place; returns self).

        A layer kept over a thin input basis stays thin when the gradients of ``examples`` have no
        mass off its range (the refit on the examples that gave A, as ``FIM(..., PMatEKFAC)``
        does), and is refit over its complete basis otherwise (:class:`EKFACDiagAcc`).
        """
        gen = self.generator
        bases = {}
        for lid, f in self.data.items():
            thin = thin_of(f)
            if thin is not None:
                bases[lid] = (thin[0], f["QG"], f.complete_basis)
            elif "diag" in f:
                bases[lid] = (f["QA"], f["QG"])
        (acc,) = _from_generator(type(self), gen, examples, [EKFACDiagAcc(gen.capture(), bases)])
        for lid, d in acc.value.items():
            f = self.data[lid]
            thin = thin_of(f)
            if thin is not None and lid not in acc.completed:
                self.data[lid] = EKFACFactors(f, thin[0], d, thin[2])
            elif thin is not None:
                raw = {k: v for k, v in dict.items(f) if k not in ("QA", "diag")}
                self.data[lid] = KroneckerFactors({**raw, "QA": acc.completed[lid], "diag": d})
            else:
                self.data[lid] = {**f, "diag": d}
        lc = self.layer_collection
        blocks = [self._block(gen, lid, self.data[lid]) for lid in lc.layers]
        self._op = BlockDiag(blocks, names=list(lc.layers))
        return self


class QuasiDiagAcc:
    """Diagonal plus the coupling of each output unit's bias with its incoming weights."""

    def __init__(self, cap, layer_ids):
        self.cap, self.layer_ids = cap, list(layer_ids)
        self.diag, self.cross = {}, {}

    def _arrow(self, lid):
        e = self.cap.lc.layers[lid]
        return e.attrs == ("weight", "bias") and e.shapes[0][0] == e.shapes[1][0]

    def update(self, ctx):
        for lid in self.layer_ids:
            pe = ctx.per_example(lid)
            d = pe.square().sum(0)
            self.diag[lid] = d if lid not in self.diag else self.diag[lid] + d
            if self._arrow(lid):
                e = self.cap.lc.layers[lid]
                n_out = e.shapes[1][0]
                w = pe[:, : e.numels[0]].reshape(pe.shape[0], n_out, -1)
                c = torch.einsum("moi,mo->oi", w, pe[:, e.numels[0] :])
                self.cross[lid] = c if lid not in self.cross else self.cross[lid] + c

    def reduce(self, comm):
        for lid in self.layer_ids:
            comm.sum(self.diag[lid])
            if lid in self.cross:
                comm.sum(self.cross[lid])

    def finalize(self, scale):
        self.value = {
            lid: {
                "diag": self.diag[lid] * scale,
                **({"cross": self.cross[lid] * scale} if lid in self.cross else {}),
            }
            for lid in self.layer_ids
        }


class PMatQuasiDiag(PMatAbstract):
    """Quasi-diagonal (Ollivier 2015): the diagonal, plus for each output unit o of a layer with a
    bias the entries coupling b_o with the weights W[o, :]. Each layer is ``Pᵀ BlockDiag(arrow_o) P``
    (one small "arrow" block per unit, in Kronecker order) or ``Diagonal`` for layers without bias.
    """

    def __init__(self, generator, data=None, examples=None):
        if data is None:
            data = _data_from_examples(type(self), generator, examples)
        self.data = data
        lc = generator.layer_collection
        super().__init__(lc, BlockDiag([self._block(lc, lid) for lid in lc.layers]), generator)

    @staticmethod
    def accumulators(generator):
        """The statistics this representation gathers in a pass over the data (a list of accumulators fed
        by :meth:`CurvatureGenerator.run`; :func:`build_many` shares one pass among several classes).

        Raises :class:`~nngeo_ops.errors.UnsupportedError` for the Hessian.
        """
        if generator.is_hessian:
            raise UnsupportedError("PMatQuasiDiag is not available for the Hessian")
        return [QuasiDiagAcc(generator.capture(), generator.layer_collection.layers)]

    @staticmethod
    def data_from(generator, accs):
        """The ``data`` of this representation from its accumulators after the pass (see
        :meth:`accumulators`): the per-layer diagonal and bias–weight cross terms.
        """
        return accs[0].value

    def _block(self, lc, lid):
        f = self.data[lid]
        if "cross" not in f:
            return Diagonal(f["diag"])
        cross = f["cross"]
        n_out, n_in = cross.shape
        n_w = n_out * n_in
        dw, db = f["diag"][:n_w].reshape(n_out, n_in), f["diag"][n_w:]
        arrows = torch.zeros(n_out, n_in + 1, n_in + 1, dtype=cross.dtype, device=cross.device)
        arrows.diagonal(dim1=1, dim2=2).copy_(torch.cat([dw, db[:, None]], 1))
        arrows[:, :n_in, n_in] = cross
        arrows[:, n_in, :n_in] = cross
        blocks = BlockDiag([Dense(b, symmetric=True, name="arrow") for b in arrows])
        p = _permutation_node(n_out, n_in, cross.dtype)
        return p.T @ blocks @ p
