"""The main cases on a CUDA GPU, timed with CUDA events: one command for a GPU check.

``python benchmarks/gpu.py [--quick] [--out DIR]`` builds on ``cuda`` (float32 and bfloat16, whose
statistics are accumulated in float32) KFAC, the diagonal and the dense Fisher of an MLP, one
product of the implicit GGN, a damped KFAC solve and the NTK Gram matrix, checks each against the
same computation in float64 on the CPU (relative error), and prints the times as ratios to one plain
forward+backward of the model on the same data and device. Without a GPU it says so and exits 0.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch
from torch import nn

if importlib.util.find_spec("nngeo_ops") is None:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nngeo_ops.nn import GGN, GramMatrix, PMatDense, PMatDiag, PMatImplicit, PMatKFAC  # noqa: E402


def _events_time(fn, repeats):
    fn()  # warm-up (kernels, allocator)
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end))
    return best  # ms


def _case_list(model, data, ce, v, ntk_x):
    return {
        "KFAC build": lambda: GGN(model, data, ce, PMatKFAC, progress=False),
        "diagonal build": lambda: GGN(model, data, ce, PMatDiag, progress=False),
        "dense build": lambda: GGN(model, data, ce, PMatDense, progress=False),
        "implicit GGN product": lambda: GGN(model, data, ce, PMatImplicit, progress=False).op @ v,
        "KFAC damped solve": lambda: GGN(model, data, ce, PMatKFAC, progress=False).solve(
            v, regul=1e-3
        ),
        "NTK Gram (64 examples)": lambda: GramMatrix(model, ntk_x, progress=False).to_torch(),
    }


def _result(out):
    if torch.is_tensor(out):
        return out
    return out.to_torch()


def run(quick=False):
    if not torch.cuda.is_available():
        return "no CUDA device: benchmarks/gpu.py skipped (nothing to measure on this machine)"
    repeats, n = (2, 1024) if quick else (10, 8192)
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 10))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(n, 256, generator=g), torch.randint(0, 10, (n,), generator=g)
    ce = nn.CrossEntropyLoss()
    p = sum(q.numel() for q in base.parameters())
    v = torch.randn(p, generator=g)
    ref_model = base.double()
    ref_data = [(x[i : i + 512].double(), y[i : i + 512]) for i in range(0, n, 512)]
    refs = {
        name: _result(fn())
        for name, fn in _case_list(ref_model, ref_data, ce, v.double(), x[:64].double()).items()
        if name != "dense build" or p <= 70000
    }
    lines = [
        f"{torch.cuda.get_device_name()}, MLP 256-256-10 ({p} parameters), N = {n}, batches of 512",
        "",
        "| case | dtype | ms (CUDA events) | ratio to fwd+bwd | rel. error vs float64 CPU |",
        "|---|---|---|---|---|",
    ]
    for dtype in (torch.float32, torch.bfloat16):
        model = nn.Sequential(nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 10))
        model.load_state_dict(base.state_dict())
        model = model.to(device="cuda", dtype=dtype)
        data = [(x[i : i + 512].to("cuda", dtype), y[i : i + 512].cuda()) for i in range(0, n, 512)]

        def step(model=model, data=data):
            model.zero_grad()
            for xb, yb in data:
                ce(model(xb), yb).backward()

        fb = _events_time(step, repeats)
        vv = v.to("cuda", dtype)
        for name, fn in _case_list(model, data, ce, vv, x[:64].to("cuda", dtype)).items():
            if name not in refs:
                continue
            ms = _events_time(fn, repeats)
            got = _result(fn()).double().cpu()
            ref = refs[name].double()
            err = float((got - ref).norm() / ref.norm())
            lines.append(f"| {name} | {dtype} | {ms:.2f} | {ms / fb:.1f} | {err:.1e} |")
        lines.append(f"| forward+backward | {dtype} | {fb:.2f} | 1.0 | |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    text = run(args.quick)
    print(text)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "gpu.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
