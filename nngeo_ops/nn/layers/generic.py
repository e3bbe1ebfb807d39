"""Per-example gradients of a module that has no layer rule, with ``torch.func``.

The capture engine records the module's inputs and the K cotangents of its output; here the module is
re-run on each example alone (``vmap`` over the batch, the batch axis kept with size 1 so the module
sees the shapes it expects) and the cotangents are pulled back to its own parameters with ``vjp``
(``vmap`` again over K). The module must treat examples independently — true of every layer except
BatchNorm in training mode.
"""

from __future__ import annotations

import torch
from torch.func import vjp, vmap

from ...errors import UnsupportedError
from ..engine.functional import call_with, tied_locations


def generic_per_example(module, attrs, args, kwargs, g, index=None) -> dict[str, torch.Tensor]:
    """{attr: (K, B, *shape)} for the module's direct parameters ``attrs``.

    ``args``/``kwargs`` are the recorded call arguments; tensor arguments whose first dimension is the
    batch size are split per example, the others are broadcast. ``index`` selects the element of a
    tuple output that ``g`` is the cotangent of.
    """
    k, b = g.shape[:2]
    params = {a: module.get_parameter(a).detach() for a in attrs}  # dotted names allowed
    locations = tied_locations(module, list(attrs))
    in_dims = tuple(
        0 if torch.is_tensor(x) and x.dim() > 0 and x.shape[0] == b else None for x in args
    )
    kw_keys = tuple(kwargs)
    kw_vals = tuple(kwargs[key] for key in kw_keys)
    kw_dims = tuple(
        0 if torch.is_tensor(x) and x.dim() > 0 and x.shape[0] == b else None for x in kw_vals
    )
    detach = lambda x: x.detach() if torch.is_tensor(x) else x  # noqa: E731
    args = tuple(detach(x) for x in args)
    kw_vals = tuple(detach(x) for x in kw_vals)

    def one_example(args_n, kw_n, g_n):
        args_n = tuple(x.unsqueeze(0) if d == 0 else x for x, d in zip(args_n, in_dims))
        kw_n = {key: (x.unsqueeze(0) if d == 0 else x) for key, x, d in zip(kw_keys, kw_n, kw_dims)}

        def f(p):
            out = call_with(module, p, args_n, kw_n, locations)
            if index is not None:
                out = out[index]
            if not torch.is_tensor(out):
                raise UnsupportedError(
                    f"module {type(module).__name__} returns {type(out).__name__}; the generic "
                    "path needs a tensor output"
                )
            return out

        _, pull = vjp(f, params)
        return pull(g_n.unsqueeze(0))[0]

    # one flat vmap over the K·B (column, example) pairs: nested vmaps hit missing batching rules
    # (e.g. prelu's backward), and the inputs are only repeated K times
    rep = lambda x, d: x.expand(k, *x.shape).reshape(k * b, *x.shape[1:]) if d == 0 else x  # noqa: E731
    args = tuple(rep(x, d) for x, d in zip(args, in_dims))
    kw_vals = tuple(rep(x, d) for x, d in zip(kw_vals, kw_dims))
    gk = g.reshape(k * b, *g.shape[2:])
    res = vmap(one_example, in_dims=(in_dims, kw_dims, 0))(args, kw_vals, gk)
    return {a: t.reshape(k, b, *t.shape[1:]) for a, t in res.items()}
