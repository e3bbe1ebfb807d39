"""Whole-model ``torch.func`` paths: Jacobian-vector products and exact Hessians.

These serve the representations that never form per-example gradients:

* the implicit GGN / Fisher, M V = (1/N) Σ_batches Jᵀ (L Lᵀ) (J V), as a batched ``MatFree`` node:
  one forward-mode product (dual numbers for one column, ``jvp`` vmapped over several), the
  output-space factor, one reverse-mode product; nothing of size P×P is ever stored. With a cache
  (:class:`Linearised`) each batch is linearised once and every later product is two backward
  passes over the kept graphs, with no forward pass;
* the Hessian of the loss, dense, per layer, or as Hessian-vector products (forward over reverse;
  reverse over reverse on a kept gradient graph with the cache).

Parameters are seen as one flat vector in the layer collection's order; the model's other parameters
and buffers are left as they are. The model itself is never modified: :func:`~nngeo_ops.nn.layers.generic.call_with` swaps the
given tensors in for the duration of one call and restores the user's ``Parameter`` objects, also
for a module registered under several names or a parameter shared by several modules.
"""

from __future__ import annotations

import contextlib
import re

import torch
from torch import nn
from torch.autograd.function import BackwardCFunction
from torch.func import grad, hessian, jvp, vjp, vmap

from ...errors import UnsupportedError
from ..layers.generic import call_with, tied_locations
from ..losses import apply_factor
from ..params import LayerCollection
from .dual import dual_forward
from .saved import unread_saves


def model_device(model):
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.get_default_device()


class _Call(nn.Module):
    # functional_call needs a module; this one runs the user's function on the (re-parametrised) model
    def __init__(self, model, function):
        super().__init__()
        self.model = model
        self.function = function

    def forward(self, *batch):
        return self.function(*batch)


