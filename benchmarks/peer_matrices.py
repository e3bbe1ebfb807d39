"""Is a peer's matrix ours? ASDL's diagonal and Kronecker Fisher of the transformer block against
the exact Fisher from ``torch.func`` and against ``nngeo_ops``.

The curvature benchmark compares a peer's time only where it computes the same matrix
(``NOT_SAME_MATRIX`` in ``bench_curvature.py``). For ``nn.Linear`` on a sequence ``(n, T, d)``,
the exact Fisher of ``CrossEntropyLoss(reduction="mean")`` is

    F = 1/n Σ_n J_nᵀ (diag p_n − p_n p_nᵀ) J_n,   J_n = ∂ logits_n / ∂θ,

whose diagonal sums each example's gradient over its T tokens *before* squaring. This script
prints, on 8 sequences of the benchmark's transformer block (float32):

* the relative error of ASDL's ``SHAPE_DIAG`` against diag(F) on the Linear layers, and the two
  traces (ours equals the exact trace);
* per Linear layer, tr(A)·tr(B) of ASDL's ``SHAPE_KRON`` factors against the trace of that layer's
  block of our ``PMatKFAC`` (ASDL's factors leave the bias out, so the dense head, where KFAC is
  exact for both, is the check of the convention).

Run with the peers' interpreter: ``/work/venv-peers/bin/python -m benchmarks.peer_matrices``.
"""

from __future__ import annotations

import torch
from torch.func import functional_call, jacrev, vmap

from benchmarks import bench_curvature as B
from benchmarks import models as M
from nngeo_ops.nn import FIM, PMatDiag, PMatKFAC


def exact_diag(model, x) -> dict[str, torch.Tensor]:
    """diag F per parameter name, from the per-example Jacobians of the logits (torch.func)."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def logits(p, xi):
        return functional_call(model, p, (xi.unsqueeze(0),)).squeeze(0)

    J = vmap(jacrev(logits), in_dims=(None, 0))(params, x)  # name -> (n, C, *shape)
    with torch.no_grad():
        p = torch.softmax(model(x), -1)
    H = torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)  # (n, C, C)
    return {
        k: torch.einsum("ncp,ncd,ndp->p", j.flatten(2), H, j.flatten(2)) / x.shape[0]
        for k, j in J.items()
    }


def main() -> None:
    torch.manual_seed(0)
    model, x, y = M.batch("transformer")
    x, y = x[:8], y[:8]
    linear = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    ex = exact_diag(model, x)

    A = B.asdl_module()
    fm = B.asdl_fisher(A, model, x, y, A.FISHER_EXACT, A.SHAPE_DIAG)
    asdl_d = torch.cat(
        [
            fm.get_fisher_tensor(m, "diag", k).flatten()
            for _, m in linear
            for k in ("weight", "bias")
        ]
    )
    ex_d = torch.cat([ex[f"{n}.{k}"] for n, _ in linear for k in ("weight", "bias")])
    ours = FIM(model, [(x, y)], PMatDiag, n_output=10, progress=False).get_diag()
    err = float((asdl_d - ex_d).norm() / ex_d.norm())
    print(f"diag, Linear layers: ASDL vs exact relative error {err:.3f}")
    print(f"  traces: ASDL {float(asdl_d.sum()):.4g}, exact {float(ex_d.sum()):.4g}")
    print(
        f"  all parameters: ours {float(ours.sum()):.4g}, exact {sum(float(v.sum()) for v in ex.values()):.4g}"
    )

    fm = B.asdl_fisher(A, model, x, y, A.FISHER_EXACT, A.SHAPE_KRON)
    K = FIM(model, [(x, y)], PMatKFAC, n_output=10, progress=False)
    dk = torch.diagonal(K.get_dense_tensor())
    start, off = {}, 0
    for n, p in model.named_parameters():
        start[n], off = (off, off + p.numel()), off + p.numel()
    print("KFAC, per Linear layer: ASDL tr(A)·tr(B) (weight only) / ours (weight and bias) / exact")
    for n, m in linear:
        a, b = fm.get_fisher_tensor(m, "kron", "A"), fm.get_fisher_tensor(m, "kron", "B")
        tr_asdl = float(torch.trace(a) * torch.trace(b))
        ours_tr = sum(float(dk[slice(*start[f"{n}.{k}"])].sum()) for k in ("weight", "bias"))
        ex_tr = sum(float(ex[f"{n}.{k}"].sum()) for k in ("weight", "bias"))
        print(
            f"  {n:6s} {tr_asdl:9.4g} {ours_tr:9.4g} {ex_tr:9.4g}  ASDL/ours {tr_asdl / ours_tr:6.2f}"
        )


if __name__ == "__main__":
    main()
