"""The libraries of ``bench_curvature.py``: for each, how it builds every curvature representation
and applies its product and damped solve (``LIBS[label](model, x, y) -> {rep: (build, mv, solve,
note)}``), and the installed version of a peer. The peers are imported inside their functions, in
the worker process of their case (none is a dependency)."""

from __future__ import annotations

import contextlib
import copy
import functools

import torch
import torch.nn.functional as Fn
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from benchmarks import harness as H

DAMPING = 1e-3
NNG, CL, BP, ASDL = "NNGeometry", "curvlinops", "BackPACK", "ASDL"


class OneBatch(DataLoader):
    """A DataLoader (NNGeometry needs ``.sampler``) that yields one prepared batch, without collation."""

    def __init__(self, x, y):
        super().__init__(TensorDataset(x, y), batch_size=x.shape[0])
        self._batch = (x, y)

    def __iter__(self):
        return iter([self._batch])

    def __len__(self):
        return 1


# ---------------------------------------------------------------------- the libraries
# each returns {rep: (build, mv, solve, note, comparable_solve)}; build() -> obj, mv(obj, v) and
# solve(obj, v) take a flat parameter-space tensor (None where the library has no such operation)


def ours(model, x, y):
    from nngeo_ops.nn import (
        FIM,
        FIM_MonteCarlo,
        PMatBlockDiag,
        PMatDiag,
        PMatEKFAC,
        PMatImplicit,
        PMatKFAC,
        PVector,
    )

    loader = [(x, y)]

    def mv(F, v):
        return F.mv(PVector(F.layer_collection, vector_repr=v))

    def solve(F, v):
        return F.solve(PVector(F.layer_collection, vector_repr=v), regul=DAMPING)

    def fim(rep, mc=False):
        f = FIM_MonteCarlo if mc else FIM
        return lambda: f(model, loader, rep, progress=False)

    return {
        "diag": (fim(PMatDiag), mv, solve, ""),
        "diag (MC)": (fim(PMatDiag, True), mv, solve, ""),
        "block-diag": (fim(PMatBlockDiag), mv, solve, ""),
        "kfac": (fim(PMatKFAC), mv, solve, ""),
        "kfac (MC)": (fim(PMatKFAC, True), mv, solve, ""),
        "ekfac (eigh only)": (
            fim(functools.partial(PMatEKFAC, fit_diag=False)),
            mv,
            solve,
            "KFAC pass + eigh",
        ),
        "ekfac (refit)": (fim(PMatEKFAC), mv, solve, "2 passes + eigh"),
        "implicit GGN": (fim(PMatImplicit), mv, None, "uncached: each mv runs the model"),
        "implicit GGN (cache)": (
            fim(functools.partial(PMatImplicit, cache=True)),
            mv,
            None,
            "mv warm; mv1 linearises",
        ),
    }


def nngeometry(model, x, y):
    import nngeometry.metrics as M
    from nngeometry.object import PVector as NPV
    from nngeometry.object import pspace as P

    model = copy.deepcopy(model)
    ld = OneBatch(x.clone(), y)  # NNGeometry sets requires_grad on the inputs it is given

    def mv(F, v):
        return F.mv(NPV(F.generator.layer_collection, vector_repr=v))

    def solve(F, v):
        return F.solve(NPV(F.generator.layer_collection, vector_repr=v), regul=DAMPING)

    def fim(rep, mc=False):
        f = M.FIM_MonteCarlo if mc else M.FIM
        return lambda: f(model, ld, rep, variant="classif_logits")

    pi = "solve: π-damped factors (another matrix)"
    return {
        "diag": (fim(P.PMatDiag), mv, solve, ""),
        "diag (MC)": (fim(P.PMatDiag, True), mv, solve, ""),
        "block-diag": (fim(P.PMatBlockDiag), mv, solve, ""),
        "kfac": (fim(P.PMatKFAC), mv, solve, pi),
        "kfac (MC)": (fim(P.PMatKFAC, True), mv, solve, pi),
        "ekfac (eigh only)": (fim(P.PMatEKFAC), mv, solve, "KFAC pass + eigh"),
        "implicit GGN": (fim(P.PMatImplicit), mv, None, "one backward per class"),
    }


