"""One forward pass carrying a tangent (dual numbers) while it records the reverse graph.

``dual_forward(fm, batch, v)`` returns the model's outputs f(w) — connected to the reverse graph of
the leaf ``w`` — and the tangent J v, in one pass: the per-batch core of the implicit GGN product
(J v, then H, then a backward for Jᵀ u) and of the first product of its cache.

Why a mode around the pass (:class:`DataTangentMode`, a ``TorchFunctionMode``):

* **The data's zero tangent.** torch's forward-mode formula of ``addmm`` / ``convolution`` is
  bilinear, ``d(x·Wᵀ) = dx·Wᵀ + x·dWᵀ``, and when the input x carries no tangent (the data, at the
  first layer) torch fills dx with zeros and still multiplies it by W: one full product of the first
  layer wasted per pass, which is the largest layer of most models (for the MLP 784-256-128-10 the
  dual forward costs ~3.8 matrix products of the first layer instead of 2), plus two zero tensors
  the size of the input. ``linear`` and ``conv*d`` calls whose input carries no tangent and whose
  weight does return the same dual tensor with the tangent computed as ``op(x, dW, db)`` alone.
  Exact: the dropped term is a product with zero.
* **Tangents kept alive by the reverse graph** (``off_graph``, when J v need not be differentiable).
  Every tensor that an autograd node saves for the backward keeps its tangent with it until the dual
  level exits (``SavedVariable`` stores the forward gradient too, for forward-over-reverse), and a
  tangent computed from primals that require grad is itself recorded on the reverse graph, which
  saves the tangents its formula reads (``gather`` of max-pooling saves its input's tangent, the
  convolution ``dx * W`` saves dx). On the benchmark CNN that is 15 MiB of tangents (every ReLU
  output's, every pooled input's) alive through the forward and, through J v's graph, the whole
  backward: a peak 14 MiB above a separate JVP and VJP. For the layers that save their input or
  output (``linear`` / ``conv*d`` with an input tangent, ``relu``, ``max_pool2d``, ``matmul`` /
  ``bmm``, ``softmax``, ``gelu``, ``layer_norm``), the mode runs
  the op on the primal alone (a tensor without tangent: what the graph saves holds none) and
  computes the tangent with torch's own formula under ``no_grad``, off the reverse graph; each
  tangent is then freed as soon as the next layer has read it, as in a pure forward-mode pass. Other
  calls run torch's formula unchanged (their saved tensors keep their tangents until the pass ends);
  J v is returned detached, so no tangent outlives the forward.
* **Max-pooling on the CPU** (off the graph): the indices come from torch's channels-last kernel,
  several times faster than its (N, C, H, W) one and equal to it (:func:`_pool_indices`); the
  maxima are a gather at them, whose backward is max-pooling's (a scatter-add at the indices).

* **No alias nodes between the rules.** A dual tensor is an alias of its primal: ``make_dual`` records
  a view node on the reverse graph, and ``unpack_dual`` another for the primal it returns, so that a
  chain of intercepted calls doubled the reverse graph (33 nodes for the MLP against 16), which every
  backward then ran, with ``create_graph`` recorded again into the cached graph of Jᵀu. The mode
  remembers (weakly) the primal and tangent of each dual it made, and of the parameters' duals; an
  intercepted call or the pass's output reads them from there, so the reverse graph links the
  primals directly. A dual changed in place since (its version moved) is unpacked as before.

* **Set-up.** The parameters' duals are made one per parameter from the views of w and of v, by
  torch's ``_make_dual`` at the entered level (``fwAD.make_dual`` reads the environment and looks
  for an export mode at every call; its one-time loading of decompositions is done once here).

Every other call runs unchanged. The values are those of torch's formulas (the same products; a
matrix input's ``linear`` sums its tangent's two terms in the other order, accumulated by the
second product), so J v is exact.
"""

from __future__ import annotations

import functools
import weakref

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

# the weight-linear ops with the data as first argument: op(x, weight, bias, *rest)
_WEIGHT_LINEAR = {F.linear, F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d}
_RELU = {F.relu, torch.relu, torch.Tensor.relu}
_MATMUL = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm, torch.Tensor.bmm}
_SOFTMAX = {F.softmax, torch.softmax, torch.Tensor.softmax}


