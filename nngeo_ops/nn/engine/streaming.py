"""Columns streamed layer by layer: each output cotangent of each column is consumed as the backward
produces it.

Where the K output columns are back-propagated one at a time (a convolution's backward has no
batching rule), :meth:`~nngeo_ops.nn.engine.capture.Capture.process` with ``consume`` runs K backward
passes over the retained graph. ``torch.autograd.grad(out, edges, column)`` would return every
layer's cotangent of the column together, at the end of the backward: for the benchmark CNN
(conv 3→16, conv 16→32, dense 2048→10, batch 128 of 3×32×32) 12.6 MB, all held while the backward's
own temporaries exist, and the previous column's until the next one had been returned. Here,
instead:

* a tensor hook on each recorded output (registered by the forward hook, removed by ``process``)
  receives its cotangent as soon as the backward has formed it;
* once every call of a layer has its cotangent for this column, the accumulators are updated for
  that layer alone (``BatchContext.layer``), and the cotangents no other layer still needs are
  dropped — the memory of one layer's cotangent at a time, as a backward hook would have;
* the backward is ``torch.autograd.backward(out, column, inputs=edges)`` on the outputs' gradient
  edges: it runs exactly the part of the graph between the output and the recorded layers (what
  ``autograd.grad`` to the same edges runs), captures nothing, and accumulates no parameter
  gradient — the nodes of the edges themselves run with no gradient to form.

Per column, ``pending[lid]`` counts the calls of layer ``lid`` whose cotangent has not arrived and
``left[call]`` the layers of a call not yet consumed. A call whose output this column does not reach
(its hook does not fire) gets a zero cotangent after the backward, and its layers are consumed then.
The statistics are those of :meth:`Capture.process` without ``consume``: each accumulator that
streams (``column_wise``) sums over the columns and reads the inputs at one of them (KFAC: the last).
"""

from __future__ import annotations

import torch


def stream_columns(cap, out, calls, lmat, count, consume, context):
    """Back-propagate the columns of ``lmat`` (K, B, …) one at a time from ``out``, handing each
    layer's cotangent of each column to ``consume`` as it is formed (see the module docstring).

    ``cap`` is the :class:`~nngeo_ops.nn.engine.capture.Capture` whose forward recorded ``calls``
    with taps (``cap._forward(batch, taps=True)``); ``context`` its ``BatchContext`` class (passed
    in: capture imports this module). Returns the batch's context (size and count).
    """
    layers_of = {id(c): [] for c in calls}
    calls_of: dict[str, list] = {}
    users_of: dict[str, list] = {}
    for u in cap.users:
        for lid in dict.fromkeys(key[0] for key in u.keys):
            calls_of.setdefault(lid, []).extend(u.calls)
            users_of.setdefault(lid, []).append(u)
            for c in u.calls:
                layers_of[id(c)].append(lid)
    # the accumulation dtype (see engine.precision) for what the layer rules read; the generic path
    # re-runs the module and keeps the model's precision
    ruled = {id(c) for u in cap.users if u.rule is not None for c in u.calls}
    widen = cap.dtype != out.dtype
    if widen:
        for u in cap.users:
            if u.rule is not None:
                for c in u.calls:
                    c.args = tuple(
                        a.to(cap.dtype) if torch.is_tensor(a) and a.is_floating_point() else a
                        for a in c.args
                    )
    edges = [c.edge for c in calls if c.edge is not None]
    b, n_cols = out.shape[0], lmat.shape[0]
    for k, lk in enumerate(lmat):
        ctx = context(cap, b, 1, count, column=k, columns=n_cols)
        pending = {lid: len(cs) for lid, cs in calls_of.items()}
        left = {id(c): len(layers_of[id(c)]) for c in calls}
        arrived = set()

        def arrive(call, g, ctx=ctx, pending=pending, left=left, arrived=arrived):
            arrived.add(id(call))
            if g is None:
                g = torch.zeros((1, *call.shape), dtype=out.dtype, device=out.device)
            else:
                g = g.unsqueeze(0)
                if widen and id(call) in ruled:
                    g = g.to(cap.dtype)
            call.grad = g
            for lid in layers_of[id(call)]:
                pending[lid] -= 1
                if pending[lid]:
                    continue
                ctx.layer = lid
                consume(ctx)
                ctx.layer = None
                ctx._pe.pop(lid, None)
                for c in calls_of[lid]:
                    left[id(c)] -= 1
                    if not left[id(c)]:
                        c.grad = None
                for u in users_of[lid]:
                    if all(not left[id(c)] for c in u.calls):
                        ctx._upe.pop(id(u), None)

        cap._sink = arrive
        try:
            if edges:
                torch.autograd.backward(out, lk, inputs=edges, retain_graph=k < n_cols - 1)
        finally:
            cap._sink = None
        for c in calls:
            if id(c) not in arrived:
                arrive(c, None)
    return context(cap, b, n_cols, count)
