"""The finite-width NTK Gram matrix and the Jacobian products, timed against their usual recipes.

Part 1, Gram matrix of N = 256 examples with C = 10 outputs ([C, N, C, N], float32), of an MLP and of a
small CNN, by

* ``GramMatrix`` (hooks backend: Kronecker-structured blocks for dense layers, per-example
  gradients for convolutions), in one pass over the loader's batches of 64 (``chunk_size=None``)
  and in chunks of 32 examples (``chunk_size=32``, recomputing per pair of chunks);
* the torch.func recipe: ``vmap(jacrev(f))`` over the examples, then one ``einsum`` of the Jacobians;
* NNGeometry's ``GramMatrix`` where it is importable (never a dependency of this project; install it in
  a scratch venv to compare).

Reported: best-of-``--repeats`` seconds after an untimed warm-up (a method whose run takes over 5 s
is timed once), peak memory of the computation and the ratios peer / ours in the same run, plus the
largest relative deviation from the recipe. Each method runs in fresh worker processes, one for the
time and one for the memory, so that its peak is its own: on the CPU the high-water mark of the
resident set (reset through ``/proc/self/clear_refs`` after the warm-up) minus the resident set at
that point, with glibc told to return large blocks to the system; on a GPU
``torch.cuda.max_memory_allocated`` minus the memory allocated before.

Part 2, one ``J @ v`` (forward mode, ``jvp``) and one ``J.T @ u`` (reverse mode, ``vjp``) of the
:class:`~nngeo_ops.nn.fspace.jacobian.Jacobian` node over the same 256 examples, against one plain
forward+backward of the model (``out.backward(u)``), as ratios.

Run: ``python benchmarks/bench_ntk.py [--quick] [--out DIR] [--repeats 3] [--device cuda]``
``[--mlp-width 128]`` (``--quick``: the MLP only, N = 64, width 64, time only, no chunked run); run it with
an interpreter where ``nngeometry`` is importable to include NNGeometry.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

# the checkout this script lives in (its nngeo_ops and the benchmarks package), first on the path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.contract import Tee, write_report  # noqa: E402
from nngeo_ops.nn.fspace.jacobian import Jacobian  # noqa: E402
from nngeo_ops.nn.fspace.ntk import GramMatrix  # noqa: E402

# examples (--quick: 64, passed to the worker processes through the environment) and outputs
N, C = int(os.environ.get("BENCH_NTK_N", "256")), 10


def mlp(width):
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, width),
        nn.ReLU(),
        nn.Linear(width, width),
        nn.ReLU(),
        nn.Linear(width, C),
    ), (N, 1, 28, 28)


def cnn(_width=None):
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, C),
    ), (N, 3, 16, 16)


# ---------------------------------------------------------------------- measuring
def _rss_kib(field):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def _reset_peak(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset the peak resident set size (VmHWM) of this process
    except OSError:
        pass
    return _rss_kib("VmRSS:") * 1024


def _peak(device, base):
    if device.type == "cuda":
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    return (_rss_kib("VmHWM:") * 1024 - base) / 2**20


def measure(fn, repeats, device, slow=5.0):
    """(best seconds, peak extra MiB, result).

    An untimed warm-up run first (lazy initialisations, code pages), then a measured run that gives
    the peak, then more timed runs up to ``repeats`` unless the measured one took over ``slow``
    seconds. The peak is only meaningful in a fresh process whose allocator returns large blocks to
    the system (see :func:`bench_gram`).
    """
    out = fn()
    del out
    base = _reset_peak(device)
    t = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    times = [time.perf_counter() - t]
    peak = _peak(device, base)
    while times[0] <= slow and len(times) < repeats:
        del out
        t = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return min(times), peak, out


# ---------------------------------------------------------------------- the peers
def torch_func_recipe(model, x):
    """The textbook torch.func NTK: per-example Jacobians by vmap(jacrev), then an einsum."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def f(p, xi):
        return functional_call(model, p, (xi[None],))[0]

    jac = vmap(jacrev(f), (None, 0))(params, x)
    jac = torch.cat([j.reshape(x.shape[0], C, -1) for j in jac.values()], dim=2)
    return torch.einsum("ncp,mdp->cndm", jac, jac)