class FlatModel:
    """``f(flat, batch) -> outputs`` with the covered parameters replaced by slices of ``flat``."""

    def __init__(self, model: nn.Module, lc: LayerCollection, function):
        named = lc.named_parameters(model)
        self.names = ["model." + n for n, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.numels = [p.numel() for _, p in named]
        self.flat0 = torch.cat([p.detach().reshape(-1) for _, p in named])
        self.wrapper = _Call(model, function)
        self.locations = tied_locations(self.wrapper, self.names)
        self.tangent_mask = self._padding_mask(model, lc)
        self.slots = self._slots()

    @staticmethod
    def _padding_mask(model, lc):
        """0 on Embedding padding rows, which torch's backward never reaches, else None.

        Forward-mode products would see these rows; masking the tangent keeps J V consistent with the
        reverse-mode Jᵀ (and with every hook-based representation).
        """
        modules = lc.get_layerid_module_map(model)
        if not any(
            isinstance(m, nn.Embedding) and m.padding_idx is not None for m in modules.values()
        ):
            return None
        parts, any_pad = [], False
        for lid, mod in modules.items():
            for attr, n in zip(lc.layers[lid].attrs, lc.layers[lid].numels):
                m = torch.ones(n, dtype=torch.bool)
                if (
                    isinstance(mod, nn.Embedding)
                    and attr == "weight"
                    and mod.padding_idx is not None
                ):
                    m.view(mod.weight.shape)[mod.padding_idx] = False
                    any_pad = True
                parts.append(m)
        return torch.cat(parts).to(model_device(model)) if any_pad else None

    def __call__(self, flat, batch):
        return self.call(self.params(flat), batch)

    def params(self, flat) -> dict:
        """``{name: view of flat}``, the covered parameters as slices of ``flat``."""
        # split, not slicing: the backward of one split is one concatenation, while each slice's
        # backward would write its gradient into a fresh zero tensor of the full size P. The
        # method itself (Tensor.split is a Python wrapper), and no view of a slice that has the
        # parameter's shape already (a bias): one autograd node less each, on every backward
        parts = flat.split_with_sizes(self.numels)
        return {
            n: t if t.shape == s else t.view(s) for n, s, t in zip(self.names, self.shapes, parts)
        }

    def _slots(self):
        """``[(name, [(module, attr), ...])]``: where :meth:`call` puts each tensor, or None where
        :func:`~nngeo_ops.nn.layers.generic.call_with` must (a scripted module, a location that
        is not a registered parameter). Resolved once; checked again at each call."""
        slots = []
        for name in self.names:
            places = []
            for path in self.locations[name]:
                mod_path, _, attr = path.rpartition(".")
                mod = self.wrapper.get_submodule(mod_path)
                if isinstance(mod, torch.jit.ScriptModule) or attr not in mod._parameters:
                    slots = None
                    break
                places.append((mod, attr))
            if slots is None:
                break
            slots.append((name, places))
        return slots

    def call(self, params: dict, batch):
        """The outputs with the covered parameters replaced by ``params`` (from :meth:`params`)."""
        try:
            return self._call(params, batch)
        except RuntimeError as err:
            if "setup_context" not in str(err):
                raise
            raise UnsupportedError(
                "the model uses a custom torch.autograd.Function without setup_context, which "
                "torch.func transforms cannot run (this path: forward-mode or vmapped products). "
                "Split its forward into forward(*args) and setup_context(ctx, inputs, output) "
                "(https://pytorch.org/docs/stable/notes/extending.func.html), or use what runs on "
                "plain autograd: PMatDense, PMatDiag, PMatBlockDiag, PMatLowRank, PMatKFAC, "
                "PMatEKFAC (hooks) or PMatImplicit (products fall back to double backward)"
            ) from None

    def _call(self, params: dict, batch):
        # what torch.func.functional_call does (call_with, without tying) for the parameters it
        # swaps: each (module, attribute) holds the given tensor in its ``_parameters`` for the
        # call, then its own Parameter again; here without its per-call resolution of the dotted
        # names, its checks for jitted modules and the call of the wrapper module (~10 % of the
        # benchmark MLP's Python time of a product)
        slots = self.slots
        if slots is None or torch.jit.is_tracing() or torch.jit.is_scripting():
            return call_with(self.wrapper, params, batch, locations=self.locations)
        done = []
        try:
            for name, places in slots:
                t = params[name]
                for mod, attr in places:
                    table = mod._parameters
                    if attr not in table:  # the module changed since: the general route
                        raise _Moved
                    done.append((table, attr, table[attr]))
                    table[attr] = t
            args = batch if isinstance(batch, tuple) else (batch,)
            return self.wrapper.function(*args)
        except _Moved:
            pass
        finally:
            for table, attr, orig in reversed(done):
                table[attr] = orig
        return call_with(self.wrapper, params, batch, locations=self.locations)


class _Moved(Exception):
    """A parameter's location is no longer a registered parameter (see ``FlatModel._call``)."""


def _output_hessian(factor, out, batch):
    """``(h, count)``, ``h(U) = L Lᵀ U`` for U of shape (k, B, *out): ``factor.hessian`` where the
    factor object has one (the output model's closed form), else from the factor L, formed once."""
    hessian = getattr(factor, "hessian", None)
    if hessian is not None:
        return hessian(out, batch)
    lmat, count = factor(out, batch)
    return (lambda u: apply_factor(lmat, u)), count


def batched_grad(outputs, inputs, cotangents, create_graph=False):
    """d(outputs)/d(inputs)ᵀ applied to each of the k cotangents (k, *outputs.shape): (k, *inputs.shape).

    The graph is retained (it is reused for further products). One backward for k = 1; otherwise
    ``is_grads_batched`` (vmap over the backward), or one backward per column where an operator of the
    backward has no batching rule.
    """
    kw = dict(retain_graph=True, create_graph=create_graph, allow_unused=True)
    if cotangents.shape[0] == 1:
        (g,) = torch.autograd.grad(outputs, inputs, cotangents[0], **kw)
        g = torch.zeros_like(inputs) if g is None else g
        return g.unsqueeze(0)
    try:
        (g,) = torch.autograd.grad(outputs, inputs, cotangents, is_grads_batched=True, **kw)
    except RuntimeError:
        cols = [torch.autograd.grad(outputs, inputs, c, **kw)[0] for c in cotangents]
        return torch.stack([torch.zeros_like(inputs) if c is None else c for c in cols])
    if g is None:
        return inputs.new_zeros(cotangents.shape[0], *inputs.shape)
    return g


def ggn_matmat(fm: FlatModel, batch, factor, v: torch.Tensor):
    """(Σ_n J_nᵀ L_n L_nᵀ J_n) V for one batch, V of shape (P, k); also returns the batch's count.

    ``factor(out, y) -> (L, count)`` with L of shape (K, B, *out_shape); a factor object with a
    ``hessian(out, y) -> (h, count)`` method, ``h(U) = L Lᵀ U``, is applied by it instead (the
    output model's closed form, e.g. p ⊙ u − p (pᵀu) for a softmax, without forming L). For one column the forward
    pass carries the tangent (forward-mode AD on dual numbers) while it records the reverse graph,
    so the product costs one forward pass with its tangent and one backward; for several columns
    the tangents are vmapped (``torch.func.jvp``) and the cotangents too.
    """
    if fm.tangent_mask is not None:
        v = v * fm.tangent_mask[:, None]
    if v.shape[1] == 1:
        try:
            return _ggn_matvec_dual(fm, batch, factor, v)
        except (RuntimeError, NotImplementedError):  # an op without a forward-mode formula
            pass
    w0 = fm.flat0
    f = lambda w: fm(w, batch)  # noqa: E731
    try:
        out, pull = vjp(f, w0)
    except (RuntimeError, NotImplementedError):  # not runnable under torch.func: plain autograd
        lin = Linearised(fm, batch, factor=factor)
        return lin.matmat(v), lin.count
    try:
        jv = vmap(lambda col: jvp(f, (w0,), (col,))[1], in_dims=1)(v)  # (k, B, *out)
    except (RuntimeError, NotImplementedError):  # no forward mode (e.g. CPU LSTM): double-VJP
        jv = jv_by_double_vjp(fm, batch, v)
    h, count = _output_hessian(factor, out.detach(), batch)
    (jtu,) = vmap(pull)(h(jv))
    return jtu.T, count


def jv_by_double_vjp(fm: FlatModel, batch, v: torch.Tensor) -> torch.Tensor:
    """J V, (k, B, *out) for V of shape (P, k), without forward mode: J V = d(Jᵀu)/du · V.

    For operators without a forward-mode formula (torch's CPU LSTM kernel, custom autograd
    Functions without ``jvp``): one forward pass, a backward with ``create_graph`` and a backward
    through it (plain autograd, no torch.func transform).
    """
    w = fm.flat0.detach().requires_grad_(True)
    with torch.enable_grad():
        out = fm(w, batch)
        if not out.requires_grad:
            return out.new_zeros(v.shape[1], *out.shape)
        u = torch.zeros_like(out, requires_grad=True)
        (g,) = torch.autograd.grad(out, w, u, create_graph=True)
    if not g.requires_grad:
        return out.new_zeros(v.shape[1], *out.shape)
    return batched_grad(g, u, v.T.to(w.dtype)).detach()


def vjp_by_autograd(fm: FlatModel, batch, u: torch.Tensor) -> torch.Tensor:
    """Jᵀ U, (k, P) for cotangents U of shape (k, *out), with plain autograd (no torch.func)."""
    w = fm.flat0.detach().requires_grad_(True)
    with torch.enable_grad():
        out = fm(w, batch)
    if not out.requires_grad:
        return w.new_zeros(u.shape[0], *w.shape)
    return batched_grad(out, w, u.to(out.dtype)).detach()


def _ggn_matvec_dual(fm: FlatModel, batch, factor, v):
    create_graph = torch.is_grad_enabled() and v.requires_grad
    w = fm.flat0.detach().requires_grad_(True)
    with torch.enable_grad():
        out, jv = dual_forward(fm, batch, w, v[:, 0])
    if jv is None:  # the output does not depend on the covered parameters
        jv = torch.zeros_like(out)
    h, count = _output_hessian(factor, out.detach(), batch)
    u = h(jv.unsqueeze(0))
    if not out.requires_grad:
        return torch.zeros_like(v), count
    (g,) = torch.autograd.grad(out, w, u[0], create_graph=create_graph, allow_unused=True)
    return (torch.zeros_like(w) if g is None else g)[:, None], count


class Linearised:
    """One batch linearised once, for many products: the output with its reverse graph, and the graph
    of u ↦ Jᵀu (built by differentiating with ``create_graph``), so that

    * J V   = d(Jᵀu)/du applied to V (a backward through the backward graph, "double-VJP"),
    * Jᵀ U  = a backward through the forward graph,

    each about the cost of one backward pass, with no forward pass per product. With ``factor`` the
    output curvature of the batch is kept too (``h(U) = L Lᵀ U``: the output model's closed form, or
    the factor L for Monte-Carlo labels, drawn once; GGN / Fisher);
    with ``loss`` the graph of the gradient of the batch's loss is kept instead, and the products are
    Hessian-vector products (reverse over reverse). Where an operator of the model has no double
    backward, J V falls back to forward mode on the kept batch (Hessian: forward over reverse).
    Memory: the activations of the batch, as long as the object lives; of its backward pass, only
    what J V reads (no saved cotangent where the graph is torch's own formulas: :mod:`.saved`).

    ``first`` (GGN / Fisher, one column (P, 1)): the linearisation also computes the batch's product
    with it, at the cost of one uncached product, kept in ``self.first``. The forward pass carries
    the tangent (J v by dual numbers, :func:`~nngeo_ops.nn.engine.dual.dual_forward`) and the graph
    of u ↦ Jᵀu is built by the backward that computes Jᵀ(L Lᵀ J v): u is a leaf holding that
    cotangent instead of zeros, and since Jᵀu is linear in u its graph is the same. Without
    ``first`` that graph costs a backward whose values are thrown away, on top of the product.
    ``first`` is a view of the value of Jᵀu, which later products never read (they differentiate
    through its graph, from ``self.jtu`` as a root): the caller may take it and scale it in place.
    """

    def __init__(self, fm: FlatModel, batch, factor=None, loss=None, first=None):
        self.fm, self.batch, self.loss = fm, batch, loss
        self.double = True
        self.first = None
        w = fm.flat0.detach().requires_grad_(True)
        self.w = w
        with torch.enable_grad():
            if loss is not None:
                out = fm(w, batch)
                value, self.count = loss(out, batch)
                self.grad = None
                if value.requires_grad:
                    (self.grad,) = torch.autograd.grad(value, w, create_graph=True)
                    self.double = self._hessian_test()
                return
            out, jv = None, None
            if first is not None:
                if fm.tangent_mask is not None:
                    first = first * fm.tangent_mask[:, None]
                try:
                    out, jv = dual_forward(fm, batch, w, first[:, 0])
                except (RuntimeError, NotImplementedError):  # no forward-mode formula
                    out, first = None, None
            if out is None:
                out = fm(w, batch)
            self.out, self.jtu = out, None
            self.h, self.count = _output_hessian(factor, out.detach(), batch)
            jv = torch.zeros_like(out) if jv is None else jv.detach()
            u0 = self.h(jv.unsqueeze(0))[0]
            if not out.requires_grad:
                if first is not None:
                    self.first = torch.zeros_like(first)
                return
            self.u = u0.detach().requires_grad_(True)
            forward = self._trusted_graph()  # its nodes, or None
            try:
                # torch's formulas alone: the cotangents the backward saves are not kept (the
                # forward graph's nodes, made before u, cannot reach it: its walk stops there)
                hooks = (
                    contextlib.nullcontext() if forward is None else unread_saves(self.u, forward)
                )
                with hooks:
                    (self.jtu,) = torch.autograd.grad(out, w, self.u, create_graph=True)
                self.double = forward is not None or self._adjoint_test()
            except (RuntimeError, NotImplementedError):
                self.double = False
            if first is not None:
                if self.jtu is not None:
                    self.first = self.jtu.detach()[:, None]
                else:  # the graph of Jᵀu could not be built: Jᵀu by a plain backward
                    self.first = batched_grad(out, w, u0.unsqueeze(0)).T

    # autograd nodes of torch's own derivative formulas ("AddmmBackward0"), whose double backward is
    # implemented (and checked by torch's gradgradcheck) or raises; Identity passes gradients on
    _BUILTIN_NODE = re.compile(
        r"[A-Za-z0-9_]+Backward[0-9]+|torch::autograd::(AccumulateGrad|Identity)"
    )
    _builtin_names: dict[str, bool] = {}  # the pattern's verdict on each node name met so far
    _kinds: dict[type, bool] = {}  # ... and on each generated node class (see _trusted_graph)

    def _trusted_graph(self) -> set | None:
        """The forward graph's nodes if they are only torch's own derivative formulas: no custom
        ``autograd.Function`` (Python or C++), backward hook or compiled graph, the nodes whose
        backward may drop paths silently under double backward (see :meth:`_adjoint_test`);
        else None. A walk over the graph's nodes instead of the test's two backward passes."""
        seen, stack, names, kinds = set(), [self.out.grad_fn], self._builtin_names, self._kinds
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            ok = kinds.get(type(node))
            if ok is None:
                if isinstance(node, BackwardCFunction):
                    return None
                name = node.name()
                ok = names.get(name)
                if ok is None:
                    ok = names[name] = self._BUILTIN_NODE.fullmatch(name) is not None
                if ok and type(node).__name__ == name:
                    # a class of torch's generated formulas (named as its nodes): one verdict per
                    # class, without the name of every node; not a class shared by several kinds
                    # of node (a C++ custom function's), whose name says which
                    kinds[type(node)] = ok
            if not ok:
                return None
            stack.extend(f for f, _ in node.next_functions)
        return seen

    def _adjoint_test(self) -> bool:
        """⟨J v, z⟩ = ⟨v, Jᵀ z⟩ on random v, z: is the double-VJP graph a faithful J?

        A backward that autograd cannot differentiate silently (a custom ``autograd.Function`` whose
        backward is ``once_differentiable`` or leaves the graph) yields a J V that misses paths, with
        no error; Jᵀ z through the forward graph is always right, so one random probe tells them apart.
        Run only where :meth:`_trusted_graph` finds a node that is not one of torch's formulas.
        """
        if not self.jtu.requires_grad:
            return True
        g = torch.Generator(device=self.w.device).manual_seed(0)
        v = torch.randn(self.w.shape, generator=g, device=self.w.device, dtype=self.w.dtype)
        z = torch.randn(self.out.shape, generator=g, device=self.w.device, dtype=self.w.dtype)
        jv = batched_grad(self.jtu, self.u, v[None])[0]
        jtz = batched_grad(self.out, self.w, z[None])[0]
        a, b = torch.dot(jv.reshape(-1), z.reshape(-1)), torch.dot(v, jtz)
        tol = torch.finfo(self.w.dtype).eps ** 0.5
        return bool(abs(a - b) <= tol * (jv.norm() * z.norm() + v.norm() * jtz.norm()))

    def _hessian_test(self) -> bool:
        """Reverse over reverse against forward over reverse on one random probe (see above)."""
        if not self.grad.requires_grad:
            return True
        g = torch.Generator(device=self.w.device).manual_seed(0)
        v = torch.randn(self.w.shape, generator=g, device=self.w.device, dtype=self.w.dtype)
        try:
            ref = hessian_matmat(self.fm, self.batch, self.loss, v[:, None], fallback=False)[0][
                :, 0
            ]
        except (RuntimeError, NotImplementedError):  # no forward over reverse: nothing to compare
            return True
        hv = batched_grad(self.grad, self.w, v[None])[0]
        tol = torch.finfo(self.w.dtype).eps ** 0.5
        return bool((hv - ref).norm() <= tol * (ref.norm() + hv.norm()))

    def matmat(self, v: torch.Tensor) -> torch.Tensor:
        """The batch's (unnormalised) Jᵀ L Lᵀ J V, or Hessian times V, for V of shape (P, k)."""
        create_graph = torch.is_grad_enabled() and v.requires_grad
        if self.fm.tangent_mask is not None:
            v = v * self.fm.tangent_mask[:, None]
        vt = v.T.to(self.w.dtype)
        if self.loss is not None:
            if self.grad is None:
                return torch.zeros_like(v)
            if self.double and self.grad.requires_grad:
                try:
                    return batched_grad(self.grad, self.w, vt, create_graph).T
                except (RuntimeError, NotImplementedError):
                    self.double = False
            if not self.grad.requires_grad:  # the loss is linear in the parameters
                return torch.zeros_like(v)
            return hessian_matmat(self.fm, self.batch, self.loss, v, fallback=False)[0]
        if not self.out.requires_grad:
            return torch.zeros_like(v)
        jv = None
        if self.double and self.jtu is not None:
            if not self.jtu.requires_grad:  # Jᵀu does not depend on u: J = 0
                return torch.zeros_like(v)
            try:
                jv = batched_grad(self.jtu, self.u, vt, create_graph)  # (k, B, *out)
            except (RuntimeError, NotImplementedError):
                self.double = False
        if jv is None:
            f = lambda w: self.fm(w, self.batch)  # noqa: E731
            jv = vmap(lambda col: jvp(f, (self.fm.flat0,), (col,))[1])(vt)
        return batched_grad(self.out, self.w, self.h(jv), create_graph).T


def hessian_matmat(fm: FlatModel, batch, loss, v: torch.Tensor, fallback: bool = True):
    """(∇² Σ-loss of the batch) V via forward-over-reverse; ``loss(out, batch) -> (value, count)``.

    Where forward mode or torch.func cannot run the model (and ``fallback``), reverse over reverse
    on the kept gradient graph (:class:`Linearised`)."""
    w0 = fm.flat0
    g = grad(lambda w: loss(fm(w, batch), batch)[0])
    if fm.tangent_mask is not None:
        v = v * fm.tangent_mask[:, None]
    try:
        hv = vmap(lambda col: jvp(g, (w0,), (col,))[1], in_dims=1)(v)
    except (RuntimeError, NotImplementedError):
        if not fallback:
            raise
        lin = Linearised(fm, batch, loss=loss)
        return lin.matmat(v), lin.count
    with torch.no_grad():
        count = loss(fm(w0, batch), batch)[1]
    return hv.T, count


def hessian_dense(fm: FlatModel, batch, loss):
    """The dense Hessian of the batch's summed loss, and its count."""
    h = hessian(lambda w: loss(fm(w, batch), batch)[0])(fm.flat0)
    with torch.no_grad():
        count = loss(fm(fm.flat0, batch), batch)[1]
    return h, count


def hessian_blocks(fm: FlatModel, batch, loss, slices):
    """The diagonal blocks (one per slice) of the Hessian of the batch's summed loss."""
    w0 = fm.flat0
    out = []
    for sl in slices:

        def f(part, sl=sl):
            w = torch.cat([w0[: sl.start], part, w0[sl.stop :]])
            return loss(fm(w, batch), batch)[0]

        out.append(hessian(f)(w0[sl]))
    with torch.no_grad():
        count = loss(fm(w0, batch), batch)[1]
    return out, count