class DataTangentMode(TorchFunctionMode):
    """Inside a ``fwAD.dual_level``: ``linear`` / ``conv*d`` with a tangent-free input compute only the
    parameters' tangent; with ``off_graph`` (the tangents need not be differentiable), ``linear`` /
    ``conv*d`` with an input tangent, ``relu``, ``max_pool2d``, ``matmul`` / ``bmm``, ``softmax``,
    ``gelu`` and ``layer_norm`` run on the primal and compute the tangent off the reverse graph (see
    the module docstring); every other call, or one with arguments a rule does not cover (in-place,
    ``out=``, a ``dtype``), runs unchanged.

    :meth:`split` unpacks a dual into ``(primal, tangent)`` (``(t, None)`` for a plain tensor),
    without an alias node for the duals the mode made or was told of (:meth:`known`)."""

    def __init__(self, off_graph: bool = False, level: int | None = None):
        super().__init__()
        self.off_graph = off_graph
        # ``level`` (the entered dual level): its duals by torch's op itself, without the Python
        # wrapper's per-call read of the environment (to load the decompositions that forward
        # mode uses: done once here) and search for an export mode (which, when exporting, must
        # see the calls: then the wrapper)
        self._make = fwAD.make_dual
        if level is not None and not torch.compiler.is_exporting() and _decompositions_loaded():
            self._make = functools.partial(torch._VF._make_dual, level=level)
        # id(dual) -> weak references to the dual, its primal and its tangent, and the dual's
        # version: weak, so that an activation or a tangent is freed when the pass drops it
        self._parts: dict[int, tuple] = {}

    def known(self, dual, primal, tangent):
        """Remember the parts of ``dual`` (a tangent, not None), for :meth:`split` while unchanged."""
        self._parts[id(dual)] = (
            weakref.ref(dual),
            weakref.ref(primal),
            weakref.ref(tangent),
            dual._version,
        )
        return dual

    def split(self, t):
        """``(primal, tangent)`` of ``t`` (``(None, None)`` for None)."""
        if t is None:
            return None, None
        parts = self._parts.get(id(t))
        if parts is not None and parts[0]() is t and t._version == parts[3]:
            primal, tangent = parts[1](), parts[2]()
            if primal is not None and tangent is not None:
                return primal, tangent
        return tuple(fwAD.unpack_dual(t))

    def dual(self, primal, tangent):
        """``make_dual(primal, tangent)``, remembered."""
        return self.known(self._make(primal, tangent), primal, tangent)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = None
        if func in _WEIGHT_LINEAR and len(args) >= 2:
            out = self._weight_linear(func, args, kwargs)
        elif self.off_graph and func in _RELU and args:
            out = _relu(self, args, kwargs)
        elif self.off_graph and func is F.max_pool2d and args:
            out = _max_pool2d(self, args, kwargs)
        elif self.off_graph and func in _MATMUL and len(args) == 2 and not kwargs:
            out = _matmul(self, func, *args)
        elif self.off_graph and func in _SOFTMAX and args:
            out = _softmax(self, args, kwargs)
        elif self.off_graph and func is F.gelu and args:
            out = _gelu(self, args, kwargs)
        elif self.off_graph and func is F.layer_norm and args:
            out = _layer_norm(self, args, kwargs)
        return func(*args, **kwargs) if out is None else out

    def _weight_linear(self, func, args, kwargs):
        x, weight, rest, kw = args[0], args[1], list(args[2:]), dict(kwargs)
        bias = rest.pop(0) if rest else kw.pop("bias", None)
        if kw or not (torch.is_tensor(x) and torch.is_tensor(weight)):
            return None  # keyword stride/padding/...: torch's own formula (the same values)
        split = self.split
        xp, xt = split(x)
        wp, wt = split(weight)
        bp, bt = split(bias)
        if xt is None:
            if wt is None:  # a weight outside the collection (its bias in it, or neither)
                return None
            primal = func(xp, wp, bp, *rest)  # recorded on the reverse graph of wp, bp
            return self.dual(primal, func(xp, wt, bt, *rest))
        if not self.off_graph or (wt is None and bt is not None):
            return None  # torch's formula: differentiable tangents, or a lone bias tangent
        primal = func(xp, wp, bp, *rest)  # what the graph saves carries no tangent
        with torch.no_grad():  # torch's formula: op(dx, W) + op(x, dW, db), off the graph
            if wt is not None and func is F.linear and xp.dim() == 2 and xt.dim() == 2:
                # a matrix product: the second term accumulated by the product itself (β = 1),
                # without a third tensor and a pass adding it
                tangent = func(xp, wt, bt).addmm_(xt, wp.t())
            else:
                tangent = func(xt, wp, None, *rest)
                if wt is not None:
                    tangent += func(xp, wt, bt, *rest)
        return self.dual(primal, tangent)  # with grad mode on: the dual's alias node