def curvlinops(model, x, y):
    from curvlinops import (
        EKFACLinearOperator,
        FisherType,
        GGNLinearOperator,
        KFACInverseLinearOperator,
        KFACLinearOperator,
    )

    params = [p for p in model.parameters() if p.requires_grad]
    data = [(x, y)]
    loss = nn.CrossEntropyLoss()
    common = dict(check_deterministic=False, num_data=x.shape[0])
    kf = dict(common, separate_weight_and_bias=False)
    if x.dim() == 3:  # the transformer: one loss term per sequence, weights shared over tokens
        kf["kfac_approx"] = "expand"

    def split(v):
        return [t.view_as(p) for t, p in zip(v.split([p.numel() for p in params]), params)]

    def mv(op, v):
        return op @ split(v)

    def solve(op, v):
        key = "_bench_inverse"
        if not hasattr(op, key):  # curvlinops caches the factors' inverses in the inverse operator
            setattr(op, key, KFACInverseLinearOperator(op, damping=DAMPING, use_exact_damping=True))
        return getattr(op, key) @ split(v)

    def kfac(cls, fisher_type):
        def build():
            op = cls(model, loss, params, data, fisher_type=fisher_type, **kf)
            if cls is EKFACLinearOperator:
                op._maybe_compute_ekfac()
            else:
                op.compute_kronecker_factors()
            return op

        return build

    def ggn():
        return GGNLinearOperator(model, loss, params, data, **common)

    return {
        "kfac": (kfac(KFACLinearOperator, FisherType.TYPE2), mv, solve, ""),
        "kfac (MC)": (kfac(KFACLinearOperator, FisherType.MC), mv, solve, ""),
        "ekfac (refit)": (kfac(EKFACLinearOperator, FisherType.TYPE2), mv, solve, ""),
        "implicit GGN": (ggn, mv, None, ""),
        "implicit GGN (cache)": (ggn, mv, None, "no cache: each mv runs the model"),
    }


def backpack(model, x, y):
    from backpack import backpack as bp_ctx
    from backpack import extend
    from backpack import extensions as E
    from backpack.hessianfree.ggnvp import ggn_vector_product_from_plist

    model = extend(copy.deepcopy(model))
    lossf = extend(nn.CrossEntropyLoss())
    params = [p for p in model.parameters() if p.requires_grad]

    def ext(e):
        def build():
            model.zero_grad()
            with bp_ctx(e):
                lossf(model(x), y).backward()
            return None

        return build

    def ggnvp(_, v):
        out = model(x)
        vs = [t.view_as(p) for t, p in zip(v.split([p.numel() for p in params]), params)]
        return ggn_vector_product_from_plist(lossf(out, y), out, params, vs)

    return {
        "diag": (ext(E.DiagGGNExact()), None, None, "DiagGGNExact"),
        "diag (MC)": (ext(E.DiagGGNMC()), None, None, "DiagGGNMC"),
        "kfac": (ext(E.KFLR()), None, None, "KFLR; factors only"),
        "kfac (MC)": (ext(E.KFAC()), None, None, "KFAC; factors only"),
        "implicit GGN": (lambda: None, ggnvp, None, "hessianfree.ggn_vector_product"),
        "implicit GGN (cache)": (lambda: None, ggnvp, None, "no cache: each mv runs the model"),
    }


def asdl_module():
    """``asdl``, imported after stubbing the NVTX ranges it opens unconditionally in places (they
    fail without CUDA)."""
    if not torch.cuda.is_available():
        from torch.cuda import nvtx

        class NoRange(contextlib.ContextDecorator):  # used both in `with` and as a decorator
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

        nvtx.range = lambda *a, **k: NoRange()
        nvtx.range_push = nvtx.range_pop = lambda *a, **k: None
    import asdl as A

    return A


def asdl_fisher(A, model, x, y, kind, shape):
    """ASDL's (module ``A``, from :func:`asdl_module`) fisher maker of ``kind`` (``FISHER_EXACT``,
    ``FISHER_MC``) and ``shape`` (``SHAPE_*``) for cross-entropy on (x, y), after its forward and
    backward (the statistics on the model)."""
    cfg = A.FisherConfig(
        fisher_type=kind,
        fisher_shapes=[shape],
        loss_type=A.LOSS_CROSS_ENTROPY,
        data_size=x.shape[0],
    )
    fm = A.get_fisher_maker(model, cfg)
    dummy = fm.setup_model_call(model, x)
    fm.setup_loss_call(Fn.cross_entropy, dummy, y)
    fm.forward_and_backward()
    return fm


def asdl(model, x, y):
    A = asdl_module()
    model = copy.deepcopy(model)

    def fisher(kind, shape):
        return lambda: asdl_fisher(A, model, x, y, kind, shape)

    return {
        "diag": (fisher(A.FISHER_EXACT, A.SHAPE_DIAG), None, None, ""),
        "diag (MC)": (fisher(A.FISHER_MC, A.SHAPE_DIAG), None, None, ""),
        "block-diag": (fisher(A.FISHER_EXACT, A.SHAPE_LAYER_WISE), None, None, ""),
        "kfac": (fisher(A.FISHER_EXACT, A.SHAPE_KRON), None, None, ""),
        "kfac (MC)": (fisher(A.FISHER_MC, A.SHAPE_KRON), None, None, ""),
    }


LIBS = {H.OURS: ours, NNG: nngeometry, CL: curvlinops, BP: backpack, ASDL: asdl}


def _version(lib):
    if lib == H.OURS:
        return ""
    import importlib.metadata as md

    dist = {
        NNG: "nngeometry",
        CL: "curvlinops-for-pytorch",
        BP: "backpack-for-pytorch",
        ASDL: "asdfghjkl",
    }[lib]
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "?"