def nngeometry_gram(model, x):
    import nngeometry
    from torch.utils.data import DataLoader, TensorDataset

    loader = DataLoader(TensorDataset(x, torch.zeros(x.shape[0])), batch_size=64)
    return nngeometry.GramMatrix(model, loader).to_torch()


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


# ---------------------------------------------------------------------- the runs
MODELS = {"mlp": mlp, "cnn": cnn}
GRAM_METHODS = {
    "ours": "nngeo_ops GramMatrix",
    "ours_chunked": "nngeo_ops GramMatrix chunk_size=32",
    "recipe": "torch.func vmap(jacrev)+einsum",
    "nngeometry": "NNGeometry GramMatrix",
}


def _setup(model_name, args, device):
    torch.manual_seed(0)
    model, shape = MODELS[model_name](args.mlp_width)
    model = model.to(device)
    x = torch.randn(shape, device=device)
    return model, x


def worker(args):
    """One Gram method on one model in this (fresh) process; prints a JSON line, saves K."""
    device = torch.device(args.device)
    model, x = _setup(args.model, args, device)
    loader = [(x[i : i + 64],) for i in range(0, N, 64)]
    fns = {
        "ours": lambda: GramMatrix(model, loader, progress=False).to_torch(),
        "ours_chunked": lambda: GramMatrix(model, loader, chunk_size=32, progress=False).to_torch(),
        "recipe": lambda: torch_func_recipe(model, x),
        "nngeometry": lambda: nngeometry_gram(model, x),
    }
    repeats = 1 if args.measure == "memory" else args.repeats
    seconds, peak, out = measure(fns[args.method], repeats, device)
    if args.measure == "time":
        torch.save(out.detach().cpu(), args.tensor_out)
    print(json.dumps({"seconds": seconds, "peak_mib": peak}))


def bench_gram(model_name, label, args, device):
    p = sum(q.numel() for q in _setup(model_name, args, device)[0].parameters())
    methods = ["ours", "recipe"] if args.quick else ["ours", "ours_chunked", "recipe"]
    if importlib.util.find_spec("nngeometry") is not None:
        methods.append("nngeometry")
    measures = ("time",) if args.quick else ("time", "memory")
    rows, results = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for m in methods:
            path = os.path.join(tmp, f"{m}.pt")
            stats = {}
            for what in measures:
                cmd = [
                    sys.executable, __file__, "--worker", "--model", model_name, "--method", m,
                    "--measure", what, "--tensor-out", path, "--repeats", str(args.repeats),
                    "--device", args.device, "--mlp-width", str(args.mlp_width),
                ]  # fmt: skip
                env = dict(os.environ)
                if what == "memory":
                    # a fixed mmap threshold makes glibc give every large block back on free, so
                    # the warm-up run's memory is not silently reused by the measured run (it
                    # also slows allocation down, hence separate timing and memory runs)
                    env["MALLOC_MMAP_THRESHOLD_"] = "131072"
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if proc.returncode != 0:
                    tail = proc.stderr.strip().splitlines()[-1:] or ["?"]
                    print(f"  {GRAM_METHODS[m]} failed: {tail[0]}")
                    break
                stats[what] = json.loads(proc.stdout.strip().splitlines()[-1])
            if len(stats) < len(measures):
                continue
            results[m] = torch.load(path)
            peak = stats["memory"]["peak_mib"] if "memory" in stats else math.nan
            rows.append((m, stats["time"]["seconds"], peak))
    ref = results.get("recipe")
    base = rows[0][1]
    print(f"\n### Gram matrix, {label} (P = {p}, N = {N}, C = {C}, float32, {device})\n")
    print("| method | seconds | peak MiB | time / ours | max rel. dev. from the recipe |")
    print("|---|---:|---:|---:|---:|")
    for m, t, mem in rows:
        err = "-" if ref is None or m == "recipe" else f"{rel_err(results[m], ref):.1e}"
        mem_s = "—" if math.isnan(mem) else f"{mem:.0f}"
        print(f"| {GRAM_METHODS[m]} | {t:.3f} | {mem_s} | {t / base:.2f} | {err} |")
    return [(f"{label}: {GRAM_METHODS[m]}", t / base) for m, t, _ in rows[1:]]


