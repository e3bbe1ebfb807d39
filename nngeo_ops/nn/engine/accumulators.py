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

import math

import torch

from ..layers.moments import _PATCH_CHUNK, second_moment


def _acc(store, key, t):
    # accumulate in place (every stored tensor is a fresh result owned by the accumulator)
    if key in store:
        store[key].add_(t)
    else:
        store[key] = t


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

    def reduce(self, comm):
        """Sum over a process group (:mod:`~nngeo_ops.nn.engine.distributed`), before ``finalize``."""
        comm.sum(self.value, symmetric=True)


def kron_block(ctx, lid) -> torch.Tensor | None:
    """Σ_{k,n} ∇θ ∇θᵀ of a layer y = W a (+ b) with one position per example, in parameter order.

    With h_n = Σ_k g_kn g_knᵀ (dG × dG per example) the weight block is Σ_n h_n ⊗ a_n a_nᵀ: row panel
    o is aᵀ [h[:, o, o'] a]_{o'}, one product over the B examples per output unit, instead of one
    product over the K·B per-example gradients (K times fewer flops for the exact Fisher, where K is
    the number of classes; the same for K = 1, without the per-example tensor). Only the upper
    triangle is computed (panel o from column o·dA on: half the flops) and mirrored, so that the
    block is bitwise symmetric and its products read one triangle (``linalg.symv``). None where it
    does not apply (several calls, several positions, other rules).
    """
    user = ctx.cap.structured.get(lid)
    if user is None or len(user.calls) != 1 or not ctx.is_kron(lid):
        return None
    rule, module, call = user.rule, user.module, user.calls[0]
    if rule.order != "ga" or not rule.bias_in_kron or rule.diagonal_input:
        return None
    if user.attrs not in (("weight",), ("weight", "bias")):
        return None
    ar, gr = rule.rows(module, call.args[0], call.grad)
    if ar.shape[1] != 1:
        return None
    a, g = ar[:, 0], gr[:, :, 0]  # (B, dA), (K, B, dG)
    h = torch.einsum("kbo,kbp->bop", g, g)  # (B, dG, dG)
    b, d_g, d_a = a.shape[0], g.shape[-1], a.shape[-1]
    n_w, bias = d_g * d_a, len(user.attrs) == 2
    n = n_w + (d_g if bias else 0)
    out = a.new_empty(n, n)
    for o in range(d_g):
        i, j = o * d_a, (o + 1) * d_a
        x = (h[:, o, o:, None] * a[:, None, :]).reshape(b, n_w - i)
        if bias:
            x = torch.cat([x, h[:, o, :]], dim=1)
        strip = out[i:j, i:]
        torch.mm(a.T, x, out=strip)
        _mirror_diagonal_block_(strip[:, : j - i])
        out[j:, i:j] = strip[:, j - i :].mT
    if bias:
        out[n_w:, n_w:] = h.sum(0)
        _mirror_diagonal_block_(out[n_w:, n_w:])
    return out


def _mirror_diagonal_block_(blk: torch.Tensor) -> None:
    # the lower triangle := the upper one transposed, so that the block is bitwise symmetric (its
    # two halves come from different sums of the GEMM otherwise)
    lower = torch.ones(blk.shape, dtype=torch.bool, device=blk.device).tril_(-1)
    blk.copy_(torch.where(lower, blk.mT, blk))


class BlockAcc:
    """One dense block per layer."""

    def __init__(self, layer_ids):
        self.layer_ids = list(layer_ids)
        self.value = {}

    def update(self, ctx):
        for lid in self.layer_ids:
            s = kron_block(ctx, lid)
            if s is None:
                pe = ctx.per_example(lid)
                s = pe.T @ pe
            _acc(self.value, lid, s)

    def finalize(self, scale):
        self.value = {k: v.mul_(scale) for k, v in self.value.items()}

    def reduce(self, comm):
        for lid in self.layer_ids:
            comm.sum(self.value[lid], symmetric=True)