def _relu(mode, args, kwargs):
    xp, xt = mode.split(args[0])
    if xt is None or len(args) > 1 or kwargs.get("inplace", False) or set(kwargs) - {"inplace"}:
        return None
    primal = torch.relu(xp)
    with torch.no_grad():  # torch's formula: the tangent where the output is positive
        tangent = torch.ops.aten.threshold_backward(xt, primal, 0)
    return mode.dual(primal, tangent)


def _matmul(mode, func, a, b):
    if not (torch.is_tensor(a) and torch.is_tensor(b)):
        return None
    (ap, at), (bp, bt) = mode.split(a), mode.split(b)
    if at is None and bt is None:
        return None
    primal = func(ap, bp)
    with torch.no_grad():  # the product rule: dA·B + A·dB
        tangent = func(at, bp) if at is not None else None
        if bt is not None:
            tangent = func(ap, bt) if tangent is None else tangent.add_(func(ap, bt))
    return mode.dual(primal, tangent)


def _softmax(mode, args, kwargs):
    kw = dict(kwargs)
    kw.pop("_stacklevel", None)
    dim = args[1] if len(args) > 1 else kw.pop("dim", None)
    xp, xt = mode.split(args[0])
    if xt is None or dim is None or len(args) > 2 or kw.get("dtype") is not None:
        return None
    primal = torch.softmax(xp, dim)
    with torch.no_grad():  # torch's formula: y ⊙ (dx − Σ_dim y ⊙ dx)
        tangent = primal * (xt - (primal * xt).sum(dim, keepdim=True))
    return mode.dual(primal, tangent)


def _gelu(mode, args, kwargs):
    xp, xt = mode.split(args[0])
    if xt is None or len(args) > 1 or set(kwargs) - {"approximate"}:
        return None
    approximate = kwargs.get("approximate", "none")
    primal = F.gelu(xp, approximate=approximate)
    with torch.no_grad():  # torch's formula: gelu'(x) ⊙ dx
        tangent = torch.ops.aten.gelu_backward(xt, xp, approximate=approximate)
    return mode.dual(primal, tangent)


def _layer_norm(mode, args, kwargs):
    names = ("normalized_shape", "weight", "bias", "eps")
    kw = dict(zip(names, args[1:]), **kwargs)
    if len(args) > 5 or set(kw) - set(names) or "normalized_shape" not in kw:
        return None
    xp, xt = mode.split(args[0])
    wp, wt = mode.split(kw.get("weight"))
    bp, bt = mode.split(kw.get("bias"))
    if xt is None and wt is None and bt is None:
        return None
    shape = kw["normalized_shape"]
    shape = [shape] if isinstance(shape, int) else list(shape)
    eps = kw.get("eps", 1e-5)
    # native_layer_norm: the node F.layer_norm records, with the statistics the tangent needs
    primal, mean, rstd = torch.native_layer_norm(xp, shape, wp, bp, eps)
    with torch.no_grad():  # torch's formula (layer_norm_jvp)
        dims = tuple(range(-len(shape), 0))
        xc = xp - mean
        tangent = None
        if xt is not None:
            dc = xt - xt.mean(dims, keepdim=True)
            rstd_t = -rstd.pow(3) * (dc * xc).mean(dims, keepdim=True)
            tangent = dc * rstd + xc * rstd_t
            if wp is not None:
                tangent = tangent * wp
        if wt is not None:
            part = xc * rstd * wt
            tangent = part if tangent is None else tangent + part
        if bt is not None:
            tangent = bt.expand_as(primal).clone() if tangent is None else tangent + bt
    return mode.dual(primal, tangent)