def bench_products(model_name, name, args, device):
    model, x = _setup(model_name, args, device)
    loader = [(x,)]
    J = Jacobian(model, loader, progress=False)
    v = torch.randn(J.shape[1], device=device)
    u = torch.randn(J.shape[0], device=device)
    u_out = u.view(C, N).T.contiguous()

    def fwd_bwd():
        model.zero_grad()
        out = model(x)
        out.backward(u_out)
        return out

    t0, _, _ = measure(fwd_bwd, args.repeats, device)
    tj, _, jv = measure(lambda: J @ v, args.repeats, device)
    tv, _, jtu = measure(lambda: J.T @ u, args.repeats, device)
    # adjointness as a correctness check of the pair
    gap = abs(float(u @ jv) - float(v @ jtu)) / max(abs(float(u @ jv)), 1e-12)
    print(f"\n### Jacobian products, {name} (N = {N}, C = {C}, float32, {device})\n")
    print("| product | seconds | time / (forward+backward) |")
    print("|---|---:|---:|")
    print(f"| forward+backward (reference) | {t0:.4f} | 1.00 |")
    print(f"| J @ v (jvp) | {tj:.4f} | {tj / t0:.2f} |")
    print(f"| J.T @ u (vjp) | {tv:.4f} | {tv / t0:.2f} |")
    print(f"\n(adjointness |uᵀ(Jv) − vᵀ(Jᵀu)| / |uᵀJv| = {gap:.1e})")
    return [(f"{name}: J @ v / fwd+bwd", tj / t0), (f"{name}: J.T @ u / fwd+bwd", tv / t0)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--mlp-width", type=int, default=128, help="hidden width of the MLP")
    parser.add_argument("--only", choices=["gram", "products"], default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", choices=list(MODELS), help=argparse.SUPPRESS)
    parser.add_argument("--method", choices=list(GRAM_METHODS), help=argparse.SUPPRESS)
    parser.add_argument("--tensor-out", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help="write bench_ntk.md and bench_ntk.png here")
    parser.add_argument("--measure", choices=["time", "memory"], help=argparse.SUPPRESS)
    parser.add_argument(
        "--quick", action="store_true", help="MLP only, N = 64, width 64, time only, no chunked run"
    )
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    out = args.out
    if args.quick:
        global N
        N = 64
        os.environ["BENCH_NTK_N"] = str(N)
        args.repeats = min(args.repeats, 2)
        args.mlp_width = min(args.mlp_width, 64)
    with Tee() as tee:
        bars = run(args)
    if out:
        write_report(out, "bench_ntk", tee.text)
        from benchmarks.report import bar_chart

        bar_chart(
            Path(out) / "bench_ntk.png",
            [label for label, _ in bars],
            [(r, r, r) for _, r in bars],
            "NTK: peer / ours (Gram matrix), product / forward+backward",
            "ratio",
            (1.0,),
            lower_is_better=False,
        )


def run(args):
    """Both parts (printing as they go); returns (label, ratio) pairs for the chart."""
    device = torch.device(args.device)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}, "
        f"{os.cpu_count()} CPUs"
    )
    labels = {
        "mlp": f"MLP 784-{args.mlp_width}-{args.mlp_width}-{C}",
        "cnn": "CNN conv16-conv32-fc",
    }
    if args.quick:  # the contract's ~20 s: each method is a fresh process (~3 s of imports)
        labels.pop("cnn")
    bars = []
    for name, label in labels.items():
        if args.only in (None, "gram"):
            bars += bench_gram(name, label, args, device)
        if args.only in (None, "products"):
            bars += bench_products(name, label, args, device)
    return bars


if __name__ == "__main__":
    main()
