"""Devices and precision: nothing is hard-coded to the CPU or to float32, and the main paths run in
float32, float64 and bfloat16 (statistics of half models accumulated in float32), close to float64."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

from nngeo_ops.nn import (
    FIM,
    GGN,
    GramMatrix,
    Hessian,
    PMatBlockDiag,
    PMatDense,
    PMatDiag,
    PMatEKFAC,
    PMatImplicit,
    PMatKFAC,
    PMatLowRank,
    PMatQuasiDiag,
)
from nngeo_ops.nn.engine.precision import accumulation_dtype

PACKAGE = Path(__file__).resolve().parents[3] / "nngeo_ops"

# a literal device or single precision in library code pins users to it; each exception says why
PATTERNS = [r"[\"']cpu[\"']", r"\.cpu\(\)", r"dtype=torch\.float32", r"\.float\(\)", r"\.half\(\)"]
ALLOWED = {
    ("linalg/scipy_adapter.py", r"\.cpu\(\)"): "numpy arrays live in host memory",
    ("linalg/_matvec.py", r"\.float\(\)"): "an error message suggesting a conversion",
    ("apps/demo.py", r"\.float\(\)"): "an accuracy of booleans, a Python float",
    ("apps/plotting.py", r"\.cpu\(\)"): "matplotlib reads host memory",
    ("ops/rules/sylvester.py", r"\.cpu\(\)"): "scipy's Schur decomposition reads host memory",
    ("ops/dense.py", r"\.cpu\(\)"): "scipy's QR-iteration eigh (a fallback) reads host memory",
    ("ops/shifted_dense.py", r"[\"']cpu[\"']"): (
        "in-place out= factorisation verified on CPU; other devices take the out-of-place call"
    ),
    ("linalg/_common.py", r"\.float\(\)"): "an error message suggesting a conversion",
    ("linalg/symv.py", r"[\"']cpu[\"']"): "scipy's BLAS symv reads host memory (a CPU-only route)",
    ("testing/operator_suite.py", r"dtype=torch\.float32"): "the suite checks float32 on purpose",
    ("testing/operator_suite.py", r"\.float\(\)"): "the suite checks float32 on purpose",
    ("nn/engine/saved.py", r"[\"']cpu[\"']"): "host zero pages (elsewhere torch.zeros)",
    ("nn/losses.py", r"[\"']cpu[\"']"): "a route around one slow CPU kernel (class_softmax)",
}


def test_no_hard_coded_device_or_single_precision():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        for i, line in enumerate(path.read_text().splitlines(), 1):
            for pat in PATTERNS:
                if re.search(pat, line) and (rel, pat) not in ALLOWED:
                    found.append(f"{rel}:{i}: {line.strip()}")
    assert not found, "hard-coded device or dtype:\n" + "\n".join(found)


def test_accumulation_dtype():
    assert accumulation_dtype(torch.bfloat16) == torch.float32
    assert accumulation_dtype(torch.float16) == torch.float32
    assert accumulation_dtype(torch.float32) == torch.float32
    assert accumulation_dtype(torch.float64) == torch.float64


TOL = {torch.float64: 1e-12, torch.float32: 1e-4, torch.bfloat16: 5e-2}
REPS = (PMatDense, PMatDiag, PMatBlockDiag, PMatKFAC, PMatEKFAC, PMatQuasiDiag, PMatLowRank)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_main_paths_in_each_precision(dtype):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    model, ref_model = base.to(dtype), None
    torch.manual_seed(0)
    ref_model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    ref_model.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(24, 5, generator=g).to(dtype), torch.randint(0, 3, (24,), generator=g)
    data = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 24, 8)]
    ref = [(b.double(), t) for b, t in data]  # the same (rounded) inputs in float64
    stat = accumulation_dtype(dtype)
    ce = nn.CrossEntropyLoss()
    tol = TOL[dtype]
    v = torch.randn(sum(p.numel() for p in model.parameters()), generator=g)
    for rep in REPS + (PMatImplicit,):
        f = FIM(model, data, rep, progress=False)
        r = FIM(ref_model, ref, rep, progress=False)
        assert f.op.dtype == stat, rep.__name__
        got, want = f.mv(v.to(dtype)), r.mv(v.double())
        assert got.dtype == dtype  # results in the vector's precision
        err = float((got.double() - want).norm() / want.norm())
        assert err < tol, (rep.__name__, err)
        if rep is not PMatImplicit:
            s = f.solve(v.to(dtype), regul=0.5)
            w = r.solve(v.double(), regul=0.5)
            assert float((s.double() - w).norm() / w.norm()) < tol, rep.__name__
    for rep in (PMatDense, PMatDiag):  # Hessian and GGN entry points
        for build in (
            lambda m, d, rep=rep: GGN(m, d, ce, rep, progress=False),
            lambda m, d, rep=rep: Hessian(m, d, ce, rep, progress=False),
        ):
            got, want = build(model, data).to_torch(), build(ref_model, ref).to_torch()
            assert got.dtype == stat
            assert float((got.double() - want).norm() / want.norm()) < tol
    k = GramMatrix(model, [b for b, _ in data], progress=False).to_torch()
    kr = GramMatrix(ref_model, [b for b, _ in ref], progress=False).to_torch()
    assert float((k.double() - kr).norm() / kr.norm()) < tol


def test_gpu_benchmark_skips_cleanly_without_cuda():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "gpu_bench", PACKAGE.parent / "benchmarks" / "gpu.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: run benchmarks/gpu.py by hand")
    assert "no CUDA device" in mod.run(quick=True)
