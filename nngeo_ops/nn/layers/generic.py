"""Per-example gradients of a module that has no layer rule, with ``torch.func``.

The capture engine records the module's inputs and the K cotangents of its output; here the module is
re-run on each example alone (``vmap`` over the batch, the batch axis kept with size 1 so the module
sees the shapes it expects) and the cotangents are pulled back to its own parameters with ``vjp``
(``vmap`` again over K). The module must treat examples independently — true of every layer except
BatchNorm in training mode.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, vjp, vmap

from ...errors import UnsupportedError


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
    # outside the transform, no graph: a forward that reads another module's parameter (one that
    # requires grad, not in ``attrs``) would otherwise hand back statistics that record a graph
    # (torch.func's vjp ignores the outer no_grad and still differentiates with respect to ``params``)
    with torch.no_grad():
        res = vmap(one_example, in_dims=(in_dims, kw_dims, 0))(args, kw_vals, gk)
    return {a: t.reshape(k, b, *t.shape[1:]) for a, t in res.items()}


# ---------------------------------------------------------------------- calls with other parameters
def tied_locations(root: nn.Module, names) -> dict[str, list[str]]:
    """For each parameter name of ``root``, every distinct ``module.attr`` path holding that tensor.

    A parameter is reached once per (module object, attribute) pair: ``Sequential(lin, Tanh(), lin)``
    registers ``lin`` as ``0`` and ``2``, which are one pair (setting ``0.weight`` sets both), while
    a weight tied between an embedding and a projection is two pairs that must both see the tensor.
    """
    wanted = {id(root.get_parameter(n)): n for n in names}
    out: dict[str, list[str]] = {n: [] for n in names}
    seen = set()
    for mod_name, mod in root.named_modules(remove_duplicate=False):
        for attr, p in mod._parameters.items():
            if p is None or id(p) not in wanted or (id(mod), attr) in seen:
                continue
            seen.add((id(mod), attr))
            out[wanted[id(p)]].append(f"{mod_name}.{attr}" if mod_name else attr)
    return out


def call_with(root: nn.Module, tensors: dict, args, kwargs=None, locations=None):
    """``root(*args, **kwargs)`` with the named parameters replaced by ``tensors``, leaving ``root``
    as it was (same ``Parameter`` objects, ``requires_grad`` and values) when it returns.

    ``torch.func.functional_call`` ties weights by name: for a module registered under two names it
    swaps the tensor in twice and restores only one of the originals, so the user's ``Parameter`` is
    left replaced by a plain tensor without gradient. Here each (module, attribute) pair is swapped
    once (``locations`` from :func:`tied_locations`, computed when not given) and nothing is tied
    behind our back.
    """
    if locations is None:
        locations = tied_locations(root, list(tensors))
    params = {path: t for name, t in tensors.items() for path in locations[name]}
    return functional_call(root, params, args, kwargs, tie_weights=False, strict=False)