class DiagAcc:
    """The diagonal, per layer (closed form Σ g² ⊗ a² for one-position layers).

    ``value[lid]`` are the slices of one ``(P,)`` buffer in the order of ``layer_ids``: each layer's
    first statistic is written into its slice (later batches are added in place), so that
    :meth:`concatenated` copies nothing (two ``torch.cat`` passes over the diagonal otherwise).
    """

    column_wise = True  # a sum over the columns: Capture.run may hand them one (layer) at a time

    def __init__(self, layer_ids):
        self.layer_ids = list(layer_ids)
        self.value = {}
        self._flat = None
        self._folded = None  # the pass's scale, folded in by update (one-batch passes)
        self._ranges = {}  # {layer id: aminmax of its final slice} (see known_range)
        self._ranged_version = None
        # (min, max, version of the buffer) of the finalised diagonal, set by check_statistics
        # (finite.py), which takes the range in the reduction that checks it: the Diagonal node
        # of PMatDiag then needs no reduction of its own
        self.value_range = None

    def _slot(self, ctx, lid):
        """The slice of the buffer for ``lid`` and its parameters' slices ``{attr: (numel,) view}``
        (the ``out`` of :meth:`BatchContext.diag`, which the rules reshape): the buffer is cut once
        per pass, by two ``split_with_sizes`` calls for all layers, not a split and a view per
        parameter for each layer (~15 µs a build of the benchmark MLP)."""
        if self._flat is None:
            layers = ctx.cap.lc.layers
            entries = [layers[i] for i in self.layer_ids]
            sizes = [e.numel() for e in entries]
            self._flat = torch.empty(sum(sizes), dtype=ctx.cap.dtype, device=ctx.cap.device)
            slots = self._flat.split_with_sizes(sizes)
            pieces = iter(self._flat.split_with_sizes([n for e in entries for n in e.numels]))
            self._slots = {
                i: (slot, {a: next(pieces) for a in e.attrs})
                for i, e, slot in zip(self.layer_ids, entries, slots)
            }
        return self._slots[lid]

    def update(self, ctx):
        # a pass of one batch: its normalisation is folded in now (BatchContext.scale), into the
        # Σ g² factor of each closed form, and the pass over the whole diagonal at finalize is
        # spared (~0.16 ms of a 5 ms build of the benchmark MLP, the diagonal being out of cache)
        scale = getattr(ctx, "scale", None)
        if scale is not None and (getattr(ctx, "columns", None) or 1) > 1:
            # K > 1 columns streamed one at a time: folded into each column's terms, a kind
            # without the closed form (convolutions) would multiply its diagonal K times
            scale = None
        # the whole batch at once with its scale folded in: each layer's slice is final when
        # written, and its range is taken then, while it is in cache (see known_range)
        final = scale is not None and getattr(ctx, "column", None) is None
        for lid in ctx.select(self.layer_ids):
            if lid in self.value:
                self.value[lid] += ctx.diag(lid, scale=scale)
                self._ranges = None
            else:
                out, pieces = self._slot(ctx, lid)
                self.value[lid] = value = ctx.diag(lid, out=out, pieces=pieces, scale=scale)
                if final and self._ranges is not None:
                    with torch.no_grad():
                        self._ranges[lid] = torch.aminmax(value.detach())
        if scale is not None:
            self._folded = scale
        if final and self._flat is not None:
            self._ranged_version = self._flat._version

    def known_range(self) -> tuple[float, float, bool] | None:
        """``(min, max, every entry finite)`` of the finalised diagonal from the ranges taken as
        each layer's final values were written (a one-batch pass, :meth:`update`), or None where
        they do not cover it as it is now. On the benchmark MLP this spares the ``aminmax`` of the
        whole diagonal out of cache at the end of the pass (~0.12 ms of a 5 ms build)."""
        ranges = self._ranges
        if (
            not ranges
            or len(ranges) != len(self.layer_ids)
            or self._flat is None
            or self._flat._version != self._ranged_version
        ):
            return None
        los = [r[0].item() for r in ranges.values()]
        his = [r[1].item() for r in ranges.values()]
        if not all(math.isfinite(v) for v in los + his):  # min() of floats skips a NaN
            return math.nan, math.nan, False
        return min(los), max(his), True

    def finalize(self, scale):
        folded = self._folded
        if folded is not None:
            if folded != scale:  # the pass's scale is the one its only batch announced
                raise RuntimeError(f"DiagAcc: scale {scale} at finalize, {folded} folded in")
            return
        if scale == 1:  # x·1 is x
            return
        if self._complete():
            self._flat.mul_(scale)
        else:
            self.value = {k: v.mul_(scale) for k, v in self.value.items()}

    def _complete(self) -> bool:
        # every layer's value is its slice (update writes the first statistic there, adds in place)
        return self._flat is not None and len(self.value) == len(self.layer_ids)

    def flat(self) -> torch.Tensor | None:
        """The ``(P,)`` buffer whose slices are every layer's value, or None when some layer's
        value is not in it."""
        return self._flat if self._complete() else None

    def concatenated(self) -> torch.Tensor:
        """The diagonal ``(P,)``: the values of ``layer_ids`` joined in that order (the buffer
        itself when every layer was written into its slice)."""
        flat = self.flat()
        return flat if flat is not None else torch.cat([self.value[lid] for lid in self.layer_ids])

    def reduce(self, comm):
        for lid in self.layer_ids:
            comm.sum(self.value[lid])


