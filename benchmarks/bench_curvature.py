"""Curvature representations of nngeo_ops against its peers, as paired ratios (benchmarks/harness.py).

For the Fisher of ``classif_logits`` (= the GGN of ``CrossEntropyLoss(reduction="mean")``, the
same matrix in every library) of three models (benchmarks/models.py: an MLP, a small CNN, a small
transformer block), float32, one batch, each representation is timed for

* ``build``: constructing it from the batch (what the library does at construction; curvlinops
  builds lazily, so its factors are forced);
* ``mv``: one matrix-vector product (implicit GGN: one Jᵀ H J v over the batch; ``mv1``: the first
  product of the cached implicit GGN, which linearises the batch);
* ``solve``: ``(F + λI)⁻¹ v`` with λ = 1e-3 once the factorisation is cached; ``solve1`` the first
  damped solve of a freshly built representation (factorisation included; the build is not timed),

each as a ratio to one plain forward+backward of the same model on the same batch, timed against
its own adjacent forward+backward in a fresh worker process per library and case, over alternating
rounds; the report gives the median of the per-round ratios ours / peer and their IQR (see
benchmarks/harness.py). Peers (NNGeometry 0.4, curvlinops, BackPACK, ASDL) run in the interpreter
given by ``--python-peers`` (default /work/venv-peers/bin/python when it exists) where they import,
and are skipped with a note otherwise; none is a dependency.

Run: ``python benchmarks/bench_curvature.py [--quick] [--out DIR] [--rounds 7] [--threads 1]``
``[--only mlp cnn transformer] [--reps kfac ...] [--no-peers] [--python-peers PATH]``
``[--call-cap 10] [--repeat K] [--from-json A.json B.json ...] [--clock auto|wall|cpu]``
``[--update-readme] [--allow-load]``. ``--update-readme`` rewrites the table in
benchmarks/README.md; it refuses when other processes used more than 5 % of the CPU during the run,
unless ``--allow-load`` is given, and then marks the table exploratory. A call over ``--call-cap``
seconds of CPU (the CNN's block-diagonal: builds of 20-30 s, solves of 64-100 s) is measured once
(‡, benchmarks/harness.py); ``--repeat K`` runs the list of cases K times and combines the runs of
each case, as ``--from-json`` does for saved runs that measured the same cases (cases measured in
one run only are shown as they are), benchmarks/report.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch import nn

from benchmarks import harness as H
from benchmarks import report as R
from benchmarks.curvature_libs import (  # noqa: F401  (names other modules import from here)
    ASDL,
    BP,
    CL,
    DAMPING,
    LIBS,
    NNG,
    OneBatch,
    _version,
    asdl_fisher,
    asdl_module,
)
from benchmarks.models import TITLES, batch

NAME = "bench_curvature"
REPS = [
    "diag",
    "diag (MC)",
    "kfac",
    "kfac (MC)",
    "ekfac (eigh only)",
    "ekfac (refit)",
    "implicit GGN",
    "implicit GGN (cache)",
    "block-diag",
]
# the peers that compute the same matrix (label -> module that must import)
MODULES = {NNG: "nngeometry", CL: "curvlinops", BP: "backpack", ASDL: "asdl"}
PEERS = {
    "diag": [NNG, BP, ASDL],
    "diag (MC)": [NNG, BP, ASDL],
    "kfac": [NNG, CL, BP, ASDL],
    "kfac (MC)": [NNG, CL, BP, ASDL],
    "ekfac (eigh only)": [NNG],
    "ekfac (refit)": [CL],
    "implicit GGN": [NNG, CL, BP],
    "implicit GGN (cache)": [CL, BP],
    "block-diag": [NNG, ASDL],
}
# the MLP's first layer alone has a 200 960² block (160 GB)
SKIP = {("mlp", "block-diag")}
QUANTITIES = ["build", "mv1", "mv", "solve", "solve1"]


# ---------------------------------------------------------------------- the worker side
def setup(case_id: str, lib: str, device: torch.device) -> H.Case:
    """The :class:`~benchmarks.harness.Case` ``"<model>/<rep>"`` of library ``lib`` (in a worker)."""
    warnings.filterwarnings("ignore")
    model_name, rep = case_id.split("/", 1)
    model, x, y = batch(model_name, device)
    loss_fn = nn.CrossEntropyLoss()

    def fwd_bwd():
        model.zero_grad()
        loss_fn(model(x), y).backward()

    # torch imports modules lazily at the first autograd.grad with grad_outputs and at the first
    # dual number: pay that before the warm-up, for every library alike
    w = torch.ones(3, requires_grad=True)
    torch.autograd.grad(w * 2, w, torch.ones(3))
    with torch.autograd.forward_ad.dual_level():
        torch.autograd.forward_ad.make_dual(torch.ones(1), torch.ones(1))

    table = LIBS[lib](model, x, y)
    if rep not in table:
        raise LookupError(f"{lib} has no {rep!r}")
    build, mv, solve, note = table[rep]
    torch.manual_seed(1)
    v = torch.randn(sum(p.numel() for p in model.parameters()), device=device)
    # "F0": the operator the products and cached solves use (the first build's); "fresh": F0 has
    # not been used yet; "error": the build's failure, reported once (under "build": the
    # quantities that need it are dropped)
    built = {}

    def build_once():
        if "error" in built:
            raise H.SameFailure(built["error"])
        try:
            return build()
        except Exception as e:
            built["error"] = f"{type(e).__name__}: {e}"
            raise

    def run_build(_):
        F = build_once()
        if "F0" not in built:
            built["F0"], built["fresh"] = F, True

    def f0():
        built.pop("fresh", None)  # used: no longer a fresh operator for a first solve
        if "F0" not in built:
            built["F0"] = build_once()
        return built["F0"]

    def fresh():
        """A freshly built operator for a first solve: F0 if nothing has used it yet (the warm-up
        runs solve1 right after build: it spares a build of up to half a minute on the CNN's
        block-diagonal, and that first solve factorises F0 for the cached solves), else a new one.
        """
        if built.pop("fresh", False):
            return built["F0"]
        return build_once()

    # warm-up order (the quantities' order): build, solve1 (on the untouched F0), products, solve
    q = {"build": H.Workload(run=run_build)}
    comparable = not note.startswith("solve: π-damped")
    if solve is not None:
        q["solve1"] = H.Workload(prepare=fresh, run=lambda F: solve(F, v), comparable=comparable)
    # init: the operator, and one call that fills whatever the library caches in it (ours and
    # curvlinops factorise at the first solve), so that the warm-up call after it is a cached
    # call. NNGeometry keeps nothing between calls (its solves run torch.linalg.solve or invert
    # the factors on every call, nngeometry/object/pspace.py): its init builds the operator only,
    # which spares a block-diagonal solve of minutes.
    stateless = lib == NNG

    def init(fn):
        return (lambda: f0()) if stateless else (lambda: fn(f0(), v))

    if mv is not None:
        if rep == "implicit GGN (cache)":
            q["mv1"] = H.Workload(prepare=build_once, run=lambda F: mv(F, v), note="first product")
        q["mv"] = H.Workload(run=lambda _: mv(f0(), v), init=init(mv))
    if solve is not None:
        q["solve"] = H.Workload(
            run=lambda _: solve(f0(), v), init=init(solve), comparable=comparable
        )
    return H.Case(reference=fwd_bwd, quantities=q, note=note, version=_version(lib))


# ---------------------------------------------------------------------- the coordinator side
def specs(models, reps, peers: bool) -> list[H.CaseSpec]:
    out = []
    for m in models:
        for rep in reps:
            if (m, rep) in SKIP:
                continue
            ps = {p: MODULES[p] for p in PEERS[rep]} if peers else {}
            out.append(H.CaseSpec(f"{m}/{rep}", f"{TITLES[m]}: {rep}", ps))
    return out


def verdict(stats: R.Combined, ours_fb: float, peer_fb: float) -> str:
    """target (median ≤ 0.8, upper quartile < 1 in every run), lead, tie, peer wins
    (benchmarks/report.py: judge); negligible when both take under 0.1 forward+backward."""
    if max(ours_fb, peer_fb) < 0.1:
        return "negligible"
    v = R.judge(stats)
    return "**target**" if v == "target" else v


# Peers' results that are another matrix than ours on that model, checked against torch.func by
# benchmarks/peer_matrices.py: ASDL flattens the tokens of a sequence Linear into the batch, so its
# "diagonal Fisher" squares each token's gradient (Σ_t g_t² a_t², 32 % off the exact diagonal of the
# transformer block, whose per-example gradient sums the tokens before squaring), and the traces of
# its Kronecker blocks of the sequence layers are 9-16x ours (8-15x the exact Fisher's).
NOT_SAME_MATRIX = {
    ("transformer", "diag", ASDL): "per-token squares Σ_t g_t² a_t², not the exact diagonal",
    ("transformer", "diag (MC)", ASDL): "per-token squares Σ_t g_t² a_t², not the exact diagonal",
    # its Linear operation flattens the tokens into the batch for every Fisher shape
    # (asdl/operations/linear.py, preprocess_in_data): the blocks are sums over tokens, not examples
    ("transformer", "block-diag", ASDL): "tokens as examples (the flattening of its diagonal)",
    ("transformer", "kfac", ASDL): "tokens as examples with another scaling: traces 9-16x ours",
    (
        "transformer",
        "kfac (MC)",
        ASDL,
    ): "tokens as examples with another scaling: traces 9-16x ours",
}


def rows(results: list[H.CaseResult], clock: str = "wall"):
    """(model, rep, q, ours, runs, best peer, {peer: (ours / peer, peer's, comparable, other)}).

    ``runs``: the results of the case (one per run, ``benchmarks/report.py: group_runs``); ours,
    peer's and ours / peer are :class:`~benchmarks.report.Combined` over those runs on ``clock``;
    ``other`` is the median of the run medians of ours / peer on the other clock.
    """
    other_clock = "cpu" if clock == "wall" else "wall"
    out = []
    for runs in R.group_runs(results):
        model, rep = runs[0].spec.case_id.split("/", 1)
        libs = list(dict.fromkeys(lib for r in runs for lib in r.libs))
        for q in QUANTITIES:
            ours_c = R.combine(
                [r.ratios(H.OURS, q, clock) for r in runs], [r.few(H.OURS, q) for r in runs]
            )
            if ours_c is None:
                continue
            paired = {}
            for lib in libs[1:]:
                rs = [r for r in runs if lib in r.libs]
                few = [r.few(H.OURS, q) or r.few(lib, q) for r in rs]
                pr = R.combine([r.paired(lib, q, clock) for r in rs], few)
                if pr is None:
                    continue
                comparable = all(r.info.get(lib, {}).get(q, {}).get("comparable", True) for r in rs)
                # an implicit operator's "build" is lazy everywhere (a peer's may be no call)
                comparable = comparable and not (rep.startswith("implicit") and q == "build")
                comparable = comparable and (model, rep, lib) not in NOT_SAME_MATRIX
                po = R.combine([r.paired(lib, q, other_clock) for r in rs], few)
                other = po.median if po else float("nan")
                peer_c = R.combine(
                    [r.ratios(lib, q, clock) for r in rs], [r.few(lib, q) for r in rs]
                )
                paired[lib] = (pr, peer_c, comparable, other)
            best = min(
                (lib for lib in paired if paired[lib][2]),
                key=lambda lib: paired[lib][1].median,
                default=None,
            )
            out.append((model, rep, q, ours_c, runs, best, paired))
    return out


def _mib(runs: list[H.CaseResult], lib: str, q: str) -> str:
    """The largest peak of the runs (benchmarks/report.py); † where one was taken in the timing
    worker (a quantity that would cost minutes again in a fresh one)."""
    ms = [r.memory.get(lib, {}).get(q) for r in runs]
    ms = [m for m in ms if m is not None]
    if not ms:
        return "—"
    timing = any(r.memory_from_timing(lib, q) for r in runs)
    return f"{max(ms):.0f}" + (" †" if timing else "")


def _fb(c: R.Combined) -> str:
    return f"{c.median:.2f}" + (f" {R.FEW}" if c.few else "")


def render(
    results: list[H.CaseResult],
    info: dict,
    load: float | None,
    exploratory: str | None,
    clock: str = "wall",
    runs_line: str = "",
) -> str:
    """The markdown report: header (date, commit, machine, load, runs), the table, notes."""
    lines = []
    if exploratory:
        reason = exploratory.split("; rerun")[0]
        lines += [f"**EXPLORATORY — not a committed measurement: {reason}.**", ""]
    share = "?" if load is None else f"{100 * load:.0f}%"
    per_case = [r.load for r in results if r.load is not None]
    lines.append(
        f"Started {info['date']}, commit `{info['commit']}`, {info['machine']}, torch {info['torch']}, "
        f"Python {info['python']}, {info['threads']} thread(s) per worker, {info['device']}, "
        f"{info['rounds']} rounds"
        + (
            f" (a call over {info['call_cap']} s of CPU: that one call, {R.FEW})"
            if "call_cap" in info
            else ""
        )
        + f". CPU share used by other processes during the run: **{share}** (per case "
        + (f"{100 * min(per_case):.0f}–{100 * max(per_case):.0f}%" if per_case else "?")
        + ")."
    )
    versions = sorted({f"{lib} {v}" for r in results for lib, v in r.versions.items() if v})
    if versions:
        lines.append("Peers: " + ", ".join(versions) + ".")
    if runs_line:
        lines.append(runs_line)
    lines.append("")
    name = "CPU time of the worker process" if clock == "cpu" else "wall-clock time"
    other = "CPU-time" if clock == "wall" else "wall-clock"
    lines.append(
        f"Clock: **{name}**. Ratios to one forward+backward (median over rounds [interquartile "
        "range]); **ours / peer**: median of the per-round paired ratios [IQR]; *best peer*: the "
        f"fastest peer computing the same matrix; *{other}*: the paired median on the other "
        "clock; peak MiB: extra resident memory of one call; (≠): not comparable (another "
        "matrix, or a lazy constructor). Verdict: **target** = median ≤ 0.8 "
        "and upper quartile < 1; lead = upper quartile < 1; peer wins = lower quartile > 1. "
        f"{R.FEW} *few calls*: a call over the cap, measured once against its own adjacent "
        f"forward+backward, no IQR (its verdict takes ×/÷ {R.FEW_BAND:g} for one); † peak on "
        "the timed call in the timing worker. A row measured in K > 1 runs: median of the run medians "
        "[pooled IQR] (K runs min–max of the run medians), the largest peak, and a verdict that "
        "every run's own IQR must satisfy (benchmarks/report.py)."
    )
    lines.append("")
    head = (
        "| model | representation | quantity | ours ×fb | best peer | peer ×fb | ours / peer "
        f"| {other} | verdict | peak MiB ours / peer | other peers (×fb → ours / peer) |"
    )
    lines += [head, "|---|---|---|---:|---|---:|---:|---:|---|---:|---|"]
    for model, rep, q, ours_c, runs, best, paired in rows(results, clock):
        if best is None:
            bcells = ["—", "—", "—", "—", "no peer", f"{_mib(runs, H.OURS, q)} / —"]
        else:
            pst, lst, _, oth = paired[best]
            bcells = [
                best,
                _fb(lst),
                R.fmt_combined(pst),
                f"{oth:.2f}",
                verdict(pst, ours_c.median, lst.median),
                f"{_mib(runs, H.OURS, q)} / {_mib(runs, best, q)}",
            ]
        others = "; ".join(
            f"{lib}{'' if c else ' (≠)'} {_fb(lst)}× → {_fb(pst)}"
            for lib, (pst, lst, c, _) in paired.items()
            if lib != best
        )
        cells = [model, rep, q, R.fmt_combined(ours_c)]
        lines.append("| " + " | ".join(cells + bcells + [others or ""]) + " |")
    notes = sorted(
        {
            f"{r.spec.case_id} · {k}: {v}"
            for r in results
            for k, v in r.notes.items()
            if "not installed" not in v
        }
        | {
            f"{m}/{rep} · {lib}: another matrix (≠): {why}"
            for (m, rep, lib), why in NOT_SAME_MATRIX.items()
            if any(r.spec.case_id == f"{m}/{rep}" and lib in r.libs for r in results)
        }
    )
    if notes:
        lines += ["", "Notes and failures:", ""] + [f"- {n}" for n in notes]
    missing = sorted({k for r in results for k, v in r.notes.items() if "not installed" in v})
    if missing:
        lines += ["", "Skipped (not installed): " + ", ".join(missing) + "."]
    return "\n".join(lines)


def chart(results, path, clock: str = "wall") -> bool:
    labels, stats = [], []
    for model, rep, q, ours_c, _, best, paired in rows(results, clock):
        if best is None:
            continue
        if verdict(paired[best][0], ours_c.median, paired[best][1].median) != "negligible":
            few = f" {R.FEW}" if paired[best][0].few else ""
            labels.append(f"{model} {rep} {q} vs {best}{few}")
            stats.append(paired[best][0].whiskers())
    if labels:
        title = f"curvature: ours / fastest peer (same matrix), {clock} clock"
        return R.bar_chart(path, labels, stats, title)
    # no peer ran (none installed, or --no-peers): our ratios to one forward+backward instead
    for model, rep, q, ours_c, *_ in rows(results, clock):
        labels.append(f"{model} {rep} {q}" + (f" {R.FEW}" if ours_c.few else ""))
        stats.append(ours_c.whiskers())
    if not labels:
        return False
    title = f"curvature: nngeo_ops alone, × one forward+backward ({clock} clock)"
    return R.bar_chart(path, labels, stats, title, "× forward+backward (median, IQR)", (1.0,))


def runs_line(results: list[H.CaseResult], infos: list[dict]) -> str:
    """The header's line on combined runs ("" when every case was measured once in one run)."""
    groups = R.group_runs(results)
    k = max((len(g) for g in groups), default=1)
    sources = list(dict.fromkeys(f"{i['date']} `{i['commit']}`" for i in infos))
    if k == 1:
        return "" if len(sources) < 2 else "Runs rendered together: " + ", ".join(sources) + "."
    counts = sorted({len(g) for g in groups})
    many = f"{counts[0]}–{counts[-1]}" if len(counts) > 1 else f"{k}"
    commits = {i["commit"] for i in infos}
    differ = " **The runs measured different commits.**" if len(commits) > 1 else ""
    return (
        f"Each case combined over {many} runs (median of the run medians, "
        f"benchmarks/report.py), from: {', '.join(sources)}.{differ}"
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="MLP, KFAC and implicit GGN, 3 rounds")
    p.add_argument("--out", default=None, help="write bench_curvature.md/.json/.png here")
    p.add_argument("--rounds", type=int, default=None, help="rounds per case (default 7)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--only", nargs="*", choices=list(TITLES), default=None)
    p.add_argument("--reps", nargs="*", choices=REPS, default=None)
    p.add_argument("--no-peers", action="store_true")
    p.add_argument("--python-peers", default=H.DEFAULT_PEERS_PYTHON)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--max-load", type=float, default=0.05, help="refuse above this load share")
    p.add_argument("--update-readme", action="store_true", help="rewrite the README table")
    p.add_argument("--allow-load", action="store_true", help="write it anyway, as exploratory")
    p.add_argument(
        "--from-json",
        nargs="*",
        default=None,
        help="render saved runs (bench_curvature.json files) instead of measuring; a case found "
        "in several is combined over its runs (benchmarks/report.py)",
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run the list of cases this many times, one pass after the other, and combine the "
        "runs of each case (benchmarks/report.py)",
    )
    p.add_argument(
        "--call-cap",
        type=float,
        default=H.HarnessConfig.call_cap_s,
        help="seconds (CPU) of a warm-up call above which that call is the quantity's one "
        "measurement (few calls, marked ‡)",
    )
    p.add_argument(
        "--clock",
        choices=["auto", "wall", "cpu"],
        default="auto",
        help="ratios of wall or CPU time (auto: wall unless the load was above --max-load)",
    )
    args = p.parse_args(argv)
    quick = args.quick
    cfg = H.HarnessConfig(
        rounds=args.rounds or (3 if quick else 7),
        threads=args.threads,
        budget_s=0.05 if quick else 0.1,
        max_pairs=3,
        python_peers=args.python_peers,
        peers=not args.no_peers,
        device=args.device,
        max_load=args.max_load,
        call_cap_s=args.call_cap,
    )
    models = args.only or (["mlp"] if quick else list(TITLES))
    reps = args.reps or (["kfac", "implicit GGN"] if quick else REPS)
    if args.from_json:
        saved = [json.loads(Path(f).read_text()) for f in args.from_json]
        info = saved[0]["info"]
        infos = [i for d in saved for i in d.get("infos", [d["info"]])]
        results = [H.CaseResult.from_json(c) for d in saved for c in d["cases"]]
    else:
        sp = specs(models, reps, cfg.peers)
        info = R.machine_info(cfg)
        info["repeat"] = str(args.repeat)
        infos = [info]
        print(
            f"# curvature benchmark ({len(sp)} cases × {args.repeat} runs, {cfg.rounds} rounds)",
            file=sys.stderr,
        )

        def save(done):  # a long run is saved case by case
            if args.out:
                Path(args.out).mkdir(parents=True, exist_ok=True)
                doc = {"info": info, "cases": [r.to_json() for r in done]}
                (Path(args.out) / f"{NAME}.json").write_text(json.dumps(doc))

        results = H.run_suite("benchmarks.bench_curvature", sp, cfg,
                              log=lambda s: print(s, file=sys.stderr), on_case=save,
                              repeat=args.repeat)  # fmt: skip
    load = H.overall_load(results)
    refusal = H.check_load(load, cfg, args.allow_load)
    clock = args.clock
    if clock == "auto":
        clock = "wall" if load is not None and load <= cfg.max_load else "cpu"
    text = render(results, info, load, refusal, clock, runs_line(results, infos))
    total = sum(r.seconds for r in results)
    text += f"\n\n(measuring took {total / 60:.0f} min)\n"
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{NAME}.md").write_text(text)
        (out / f"{NAME}.json").write_text(
            json.dumps(
                {
                    "info": info,
                    "infos": infos,
                    "load": load,
                    "cases": [r.to_json() for r in results],
                }
            )
        )
        chart(results, out / f"{NAME}.png", clock)
    if args.update_readme:
        if refusal and not args.allow_load:
            print(f"README not updated: {refusal}", file=sys.stderr)
            return 3
        R.replace_section(Path(__file__).with_name("README.md"), "curvature", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
