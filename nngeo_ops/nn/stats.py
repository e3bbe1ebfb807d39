"""Accumulators: what each representation gathers from the batches of one pass.

Each accumulator sums over batches in ``update(ctx)`` and applies the normalisation in
``finalize(scale)`` (scale = 1/N for a mean, 1 for a sum). Several accumulators can share one pass
(:meth:`Capture.run` takes a list), so e.g. KFAC factors, the diagonal and the dense matrix of a model
cost one forward/backward per batch together.

Kronecker factors (KFAC, Martens & Grosse 2015; KFC for convolutions; Eschenhagen et al. 2023 for
weight sharing), per structured layer with rows a_{n,r} (inputs, with a trailing 1 for the bias) and
g_{k,n,r} (output cotangents):

* ``expand``: A = (1/Σ_n R_n) Σ_{n,r} a aᵀ and G = scale · Σ_{k,n,r} g gᵀ;
* ``reduce``: A = (1/N_ex) Σ_n ā āᵀ with ā = mean_r a, G = scale · Σ_{k,n} ḡ ḡᵀ with ḡ = Σ_r g.

Both are exact (A ⊗ G equals the true block) when each example has one position and A or G is
constant over examples. Layers with a single position do not depend on the mode.
"""

from __future__ import annotations

import torch

from .rules import EmbeddingRule


class DenseAcc:
    """Σ_{k,n} ∇θ ∇θᵀ over every covered parameter."""

    def __init__(self):
        self.value = None

    def update(self, ctx):
        pe = ctx.per_example_all()
        s = pe.T @ pe
        self.value = s if self.value is None else self.value + s

    def finalize(self, scale):
        self.value = self.value * scale


class BlockAcc:
    """One dense block per layer."""

    def __init__(self, layer_ids):
        self.layer_ids = list(layer_ids)
        self.value = {}

    def update(self, ctx):
        for lid in self.layer_ids:
            pe = ctx.per_example(lid)
            s = pe.T @ pe
            self.value[lid] = s if lid not in self.value else self.value[lid] + s

    def finalize(self, scale):
        self.value = {k: v * scale for k, v in self.value.items()}


class DiagAcc:
    """The diagonal, per layer (closed form Σ g² ⊗ a² for one-position layers)."""

    def __init__(self, layer_ids):
        self.layer_ids = list(layer_ids)
        self.value = {}

    def update(self, ctx):
        for lid in self.layer_ids:
            d = ctx.diag(lid)
            self.value[lid] = d if lid not in self.value else self.value[lid] + d

    def finalize(self, scale):
        self.value = {k: v * scale for k, v in self.value.items()}


class GradsAcc:
    """The per-(column, example) gradients themselves, scaled so that U Uᵀ is the matrix: U = (P, M)."""

    def __init__(self):
        self.rows = []

    def update(self, ctx):
        self.rows.append(ctx.per_example_all())

    def finalize(self, scale):
        self.value = torch.cat(self.rows, dim=0).T * scale**0.5
        self.rows = []


def _sym_add(store, key, s):
    store[key] = s if key not in store else store[key] + s


class KFACAcc:
    """Kronecker factors of structured layers (see the module docstring for the two modes).

    ``value[lid]`` is a dict: ``{"A": ..., "G": ...}`` for Kronecker layers (``A`` 1-D for Embedding,
    where it is diagonal), plus ``"bias"`` (an exact dense block) when the bias is outside the
    Kronecker form (ConvTranspose2d); ``{"block": ...}`` for elementwise (normalisation) layers, whose
    exact block couples only γ_e with β_e.
    """

    def __init__(self, cap, layer_ids, mode="expand"):
        if mode not in ("expand", "reduce"):
            raise ValueError(f"KFAC mode must be 'expand' or 'reduce', not {mode!r}")
        self.cap = cap
        self.layer_ids = list(layer_ids)
        self.mode = mode
        self._a, self._g, self._n, self._b, self._blk = {}, {}, {}, {}, {}

    def update(self, ctx):
        for lid in self.layer_ids:
            if not ctx.is_kron(lid):
                self._update_elementwise(ctx, lid)
                continue
            rule = self.cap.structured[lid].rule
            arow, grow = ctx.kron_rows(lid)
            b, r = arow.shape[:2]
            if isinstance(rule, EmbeddingRule):  # A is diagonal: token frequencies
                _sym_add(self._a, lid, ctx.token_counts(lid).to(grow.dtype))
                self._n[lid] = self._n.get(lid, 0) + b * r
                g2 = grow.reshape(-1, grow.shape[-1])
            elif self.mode == "expand":
                a2 = arow.reshape(-1, arow.shape[-1])
                _sym_add(self._a, lid, a2.T @ a2)
                self._n[lid] = self._n.get(lid, 0) + b * r
                g2 = grow.reshape(-1, grow.shape[-1])
            else:
                abar = arow.mean(1)
                _sym_add(self._a, lid, abar.T @ abar)
                self._n[lid] = self._n.get(lid, 0) + b
                g2 = grow.sum(2).reshape(-1, grow.shape[-1])
            _sym_add(self._g, lid, g2.T @ g2)
            if not rule.bias_in_kron and self.cap.structured[lid].module.bias is not None:
                bg = ctx.separate_bias(lid)
                _sym_add(self._b, lid, bg.T @ bg)

    def _update_elementwise(self, ctx, lid):
        pe = ctx.per_example(lid)
        n_w = self.cap.lc.layers[lid].numels[0]
        w = pe[:, :n_w]
        stats = [w.square().sum(0)]
        if pe.shape[1] > n_w:
            bias = pe[:, n_w:]
            stats += [(w * bias).sum(0), bias.square().sum(0)]
        stats = torch.stack(stats)
        _sym_add(self._blk, lid, stats)

    def finalize(self, scale):
        self.value = {}
        for lid in self.layer_ids:
            if lid in self._blk:
                s = self._blk[lid] * scale
                if s.shape[0] == 1:
                    blk = torch.diag(s[0])
                else:
                    blk = torch.cat(
                        [
                            torch.cat([torch.diag(s[0]), torch.diag(s[1])], 1),
                            torch.cat([torch.diag(s[1]), torch.diag(s[2])], 1),
                        ]
                    )
                self.value[lid] = {"block": blk}
                continue
            v = {"A": self._a[lid] / self._n[lid], "G": self._g[lid] * scale}
            if lid in self._b:
                v["bias"] = self._b[lid] * scale
            self.value[lid] = v


class EKFACDiagAcc:
    """Second moments of the per-example gradients in a Kronecker eigenbasis (George et al., 2018).

    ``bases[lid] = (Q_A, Q_G)``; the refit diagonal is s = scale · Σ_{k,n} (Q_Gᵀ ∇W Q_A)² (order "ga",
    transposed for "ag"), flattened in the order of ``Q_G ⊗ Q_A`` (resp. ``Q_A ⊗ Q_G``).
    """

    def __init__(self, cap, bases):
        self.cap = cap
        self.bases = bases
        self.value = {}

    def update(self, ctx):
        for lid, (qa, qg) in self.bases.items():
            rule = self.cap.structured[lid].rule
            arow, grow = ctx.kron_rows(lid)
            pa, pg = arow @ qa, grow @ qg
            if rule.order == "ga":
                w = torch.einsum("kbrg,bra->kbga", pg, pa)
            else:
                w = torch.einsum("bra,kbrg->kbag", pa, pg)
            _sym_add(self.value, lid, w.square().sum((0, 1)).reshape(-1))

    def finalize(self, scale):
        self.value = {k: v * scale for k, v in self.value.items()}