class GradsAcc:
    """The per-(column, example) gradients themselves, scaled so that U Uᵀ is the matrix: U = (P, M)."""

    def __init__(self):
        self.rows = []

    def update(self, ctx):
        self.rows.append(ctx.per_example_all())

    def finalize(self, scale):
        self.value = torch.cat(self.rows, dim=0).T * scale**0.5
        self.rows = []

    def reduce(self, comm):
        # the columns of U over all ranks, in rank order: U Uᵀ is the matrix of the union
        from .distributed import gather_rows

        self.rows = [gather_rows(comm.group, torch.cat(self.rows, dim=0))]


class KroneckerFactors(dict):
    """The statistics of one Kronecker layer: ``{"A": (dA, dA), "G": (dG, dG)[, "bias": ...]}``.

    An input factor gathered from fewer rows than half its size is held as ``"A_rows"`` (n × dA,
    A = A_rowsᵀ·A_rows, normalisation included); reading ``"A"`` forms it then, once.
    """

    def __missing__(self, key):
        if key == "A" and "A_rows" in self:
            r = self["A_rows"]
            self["A"] = a = second_moment(r)
            return a
        raise KeyError(key)


class KFACAcc:
    """Kronecker factors of structured layers (see the module docstring for the two modes).

    ``value[lid]`` is a dict: ``{"A": ..., "G": ...}`` for Kronecker layers (``A`` 1-D for Embedding,
    where it is diagonal), plus ``"bias"`` (an exact dense block) when the bias is outside the
    Kronecker form (ConvTranspose2d); ``{"block": ...}`` for elementwise (normalisation) layers, whose
    exact block couples only γ_e with β_e.
    """

    def __init__(self, cap, layer_ids, mode="expand", low_rank: bool = True):
        if mode not in ("expand", "reduce"):
            raise ValueError(f"KFAC mode must be 'expand' or 'reduce', not {mode!r}")
        self.cap = cap
        self.layer_ids = list(layer_ids)
        self.mode = mode
        self.low_rank = low_rank
        self._a, self._g, self._n, self._b, self._blk = {}, {}, {}, {}, {}
        self._rows: dict[str, list[torch.Tensor]] = {}  # A's rows, while they are the cheaper form

    # G, the bias blocks and the elementwise blocks are sums over the K columns and A is read from
    # the inputs: Capture.run may hand the columns one at a time, a layer at a time (A taken at the
    # last column only)
    column_wise = True

    def update(self, ctx):
        # A and the row counts: once per batch, at its last column, whose backward frees the saved
        # tensors of the graph as it goes (the earlier ones retain it): what A's work allocates
        # (a dense layer's kept rows, a convolution's patch chunks) is then not held through the
        # earlier columns' backward peaks (benchmark CNN, exact KFAC: 38.1 -> 37.1 MiB allocated)
        inputs = ctx.last_column
        for lid in ctx.select(self.layer_ids):
            if not ctx.is_kron(lid):
                self._update_elementwise(ctx, lid)
                continue
            user = self.cap.structured[lid]
            rule, module = user.rule, user.module
            if rule.diagonal_input:  # A is diagonal (embeddings: token frequencies)
                if inputs:
                    _acc(self._a, lid, ctx.token_counts(lid).to(ctx.cap.dtype))
                for c in user.calls:
                    g = c.grad.reshape(*c.grad.shape[:2], -1, c.grad.shape[-1])
                    if inputs:
                        self._n[lid] = self._n.get(lid, 0) + g.shape[1] * g.shape[2]
                    _acc(self._g, lid, second_moment(g))
            else:
                # a bias is folded in as a constant input 1: A = [[Σ a aᵀ, Σ a], [Σ aᵀ, n]]
                ones = rule.order == "ga" and getattr(module, "bias", None) is not None
                rows = []
                for c in user.calls:
                    if not inputs:  # an earlier column: the cotangent rows only
                        rows.append((None, 0, 0, rule.kfac_grad_rows(module, c.args[0], c.grad)))
                        continue
                    moment = None
                    if self.mode == "expand":
                        moment = rule.input_moment(module, c.args[0], c.grad, ones)
                    if moment is None:
                        rows.append(rule.kfac_rows(module, c.args[0], c.grad))
                        continue
                    a, n_rows, gr = moment
                    _acc(self._a, lid, a)
                    self._n[lid] = self._n.get(lid, 0) + n_rows
                    _acc(self._g, lid, second_moment(gr))
                if self.mode == "expand":
                    for am, b, r, gr in rows:
                        if inputs:
                            self._acc_a(lid, am, ones)
                            self._n[lid] = self._n.get(lid, 0) + b * r
                        _acc(self._g, lid, second_moment(gr))
                else:
                    if inputs:
                        r_all = sum(r for _, _, r, _ in rows)
                        abar = sum(am.reshape(b, r, -1).sum(1) for am, b, r, _ in rows) / r_all
                        self._acc_a(lid, abar, ones)
                        self._n[lid] = self._n.get(lid, 0) + abar.shape[0]
                    gbar = sum(gr.sum(2) for *_, gr in rows)  # (K, B, dG)
                    _acc(self._g, lid, second_moment(gbar))
            if not rule.bias_in_kron and getattr(module, "bias", None) is not None:
                bg = ctx.separate_bias(lid)
                _acc(self._b, lid, bg.T @ bg)

    def _acc_a(self, lid, rows, ones):
        """Add Σ [a; 1][a; 1]ᵀ (or Σ a aᵀ) over ``rows`` (…, dA) to A. With many rows (convolution
        patches) the 1 is not appended to them: its row and column are Σ a and the row count."""
        m = rows.reshape(-1, rows.shape[-1])
        n, d = m.shape
        if self.low_rank and lid not in self._a:
            # Fewer rows than half of A's size: keep them (A = Σ r rᵀ has rank ≤ their number). This
            # skips the Gram product, the largest cost of KFAC for a wide first layer, and the damped
            # solve then needs a QR of the rows instead of the eigendecomposition of A.
            kept = self._rows.setdefault(lid, [])
            total = n + sum(r.shape[0] for r in kept)
            if 2 * total <= d + ones:
                # stored feature-major (a transposed view of a (dA, n) block): the LowRank node of
                # the built matrix wants U = rowsᵀ contiguous, which is then this block, not a copy
                buf = m.new_empty(d + ones, n)
                buf[:d].copy_(m.T)
                if ones:
                    buf[d].fill_(1)
                kept.append(buf.T)
                return
            del self._rows[lid]
            if kept:  # from now on A is dense
                _acc(self._a, lid, second_moment(torch.cat(kept)))
        if not ones:
            a = second_moment(m)
        elif n < 4 * d:  # few rows: appending the 1 to them costs less than copying the result
            a = second_moment(torch.cat([m, m.new_ones(n, 1)], dim=1))
        else:
            a = second_moment(m, pad=1)
            s = m.sum(0)
            a[:d, d] = s
            a[d, :d] = s
            a[d, d] = n
        _acc(self._a, lid, a)

    def reduce(self, comm):
        """Sum the factors over a process group (before ``finalize``).

        A low-rank input factor stays in row form only if the rows of all ranks together are still
        fewer than half its size (the single-process rule on the union); its rows are then
        gathered, else every rank forms its dense part and the parts are summed.
        """
        from .distributed import gather_rows

        kron = [lid for lid in self.layer_ids if lid not in self._blk]
        held = [
            sum(r.shape[0] for r in self._rows[lid]) if lid in self._rows else 1 << 50
            for lid in kron
        ]
        held = torch.tensor(held, dtype=torch.int64, device=self.cap.device)
        comm.sum(held)
        comm.flush()
        for lid, total in zip(kron, held.tolist()):
            if lid not in self._rows:
                continue
            rows = torch.cat(self._rows[lid])
            if 2 * total <= rows.shape[1]:
                self._rows[lid] = [gather_rows(comm.group, rows)]
            else:
                del self._rows[lid]
                _acc(self._a, lid, second_moment(rows))
        for lid in self.layer_ids:
            for store in (self._a, self._g, self._b):
                if lid in store:
                    comm.sum(store[lid], symmetric=store[lid].dim() == 2)
            if lid in self._blk:
                comm.sum(self._blk[lid])
        counted = [lid for lid in self.layer_ids if lid in self._n]
        n = torch.tensor(
            [self._n[lid] for lid in counted], dtype=torch.int64, device=self.cap.device
        )
        comm.sum(n)
        comm.then(lambda: self._n.update(zip(counted, (int(v) for v in n.tolist()))))

    def _update_elementwise(self, ctx, lid):
        pe = ctx.per_example(lid)
        n_w = self.cap.lc.layers[lid].numels[0]
        w = pe[:, :n_w]
        stats = [w.square().sum(0)]
        if pe.shape[1] > n_w:
            bias = pe[:, n_w:]
            stats += [(w * bias).sum(0), bias.square().sum(0)]
        stats = torch.stack(stats)
        _acc(self._blk, lid, stats)

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
            if lid in self._rows:
                kept = self._rows[lid]  # feature-major blocks (see _acc_a): joined as such
                rows = kept[0] if len(kept) == 1 else torch.cat([r.mT for r in kept], 1).mT
                rows = rows.div_(math.sqrt(self._n[lid]))
                v = KroneckerFactors(A_rows=rows, G=self._g[lid].mul_(scale))
            else:
                v = KroneckerFactors(A=self._a[lid].div_(self._n[lid]), G=self._g[lid].mul_(scale))
            if lid in self._b:
                v["bias"] = self._b[lid].mul_(scale)
            self.value[lid] = v
        self._a, self._g, self._b, self._rows = {}, {}, {}, {}