def _max_pool2d(mode, args, kwargs):
    xp, xt = mode.split(args[0])
    if xt is None:
        return None
    kw = dict(kwargs)
    rest = list(args[1:])
    indices = rest.pop(5) if len(rest) > 5 else kw.pop("return_indices", False)
    idx = _pool_indices(xp, rest, kw)
    # the maxima, on the reverse graph: max-pooling's backward is this gather's
    primal = _at(xp, idx)
    with torch.no_grad():  # torch's formula: the tangent at the maxima
        tangent = _at(xt, idx)
    out = mode.dual(primal, tangent)
    return (out, idx) if indices else out


def _at(t, idx):
    """``t`` at the pooling windows' maxima (torch's forward-mode formula of max-pooling)."""
    return t.flatten(-2).gather(-1, idx.flatten(-2)).view_as(idx)


# channels-last copies of at most this many bytes at a time (a bounded transient)
_POOL_CHUNK = 1 << 20


def _pool_indices(x, rest, kw):
    """The indices of ``max_pool2d_with_indices(x, *rest, **kw)`` (a tensor without gradient).

    On the CPU, torch's kernel for a contiguous (N, C, H, W) input is scalar per window (8.8 ms for
    the benchmark CNN's 128×16×32×32 activations, one thread) while its channels-last kernel,
    vectorised over the channels, takes 1.2 ms, 4 ms with the copy into that layout: the indices
    are taken from a channels-last copy of the input, a batch chunk at a time. Both kernels scan a
    window in the same order and keep the first maximum (a NaN wins), and an index counts in the
    (H, W) plane whatever the layout, so the indices are the same.
    """
    with torch.no_grad():
        cl = torch.channels_last
        # on other devices (CUDA's kernel is fast in either layout) and for a channels-last or
        # empty input, torch's call as it is
        if x.dim() != 4 or not x.is_cpu or x.numel() == 0 or x.is_contiguous(memory_format=cl):
            return F.max_pool2d_with_indices(x, *rest, **kw)[1]
        n = max(1, _POOL_CHUNK // (x[0].numel() * x.element_size()))
        idx = None
        for i, c in enumerate(x.split(n)):
            part = F.max_pool2d_with_indices(c.contiguous(memory_format=cl), *rest, **kw)[1]
            if idx is None:
                idx = part.new_empty((x.shape[0], *part.shape[1:]))
            idx[i * n : i * n + part.shape[0]].copy_(part)  # back to (N, C, H, W) order
        return idx


_LOADED = []


def _decompositions_loaded() -> bool:
    """Whether torch's forward-mode decompositions are loaded, as ``fwAD.make_dual`` loads them
    at each call (an import, once per process); False if this torch has no such step to call."""
    if not _LOADED:
        load = getattr(fwAD, "_maybe_load_decompositions", None)
        if load is None:
            return False
        load()
        _LOADED.append(True)
    return True


def dual_forward(fm, batch, w: torch.Tensor, v: torch.Tensor):
    """``(out, jv)``: the outputs of ``fm(w, batch)`` on the reverse graph of ``w`` (a leaf with
    ``requires_grad``), and J v for the flat tangent ``v`` (P,), or None where the outputs do not
    depend on the covered parameters. Call with grad mode enabled.

    J v is differentiable in ``v`` where grad mode is on and ``v`` requires grad; otherwise it is
    computed off the reverse graph and returned detached (see the module docstring)."""
    off_graph = not (torch.is_grad_enabled() and v.requires_grad)
    v = v.to(w.dtype)
    with fwAD.dual_level() as level:
        mode = DataTangentMode(off_graph, level)
        # one dual per parameter, of its views of w and of v (the tangent as it is: same layout),
        # made outside the mode, which would otherwise dispatch each call through Python; the
        # mode knows their parts (held here for the pass: the mode's references are weak), so an
        # intercepted call reads them without the duals' alias nodes. Cheaper than the views of
        # one dual of w (a split and a view of a dual also split and view its tangent)
        primals, tangents = fm.params(w), fm.params(v)
        params = {n: mode.dual(p, tangents[n]) for n, p in primals.items()}
        with mode:
            out_d = fm.call(params, batch)
        out, jv = mode.split(out_d)
        if off_graph and jv is not None:
            jv = jv.detach()  # J v's graph (torch's formulas) would keep every tangent it read
    return out, jv
