"""Compare ``nngeo_ops.compat.nngeometry`` with NNGeometry itself on the conventions the compat
layer reproduces (a comparison script, not a test: our tests check against torch.func).

Usage::

    python benchmarks/compare_nngeometry.py PATH_TO_NNGEOMETRY_CHECKOUT [--out DIR]

``PATH_TO_NNGEOMETRY_CHECKOUT`` is a checkout of https://github.com/tfjgeorge/nngeometry (its
package is imported from there; nothing is downloaded). Both libraries build the same matrices of
the same float64 model and data; the table gives the largest absolute difference of each quantity:

* ``PMatMixed.from_mapping`` with KFAC on Linear layers, a block-diagonal part elsewhere: the
  matrix, its inverse ``inv(λ)`` (NNGeometry inverts part by part, the KFAC part π-damped) and
  ``solve(v, λ)``;
* ``PMatEKFACBlockDiag`` before and after ``update_diag``, and after a pickle round trip (whose
  generator is replaced by a ``DummyGenerator``: ``update_diag`` then raises AttributeError in
  both);
* KFAC ``inv(λ)`` with π-damping and ``to_torch(split_weight_bias=False)`` (interleaved layout).
"""

from __future__ import annotations

import argparse
import importlib
import os
import pickle
import sys


def _import(prefix):
    names = ["backend", "layercollection", "object.pspace", "object.vector", "metrics"]
    return {n: importlib.import_module(f"{prefix}.{n}") for n in names}


def _build(mods, torch):
    nn = torch.nn
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 3)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (40,), generator=g)
    data = torch.utils.data.TensorDataset(x, y)
    loader = torch.utils.data.DataLoader(data, batch_size=10)
    lcmod, ps = mods["layercollection"], mods["object.pspace"]
    lc = lcmod.LayerCollection.from_model(model)

    def fn(inputs, targets):  # a local closure: pickling must drop it
        return model(inputs)

    backend = mods["backend"].TorchHooksJacobianBackend(model=model, function=fn)
    v = torch.randn(lc.numel(), generator=g, dtype=torch.float64)
    vec = mods["object.vector"].PVector(lc, vector_repr=v)
    lam = 0.05
    out = {}
    mixed = ps.PMatMixed.from_mapping(
        lc,
        backend,
        default_representation=ps.PMatBlockDiag,
        map_layers_to={lcmod.LinearLayer: ps.PMatKFAC},
        examples=loader,
    )
    out["mixed KFAC/blockdiag: matrix"] = mixed.to_torch()
    out["mixed KFAC/blockdiag: inv(λ)"] = mixed.inv(lam).to_torch()
    out["mixed KFAC/blockdiag: solve(v, λ)"] = mixed.solve(vec, regul=lam).to_torch()
    ek = ps.PMatEKFACBlockDiag(layer_collection=lc, generator=backend, examples=loader)
    out["EKFACBlockDiag: matrix"] = ek.to_torch()
    back = pickle.loads(pickle.dumps(ek))
    out["EKFACBlockDiag: pickled, matrix"] = back.to_torch()
    try:
        back.update_diag(loader)
        refit = "no error"
    except AttributeError:
        refit = "AttributeError"
    ek.update_diag(loader)
    out["EKFACBlockDiag: after update_diag"] = ek.to_torch()
    lin = lcmod.LayerCollection()
    for module in (model[0], model[3]):
        lin.add_layer_from_model(model, module)
    kfac = ps.PMatKFAC(layer_collection=lin, generator=backend, examples=loader)
    w = torch.randn(lin.numel(), generator=g, dtype=torch.float64)
    wvec = mods["object.vector"].PVector(lin, vector_repr=w)
    out["KFAC (Linear layers): interleaved matrix"] = kfac.to_torch(split_weight_bias=False)
    out["KFAC (Linear layers): π-damped solve(v, λ)"] = kfac.solve(wvec, regul=lam).to_torch()
    return out, refit


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("checkout", help="path of a checkout of NNGeometry's repository")
    p.add_argument("--out", default=None, help="folder for compare_nngeometry.md")
    args = p.parse_args(argv)
    import torch

    # NNGeometry allocates some of its buffers in the default dtype: float32 would cap the agreement
    # of a float64 model at ~1e-8 for reasons that are not the conventions compared here
    torch.set_default_dtype(torch.float64)
    sys.path.insert(0, os.path.abspath(args.checkout))
    theirs, refit_theirs = _build(_import("nngeometry"), torch)
    ours, refit_ours = _build(_import("nngeo_ops.compat.nngeometry"), torch)
    lines = ["| quantity | max abs difference | max abs value |", "|---|---|---|"]
    for key, t in theirs.items():
        diff = (ours[key] - t).abs().max().item()
        lines.append(f"| {key} | {diff:.2e} | {t.abs().max().item():.2e} |")
    lines.append(f"| pickled update_diag | ours: {refit_ours} | NNGeometry: {refit_theirs} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "compare_nngeometry.md"), "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