def pad_thin_diag(d: torch.Tensor, n_g: int, n_a: int, order: str) -> torch.Tensor:
    """An EKFAC diagonal over a thin basis ``Q_G ⊗ Q_A1`` (``Q_A1`` with ``r`` < ``n_a`` columns; order
    "ga", resp. ``Q_A1 ⊗ Q_G`` for "ag") placed in the complete basis ``Q_G ⊗ [Q_A1 | B]``: 0 on
    the complement ``B``."""
    if order == "ga":
        grid = d.reshape(n_g, -1)
        return torch.nn.functional.pad(grid, (0, n_a - grid.shape[1])).reshape(-1)
    grid = d.reshape(-1, n_g)
    return torch.nn.functional.pad(grid, (0, 0, 0, n_a - grid.shape[0])).reshape(-1)


class EKFACDiagAcc:
    """Second moments of the per-example gradients in a Kronecker eigenbasis (George et al., 2018).

    ``bases[lid] = (Q_A, Q_G)``; the refit diagonal is s = scale · Σ_{k,n} (Q_Gᵀ ∇W Q_A)² (order "ga",
    transposed for "ag"), flattened in the order of ``Q_G ⊗ Q_A`` (resp. ``Q_A ⊗ Q_G``).

    With ∇W_{k,n} = Σ_r g_{k,n,r} ⊗ a_{n,r}, Q_Gᵀ ∇W Q_A = Σ_r (Q_Gᵀ g) ⊗ (Q_Aᵀ a): the rows of A are
    projected once per batch (a chunk of examples at a time, so a convolution's patch matrix never
    exists whole) and kept for the batch's columns, which may come one at a time
    (``column_wise``, see :mod:`~nngeo_ops.nn.engine.streaming`): each column's cotangent rows are
    projected and its per-example gradients in the eigenbasis squared and summed as it arrives.
    Kinds that form their per-example gradients directly (:meth:`KronRule.per_example_weight`,
    convolutions) need no projected rows at all.

    A *thin* input basis, ``bases[lid] = (Q_A1, Q_G, complete)`` with ``Q_A1`` (dA × r, r < dA) and
    ``complete()`` returning a complete basis whose first r columns are ``Q_A1``: the diagonal is
    fitted over ``Q_G ⊗ Q_A1`` only, which is exact when the per-example gradients have no component
    off that range (their input rows lie in range(Q_A1): the refit on the examples that gave A).
    For each column the mass off the range, Σ_{k,n} (Σ_r ‖g_{k,n,r}‖ ‖a_{n,r} − Q_A1 Q_A1ᵀ a_{n,r}‖)²
    (the input rows' residuals are formed with their projection, once per batch; exact with one row
    per example, a bound with several), is compared with the column's mass: above ``16·eps`` of it
    (more than rounding) the layer switches to the complete basis for this column and the next
    ones, the earlier columns' and batches' diagonal padded with their zeros off the range
    (:func:`pad_thin_diag`; they passed the same test). ``completed[lid]`` is then that complete
    basis and ``value[lid]`` is over it; the other thin layers' values are over the thin basis. A
    distributed reduction completes every thin layer (the ranks need the same shapes).
    """

    column_wise = True  # a sum over the columns; the inputs' projection is read at the first

    def __init__(self, cap, bases):
        self.cap = cap
        self.bases = bases
        self.value = {}
        self.completed: dict[str, torch.Tensor] = {}
        # lid: (the projected A rows (B, R, dA), their squared residuals (B, R) or None) of the
        # batch, kept for its later columns
        self._pa = {}

    def update(self, ctx):
        for lid in ctx.select(list(self.bases)):
            basis = self.bases[lid]
            qa, qg = basis[0], basis[1]
            thin = len(basis) > 2 and lid not in self.completed
            if lid in self.completed:
                qa = self.completed[lid]
            user = self.cap.structured[lid]
            rule = user.rule
            if not thin and rule.order == "ga":
                w2 = self._example_squares(user, qa, qg)
                if w2 is not None:
                    _acc(self.value, lid, w2.reshape(-1))
                    continue
            cached = None if ctx.first_column else self._pa.get(lid)
            if cached is None:
                cached = self._project_inputs(user, qa, residuals=thin)
            pa, res2 = cached
            grows = [rule.kfac_grad_rows(user.module, c.args[0], c.grad) for c in user.calls]
            grow = grows[0] if len(grows) == 1 else torch.cat(grows, dim=2)
            w2 = self._squares(pa, grow, qg, rule.order)
            if thin:
                off = self._mass_off_range(res2, grow)
                if off > 16 * torch.finfo(w2.dtype).eps * (off + float(w2.sum())):
                    self._complete(lid, basis, rule.order, qg.shape[1], qa.shape[0])
                    cached = self._project_inputs(user, self.completed[lid], residuals=False)
                    w2 = self._squares(cached[0], grow, qg, rule.order)
            # kept for the next columns of this batch only
            if ctx.last_column:
                self._pa.pop(lid, None)
            else:
                self._pa[lid] = cached
            _acc(self.value, lid, w2.reshape(-1))

    def _squares(self, pa, grow, qg, order):
        if pa.shape[1] == 1:  # one position: Σ_{k,n} (pg ⊗ pa)² = Σ_n (Σ_k pg²) ⊗ pa²
            # Σ_k pg² one column k at a time: no (K, B, dG) projection nor its square at once
            g2 = None
            for gk in grow[:, :, 0]:
                p2 = (gk @ qg).square_()
                g2 = p2 if g2 is None else g2.add_(p2)
            a2 = pa[:, 0].square()
            return g2.T @ a2 if order == "ga" else a2.T @ g2
        return self._per_example_squares(pa, grow, qg, order)

    @staticmethod
    def _mass_off_range(res2, grow) -> float:
        """Σ_{k,n} (Σ_r ‖g_{k,n,r}‖ ‖a_{n,r} − Q Qᵀ a_{n,r}‖)²: the mass of the per-example gradients
        off range(Q_G ⊗ Q) (exact with one row per example, an upper bound with several), from the
        rows' squared residuals ``res2`` (B, R)."""
        gn = torch.linalg.vector_norm(grow, dim=-1)  # (K, B, R), no squared copy of grow
        return float((gn * res2.sqrt()).sum(-1).square().sum())

    def _complete(self, lid, basis, order, n_g, n_a):
        full = basis[2]()
        self.completed[lid] = full
        if lid in self.value:  # earlier columns and batches: nothing off the range (to rounding)
            self.value[lid] = pad_thin_diag(self.value[lid], n_g, n_a, order)

    @staticmethod
    def _example_squares(user, qa, qg):
        """Σ_{k,n} (Q_Gᵀ [∇W ∇b] Q_A)² from the per-example gradients of a kind that forms them
        directly (:meth:`KronRule.per_example_weight`, convolutions), a chunk of examples at a time;
        None for the other kinds. For a convolution this needs neither the patches nor their
        projection (B·R·dA numbers, 33 MB for the benchmark CNN, kept for the batch's columns):
        the grouped kernel and two small products per example."""
        rule, module, calls = user.rule, user.module, user.calls
        k, b = calls[0].grad.shape[:2]
        bias = getattr(module, "bias", None) is not None
        step = max(1, _PATCH_CHUNK // (k * qg.shape[0] * qa.shape[0]))
        out = None
        for i in range(0, b, step):
            x = None
            for c in calls:
                a, g = c.args[0][i : i + step], c.grad[:, i : i + step]
                xw = rule.per_example_weight(module, a, g)  # (K, s, dG, dA without the 1)
                if xw is None:
                    return None
                if bias:
                    xb = rule.bias_grad(module, g, rule.kfac_grad_rows(module, a, g))
                    xw = torch.cat([xw, xb.unsqueeze(-1)], dim=-1)
                x = xw if x is None else x.add_(xw)
            part = (qg.T @ x @ qa).square_().sum((0, 1))
            out = part if out is None else out.add_(part)
        return out

    @staticmethod
    def _project_inputs(user, qa, residuals=False):
        """``(P, res2)``: P (B, R, dA) the A rows of every call of a layer times Q_A, joined over the
        calls along the positions (as :meth:`BatchContext.kron_rows`); the bias's constant 1 of
        order "ga" is projected as Q_A's last row, without appending it to the rows. The rows are
        formed a chunk of examples at a time (:meth:`KronRule.kfac_rows` of a slice of the batch).
        With ``residuals`` (a thin Q_A), ``res2`` (B, R) holds ‖a − Q_A Q_Aᵀ a‖² of each row (the
        constant 1 included), formed from the same chunk; else None."""
        rule, module = user.rule, user.module
        ones = rule.order == "ga" and getattr(module, "bias", None) is not None
        q, q1 = (qa[:-1], qa[-1]) if ones else (qa, None)
        parts, res_parts = [], []
        for c in user.calls:
            a, g = c.args[0], c.grad
            b = a.shape[0]
            out, res, i, step = None, None, 0, 1
            while i < b:
                rows, n, r, _ = rule.kfac_rows(module, a[i : i + step], g[:, i : i + step])
                if out is None:  # R and dA are known from the first example
                    out = rows.new_empty(b, r, qa.shape[1])
                    res = rows.new_empty(b, r) if residuals else None
                    step = max(1, _PATCH_CHUNK // max(1, rows.shape[0] * rows.shape[1]))
                p = torch.mm(rows, q, out=out[i : i + n].view(n * r, -1))
                if q1 is not None:
                    p.add_(q1)
                if residuals:  # Q Qᵀ a − a in one buffer, squared in place (the sign is moot)
                    r2 = torch.matmul(p, q.mT).sub_(rows).square_().sum(-1)
                    if q1 is not None:  # the rows' trailing constant 1
                        r2.add_((p @ q1 - 1).square_())
                    res[i : i + n] = r2.view(n, r)
                i += n
            parts.append(out)
            res_parts.append(res)
        if len(parts) == 1:
            return parts[0], res_parts[0]
        return torch.cat(parts, dim=1), (torch.cat(res_parts, dim=1) if residuals else None)

    @staticmethod
    def _per_example_squares(pa, grow, qg, order):
        """Σ_{k,n} (Σ_r (grow Q_G) ⊗ pa)²: the cotangent rows projected and the per-example gradients
        formed a chunk of examples at a time (neither the projected rows nor the per-example
        gradients of the whole batch exist at once)."""
        k, b, r = grow.shape[:3]
        d_g = qg.shape[1]
        per = k * max(r * d_g, d_g * pa.shape[-1])
        step = max(1, _PATCH_CHUNK // per)
        out = None
        for i in range(0, b, step):
            ga, gg = pa[i : i + step], grow[:, i : i + step] @ qg
            if order == "ga":
                w = torch.einsum("kbrg,bra->kbga", gg, ga)
            else:
                w = torch.einsum("bra,kbrg->kbag", ga, gg)
            part = w.square_().sum((0, 1))
            out = part if out is None else out.add_(part)
        return out

    def finalize(self, scale):
        self.value = {k: v.mul_(scale) for k, v in self.value.items()}

    def reduce(self, comm):
        for lid, basis in self.bases.items():
            if len(basis) > 2 and lid not in self.completed:  # every rank: the complete shape
                user = self.cap.structured[lid]
                self._complete(lid, basis, user.rule.order, basis[1].shape[1], basis[0].shape[0])
            comm.sum(self.value[lid])
