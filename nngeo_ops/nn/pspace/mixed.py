"""Mixed representations: one representation for some layers, another for the rest.

A :class:`PMatMixed` splits the layer collection by layer kind (the module class name, e.g.
``"Linear"``), builds one sub-representation per group on a generator restricted to that group's
layers, and joins their per-layer blocks into one ``BlockDiag`` over the whole collection, in the
collection's flat order. Everything the algebra knows about the blocks (the eigen form of EKFAC, exact
damping, closed-form inverses of dense blocks) applies to the joined node, so ``solve``, ``inverse``,
``pow``, ``trace`` and ``eigh`` of a mixed matrix are exact and blockwise.

:class:`PMatEKFACBlockDiag` is the usual mixture: EKFAC for Linear / Conv1d / Conv2d / Embedding
layers, one dense block per layer for the others (normalisation layers, custom layers).

The sub-representations are kept in ``sub_pmats`` (keyed by their class); :meth:`PMatMixed.update_diag`
refits the EKFAC part and rebuilds the joined node.
"""

from __future__ import annotations

from collections import OrderedDict

from ...errors import UnsupportedError
from ...ops import BlockDiag
from ..engine.curvature_generator import CurvatureGenerator
from ..params import LayerCollection
from .base import PMatAbstract, PMatBlockDiag
from .kfac import PMatEKFAC

EKFAC_KINDS = ("Linear", "Conv1d", "Conv2d", "Embedding")


def restricted_generator(generator: CurvatureGenerator, lc: LayerCollection) -> CurvatureGenerator:
    """The same model, output model, kind and settings as ``generator``, over the layers ``lc``."""
    return CurvatureGenerator(
        generator.model,
        generator.output_model,
        generator.kind,
        layer_collection=lc,
        function=generator.function,
        trials=generator.trials,
        generator=generator.rng,
        n_output=generator.n_output,
        device=generator.device,
        progress=generator.progress,
        kfac_mode=generator.kfac_mode,
        process_group=generator.process_group,
    )


def _layer_blocks(pmat: PMatAbstract) -> dict:
    op = pmat.op
    if not isinstance(op, BlockDiag) or len(op.blocks) != len(pmat.layer_collection):
        raise UnsupportedError(
            f"{type(pmat).__name__} is not block-diagonal by layer and cannot enter a mixed "
            "representation; use PMatBlockDiag, PMatDiag, PMatKFAC or PMatEKFAC"
        )
    return dict(zip(pmat.layer_collection.layers, op.blocks))


class PMatMixed(PMatAbstract):
    """Per-layer-kind representations joined into one block-diagonal matrix.

    Args:
        generator: a :class:`CurvatureGenerator` over the whole collection.
        examples: the loader every sub-representation is built from (each does its own pass).
        default: the representation class of layers whose kind is not in ``by_kind``.
        by_kind: ``{module class name: representation class}``, e.g. ``{"Linear": PMatEKFAC}``.

    Every representation must be block-diagonal by layer (PMatBlockDiag, PMatDiag, PMatKFAC,
    PMatEKFAC, PMatQuasiDiag). ``layer_map[layer_id]`` is the class used for a layer.
    """

    def __init__(self, generator, data=None, examples=None, default=PMatBlockDiag, by_kind=None):
        if data is not None:
            raise UnsupportedError("PMatMixed is built from examples, not from data")
        by_kind = dict(by_kind or {})
        lc = generator.layer_collection
        groups: OrderedDict = OrderedDict()
        self.layer_map = {}
        for lid, entry in lc.items():
            cls = by_kind.get(entry.kind, default)
            self.layer_map[lid] = cls
            groups.setdefault(cls, OrderedDict())[lid] = entry
        self.sub_pmats = OrderedDict()
        for cls, layers in groups.items():
            sub_lc = (
                type(lc)(layers) if type(lc) is not LayerCollection else LayerCollection(layers)
            )
            sub_gen = restricted_generator(generator, sub_lc)
            self.sub_pmats[cls] = cls(sub_gen, examples=examples)
        super().__init__(lc, self._join(lc), generator)

    def _join(self, lc) -> BlockDiag:
        blocks = {}
        for pmat in self.sub_pmats.values():
            blocks.update(_layer_blocks(pmat))
        names = list(lc.layers)
        return BlockDiag([blocks[lid] for lid in names], names=names)

    def update_diag(self, examples) -> PMatMixed:
        """Refit the EKFAC diagonals (in place) on ``examples``; returns self."""
        found = False
        for pmat in self.sub_pmats.values():
            if isinstance(pmat, PMatEKFAC):
                pmat.update_diag(examples)
                found = True
        if not found:
            raise UnsupportedError("this mixed representation has no EKFAC part to refit")
        self._op = self._join(self.layer_collection)
        self.__dict__.pop("_damped_nodes", None)
        return self


class PMatEKFACBlockDiag(PMatMixed):
    """EKFAC on Linear / Conv1d / Conv2d / Embedding layers, one dense block on every other layer."""

    def __init__(self, generator, data=None, examples=None):
        super().__init__(
            generator,
            data=data,
            examples=examples,
            default=PMatBlockDiag,
            by_kind={k: PMatEKFAC for k in EKFAC_KINDS},
        )
